"""Errors of the inference service, translated to gRPC codes in one place.

InferenceError
 ├ InvalidInput        -> INVALID_ARGUMENT   (bad header, chunk order, sizes)
 ├ UnsupportedTask     -> FAILED_PRECONDITION (model cannot do task / modality)
 ├ UnknownModel        -> NOT_FOUND
 ├ QueueFull           -> RESOURCE_EXHAUSTED
 ├ BackendUnavailable  -> UNAVAILABLE        (loading, stopping)
 ├ Cancelled           -> CANCELLED          (the caller withdrew the request)
 ├ DeadlineExceeded    -> DEADLINE_EXCEEDED  (the request's deadline passed while it ran)
 └ CheckpointError     -> raised at start-up; names the missing/bad file
"""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """Base of every error a peer or an operator must see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"


class InvalidInput(InferenceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_INPUT"


class UnsupportedTask(InferenceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UNSUPPORTED_TASK"


class UnknownModel(InferenceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "UNKNOWN_MODEL"


class QueueFull(InferenceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"


class BackendUnavailable(InferenceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"


class Cancelled(InferenceError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class DeadlineExceeded(InferenceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class CheckpointError(InferenceError):
    """A checkpoint directory is missing or malformed (raised at start-up)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CHECKPOINT_INVALID"


def to_grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (code, message); unknown errors become INTERNAL."""
    if isinstance(exc, InferenceError):
        return exc.code, f"{exc.reason}: {exc}"
    return grpc.StatusCode.INTERNAL, "INTERNAL: unexpected error in the inference service"
