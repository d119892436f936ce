"""Typed exceptions for failed calls, one class per gRPC status a caller may want to handle differently.

A strategy engine usually treats "no model yet" (NotFoundError) and "service down" (UnavailableError) differently
from a malformed request, so each status code it can act on has its own class; all share `MlsignalClientError`.
"""

from __future__ import annotations

from typing import Any

import grpc

from mlsignal.client.jobs import job_state_name
from mlsignal.v1 import training_pb2

__all__ = [
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "MlsignalClientError",
    "NotFoundError",
    "ProtocolError",
    "ResourceExhaustedError",
    "TrainingFailedError",
    "UnauthenticatedError",
    "UnavailableError",
    "called_service",
    "error_from_rpc",
    "error_from_status",
    "is_method_not_found",
    "wrong_service_note",
]


class MlsignalClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode (None when the failure is not a gRPC status), `details` the message.

    Example::

        >>> try:                                                            # doctest: +SKIP
        ...     out = client.predict(df, "BTC/USDT", "1h")
        ... except NotFoundError:
        ...     out = None          # no model yet: trade without the ML filter
        ... except MlsignalClientError as exc:
        ...     log.error("mlsignal failed: %s (%s)", exc.details, exc.code)
    """

    def __init__(self, code: grpc.StatusCode | None, details: str, note: str = ""):
        self.code = code
        self.details = details
        self.note = note
        self.field = ""  # the request field at fault, when the server named one
        super().__init__(self._text())

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions cross process boundaries (multiprocessing, Dask) by pickling; keep every field.
        return (self.__class__, (self.code, self.details, self.note))

    def _text(self) -> str:
        head = f"{self.code.name}: {self.details}" if self.code is not None else self.details
        return f"{head} ({self.note})" if self.note else head


class InvalidArgumentError(MlsignalClientError):
    """INVALID_ARGUMENT: the request is malformed; `details` names the field and what was expected."""


class NotFoundError(MlsignalClientError):
    """NOT_FOUND: no model for the symbol and timeframe, or an unknown job or model id."""


class FailedPreconditionError(MlsignalClientError):
    """FAILED_PRECONDITION: e.g. no candles stored for the range, or the job already finished."""


class ResourceExhaustedError(MlsignalClientError):
    """RESOURCE_EXHAUSTED: the training queue is full, or a message is too large; retry later or send less."""


class UnavailableError(MlsignalClientError):
    """UNAVAILABLE: the service (or its database) cannot be reached; usually worth a retry with back-off."""


class UnauthenticatedError(MlsignalClientError):
    """UNAUTHENTICATED: the bearer token is missing or was refused."""


class DeadlineExceededError(MlsignalClientError):
    """DEADLINE_EXCEEDED: the call took longer than the client's `timeout`."""


class DataLossError(MlsignalClientError):
    """DATA_LOSS: stored data is damaged, e.g. a model artifact whose sha256 does not verify."""


class ProtocolError(MlsignalClientError):
    """The server answered something that breaks the contract (wrong count, order or model); `code` is None.

    Raised instead of returning misaligned probabilities, which would look plausible and be wrong.
    """


