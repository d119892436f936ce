"""Domain errors. Each maps to one gRPC status code in the servicers; messages name the field."""

from __future__ import annotations


class MlsignalError(Exception):
    """Base class; `field` names the request field at fault, when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidArgument(MlsignalError):
    """A malformed request (INVALID_ARGUMENT)."""


class NotFound(MlsignalError):
    """No such model, job or symbol (NOT_FOUND)."""


class FailedPrecondition(MlsignalError):
    """The request is well-formed but the stored state cannot satisfy it (FAILED_PRECONDITION)."""


class ResourceExhausted(MlsignalError):
    """A queue or size limit is full (RESOURCE_EXHAUSTED)."""


class Unavailable(MlsignalError):
    """A dependency such as the database cannot be reached (UNAVAILABLE)."""


class DataLoss(MlsignalError):
    """A stored artifact is corrupt or does not match its recorded checksum (DATA_LOSS)."""
