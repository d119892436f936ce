"""Domain errors (each maps to one gRPC status code; messages name the field at fault) and `one_line`, which shows
any exception on one line for logs and error messages."""

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


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """An exception as one line for logs and error messages, whitespace collapsed.

    When the exception wraps a database driver's error (SQLAlchemy keeps it in `orig`), the driver's own message is
    used: it says what failed (locked, read-only, connection refused) without the SQL statement and its parameters.
    With `with_type` the message is prefixed with the exception's type name; an empty message gives the type name.
    """
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    name = type(inner).__name__
    text = " ".join(str(inner).split())
    if not text:
        return name
    return f"{name}: {text}" if with_type else text