class TrainingFailedError(MlsignalClientError):
    """A training job ended FAILED or CANCELLED; `job` is the final TrainingJob message and `details` its error.

    Example::

        >>> try:                                                            # doctest: +SKIP
        ...     job = training.train("BTC/USDT", "1h").wait()
        ... except TrainingFailedError as exc:
        ...     print(job_state_name(exc.job.state), exc.job.error)
    """

    def __init__(self, job: training_pb2.TrainingJob):
        self.job = job
        state = job_state_name(job.state)
        super().__init__(None, job.error or f"job {job.job_id} ended {state}", note=f"job {job.job_id} {state}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.job,))


_ERROR_CLASSES: dict[grpc.StatusCode, type[MlsignalClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def error_from_rpc(err: grpc.RpcError, note: str = "") -> MlsignalClientError:
    """The typed exception for a grpc.RpcError (MlsignalClientError itself for codes without a subclass).

    Tolerates RpcErrors that carry no status (raised by some interceptors), which become UNKNOWN.

    Example::

        >>> try:                                                            # doctest: +SKIP
        ...     stub.GetModel(request)
        ... except grpc.RpcError as rpc_error:
        ...     raise error_from_rpc(rpc_error) from rpc_error
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _ERROR_CLASSES.get(code, MlsignalClientError)
    if code == grpc.StatusCode.UNIMPLEMENTED and _not_found_details(details or "") and "listens on" not in note:
        note = f"{note}; {WHERE_SERVICES}" if note else WHERE_SERVICES
    return cls(code, details or str(err) or code.name, note=note)


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(status: Any, note: str = "") -> MlsignalClientError:
    """The typed exception for a `google.rpc.Status` (a StreamPredict answer's `error`), with the field that was
    wrong in `field` when the status carries a BadRequest field violation."""
    from google.rpc import error_details_pb2

    code = _CODE_BY_NUMBER.get(int(status.code), grpc.StatusCode.UNKNOWN)
    cls = _ERROR_CLASSES.get(code, MlsignalClientError)
    exc = cls(code, status.message or code.name, note=note)
    exc.field = ""
    for detail in status.details:
        violations = error_details_pb2.BadRequest()
        if detail.Unpack(violations) and violations.field_violations:
            exc.field = violations.field_violations[0].field
            break
    return exc


# The two services, by gRPC service name: (what the CLI calls it, the variable that holds its address, its default).
SERVICES = {
    "mlsignal.v1.TrainingService": ("training", "MLSIGNAL_TRAINING_ADDR", "127.0.0.1:50051"),
    "mlsignal.v1.InferenceService": ("inference", "MLSIGNAL_INFERENCE_ADDR", "127.0.0.1:50052"),
}


def called_service(method: Any) -> str:
    """The gRPC service name of a stub method (a multi-callable or a path like /mlsignal.v1.TrainingService/X)."""
    path = getattr(method, "_method", method)
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    if not isinstance(path, str):
        return ""
    return path.strip("/").partition("/")[0]


def wrong_service_note(channel: grpc.Channel, service: str, target: str = "", timeout: float = 2.0) -> str:
    """For an UNIMPLEMENTED answer to a call of `service`: which mlsignal service answered instead and where the
    called one listens, like `this is the inference service; training listens on MLSIGNAL_TRAINING_ADDR (default
    127.0.0.1:50051)`. The server's health service tells which service it runs; empty when `service` is not one of
    mlsignal's."""
    if service not in SERVICES:
        return ""
    wanted, variable, default = SERVICES[service]
    where = f"{wanted} listens on {variable} (default {default})"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    for other, (name, _, _) in SERVICES.items():
        if other == service:
            continue
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=other), timeout=timeout)
        except grpc.RpcError:
            continue
        return f"this is the {name} service; {where}"
    at = f"{target} " if target else "the server "
    return f"{at}does not offer {service}; {where}"


def is_method_not_found(err: grpc.RpcError) -> bool:
    """Whether a call failed because the server does not have the method (e.g. the other service's port): gRPC's own
    UNIMPLEMENTED answer, not one a method sent itself."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    if not (callable(code_fn) and code_fn() == grpc.StatusCode.UNIMPLEMENTED):
        return False
    details = (details_fn() if callable(details_fn) else "") or ""
    return _not_found_details(details)


def _not_found_details(details: str) -> bool:
    """gRPC's texts for a method the server does not have (Python and C++ servers, Go servers)."""
    text = details.strip().lower()
    return text in ("", "method not found!") or text.startswith(("unknown service", "unknown method"))


# For an UNIMPLEMENTED answer where the client could not ask which service answered.
WHERE_SERVICES = ("is the target the other service's address? training listens on MLSIGNAL_TRAINING_ADDR (default "
                  "127.0.0.1:50051), inference on MLSIGNAL_INFERENCE_ADDR (default 127.0.0.1:50052)")
