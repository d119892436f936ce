"""docker-compose.yml and the Dockerfile, checked statically (CI does not run Docker): commands exist, variables are
known, ports agree with the listen addresses, the model volume is read-only for inference, the image installs this
package and runs as a non-root user."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from mlsignal.cli import build_parser
from shared.settings import known_variables

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = "/var/lib/mlsignal/models"
ADDR_VARIABLES = {"mlsignal-training": "MLSIGNAL_TRAINING_ADDR", "mlsignal-inference": "MLSIGNAL_INFERENCE_ADDR"}
#: Commands of other packages that the image may run: the subcommands allowed, and the requirements (any one) that
#: install them.
FOREIGN_COMMANDS = {"dask": ({"scheduler", "worker"}, {"distributed", "dask[distributed]"})}
VARIABLE = re.compile(r"\bMLSIGNAL_[A-Z0-9_]+")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.fixture(scope="module")
def dependencies(dockerfile) -> set[str]:
    """What the image installs, lower case: the base dependencies plus those of the extras named in the Dockerfile's
    `pip install "mlsignal[...]"`, resolved through extras that name other extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    m = re.search(r'pip install [^\n]*"mlsignal\[([^\]]+)\]"', dockerfile)
    assert m, "the Dockerfile must install mlsignal with its server extras"
    todo, seen, reqs = [e.strip() for e in m.group(1).split(",")], set(), list(project["dependencies"])
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            inner = re.match(r"\s*mlsignal\[([^\]]+)\]", req)
            if inner:
                todo.extend(e.strip() for e in inner.group(1).split(","))
            else:
                reqs.append(req)
    return requirement_names(reqs)


def requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
        name = m.group(1).lower()
        names.add(name)
        names.update(f"{name}[{e.strip().lower()}]" for e in (m.group(2) or "").split(",") if e.strip())
    return names


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def ours(services: dict) -> dict:
    """The services that run the mlsignal image."""
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("mlsignal")
            or "build" in s}


def argv(value) -> list[str]:
    return list(map(str, value)) if isinstance(value, list) else shlex.split(str(value))


def commands(service: dict) -> list[list[str]]:
    """The command and the health-check command of a service, as argument lists."""
    out = []
    for key in ("entrypoint", "command"):
        if key in service:
            out.append(argv(service[key]))
    test = service.get("healthcheck", {}).get("test")
    if test:
        test = argv(test)
        assert test[0] in ("CMD", "CMD-SHELL"), test
        out.append(test[1:] if test[0] == "CMD" else shlex.split(test[1]))
    return out


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def volume_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for every volume of a service, short or long syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only", False)))
        else:
            parts = v.split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            out[parts[1]] = (parts[0], "ro" in mode.split(","))
    return out


