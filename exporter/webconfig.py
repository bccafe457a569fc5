"""TLS, mutual TLS and basic auth for the HTTP endpoints, from a web configuration file in the
format of the Prometheus exporter-toolkit (`--web.config.file`), re-read when it changes.

The file and the certificate, key and CA files it names are checked (one `stat` each) on every
new connection and request: a rotated certificate or a changed user list applies to the next
connection without a restart. A new version that does not load keeps the previous one in force
and is reported once, with what is wrong.

What the toolkit format has and this exporter does not do is refused at load, never silently
ignored: TLS below 1.2, client certificates accepted without verification
(RequestClientCert, RequireAnyClientCert), curve_preferences and rate_limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

log = logging.getLogger(__name__)

_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
#: Go's TLS 1.2 cipher suite names (what the toolkit format uses) and OpenSSL's names.
#: TLS 1.3 suites are not configurable, in Go as in OpenSSL's cipher list.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
#: Response headers the format allows, with the values allowed where the toolkit limits them.
_HEADERS: dict[str, frozenset[str] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": frozenset({"deny", "sameorigin"}),
    "X-Content-Type-Options": frozenset({"nosniff"}),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "auth_excluded_paths")
_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
_REFUSED = {
    "rate_limit": "rate_limit is not supported by gpu-exporter; --web.max-requests caps "
    "concurrent requests instead",
    "curve_preferences": "curve_preferences is not supported by gpu-exporter (OpenSSL's "
    "defaults are used); remove it",
}
#: Seconds a verified user and password are remembered, so bcrypt (slow by design, tens of
#: milliseconds per check) runs once per credential per this period, not once per scrape.
CREDENTIAL_CACHE_SECONDS = 60.0
_CREDENTIAL_CACHE_SIZE = 256


class WebConfigError(ValueError):
    """A web configuration that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class WebConfig:
    """A loaded web configuration: the TLS context (None: plain HTTP) and who may ask."""

    tls: ssl.SSLContext | None = None
    allowed_sans: frozenset[str] = frozenset()
    users: Mapping[str, bytes] = field(default_factory=dict)
    auth_excluded_paths: frozenset[str] = frozenset()
    headers: tuple[tuple[str, str], ...] = ()
    #: Files whose change means the configuration must be loaded again.
    files: tuple[str, ...] = ()


