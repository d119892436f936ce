"""Fixtures shared by the whole suite: real databases (a throwaway PostgreSQL 15 cluster and SQLite files) and data;
and the rule that under CI (CI=true) no test skips.

Tests that must hold on both databases take `db_url`. PostgreSQL clusters come from `postgres.started_cluster`.

A test skips where something it needs is missing on a developer's machine (PostgreSQL binaries, Node.js and the npm
packages, `.venv-client`, root for `chattr`, a dev dependency); `make test` installs all of it. With CI=true every
such skip, from a test, a fixture, a `skipif` mark or a module-level skip at collection, is reported as a failure
instead, so CI never passes by testing less (`.ci/run` checks the summary as well).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path

import pytest

from postgres import started_cluster

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# no skips under CI


def ci() -> bool:
    """Whether this is a CI run (CI=true), where every test must run."""
    return os.environ.get("CI", "").strip().lower() == "true"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.longrepr = (f"skipped under CI=true, where every test must run (`make test` installs what tests "
                           f"need): {_skip_reason(report)}")
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI, a test that skips (in setup, in its body, or by a skip/skipif mark) fails instead."""
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Under CI, a module that skips itself at collection (`pytest.skip(allow_module_level=True)`, `importorskip`)
    is a collection error instead."""
    outcome = yield
    _fail_skip(outcome.get_result())


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL cluster on 127.0.0.1:<free port> for this session (`postgres.started_cluster`); yields its base
    SQLAlchemy URL."""
    with started_cluster("mlsignal-pg-", "-c max_connections=200") as cluster:
        yield cluster.url()


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
