"""Fixtures shared by the whole suite: real databases (a throwaway PostgreSQL 15 cluster and SQLite files) and data.

Tests that must hold on both databases take `db_url`. PostgreSQL is skipped when its binaries are missing, except on CI
(CI=true), where a missing server fails the run instead of silently testing less.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_USER = "postgres"


# --------------------------------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl: PATH first, then the Debian layout (newest version)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True)
    preferred = [c for c in candidates if "/15/" in c] + candidates
    return Path(preferred[0]).parent if preferred else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traversable_by_others(directory: Path) -> bool:
    """Whether another user (the postgres account) can pass through `directory` and all its ancestors."""
    d = directory.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (d, *d.parents))


def _run(cmd: list[str], as_postgres: bool, **kw) -> subprocess.CompletedProcess:
    if as_postgres:
        cmd = ["runuser", "-u", PG_USER, "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL cluster on 127.0.0.1:<free port> for this session; yields its base SQLAlchemy URL."""
    bindir = _pg_bindir()
    if bindir is None:
        msg = "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires PostgreSQL tests to run")
        pytest.skip(msg)

    as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root
    base = next(
        (Path(d) for d in (tempfile.gettempdir(), "/tmp") if not as_postgres or _traversable_by_others(Path(d))),
        None,
    )
    if base is None:
        pytest.fail("no temporary directory the postgres user can reach")
    root = Path(tempfile.mkdtemp(prefix="mlsignal-pg-", dir=base))
    data, log = root / "data", root / "server.log"
    if as_postgres:
        shutil.chown(root, user=PG_USER, group=PG_USER)
    initdb, pg_ctl = str(bindir / "initdb"), str(bindir / "pg_ctl")
    try:
        _run(
            [initdb, "-D", str(data), "-A", "trust", "-U", PG_USER, "-E", "UTF8", "--locale=C", "--no-sync"],
            as_postgres,
        )
        for attempt in range(3):  # the free port may be taken between choosing and binding it
            port = _free_port()
            options = (
                f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            try:
                _run([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"], as_postgres)
                break
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL: {exc.cmd}: {exc.stderr}\n{server_log}")

    try:
        yield f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/postgres"
    finally:
        stop = [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]
        subprocess.run((["runuser", "-u", PG_USER, "--"] if as_postgres else []) + stop, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _admin_connect(base_url: str):
    import psycopg
    import sqlalchemy as sa

    url = sa.engine.make_url(base_url)
    return psycopg.connect(host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True)


@contextlib.contextmanager
def fresh_pg_database(base_url: str):
    """Create a uniquely named, migrated database on a PostgreSQL server; drop it on exit."""
    import sqlalchemy as sa

    from shared.store.migrate import upgrade

    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin_connect(base_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with _admin_connect(base_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_server):
    """A fresh, migrated database on the session's PostgreSQL server; dropped afterwards."""
    with fresh_pg_database(pg_server) as url:
        yield url


# --------------------------------------------------------------------------------------------------------------------
# SQLite and both


@pytest.fixture
def sqlite_url(tmp_path):
    """A fresh, migrated SQLite file in the test's temporary directory."""
    from shared.store.migrate import upgrade

    url = f"sqlite:///{tmp_path}/mlsignal.db"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request):
    """A fresh, migrated database: the test runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


# --------------------------------------------------------------------------------------------------------------------
# data


@pytest.fixture
def sample_csv() -> Path:
    """The bundled BTC/USD hourly candles (Coinbase, 2017-07-01 .. 2019-10-17, 20,111 rows, no gaps)."""
    return REPO / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"


@pytest.fixture
def binance_csv() -> Path:
    """Binance BTC/USDT 5m klines, 2023-03-20 .. 2023-03-28, 2,576 rows, one 16-candle gap on 2023-03-24."""
    return REPO / "data" / "BTCUSDT-5m-2023-03-20_28.binance-kline.csv"


# Real services (servers on 127.0.0.1:0 with trained models) for the integration tests.
from service_fixtures import sample_frame, services  # noqa: E402,F401
