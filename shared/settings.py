"""All configuration, read from MLSIGNAL_* environment variables in this one place.

| variable | default | meaning |
| --- | --- | --- |
| MLSIGNAL_DATABASE_URL | sqlite:///./var/mlsignal.db | SQLAlchemy URL, e.g. `postgresql+psycopg://user:pw@host/db` |
| MLSIGNAL_MODEL_DIR | ./var/models | where model artifacts are written (training) and read (inference) |
| MLSIGNAL_TRAINING_ADDR | 127.0.0.1:50051 | listen address of mlsignal-training; target of the CLI |
| MLSIGNAL_INFERENCE_ADDR | 127.0.0.1:50052 | listen address of mlsignal-inference; target of the CLI |
| MLSIGNAL_TRAINING_WORKERS | 1 | training jobs that run at once (locally: this many warm worker processes) |
| MLSIGNAL_TRAINING_QUEUE_SIZE | 16 | queued jobs accepted before StartTraining answers RESOURCE_EXHAUSTED |
| MLSIGNAL_TRAINING_FIT_JOBS | -1 | cores one forest fit uses (-1: all cores of the machine or Dask worker running it) |
| MLSIGNAL_DASK_SCHEDULER | (none) | `tcp://host:8786`: run each training job as one task on this Dask cluster |
| MLSIGNAL_DASK_SPREAD_FIT | 0 | `1`: with Dask, grow each forest's trees as tasks across the cluster |
| MLSIGNAL_MODEL_POLL_SECONDS | 2 | how often inference checks the registry for newer models |
| MLSIGNAL_MODEL_CACHE_SIZE | 0 | serving models kept in memory: 0 one per market in use, N the N most recent markets |
| MLSIGNAL_FOREST_RUNTIME | auto | `native` (scikit-learn's exact numbers) or `onnx` forests; `auto`: native else onnx |
| MLSIGNAL_MODEL_MAX_AGE | (none) | e.g. `30d`: an older serving model makes health `mlsignal.staleness` NOT_SERVING |
| MLSIGNAL_LIVE_MONITORING | 1 | `0`: inference does not journal predictions, so nothing is scored live |
| MLSIGNAL_LIVE_FLUSH_SECONDS | 1 | how often the prediction journal writes what inference served and received |
| MLSIGNAL_DRIFT_WINDOW | 1000 | last distinct candles per model that drift (PSI) and the OOD rate cover |
| MLSIGNAL_LIVE_RETENTION_DAYS | 90 | days live scores (and predictions never scored) are kept after they are written |
| MLSIGNAL_PROMOTION | shadow | `shadow`: past the gate, serves where nothing serves, else shadows; `auto`; `manual` |
| MLSIGNAL_PROMOTION_TOLERANCE | 0 | gate: `log_loss < prior_log_loss * (1 + tolerance)`; negative is stricter; > -1 |
| MLSIGNAL_SHADOW_MIN_SCORED | 500 | paired live scores before the shadow test first looks |
| MLSIGNAL_SHADOW_MAX_SCORED | 5000 | paired live scores after which an undecided shadow is rejected |
| MLSIGNAL_SHADOW_ALPHA | 0.05 | false promotions allowed over all looks of the live test |
| MLSIGNAL_DEMOTE_WORSE_THAN_PRIOR | 0 | `1`: roll back a serving model the live test finds worse than its class prior |
| MLSIGNAL_RESEARCH_KEEP | 50 | research models kept per market; older ones are retired and their files deleted |
| MLSIGNAL_POLICY_INTERVAL_SECONDS | 5 | how often training runs due policies and the shadow test; 0: neither here |
| MLSIGNAL_MAX_BATCH | 10000 | most candles in one PredictRequest |
| MLSIGNAL_GRACE_SECONDS | 5 | how long a stopping server lets calls finish |
| MLSIGNAL_MAX_STREAMS | 10000 | open streams per server (StreamPredict, WatchTrainingJob); more: RESOURCE_EXHAUSTED |
| MLSIGNAL_LOG_LEVEL | INFO | log level |
| MLSIGNAL_LOG_FORMAT | text | `text` or `json` (one object per line) |
| MLSIGNAL_METRICS_PORT | 0 | Prometheus metrics port (0: none); with MLSIGNAL_AUTH_TOKEN a scrape must send the token |
| MLSIGNAL_METRICS_HOST | 127.0.0.1 | address the metrics port listens on; `0.0.0.0` or `::` for every interface |
| MLSIGNAL_AUTH_TOKEN | (none) | servers: bearer token every RPC but grpc.health.v1 needs; clients: the token sent |
| MLSIGNAL_TLS_CERT | (none) | server certificate chain (PEM file); with MLSIGNAL_TLS_KEY the server speaks TLS only |
| MLSIGNAL_TLS_KEY | (none) | server private key (PEM file) |
| MLSIGNAL_TLS_CA | (none) | clients: CA certificate (PEM) that signed the server certificate; setting it turns TLS on |
| MLSIGNAL_ALLOW_PLAINTEXT_TOKEN | 0 | `1`: a server with a token but no TLS may listen off loopback (else it exits) |
| MLSIGNAL_DASK_TLS_CA | (none) | CA (PEM) of the Dask cluster; with _CERT and _KEY: mutual TLS (`tls://` address) |
| MLSIGNAL_DASK_TLS_CERT | (none) | the training service's certificate for the Dask cluster (PEM, signed by that CA) |
| MLSIGNAL_DASK_TLS_KEY | (none) | its private key (PEM) |
| MLSIGNAL_DASK_ALLOW_PLAINTEXT | 0 | `1`: accept a `tcp://` Dask scheduler off loopback (else refused at start-up) |

Training on Dask (MLSIGNAL_DASK_SCHEDULER set): the service keeps its queue, the jobs table and the registry, and
submits at most MLSIGNAL_TRAINING_WORKERS jobs at once to the cluster (set it to at least the cluster's worker
threads, or jobs wait in the service queue while workers idle). A job's whole pipeline is one task; it reads the
candles from the database itself and returns the artifact bytes, which the service writes into MLSIGNAL_MODEL_DIR
and registers. Workers therefore need the mlsignal package (the same versions as the service) and read access to
the database, but no model volume. A worker uses its own MLSIGNAL_DATABASE_URL when set; otherwise the service's
URL is sent with the task, except that a URL with a password is never sent (set it on the workers then).
Dask workers are trusted code: the service deserialises what the cluster returns, and whoever can submit tasks to the
scheduler runs code on every worker. A scheduler off this machine must therefore use TLS with client certificates
(a `tls://` address with MLSIGNAL_DASK_TLS_CA/_CERT/_KEY; scheduler and workers started with the same CA and
`--tls-ca-file/--tls-cert/--tls-key`), or be explicitly accepted in clear text with MLSIGNAL_DASK_ALLOW_PLAINTEXT=1.
The forest fit uses MLSIGNAL_TRAINING_FIT_JOBS cores of the worker; when that asks for more cores than the worker
machine has, or with MLSIGNAL_DASK_SPREAD_FIT=1, the trees are grown as tasks across the cluster instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "MLSIGNAL_"
#: What may execute a served forest (MLSIGNAL_FOREST_RUNTIME).
FOREST_RUNTIMES = ("auto", "native", "onnx")


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def _str(name: str, default: str) -> str:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///./var/mlsignal.db"
    model_dir: Path = Path("./var/models")
    training_addr: str = "127.0.0.1:50051"
    inference_addr: str = "127.0.0.1:50052"
    training_workers: int = 1
    training_queue_size: int = 16
    training_fit_jobs: int = -1
    dask_scheduler: str | None = None
    dask_spread_fit: bool = False
    model_poll_seconds: float = 2.0
    model_cache_size: int = 0
    forest_runtime: str = "auto"
    model_max_age: str | None = None
    live_monitoring: bool = True
    live_flush_seconds: float = 1.0
    live_retention_days: float = 90.0
    drift_window: int = 1000
    promotion: str = "shadow"
    promotion_tolerance: float = 0.0
    shadow_min_scored: int = 500
    shadow_max_scored: int = 5000
    shadow_alpha: float = 0.05
    demote_worse_than_prior: bool = False
    research_keep: int = 50
    policy_interval_seconds: float = 5.0
    max_batch: int = 10_000
    grace_seconds: float = 5.0
    max_streams: int = 10_000
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    auth_token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    allow_plaintext_token: bool = False
    dask_tls_ca: Path | None = None
    dask_tls_cert: Path | None = None
    dask_tls_key: Path | None = None
    dask_allow_plaintext: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        s = cls(
            database_url=_str("MLSIGNAL_DATABASE_URL", d.database_url),
            model_dir=Path(_str("MLSIGNAL_MODEL_DIR", str(d.model_dir))),
            training_addr=_str("MLSIGNAL_TRAINING_ADDR", d.training_addr),
            inference_addr=_str("MLSIGNAL_INFERENCE_ADDR", d.inference_addr),
            training_workers=_int("MLSIGNAL_TRAINING_WORKERS", d.training_workers),
            training_queue_size=_int("MLSIGNAL_TRAINING_QUEUE_SIZE", d.training_queue_size),
            training_fit_jobs=_int("MLSIGNAL_TRAINING_FIT_JOBS", d.training_fit_jobs),
            dask_scheduler=_optional("MLSIGNAL_DASK_SCHEDULER"),
            dask_spread_fit=_bool("MLSIGNAL_DASK_SPREAD_FIT", d.dask_spread_fit),
            model_poll_seconds=_float("MLSIGNAL_MODEL_POLL_SECONDS", d.model_poll_seconds),
            model_cache_size=_int("MLSIGNAL_MODEL_CACHE_SIZE", d.model_cache_size),
            forest_runtime=_str("MLSIGNAL_FOREST_RUNTIME", d.forest_runtime).strip().lower(),
            model_max_age=_optional("MLSIGNAL_MODEL_MAX_AGE"),
            live_monitoring=_bool("MLSIGNAL_LIVE_MONITORING", d.live_monitoring),
            live_flush_seconds=_float("MLSIGNAL_LIVE_FLUSH_SECONDS", d.live_flush_seconds),
            live_retention_days=_float("MLSIGNAL_LIVE_RETENTION_DAYS", d.live_retention_days),
            drift_window=_int("MLSIGNAL_DRIFT_WINDOW", d.drift_window),
            promotion=_str("MLSIGNAL_PROMOTION", d.promotion).strip().lower(),
            promotion_tolerance=_float("MLSIGNAL_PROMOTION_TOLERANCE", d.promotion_tolerance),
            shadow_min_scored=_int("MLSIGNAL_SHADOW_MIN_SCORED", d.shadow_min_scored),
            shadow_max_scored=_int("MLSIGNAL_SHADOW_MAX_SCORED", d.shadow_max_scored),
            shadow_alpha=_float("MLSIGNAL_SHADOW_ALPHA", d.shadow_alpha),
            demote_worse_than_prior=_bool("MLSIGNAL_DEMOTE_WORSE_THAN_PRIOR", d.demote_worse_than_prior),
            research_keep=_int("MLSIGNAL_RESEARCH_KEEP", d.research_keep),
            policy_interval_seconds=_float("MLSIGNAL_POLICY_INTERVAL_SECONDS", d.policy_interval_seconds),
            max_batch=_int("MLSIGNAL_MAX_BATCH", d.max_batch),
            grace_seconds=_float("MLSIGNAL_GRACE_SECONDS", d.grace_seconds),
            max_streams=_int("MLSIGNAL_MAX_STREAMS", d.max_streams),
            log_level=_str("MLSIGNAL_LOG_LEVEL", d.log_level).upper(),
            log_format=_str("MLSIGNAL_LOG_FORMAT", d.log_format).lower(),
            metrics_port=_int("MLSIGNAL_METRICS_PORT", d.metrics_port),
            metrics_host=_str("MLSIGNAL_METRICS_HOST", d.metrics_host).strip(),
            auth_token=_optional("MLSIGNAL_AUTH_TOKEN"),
            tls_cert=_path("MLSIGNAL_TLS_CERT"),
            tls_key=_path("MLSIGNAL_TLS_KEY"),
            tls_ca=_path("MLSIGNAL_TLS_CA"),
            allow_plaintext_token=_bool("MLSIGNAL_ALLOW_PLAINTEXT_TOKEN", d.allow_plaintext_token),
            dask_tls_ca=_path("MLSIGNAL_DASK_TLS_CA"),
            dask_tls_cert=_path("MLSIGNAL_DASK_TLS_CERT"),
            dask_tls_key=_path("MLSIGNAL_DASK_TLS_KEY"),
            dask_allow_plaintext=_bool("MLSIGNAL_DASK_ALLOW_PLAINTEXT", d.dask_allow_plaintext),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.training_workers < 1:
            raise ValueError("MLSIGNAL_TRAINING_WORKERS must be >= 1")
        if self.training_queue_size < 1:
            raise ValueError("MLSIGNAL_TRAINING_QUEUE_SIZE must be >= 1")
        if self.dask_scheduler is not None:
            check_dask_address(self.dask_scheduler)
        tls_files = self.dask_tls_files()
        if self.dask_scheduler is not None:
            check_dask_security(self.dask_scheduler, tls_files is not None, self.dask_allow_plaintext)
        if self.model_poll_seconds <= 0:
            raise ValueError("MLSIGNAL_MODEL_POLL_SECONDS must be > 0")
        if self.model_cache_size < 0:
            raise ValueError("MLSIGNAL_MODEL_CACHE_SIZE must be >= 0 (0: one model per market in use)")
        if self.forest_runtime not in FOREST_RUNTIMES:
            raise ValueError(f"MLSIGNAL_FOREST_RUNTIME={self.forest_runtime!r}: expected 'auto', 'native' or 'onnx'")
        self.model_max_age_ms()
        if not 0 < self.live_flush_seconds <= 3600:
            raise ValueError("MLSIGNAL_LIVE_FLUSH_SECONDS must be > 0 and at most 3600")
        if not 1 <= self.drift_window <= 1_000_000:
            raise ValueError("MLSIGNAL_DRIFT_WINDOW must be between 1 and 1000000 (candles)")
        if not 0 < self.live_retention_days <= 36_500:
            raise ValueError("MLSIGNAL_LIVE_RETENTION_DAYS must be > 0 (days) and at most 36500")
        if self.promotion not in ("shadow", "auto", "manual"):
            raise ValueError(f"MLSIGNAL_PROMOTION={self.promotion!r}: expected 'shadow', 'auto' or 'manual'")
        if not 1 <= self.shadow_min_scored <= self.shadow_max_scored:
            raise ValueError(f"MLSIGNAL_SHADOW_MIN_SCORED={self.shadow_min_scored} and MLSIGNAL_SHADOW_MAX_SCORED="
                             f"{self.shadow_max_scored}: expected 1 <= MIN <= MAX")
        if not 0 < self.shadow_alpha < 0.5:
            raise ValueError(f"MLSIGNAL_SHADOW_ALPHA={self.shadow_alpha!r}: expected a probability in (0, 0.5)")
        if not (math.isfinite(self.promotion_tolerance) and self.promotion_tolerance > -1):
            raise ValueError(f"MLSIGNAL_PROMOTION_TOLERANCE={self.promotion_tolerance!r}: expected a number above -1 "
                             "(0: the model must not be worse than the prior; negative is stricter)")
        if self.research_keep < 1:
            raise ValueError("MLSIGNAL_RESEARCH_KEEP must be >= 1")
        if not 0 <= self.policy_interval_seconds <= 3600:
            raise ValueError("MLSIGNAL_POLICY_INTERVAL_SECONDS must be between 0 (no retrain policies run here) and "
                             "3600")
        if not 1 <= self.max_batch <= 1_000_000:
            raise ValueError("MLSIGNAL_MAX_BATCH must be between 1 and 1000000")
        if self.max_streams < 1:
            raise ValueError("MLSIGNAL_MAX_STREAMS must be >= 1")
        if self.log_format not in ("text", "json"):
            raise ValueError("MLSIGNAL_LOG_FORMAT must be 'text' or 'json'")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("MLSIGNAL_METRICS_PORT must be between 0 (no metrics) and 65535")
        if not self.metrics_host.strip():
            raise ValueError("MLSIGNAL_METRICS_HOST must be an address, e.g. 127.0.0.1 or 0.0.0.0")
        if self.auth_token is not None:
            check_token(self.auth_token, "MLSIGNAL_AUTH_TOKEN")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("MLSIGNAL_TLS_CERT and MLSIGNAL_TLS_KEY must be set together")

    def dask_tls_files(self) -> tuple[Path, Path, Path] | None:
        """(CA, certificate, key) for mutual TLS with the Dask cluster, or None; ValueError unless all three or none
        are set."""
        files = (self.dask_tls_ca, self.dask_tls_cert, self.dask_tls_key)
        if all(f is None for f in files):
            return None
        if any(f is None for f in files):
            raise ValueError("MLSIGNAL_DASK_TLS_CA, MLSIGNAL_DASK_TLS_CERT and MLSIGNAL_DASK_TLS_KEY must be set "
                             "together (mutual TLS: the cluster's CA, and the service's certificate and key)")
        return files  # type: ignore[return-value]

    def model_max_age_ms(self) -> int | None:
        """MLSIGNAL_MODEL_MAX_AGE in milliseconds (None when unset); ValueError for a malformed duration."""
        if self.model_max_age is None:
            return None
        from shared.timeframes import parse_duration

        try:
            return parse_duration(self.model_max_age)
        except ValueError as exc:
            raise ValueError(f"MLSIGNAL_MODEL_MAX_AGE: {exc}") from None

    @property
    def tls(self) -> bool:
        """Whether the servers listen with TLS (a certificate and key are configured)."""
        return self.tls_cert is not None

    def server_tls_pair(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) as PEM bytes, or None without TLS; ValueError names an unreadable file."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return read_pem("MLSIGNAL_TLS_CERT", self.tls_cert), read_pem("MLSIGNAL_TLS_KEY", self.tls_key)


def _optional(name: str) -> str | None:
    raw = os.environ.get(name)
    return None if raw is None or raw == "" else raw


def _path(name: str) -> Path | None:
    raw = _optional(name)
    return None if raw is None else Path(raw)


def read_pem(name: str, path: Path) -> bytes:
    """The bytes of a PEM file (certificate, key or CA); ValueError names the setting `name` when the file cannot be
    read or holds no PEM block."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}={str(path)!r}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{name}={str(path)!r}: not a PEM file")
    return data


