"""Makes the Slicer extension's pure-Python package `RadBridgeLib` importable in tests."""

from __future__ import annotations

import sys
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parents[3] / "slicer_extension" / "RadBridge"
if str(EXTENSION_DIR) not in sys.path:
    sys.path.insert(0, str(EXTENSION_DIR))
