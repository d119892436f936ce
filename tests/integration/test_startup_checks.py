"""Start-up checks of both servers: a database without the current schema, a SQLite file that does not exist and a
port in use stop the start at once with one clear line and a non-zero exit; no database file is ever created by a
server. A SQLite file deleted while the services run gives UNAVAILABLE instead of a new empty database, and a
restored file is used again without a restart."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlsignal.v1 import inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from shared.server.startup import StartupError
from shared.settings import Settings
from shared.store.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
SERVERS = (("training_service.server", "mlsignal-training", "MLSIGNAL_TRAINING_ADDR"),
           ("inference_service.server", "mlsignal-inference", "MLSIGNAL_INFERENCE_ADDR"))


def _env(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    env.update({"MLSIGNAL_DATABASE_URL": url, "MLSIGNAL_MODEL_DIR": str(tmp_path / "models"),
                "MLSIGNAL_TRAINING_ADDR": "127.0.0.1:0", "MLSIGNAL_INFERENCE_ADDR": "127.0.0.1:0", **extra})
    return env


def _run_servers(cases: dict[str, dict[str, str]]) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Start both servers for every case at once (each should exit at once); their results by (case, program)."""
    procs = {}
    for case, env in cases.items():
        for module, prog, _ in SERVERS:
            procs[(case, prog)] = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO, text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for key, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[key] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_a_database_without_the_current_schema_stops_both_servers_and_creates_nothing(tmp_path):
    missing_dir = tmp_path / "typo"
    missing = missing_dir / "mlsignal.db"
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # an SQLite file with no tables
    old = tmp_path / "old.db"
    assert upgrade(f"sqlite:///{old}", "0001") == "0001"
    relative = Path("var") / f"absent-{tmp_path.name}" / "mlsignal.db"  # the servers run in REPO
    cases = {
        "missing": _env(f"sqlite:///{missing}", tmp_path),
        "relative": _env(f"sqlite:///{relative}", tmp_path),
        "empty": _env(f"sqlite:///{empty}", tmp_path),
        "old": _env(f"sqlite:///{old}", tmp_path),
    }
    results = _run_servers(cases)
    for (case, prog), result in results.items():
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, (case, prog, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and "listening" not in result.stdout, (case, prog, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: cannot use the database "), (case, prog, lines)
        assert "`mlsignal db upgrade`" in lines[0], lines[0]
        expected = {"missing": f"sqlite:///{missing}: the file does not exist",
                    "relative": f"sqlite:///{relative} (the file {REPO / relative}: the path is relative to the "
                                "working directory): the file does not exist; create it with `mlsignal db upgrade` "
                                "(run it in the directory the services run in, or use an absolute path)",
                    "empty": "it has no mlsignal schema",
                    "old": "its schema is at migration 0001, older than"}[case]
        assert expected in lines[0], lines[0]
    # no server created the database or its directory, nor touched the others
    assert not missing.exists() and not missing_dir.exists() and not (REPO / relative).parent.exists()
    with sqlite3.connect(empty) as conn:  # still without a table
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    assert upgrade(f"sqlite:///{old}", "0001") == "0001"


def test_start_in_process_refuses_an_unmigrated_database(tmp_path):
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    url = f"sqlite:///{tmp_path}/none/mlsignal.db"
    settings = Settings(database_url=url, model_dir=tmp_path / "models")
    for start in (start_training, start_inference):
        with pytest.raises(StartupError, match="mlsignal db upgrade"):
            start(settings, "127.0.0.1:0")
    assert not (tmp_path / "none").exists()


@pytest.mark.postgres
def test_a_postgres_database_without_the_schema_stops_the_start(pg_server, tmp_path):
    import sqlalchemy as sa

    from conftest import _admin_connect
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    name = "t_unmigrated_startup"
    with _admin_connect(pg_server) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    try:
        settings = Settings(database_url=url, model_dir=tmp_path / "models")
        for start in (start_training, start_inference):
            with pytest.raises(StartupError, match=r"no mlsignal schema.*mlsignal db upgrade"):
                start(settings, "127.0.0.1:0")
        upgrade(url, "0001")
        for start in (start_training, start_inference):
            with pytest.raises(StartupError, match=r"migration 0001, older.*mlsignal db upgrade"):
                start(settings, "127.0.0.1:0")
    finally:
        with _admin_connect(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_second_server_on_a_port_in_use_exits_non_zero(tmp_path):
    url = f"sqlite:///{tmp_path}/mlsignal.db"
    upgrade(url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        cases = {"taken": _env(url, tmp_path, MLSIGNAL_TRAINING_ADDR=address, MLSIGNAL_INFERENCE_ADDR=address)}
        results = _run_servers(cases)
    for (_, prog), result in results.items():
        assert result.returncode == 1, (prog, result.stderr)
        assert result.stderr.strip() == (f"{prog}: cannot listen on {address}: the address is in use or not "
                                         "available here (is another server running on it?)"), result.stderr


def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_deleted_sqlite_file_is_not_recreated_and_a_restored_one_is_used(tmp_path, monkeypatch):
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    db = tmp_path / "mlsignal.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)
    settings = Settings(database_url=url, model_dir=tmp_path / "models", model_poll_seconds=0.2)
    training = start_training(settings, "127.0.0.1:0")
    inference = start_inference(settings, "127.0.0.1:0")
    tch = grpc.insecure_channel(f"127.0.0.1:{training.port}")
    ich = grpc.insecure_channel(f"127.0.0.1:{inference.port}")
    tstub, istub = training_pb2_grpc.TrainingServiceStub(tch), inference_pb2_grpc.InferenceServiceStub(ich)
    list_jobs = lambda: tstub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10)  # noqa: E731
    get_model = lambda: istub.GetModel(inference_pb2.GetModelRequest(symbol="BTC/USD", timeframe="1h"),  # noqa: E731
                                       timeout=10)
    try:
        assert _code(list_jobs)[0] == grpc.StatusCode.OK
        assert _code(get_model)[0] == grpc.StatusCode.NOT_FOUND
        from test_postgres_outage import _record

        logged = _record(monkeypatch, "shared.store.db")
        for suffix in ("", "-wal", "-shm"):  # the operator deletes the database
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        for call in (list_jobs, get_model, list_jobs, get_model, list_jobs):
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert f"the database file is missing: {db}" in details, details
        time.sleep(0.5)  # the model poll runs meanwhile
        assert not db.exists(), "a server created a new, empty database"
        reports = [m for m in logged if "the database file is missing" in m]
        assert 1 <= len(reports) <= 2, reports  # once per server, not per call or poll

        shutil.copy(backup, db)  # restored: both work again without a restart
        assert _code(list_jobs)[0] == grpc.StatusCode.OK
        assert _code(get_model)[0] == grpc.StatusCode.NOT_FOUND
        assert any(m.endswith("works again") for m in logged)
        for channel in (tch, ich):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        tch.close()
        ich.close()
        inference.stop(0.5)
        training.stop(0.5)


def test_postgresql_that_refuses_the_database_or_the_role_stops_both_servers(pg_server, tmp_path):
    """A PostgreSQL that answers but refuses for good (no such database, no such role) is a configuration error: both
    servers exit non-zero at once naming the cause; only an unreachable server is an outage worth waiting for."""
    import sqlalchemy as sa

    base = sa.engine.make_url(pg_server)
    cases = {
        "database": _env(base.set(database="no_such_database").render_as_string(hide_password=False), tmp_path),
        "role": _env(base.set(username="no_such_role").render_as_string(hide_password=False), tmp_path),
    }
    results = _run_servers(cases)
    for (case, prog), result in results.items():
        assert result.returncode != 0, (case, prog, result.stderr)
        expected = 'database "no_such_database" does not exist' if case == "database" else 'role "no_such_role"'
        assert expected in result.stderr and "MLSIGNAL_DATABASE_URL" in result.stderr, (case, prog, result.stderr)
