"""/metrics behind TLS, mutual TLS and basic auth from an exporter-toolkit web config, re-read
on change, and the cap on concurrent requests; every check with a real TLS or HTTP client."""

from __future__ import annotations

import datetime
import gzip
import http.client
import ipaddress
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exporter.server import MetricsServer
from exporter.webconfig import WebConfigError, WebConfigWatcher, load_web_config

BODY = b"# HELP gpu_up up\n# TYPE gpu_up gauge\ngpu_up 1.0\n"


class StaticSource:
    """What the server serves: fixed bytes, optionally held until released (to fill slots)."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold = hold
        self.entered = threading.Semaphore(0)

    def exposition(self, gzipped: bool = False) -> bytes:
        self.entered.release()
        if self.hold is not None:
            self.hold.wait(30)
        return gzip.compress(BODY) if gzipped else BODY

    def healthy(self) -> bool:
        return True


# -- certificates -----------------------------------------------------------------------------


@dataclass
class Pki:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by a CA the server does not trust
    stranger_key: Path
    other_san_cert: Path  # trusted, but with a SAN the server does not allow
    other_san_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    sans: list[x509.GeneralName],
    ca: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    def authority(name: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = _key()
        cert = _certificate(name, key, None, [], ca=True)
        return cert.subject, key, cert

    ca_name, ca_key, ca_cert = authority("test CA")
    _write(directory / "ca.pem", ca_cert, ca_key)
    other_name, other_key, _ = authority("someone else's CA")

    def leaf(file: str, issuer: Any, sans: list[x509.GeneralName]) -> tuple[Path, Path]:
        key = _key()
        path = _write(directory / file, _certificate(file, key, issuer, sans), key)
        return path, path.with_suffix(".key")

    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = leaf("server.pem", (ca_name, ca_key), local)
    client = leaf("client.pem", (ca_name, ca_key), [x509.DNSName("prometheus.monitoring")])
    stranger = leaf("stranger.pem", (other_name, other_key), [x509.DNSName("prometheus")])
    other = leaf("other.pem", (ca_name, ca_key), [x509.DNSName("grafana.monitoring")])
    return Pki(directory, directory / "ca.pem", *server, *client, *stranger, *other)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- serving ----------------------------------------------------------------------------------


@dataclass
class Served:
    server: MetricsServer
    config_path: Path | None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str = "/metrics") -> str:
        return f"{self.server.scheme}://127.0.0.1:{self.port}{path}"


@contextmanager
def serving(
    config: dict[str, Any] | None,
    directory: Path,
    source: Any = None,
    max_requests: int = 40,
) -> Iterator[Served]:
    path = None
    watcher = None
    if config is not None:
        path = directory / "web.yml"
        path.write_text(yaml.safe_dump(config))
        watcher = WebConfigWatcher(path)
    server = MetricsServer(
        ("127.0.0.1", 0), source or StaticSource(), web=watcher, max_requests=max_requests
    )
    server.serve_in_background()
    try:
        yield Served(server, path)
    finally:
        server.shutdown()
        server.server_close()


def tls_config(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "tls_server_config": {
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            **extra,
        }
    }


def client_context(
    pki: Pki,
    cert: tuple[Path, Path] | None = None,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if versions is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer what it is told to
        context.minimum_version, context.maximum_version = versions
    return context


def https_get(port: int, context: ssl.SSLContext, path: str = "/metrics") -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the server ends the connection without serving (handshake or after it)."""
    try:
        https_get(port, context)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


# -- TLS --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_serves_metrics_and_refuses_anything_below_tls_1_2(pki: Pki, tmp_path: Path) -> None:
    with serving(tls_config(pki), tmp_path) as served:
        response = requests.get(served.url(), verify=str(pki.ca), timeout=10)
        tls12 = https_get(
            served.port,
            client_context(pki, versions=(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)),
        )
        old = client_context(pki, versions=(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1))
        assert refused(served.port, old), "TLS 1.0/1.1 must be refused"
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as plain:
            plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = plain.recv(65536)
            except ConnectionResetError:
                answer = b""
    assert served.url().startswith("https://")
    assert response.status_code == 200 and response.content == BODY
    assert tls12 == (200, BODY)
    assert b"gpu_up" not in answer, "plain HTTP on the TLS port got metrics"