DASK_SCHEMES = ("tcp", "tls")


def check_dask_address(address: str, what: str = "MLSIGNAL_DASK_SCHEDULER") -> str:
    """A Dask scheduler address must look like ``tcp://host:port`` (or ``tls://`` with Dask's TLS configuration)."""
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or scheme not in DASK_SCHEMES or not colon or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"{what}={address!r}: expected a Dask scheduler address like tcp://dask-scheduler:8786")
    return address


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address is this machine's loopback: localhost, 127.0.0.0/8 or ::1 (brackets and
    surrounding spaces ignored). The one definition for servers and clients: this module needs nothing beyond the
    standard library, so the client SDK imports it on the base install."""
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dask_security(address: str, tls: bool, allow_plaintext: bool,
                        what: str = "MLSIGNAL_DASK_SCHEDULER") -> str:
    """Refuse a Dask scheduler address that would expose the training service: a `tls://` address needs the TLS
    files, TLS files need a `tls://` address, and a `tcp://` scheduler off this machine needs `allow_plaintext`
    (MLSIGNAL_DASK_ALLOW_PLAINTEXT=1). Nothing is contacted; ValueError says what to change."""
    scheme, _, rest = address.partition("://")
    host = rest.rpartition(":")[0]
    if scheme == "tls" and not tls:
        raise ValueError(f"{what}={address!r}: a tls:// scheduler needs MLSIGNAL_DASK_TLS_CA, MLSIGNAL_DASK_TLS_CERT "
                         "and MLSIGNAL_DASK_TLS_KEY")
    if scheme == "tcp" and tls:
        raise ValueError(f"{what}={address!r}: MLSIGNAL_DASK_TLS_* are set, so the scheduler address must be "
                         f"tls://{rest}")
    if scheme == "tcp" and not allow_plaintext and not is_loopback_host(host):
        raise ValueError(f"{what}={address!r}: refusing an unencrypted, unauthenticated Dask scheduler on another "
                         "machine (whoever reaches it can run code on the training service); use tls:// with "
                         "MLSIGNAL_DASK_TLS_CA/_CERT/_KEY, or set MLSIGNAL_DASK_ALLOW_PLAINTEXT=1 to accept it")
    return address


def check_token(token: str, what: str = "token") -> str:
    """A bearer token must be non-empty printable ASCII without spaces (it travels in a gRPC metadata value)."""
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"{what} must be non-empty printable ASCII without spaces")
    return token


def client_security(tls: bool | None = None, ca_cert: str | Path | None = None,
                    token: str | None = None) -> dict:
    """Keyword arguments for connect_channel / TrainingClient / InferenceClient from flags and the environment.

    Explicit arguments win; otherwise MLSIGNAL_TLS_CA (a CA certificate PEM, which turns TLS on) and
    MLSIGNAL_AUTH_TOKEN are read. `tls=True` without a CA uses the system roots. Returns
    ``{"tls": bool, "root_certificates": bytes | None, "token": str | None}``; ValueError names a bad value.

    Example::

        >>> TrainingClient(target, **client_security(args.tls, args.ca_cert, args.token))   # doctest: +SKIP
    """
    ca = Path(ca_cert) if ca_cert else _path("MLSIGNAL_TLS_CA")
    what = "--ca-cert" if ca_cert else "MLSIGNAL_TLS_CA"
    root = read_pem(what, ca) if ca is not None else None
    use_tls = bool(tls) or root is not None
    if token is not None:
        check_token(token, "--token")
    else:
        token = _optional("MLSIGNAL_AUTH_TOKEN")
        if token is not None:
            check_token(token, "MLSIGNAL_AUTH_TOKEN")
    return {"tls": use_tls, "root_certificates": root, "token": token}


def known_variables() -> set[str]:
    """Every MLSIGNAL_* variable this module reads."""
    return {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
