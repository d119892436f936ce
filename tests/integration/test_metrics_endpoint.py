"""The Prometheus endpoint of a real server: on loopback unless MLSIGNAL_METRICS_HOST says otherwise, behind the
bearer token when MLSIGNAL_AUTH_TOKEN is set, over HTTPS with the server's certificate when TLS is configured, and
refused at start-up where it would send the token in clear text off this machine.

In-process inference servers on 127.0.0.1:0 over an empty, migrated SQLite database (metrics need no model).
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

from conftest import _free_port
from shared.server.startup import StartupError
from shared.settings import Settings
from shared.store.migrate import upgrade

TOKEN = "metrics-t0ken-for-tests"


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine other than loopback, or None when it has none."""
    candidates = []
    for destination in ("10.255.255.255", "192.0.2.255", "198.51.100.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((destination, 9))  # UDP: picks the outgoing address, sends nothing
            except OSError:
                continue
            candidates.append(probe.getsockname()[0])
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    return next((ip for ip in candidates if not ip.startswith("127.") and ip != "0.0.0.0"), None)


def scrape(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """(HTTP status, body) of one GET."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10,
                                    context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("metrics")
    url = f"sqlite:///{root}/mlsignal.db"
    upgrade(url)
    return Settings(database_url=url, model_dir=root / "models", model_poll_seconds=0.5)


def serving(settings: Settings):
    from inference_service.server import start

    return start(replace(settings, metrics_port=_free_port()), "127.0.0.1:0")


def test_metrics_listen_on_loopback_by_default_and_not_on_the_machines_address(base):
    assert Settings().metrics_host == "127.0.0.1"
    running = serving(base)
    try:
        metrics = running.handle.metrics
        assert metrics is not None and metrics.address == ("127.0.0.1", metrics.port)
        status, body = scrape(f"http://127.0.0.1:{metrics.port}/metrics")
        assert status == 200 and "mlsignal_build_info" in body
        ip = non_loopback_ipv4()
        if ip is not None:
            assert not reachable(ip, metrics.port), f"metrics answer on {ip}:{metrics.port}"
    finally:
        running.stop(0.5)


def test_metrics_host_every_interface_is_reachable_on_the_machines_address(base):
    running = serving(replace(base, metrics_host="0.0.0.0"))
    try:
        metrics = running.handle.metrics
        assert metrics is not None and metrics.address == ("0.0.0.0", metrics.port)
        ip = non_loopback_ipv4()
        for host in ("127.0.0.1", *([ip] if ip else [])):
            status, body = scrape(f"http://{host}:{metrics.port}/metrics")
            assert status == 200 and "mlsignal_build_info" in body, host
    finally:
        running.stop(0.5)


def test_with_a_token_a_scrape_needs_it(base):
    running = serving(replace(base, auth_token=TOKEN))
    try:
        url = f"http://127.0.0.1:{running.handle.metrics.port}/metrics"
        status, body = scrape(url)
        assert status == 401 and "Bearer" in body and "mlsignal_" not in body
        assert scrape(url, "wrong-token")[0] == 401
        assert scrape(url, TOKEN + "x")[0] == 401
        assert scrape(url.removesuffix("/metrics"))[0] == 401  # every path
        status, body = scrape(url, TOKEN)
        assert status == 200 and "mlsignal_build_info" in body
    finally:
        running.stop(0.5)


def test_with_tls_the_endpoint_speaks_https_with_the_servers_certificate(base, tmp_path):
    from certificates import make_ca

    tls = make_ca(tmp_path / "tls", "metrics")
    running = serving(replace(base, auth_token=TOKEN, tls_cert=tls["cert"], tls_key=tls["key"]))
    try:
        port = running.handle.metrics.port
        context = ssl.create_default_context(cafile=str(tls["ca"]))
        assert scrape(f"https://127.0.0.1:{port}/metrics", context=context)[0] == 401
        status, body = scrape(f"https://localhost:{port}/metrics", TOKEN, context=context)
        assert status == 200 and "mlsignal_build_info" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP gets no answer
            scrape(f"http://127.0.0.1:{port}/metrics", TOKEN)
    finally:
        running.stop(0.5)


def test_a_token_is_not_served_in_clear_text_off_loopback(base):
    from shared.server.builder import plaintext_token_problem

    exposed = replace(base, auth_token=TOKEN, metrics_host="0.0.0.0", metrics_port=_free_port())
    problem = plaintext_token_problem(exposed, "127.0.0.1:0")
    assert problem is not None and "metrics" in problem and "MLSIGNAL_METRICS_HOST" in problem
    from inference_service.server import start

    with pytest.raises(StartupError, match="metrics"):
        start(exposed, "127.0.0.1:0")
    assert reachable("127.0.0.1", exposed.metrics_port) is False  # nothing was left listening
    # loopback, no token, or the explicit opt-in: no objection
    assert plaintext_token_problem(replace(exposed, metrics_host="localhost"), "127.0.0.1:0") is None
    assert plaintext_token_problem(replace(exposed, auth_token=None), "127.0.0.1:0") is None
    accepted = replace(exposed, allow_plaintext_token=True)
    assert plaintext_token_problem(accepted, "127.0.0.1:0") is None
    running = serving(accepted)
    try:
        ip = non_loopback_ipv4() or "127.0.0.1"
        assert scrape(f"http://{ip}:{running.handle.metrics.port}/metrics")[0] == 401
        assert scrape(f"http://{ip}:{running.handle.metrics.port}/metrics", TOKEN)[0] == 200
    finally:
        running.stop(0.5)