def test_min_version_tls13_refuses_a_tls_1_2_client(pki: Pki, tmp_path: Path) -> None:
    with serving(tls_config(pki, min_version="TLS13"), tmp_path) as served:
        only12 = client_context(pki, versions=(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
        assert refused(served.port, only12)
        assert https_get(served.port, client_context(pki)) == (200, BODY)


def test_mutual_tls_requires_a_certificate_from_the_trusted_ca_with_an_allowed_san(
    pki: Pki, tmp_path: Path
) -> None:
    config = tls_config(
        pki,
        client_auth_type="RequireAndVerifyClientCert",
        client_ca_file=str(pki.ca),
        client_allowed_sans=["prometheus.monitoring"],
    )
    with serving(config, tmp_path) as served:
        ok = requests.get(
            served.url(),
            verify=str(pki.ca),
            cert=(str(pki.client_cert), str(pki.client_key)),
            timeout=10,
        )
        no_cert = refused(served.port, client_context(pki))
        stranger = refused(served.port, client_context(pki, (pki.stranger_cert, pki.stranger_key)))
        other_san = refused(
            served.port, client_context(pki, (pki.other_san_cert, pki.other_san_key))
        )
    assert ok.status_code == 200 and ok.content == BODY
    assert no_cert, "a client without a certificate was served"
    assert stranger, "a certificate from an untrusted CA was accepted"
    assert other_san, "a certificate without an allowed SAN was accepted"


# -- basic auth -------------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


def users_config(cost: int = 10, **extra: Any) -> dict[str, Any]:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()
    return {"basic_auth_users": {"prometheus": hashed}, **extra}


def test_basic_auth_checks_bcrypt_once_then_remembers_the_credential_briefly(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    config = users_config(auth_excluded_paths=["/healthz"])
    with serving(config, tmp_path) as served:
        anonymous = requests.get(served.url(), timeout=10)
        wrong = requests.get(served.url(), auth=("prometheus", "wrong"), timeout=10)
        stranger = requests.get(served.url(), auth=("nobody", PASSWORD), timeout=10)
        health = requests.get(served.url("/healthz"), timeout=10)
        timings = []
        for _ in range(5):
            began = time.perf_counter()
            ok = requests.get(served.url(), auth=("prometheus", PASSWORD), timeout=10)
            timings.append(time.perf_counter() - began)
            assert ok.status_code == 200 and ok.content == BODY
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="gpu-exporter"'
    assert wrong.status_code == 401 and stranger.status_code == 401
    assert BODY not in anonymous.content + wrong.content + stranger.content
    assert health.status_code == 200  # probes need no password where the operator says so
    first, cached = timings[0], sorted(timings[1:])[1]
    record_property("first_ms", round(first * 1e3, 1))
    record_property("cached_ms", round(cached * 1e3, 2))
    assert first > 3 * cached, f"bcrypt not cached: first {first * 1e3:.1f} ms, then {timings}"


def test_basic_auth_and_tls_together(pki: Pki, tmp_path: Path) -> None:
    with serving({**tls_config(pki), **users_config()}, tmp_path) as served:
        denied = requests.get(served.url(), verify=str(pki.ca), timeout=10)
        allowed = requests.get(
            served.url(), verify=str(pki.ca), auth=("prometheus", PASSWORD), timeout=10
        )
    assert denied.status_code == 401
    assert allowed.status_code == 200


# -- reload -----------------------------------------------------------------------------------


def test_a_changed_file_applies_to_the_next_request_and_a_broken_one_keeps_the_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), serving(users_config(4), tmp_path) as served:
        assert served.config_path is not None
        before = requests.get(served.url(), auth=("prometheus", PASSWORD), timeout=10)
        renamed = users_config(4)
        renamed["basic_auth_users"] = {"scraper": renamed["basic_auth_users"]["prometheus"]}
        served.config_path.write_text(yaml.safe_dump(renamed))
        old_user = requests.get(served.url(), auth=("prometheus", PASSWORD), timeout=10)
        new_user = requests.get(served.url(), auth=("scraper", PASSWORD), timeout=10)
        served.config_path.write_text("basic_auth_users: [this is: not a mapping\n")
        broken = [
            requests.get(served.url(), auth=("scraper", PASSWORD), timeout=10).status_code
            for _ in range(3)
        ]
        served.config_path.write_text(yaml.safe_dump({}))
        open_again = requests.get(served.url(), timeout=10)
    assert before.status_code == 200
    assert old_user.status_code == 401 and new_user.status_code == 200
    assert broken == [200, 200, 200], "a broken file must keep the previous configuration"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "a broken file is reported once, not per request"
    assert "not valid YAML" in errors[0].getMessage()
    assert open_again.status_code == 200
    reloads = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" reloaded")]
    assert len(reloads) == 2, reloads


