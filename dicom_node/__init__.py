"""RadBridge DICOM node: receives studies, routes series to models, returns SR + SEG.

DICOM stays here: the inference service sees only arrays, geometry and text.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
