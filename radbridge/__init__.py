"""RadBridge: a bridge between hospital imaging systems and medical VLMs.

This package holds the ``radbridge`` command line and the settings loader
shared by ``dicom_node`` and ``inference_service``.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