def test_a_rotated_certificate_is_served_to_the_next_connection(pki: Pki, tmp_path: Path) -> None:
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(pki.server_cert.read_bytes())
    live_key.write_bytes(pki.server_key.read_bytes())
    config = {"tls_server_config": {"cert_file": str(live_cert), "key_file": str(live_key)}}
    rotated = make_pki(tmp_path)  # a fresh server certificate, same names, new CA
    with serving(config, tmp_path) as served:
        first = https_get(served.port, client_context(pki))
        live_cert.write_bytes(rotated.server_cert.read_bytes())
        live_key.write_bytes(rotated.server_key.read_bytes())
        old_trust = refused(served.port, client_context(pki))
        new_trust = https_get(served.port, client_context(rotated))
    assert first == (200, BODY)
    assert old_trust, "the old certificate is still served after rotation"
    assert new_trust == (200, BODY)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tls", "users", "message"),
    [
        ({"min_version": "TLS11"}, None, "TLS 1.2 is the minimum"),
        ({"client_auth_type": "RequireAnyClientCert"}, None, "RequireAndVerifyClientCert"),
        ({"client_auth_type": "RequireAndVerifyClientCert"}, None, "needs client_ca_file"),
        ({"cipher_suites": ["TLS_RSA_WITH_RC4_128_SHA"]}, None, "cipher_suites"),
        ({"curve_preferences": ["X25519"]}, None, "curve_preferences"),
        ({"client_allowed_sans": ["x"]}, None, "client_allowed_sans"),
        (None, {"prometheus": "plain-text-password"}, "bcrypt hash"),
    ],
)
def test_a_bad_web_config_says_what_to_fix(
    pki: Pki, tmp_path: Path, tls: dict[str, Any] | None, users: Any, message: str
) -> None:
    config: dict[str, Any] = tls_config(pki, **tls) if tls is not None else {}
    if users is not None:
        config["basic_auth_users"] = users
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(WebConfigError, match=message) as raised:
        load_web_config(path)
    assert str(path) in str(raised.value)


def test_unknown_keys_and_rate_limit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("rate_limit: {interval: 1s, burst: 10}\n")
    with pytest.raises(WebConfigError, match=r"--web\.max-requests"):
        load_web_config(path)
    path.write_text("tls_server_config: {cert_fle: x.pem}\n")
    with pytest.raises(WebConfigError, match="cert_fle: unknown key"):
        load_web_config(path)


def test_the_exporter_refuses_to_start_on_a_bad_web_config(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("tls_server_config: {cert_file: missing.pem, key_file: missing.key}\n")
    result = subprocess.run(
        [sys.executable, "-m", "exporter.main", "--web.config.file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "certificate" in lines[0], lines


# -- the request cap --------------------------------------------------------------------------


def test_requests_beyond_the_cap_get_503_at_once_and_the_cap_frees_up(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    hold = threading.Event()
    source = StaticSource(hold)
    with serving(None, tmp_path, source=source, max_requests=2) as served:
        results: list[int] = []

        def scrape() -> None:
            results.append(requests.get(served.url(), timeout=30).status_code)

        held = [threading.Thread(target=scrape) for _ in range(2)]
        for thread in held:
            thread.start()
        for _ in held:
            assert source.entered.acquire(timeout=10), "the held requests never arrived"
        began = time.perf_counter()
        over = requests.get(served.url(), timeout=10)
        refused_in = time.perf_counter() - began
        hold.set()
        for thread in held:
            thread.join(timeout=10)
        after = requests.get(served.url(), timeout=10)
    record_property("refused_ms", round(refused_in * 1e3, 2))
    assert over.status_code == 503 and over.headers["Retry-After"] == "1"
    assert refused_in < 0.1, f"the 503 took {refused_in * 1e3:.0f} ms"
    assert results == [200, 200]
    assert after.status_code == 200


def test_connections_beyond_four_times_the_cap_are_closed_at_accept(tmp_path: Path) -> None:
    with serving(None, tmp_path, max_requests=1) as served:
        idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(4)]
        try:
            time.sleep(0.2)  # let the server accept them
            extra = socket.create_connection(("127.0.0.1", served.port), timeout=5)
            extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(100) == b"", "a connection beyond the cap was served"
            extra.close()
        finally:
            for connection in idle:
                connection.close()
        time.sleep(0.2)
        assert requests.get(served.url(), timeout=10).status_code == 200
