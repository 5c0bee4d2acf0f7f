"""Errors of the DICOM node, and their translation to DIMSE statuses (only here).

RadBridgeError
 ├ InvalidInstance       C-STORE 0xC000 (0xC210 when it cannot be decoded)
 ├ SopClassNotSupported  C-STORE 0x0122
 ├ StorageError          C-STORE 0xA700 (write/fsync/rename failed; never 0x0000)
 ├ VolumeError           job FAILED with the reason (series cannot form a volume)
 ├ InferenceUnavailable  job retried with backoff (service down, deadline)
 ├ InferenceRejected     job FAILED (the service refused the request)
 └ ExportError           job retried with backoff, then DEAD_LETTER
"""

from __future__ import annotations

from pydicom.dataset import Dataset


class RadBridgeError(Exception):
    """Base of every error a peer or an operator must see."""

    retryable: bool = False


class InvalidInstance(RadBridgeError):
    status = 0xC000


class UndecodableInstance(InvalidInstance):
    status = 0xC210


class SopClassNotSupported(RadBridgeError):
    status = 0x0122


class StorageError(RadBridgeError):
    status = 0xA700
    retryable = True


class VolumeError(RadBridgeError):
    """The instances of a series cannot form a volume."""


class InferenceUnavailable(RadBridgeError):
    retryable = True


class InferenceRejected(RadBridgeError):
    """The inference service refused the request (bad input, unsupported task)."""


class ExportError(RadBridgeError):
    retryable = True


#: DIMSE status for unexpected errors in a C-STORE handler (processing failure).
PROCESSING_FAILURE = 0x0110


def to_dimse_status(exc: BaseException) -> Dataset:
    """A C-STORE response status dataset with an Error Comment (no PHI; <= 64 chars)."""
    status = Dataset()
    status.Status = getattr(exc, "status", PROCESSING_FAILURE) if isinstance(exc, RadBridgeError) else 0xA700
    comment = str(exc) if isinstance(exc, RadBridgeError) else "Out of resources: could not store"
    status.ErrorComment = comment[:64]
    return status
