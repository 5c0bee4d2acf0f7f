"""RadBridge inference service: runs models on volumes received over gRPC.

It sees arrays, geometry and text only; it never builds or parses DICOM.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