PLAIN = WebConfig()


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read, validate and build a web configuration; raises WebConfigError saying what to fix."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text()
    except OSError as error:
        raise WebConfigError(f"{source}: cannot read: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise WebConfigError(f"{source}: not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(f"{source}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    _check_keys(source, "", data, _TOP_KEYS)
    base = Path(source).resolve().parent
    tls, sans, files = _tls(source, base, data.get("tls_server_config") or {})
    users = _users(source, data.get("basic_auth_users") or {})
    excluded = _string_list(source, "auth_excluded_paths", data.get("auth_excluded_paths"))
    headers = _http(source, data.get("http_server_config") or {})
    if users and tls is None:
        log.warning("%s: basic auth without TLS sends passwords in clear text", source)
    return WebConfig(tls, frozenset(sans), users, frozenset(excluded), headers, (source, *files))


def _check_keys(source: str, where: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        name = f"{where}.{key}" if where else str(key)
        if key in _REFUSED:
            raise WebConfigError(f"{source}: {name}: {_REFUSED[key]}")
        if key not in allowed:
            raise WebConfigError(
                f"{source}: {name}: unknown key; allowed here: {', '.join(allowed)}"
            )


def _string_list(source: str, where: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise WebConfigError(f"{source}: {where}: expected a list of strings")
    return list(value)


def _tls(
    source: str, base: Path, spec: object
) -> tuple[ssl.SSLContext | None, list[str], list[str]]:
    """The server TLS context (None when no certificate is configured), allowed SANs, files."""
    where = "tls_server_config"
    if not isinstance(spec, dict):
        raise WebConfigError(f"{source}: {where}: expected a mapping")
    _check_keys(source, where, spec, _TLS_KEYS)
    if not spec:
        return None, [], []

    def text(key: str) -> str | None:
        value = spec.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise WebConfigError(f"{source}: {where}.{key}: expected a string")
        return value

    def file(key: str) -> str | None:
        value = text(key)
        return None if value is None else str(base / value)

    cert, key, ca = text("cert"), text("key"), text("client_ca")
    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    for inline, named in (
        ("cert", "cert_file"),
        ("key", "key_file"),
        ("client_ca", "client_ca_file"),
    ):
        if text(inline) and text(named):
            raise WebConfigError(f"{source}: {where}: give {inline} or {named}, not both")
    if not (cert or cert_file) and not (key or key_file):
        others = set(spec) - {"cert", "key", "cert_file", "key_file"}
        if others:
            raise WebConfigError(
                f"{source}: {where}: cert_file and key_file are required for TLS "
                f"(found only {', '.join(sorted(others))})"
            )
        return None, [], []
    if not (cert or cert_file):
        raise WebConfigError(f"{source}: {where}.cert_file: missing (the key has no certificate)")
    if not (key or key_file):
        raise WebConfigError(f"{source}: {where}.key_file: missing (the certificate has no key)")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _version(source, spec, "min_version", "TLS12")
    context.maximum_version = _version(source, spec, "max_version", "TLS13")
    if context.minimum_version > context.maximum_version:
        raise WebConfigError(f"{source}: {where}: min_version is above max_version")
    _load_chain(source, context, cert_file, key_file, cert, key)

    auth = spec.get("client_auth_type", "NoClientCert")
    if auth in ("RequestClientCert", "RequireAnyClientCert"):
        raise WebConfigError(
            f"{source}: {where}.client_auth_type: {auth} accepts certificates nobody verified; "
            "use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
        )
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(
            f"{source}: {where}.client_auth_type: {auth!r} is not one of {', '.join(_CLIENT_AUTH)}"
        )
    context.verify_mode = _CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        if not (ca or ca_file):
            raise WebConfigError(f"{source}: {where}: {auth} needs client_ca_file (or client_ca)")
        try:
            context.load_verify_locations(cafile=ca_file, cadata=ca)
        except (OSError, ssl.SSLError, ValueError) as error:
            raise WebConfigError(
                f"{source}: {where}.client_ca_file: cannot load: {error}"
            ) from None
    sans = _string_list(source, f"{where}.client_allowed_sans", spec.get("client_allowed_sans"))
    if sans and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(
            f"{source}: {where}.client_allowed_sans needs client_auth_type "
            "RequireAndVerifyClientCert: without a certificate there is no SAN to check"
        )
    suites = _string_list(source, f"{where}.cipher_suites", spec.get("cipher_suites"))
    if suites:
        unknown = [s for s in suites if s not in CIPHER_SUITES]
        if unknown:
            raise WebConfigError(
                f"{source}: {where}.cipher_suites: unknown or insecure {', '.join(unknown)}; "
                f"use some of {', '.join(CIPHER_SUITES)}"
            )
        context.set_ciphers(":".join(CIPHER_SUITES[s] for s in suites))
    if spec.get("prefer_server_cipher_suites", True):
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    files = [f for f in (cert_file, key_file, ca_file) if f is not None]
    return context, sans, files


def _version(source: str, spec: Mapping[str, Any], key: str, default: str) -> ssl.TLSVersion:
    value = spec.get(key, default)
    if value in ("TLS10", "TLS11"):
        raise WebConfigError(
            f"{source}: tls_server_config.{key}: {value} is refused; TLS 1.2 is the minimum"
        )
    if value not in _TLS_VERSIONS:
        raise WebConfigError(f"{source}: tls_server_config.{key}: use TLS12 or TLS13")
    return _TLS_VERSIONS[value]


def _load_chain(
    source: str,
    context: ssl.SSLContext,
    cert_file: str | None,
    key_file: str | None,
    cert: str | None,
    key: str | None,
) -> None:
    """Load the certificate and key; inline PEM goes through a private temporary directory."""
    with tempfile.TemporaryDirectory(prefix="gpu-exporter-tls-") as private:
        if cert is not None:
            cert_file = os.path.join(private, "cert.pem")
            Path(cert_file).write_text(cert)
        if key is not None:
            key_file = os.path.join(private, "key.pem")
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(key)
        try:
            context.load_cert_chain(certfile=str(cert_file), keyfile=key_file)
        except (OSError, ssl.SSLError) as error:
            raise WebConfigError(
                f"{source}: tls_server_config: cannot load the certificate and key: {error}"
            ) from None


def _users(source: str, spec: object) -> dict[str, bytes]:
    if not isinstance(spec, dict):
        raise WebConfigError(f"{source}: basic_auth_users: expected a mapping of user: bcrypt hash")
    users: dict[str, bytes] = {}
    for user, hashed in spec.items():
        where = f"{source}: basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"{where}: a user name is a non-empty string without ':'")
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(
                f'{where}: expected a bcrypt hash ($2y$...), e.g. from `htpasswd -nBC 10 ""`'
            )
        try:
            bcrypt.checkpw(b"", hashed.encode())
        except ValueError:
            raise WebConfigError(f"{where}: not a valid bcrypt hash") from None
        users[user] = hashed.encode()
    return users


def _http(source: str, spec: object) -> tuple[tuple[str, str], ...]:
    where = "http_server_config"
    if not isinstance(spec, dict):
        raise WebConfigError(f"{source}: {where}: expected a mapping")
    _check_keys(source, where, spec, ("http2", "headers"))
    if not isinstance(spec.get("http2", True), bool):
        raise WebConfigError(f"{source}: {where}.http2: expected true or false")
    headers = spec.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{source}: {where}.headers: expected a mapping")
    out = []
    for name, value in headers.items():
        if name not in _HEADERS:
            raise WebConfigError(
                f"{source}: {where}.headers.{name}: not allowed; use some of {', '.join(_HEADERS)}"
            )
        if not isinstance(value, str):
            raise WebConfigError(f"{source}: {where}.headers.{name}: expected a string")
        allowed = _HEADERS[name]
        if allowed is not None and value.lower() not in allowed:
            raise WebConfigError(
                f"{source}: {where}.headers.{name}: use one of {', '.join(sorted(allowed))}"
            )
        if value:
            out.append((name, value))
    return tuple(out)


def _signature(files: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a file is rewritten or replaced (Kubernetes swaps a symlink)."""
    out: list[tuple[int, int, int] | None] = []
    for name in files:
        try:
            stat = os.stat(name)
        except OSError:
            out.append(None)
            continue
        out.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(out)


class WebConfigWatcher:
    """The configuration in force, re-read when its file or a file it names changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._config = load_web_config(self.path)  # a bad file at start-up is fatal
        self._signature = _signature(self._config.files)
        self._rejected: tuple[tuple[int, int, int] | None, ...] | None = None
        self._lock = threading.Lock()

    def current(self) -> WebConfig:
        """The configuration for the next connection or request (a few `stat` calls)."""
        config = self._config
        signature = _signature(config.files)
        if signature == self._signature or signature == self._rejected:
            return config
        with self._lock:
            if self._config is not config:  # another thread reloaded meanwhile
                return self._config
            try:
                fresh = load_web_config(self.path)
            except WebConfigError as error:
                if signature != self._rejected:
                    self._rejected = signature
                    log.error("web config not reloaded, the previous one stays in force: %s", error)
                return config
            self._config, self._signature, self._rejected = fresh, _signature(fresh.files), None
            log.info("web config %s reloaded", self.path)
            return fresh


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, remembering successes briefly.

    bcrypt runs one check at a time (a flood of wrong passwords costs one core at most, and
    the request cap answers the rest), and a user that does not exist costs the same bcrypt
    as one that does. Remembered credentials are keyed by an HMAC under a per-process key,
    so no password is kept in memory.
    """

    def __init__(self, ttl: float = CREDENTIAL_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._decoys: dict[bytes, bytes] = {}

    def check(self, header: str | None, users: Mapping[str, bytes]) -> bool:
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user_bytes, sep, password = decoded.partition(b":")
        if not sep:
            return False
        user = user_bytes.decode("utf-8", errors="replace")
        hashed = users.get(user)
        known = hashed is not None
        if hashed is None:
            hashed = self._decoy(next(iter(users.values())) if users else b"$2b$10$")
        token = hmac.new(self._key, b"\0".join((user_bytes, password, hashed)), hashlib.sha256)
        digest = token.digest()
        now = time.monotonic()
        with self._lock:
            seen = self._verified.get(digest)
            if seen is not None and now - seen < self.ttl:
                return known
        with self._bcrypt_lock:
            good = bcrypt.checkpw(password, hashed) and known
        if good:
            with self._lock:
                self._verified[digest] = now
                self._verified.move_to_end(digest)
                while len(self._verified) > _CREDENTIAL_CACHE_SIZE:
                    self._verified.popitem(last=False)
        return good

    def _decoy(self, like: bytes) -> bytes:
        """A hash of the same cost as a real user's, for names that do not exist."""
        cost = like[:7]  # b"$2b$10$"
        decoy = self._decoys.get(cost)
        if decoy is None:
            rounds = int(cost[4:6]) if cost[4:6].isdigit() else 10
            decoy = self._decoys[cost] = bcrypt.hashpw(
                secrets.token_bytes(16), bcrypt.gensalt(rounds)
            )
        return decoy


def peer_sans(certificate: Mapping[str, Any] | None) -> set[str]:
    """The subject alternative names (DNS, IP, e-mail, URI values) of a verified peer."""
    if not certificate:
        return set()
    return {str(value) for _, value in certificate.get("subjectAltName", ())}