def container_ports(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    for p in service.get("expose", []):
        ports.add(int(str(p).split("/")[0]))
    return ports


def test_the_expected_services_exist(services):
    assert {"postgres", "migrate", "training", "inference"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    assert set(ours(services)) >= {"migrate", "training", "inference"}


def test_every_command_is_a_console_script_or_an_mlsignal_subcommand(services, scripts, dependencies):
    parser = build_parser()
    checked = 0
    for name, service in ours(services).items():
        for cmd in commands(service):
            if cmd and cmd[0] in FOREIGN_COMMANDS:
                allowed, requirements = FOREIGN_COMMANDS[cmd[0]]
                assert len(cmd) > 1 and cmd[1] in allowed, f"{name}: `{shlex.join(cmd)}`: expected {cmd[0]} {allowed}"
                assert requirements & dependencies, (f"{name} runs `{cmd[0]} {cmd[1]}`, but pyproject.toml requires "
                                                     f"none of {sorted(requirements)}, so the image lacks it")
                checked += 1
                continue
            assert cmd and cmd[0] in scripts, f"{name}: {cmd[0]!r} is not one of the console scripts {sorted(scripts)}"
            if cmd[0] == "mlsignal":
                try:
                    parser.parse_args(cmd[1:])
                except SystemExit as exc:
                    if exc.code not in (0, None):  # `mlsignal --help` is fine
                        pytest.fail(f"{name}: `{shlex.join(cmd)}` is not a valid mlsignal command")
            checked += 1
    assert checked >= 5


def test_migrate_training_and_inference_are_wired_in_order(services):
    assert commands(services["migrate"])[0] == ["mlsignal", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(argv(services["postgres"]["healthcheck"]["test"]))
    assert commands(services["training"])[0] == ["mlsignal-training"]
    assert commands(services["inference"])[0] == ["mlsignal-inference"]
    for name in ("training", "inference"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        health = commands(services[name])[-1]
        assert health[:2] == ["mlsignal", "health"], f"{name} has no gRPC health check"


def test_every_mlsignal_variable_is_known(compose, dockerfile):
    known = known_variables()
    used = set(VARIABLE.findall((REPO / "docker-compose.yml").read_text())) | set(VARIABLE.findall(dockerfile))
    assert used, "no MLSIGNAL_* variable used at all"
    assert used <= known, f"unknown variables: {sorted(used - known)}"
    for name, service in ours(compose["services"]).items():
        for key in environment(service):
            assert key.startswith("MLSIGNAL_"), f"{name}: {key}: configure mlsignal only through MLSIGNAL_* variables"


def test_the_dask_cluster_is_optional_and_wired_to_the_training_service(services):
    scheduler, worker = services["dask-scheduler"], services["dask-worker"]
    for name in ("dask-scheduler", "dask-worker"):
        assert services[name].get("profiles") == ["dask"], f"{name}: the default compose must train locally"
    sched_cmd = commands(scheduler)[0]
    assert sched_cmd[:2] == ["dask", "scheduler"]
    port = int(sched_cmd[sched_cmd.index("--port") + 1])
    assert port in container_ports(scheduler)
    work_cmd = commands(worker)[0]
    assert work_cmd[:2] == ["dask", "worker"] and work_cmd[2] == f"tls://dask-scheduler:{port}"
    # mutual TLS on the cluster: scheduler and workers present certificates signed by the CA the service trusts
    training_env = environment(services["training"])
    assert sched_cmd[sched_cmd.index("--protocol") + 1] == "tls"
    for cmd in (sched_cmd, work_cmd):
        for flag, variable in (("--tls-ca-file", "MLSIGNAL_DASK_TLS_CA"), ("--tls-cert", "MLSIGNAL_DASK_TLS_CERT"),
                               ("--tls-key", "MLSIGNAL_DASK_TLS_KEY")):
            assert cmd[cmd.index(flag) + 1] == training_env[variable], (cmd, flag)
    assert "container_name" not in worker and not worker.get("ports"), "dask-worker must scale"
    # workers read the database and return the artifacts; they need no model volume
    assert MODEL_DIR not in volume_mounts(worker) and "MLSIGNAL_MODEL_DIR" not in environment(worker)
    assert environment(worker)["MLSIGNAL_DATABASE_URL"] == environment(services["training"])["MLSIGNAL_DATABASE_URL"]
    training = environment(services["training"])
    assert training["MLSIGNAL_DASK_SCHEDULER"] == "${MLSIGNAL_DASK_SCHEDULER:-}", "training stays local by default"


def test_service_ports_match_the_listen_addresses(services):
    for name, service in ours(services).items():
        script = commands(service)[0][0]
        if script not in ADDR_VARIABLES:
            continue
        addr = environment(service)[ADDR_VARIABLES[script]]
        host, _, port = addr.rpartition(":")
        assert host in ("0.0.0.0", "[::]"), f"{name}: {addr} is not reachable from other containers"
        port = int(port)
        assert port in container_ports(service), f"{name}: listens on {port}, publishes {container_ports(service)}"
        health = commands(service)[-1]
        target = health[health.index("--target") + 1]
        assert target.endswith(f":{port}"), f"{name}: health check on {target}, service on {port}"
        metrics = int(environment(service).get("MLSIGNAL_METRICS_PORT", "0"))
        if metrics:
            assert metrics in container_ports(service), f"{name}: metrics port {metrics} is not exposed"
            metrics_host = environment(service).get("MLSIGNAL_METRICS_HOST", "127.0.0.1")
            assert metrics_host in ("0.0.0.0", "::"), f"{name}: metrics on {metrics_host} are not reachable from " \
                "other containers"


def test_inference_scales_without_host_port_conflicts(services):
    for p in services["inference"].get("ports", []):
        published = str(p["published"]) if isinstance(p, dict) else str(p).split(":")[-2]
        assert "-" in published, f"inference publishes the fixed host port {published}: it cannot be scaled"
    assert "container_name" not in services["inference"]


def test_model_volume_read_write_for_training_read_only_for_inference(compose, services):
    training, inference = volume_mounts(services["training"]), volume_mounts(services["inference"])
    assert MODEL_DIR in training and MODEL_DIR in inference
    assert training[MODEL_DIR][0] == inference[MODEL_DIR][0], "training and inference must share the model volume"
    assert training[MODEL_DIR][0] in (compose.get("volumes") or {}), "the model volume must be a named volume"
    assert training[MODEL_DIR][1] is False, "training must write models"
    assert inference[MODEL_DIR][1] is True, "inference must mount the models read-only"
    for name in ("training", "inference"):
        assert environment(services[name])["MLSIGNAL_MODEL_DIR"] == MODEL_DIR
    assert any(t == "/var/lib/postgresql/data" and s in compose["volumes"]
               for t, (s, _) in volume_mounts(services["postgres"]).items())


def test_no_secret_is_baked_in(compose, dockerfile):
    for name, service in ours(compose["services"]).items():
        token = environment(service).get("MLSIGNAL_AUTH_TOKEN")
        assert token is None or token.startswith("${"), f"{name}: the token must come from the environment"
    assert not re.search(r"^\s*(ENV|ARG)\b.*(TOKEN|PASSWORD|SECRET|_KEY)", dockerfile, re.M | re.I)


def test_dockerfile_builds_a_wheel_and_installs_it_as_a_non_root_user(dockerfile):
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.M | re.I)
    assert len(stages) >= 2, "expected a multi-stage build"
    assert all(image.startswith("python:3.11-slim") for image, _ in stages)
    builder = stages[0][1]
    assert builder and re.search(r"pip\s+wheel\b.*\s\"?\.(\[[a-z,]+\])?\"?\s*$", dockerfile, re.M), \
        "the builder must build a wheel of ."
    final = dockerfile[dockerfile.rindex("\nFROM"):]
    assert re.search(r"pip\s+install\b[^\n]*(--find-links|\.whl)[^\n]*\bmlsignal\b", final) or \
        re.search(r"pip\s+install\b[^\n]*\.whl", final), "the final stage must install the built wheel"
    assert f"from={builder}" in final or f"--from={builder}" in final, \
        "the final stage must take the wheels from the builder"
    assert not re.search(r"apt-get\s+install|build-essential|gcc", final), "no build tools in the final image"
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", final, re.M) for p in line.split()}
    assert {50051, 50052} <= exposed
    cmd = re.findall(r"^CMD\s+(.+)$", final, re.M)
    assert not cmd or not re.search(r"token|password|secret", cmd[-1], re.I)


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var"} <= ignored
    assert "README.md" not in ignored and "pyproject.toml" not in ignored  # the wheel build needs both


REQUIRED = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):?\?(?P<message>[^}]+)\}$")


