"""Throwaway PostgreSQL clusters for the tests, made one way: `initdb` and `pg_ctl` of the PostgreSQL binaries (`make
test` installs PostgreSQL 15), run as the postgres user when the tests run as root (PostgreSQL refuses to run as
root), listening on 127.0.0.1 at a free port with a socket directory of their own.

The session's shared server (`pg_server` in conftest) and the clusters of tests that stop and start their own server
(database outages) all come from `started_cluster`. Without the binaries a test skips, which the CI=true hook in
conftest turns into a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER = "postgres"
#: What a cluster runs with: no durability (throwaway data), loopback only.
SERVER_OPTIONS = "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def pg_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl: PATH first, then the Debian layout (15 preferred, else the newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True)
    preferred = [c for c in candidates if "/15/" in c] + candidates
    return Path(preferred[0]).parent if preferred else None


def _traversable_by_others(directory: Path) -> bool:
    """Whether another user (the postgres account) can pass through `directory` and all its ancestors."""
    d = directory.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (d, *d.parents))


def _run(cmd: list[str], as_postgres: bool) -> subprocess.CompletedProcess:
    if as_postgres:
        cmd = ["runuser", "-u", PG_USER, "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


class Cluster:
    """One PostgreSQL cluster: its data directory, log and port; `stop` and `start` it at will."""

    def __init__(self, bindir: Path, root: Path, as_postgres: bool, options: str = "") -> None:
        self.bindir, self.root, self.as_postgres = bindir, root, as_postgres
        self.data, self.log = root / "data", root / "server.log"
        self.options = options
        self.port = 0
        self.running = False

    def pg_ctl(self, *args: str) -> None:
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args], self.as_postgres)

    def start(self) -> None:
        options = f"-c port={self.port} -c unix_socket_directories={self.root} {SERVER_OPTIONS} {self.options}"
        self.pg_ctl("-l", str(self.log), "-w", "-t", "60", "-o", options.strip(), "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")
        self.running = False

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is down while this is entered, and up again after."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def started_cluster(prefix: str, options: str = "") -> Iterator[Cluster]:
    """A new cluster, initialised and running, in a temporary directory named `prefix`...; stopped and deleted on
    exit. `options` are extra server options (``-c name=value``). Skips without the PostgreSQL binaries."""
    from conftest import _free_port

    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                    "`make test` installs them")
    as_postgres = os.geteuid() == 0
    base = next((Path(d) for d in (tempfile.gettempdir(), "/tmp")
                 if not as_postgres or _traversable_by_others(Path(d))), None)
    if base is None:
        pytest.fail("no temporary directory the postgres user can reach")
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if as_postgres:
        shutil.chown(root, user=PG_USER, group=PG_USER)
    cluster = Cluster(bindir, root, as_postgres, options)
    try:
        try:
            _run([str(bindir / "initdb"), "-D", str(cluster.data), "-A", "trust", "-U", PG_USER, "-E", "UTF8",
                  "--locale=C", "--no-sync"], as_postgres)
            for attempt in range(3):  # the free port may be taken between choosing and binding it
                cluster.port = _free_port()
                try:
                    cluster.start()
                    break
                except subprocess.CalledProcessError:
                    if attempt == 2:
                        raise
        except subprocess.CalledProcessError as exc:
            server_log = cluster.log.read_text() if cluster.log.exists() else ""
            pytest.fail(f"cannot start PostgreSQL: {exc.cmd}: {exc.stderr}\n{server_log}")
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
