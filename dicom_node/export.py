"""Exporters: send produced objects to their destinations (C-STORE SCU here).

Exporters are registered by target type, as in mercure; STOW-RS will join
"dicom" under its own key. Any failure raises ExportError, which the worker
retries with backoff and finally parks in DEAD_LETTER.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.config import ExportTarget
from dicom_node.errors import ExportError

logger = logging.getLogger(__name__)
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
Exporter = Callable[[Sequence[Path], ExportTarget, str], None]


def send_cstore(paths: Sequence[Path], target: ExportTarget, calling_ae: str) -> None:
    """One association, one C-STORE per file; any non-success status is an ExportError."""
    ae = AE(ae_title=target.calling_ae_title or calling_ae)
    contexts: set[tuple[str, str]] = set()
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        contexts.add((str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    for sop_class in sorted({c for c, _ in contexts}):
        syntaxes = sorted(
            {ts for c, ts in contexts if c == sop_class} | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        )
        ae.add_requested_context(sop_class, syntaxes)
    try:
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    except Exception as exc:
        raise ExportError(f"Cannot connect to {target.ae_title}@{target.host}:{target.port}: {exc}") from exc
    if not assoc.is_established:
        raise ExportError(
            f"Association with {target.ae_title}@{target.host}:{target.port} was not established."
        )
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code not in SUCCESS_STATUSES:
                comment = status.get("ErrorComment", "") if status else "no response"
                raise ExportError(f"C-STORE to {target.ae_title} failed: status {code!r} {comment}".strip())
    finally:
        if assoc.is_established:
            assoc.release()


EXPORTERS: dict[str, Exporter] = {"dicom": send_cstore}


def export(paths: Sequence[Path], target: ExportTarget, calling_ae: str) -> None:
    try:
        exporter = EXPORTERS[target.type]
    except KeyError as exc:
        raise ExportError(f"No exporter for target type {target.type!r}.") from exc
    exporter(paths, target, calling_ae)