def _references(value: str, name: str) -> list[str]:
    """Every `${name...}` interpolation in a value."""
    return re.findall(r"\$\{" + name + r"(?:[:?\-+][^}]*)?\}", value)


def test_every_secret_is_required_and_has_no_default(compose):
    text = (REPO / "docker-compose.yml").read_text()
    secrets = {"MLSIGNAL_AUTH_TOKEN", "POSTGRES_PASSWORD"}
    for secret in secrets:
        uses = _references(text, secret)
        assert uses, f"{secret} is not used"
        for use in uses:
            m = REQUIRED.match(use)
            assert m and m.group("name") == secret, f"{use}: {secret} must be required (${{{secret}:?message}})"
            assert "openssl rand" in m.group("message"), f"{use}: the message should say how to make a secret"
    # every value in any service that carries a secret takes it from the environment, never a literal
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if re.search(r"(^|_)(AUTH_TOKEN|PASSWORD|SECRET)$", key):
                assert REQUIRED.match(value), f"{name}: {key}={value!r} must be a required variable"
            assert "://mlsignal:mlsignal@" not in value, f"{name}: {key} carries a default password"
            if "://" in value and "@" in value:  # a URL with credentials: its password is a required variable
                password = value.split("://", 1)[1].rsplit("@", 1)[0].partition(":")[2]
                assert REQUIRED.match(password), f"{name}: {key}: the password must be a required variable"


def test_compose_without_secrets_is_refused():
    """What `docker compose config` does with the variables unset: each `${NAME:?message}` stops it with the message;
    the required variables are exactly the secrets, and no secret has a `:-` default anywhere."""
    text = (REPO / "docker-compose.yml").read_text()
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Z0-9_]+):?\?[^}]+\}", text)}
    assert required == {"MLSIGNAL_AUTH_TOKEN", "POSTGRES_PASSWORD"}
    for secret in required:
        assert not re.search(r"\$\{" + secret + r":?[-=+]", text), f"{secret} has a default or alternative value"


def test_servers_do_not_accept_a_plaintext_token_by_default(services):
    for name in ("training", "inference"):
        env = environment(services[name])
        assert env.get("MLSIGNAL_ALLOW_PLAINTEXT_TOKEN") == "${MLSIGNAL_ALLOW_PLAINTEXT_TOKEN:-0}", name
        assert env.get("MLSIGNAL_TLS_CERT", "").startswith("${MLSIGNAL_TLS_CERT"), name
        assert env.get("MLSIGNAL_TLS_KEY", "").startswith("${MLSIGNAL_TLS_KEY"), name
