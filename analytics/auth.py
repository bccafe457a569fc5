"""Optional bearer-token authentication for ``/api/v1``.

With tokens configured, every ``/api/v1`` route needs ``Authorization: Bearer <token>``;
``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document stay open so probes, scrapes
and API discovery work without a secret. The check runs before routing, so an unauthenticated
client cannot tell existing routes from missing ones. Tokens are compared in constant time
against every configured token (no early exit), so timing reveals neither a token nor which
one matched.

A token may be bound to teams or namespaces (:mod:`analytics.scope`); the hook records the
matched token's scope for the request, and the scope guard refuses what it may not see.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from flask import Flask, g, request

from analytics.envelope import ApiError, ErrorCode
from analytics.scope import UNRESTRICTED, Scope, set_current

API_PREFIX = "/api/v1"
#: Paths under API_PREFIX that need no token.
OPEN_API_PATHS = frozenset({f"{API_PREFIX}/openapi.json"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="gpu-analytics"'}


class TokenChecker:
    """Accepts a request when its bearer token equals one of ``tokens``."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(token.encode("utf-8") for token in tokens)
        if not self._tokens:
            # Fail closed: an empty token list must never mean "everyone is allowed".
            raise ValueError("TokenChecker needs at least one token")

    def accepts(self, presented: str) -> bool:
        """Constant-time membership test of ``presented`` in the configured tokens."""
        return self.match(presented) is not None

    def match(self, presented: str) -> int | None:
        """The index of the configured token equal to ``presented``, or None.

        Every token is compared (no early exit), so timing does not tell which one matched.
        """
        candidate = presented.encode("utf-8", errors="replace")
        found: int | None = None
        for index, token in enumerate(self._tokens):
            if hmac.compare_digest(candidate, token):
                found = index
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def requires_token(path: str) -> bool:
    """Whether ``path`` is protected when tokens are configured."""
    protected = path == API_PREFIX or path.startswith(API_PREFIX + "/")
    return protected and path not in OPEN_API_PATHS


def token_id(token: str) -> str:
    """A short, non-reversible name for a token (rate-limit keys, logs): never the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


_EXTENSION = "gpu_analytics_auth"
_UNSET = object()


class Authenticator:
    """The configured tokens, their ids and scopes: who a bearer header belongs to."""

    def __init__(self, tokens: Iterable[str], scopes: Mapping[str, Scope] | None = None) -> None:
        ordered = tuple(tokens)
        self._checker = TokenChecker(ordered)
        self._scopes = [(scopes or {}).get(token, UNRESTRICTED) for token in ordered]
        self._ids = [token_id(token) for token in ordered]

    def identify(self, header: str | None) -> tuple[str, Scope] | None:
        """(token id, scope) for a valid ``Authorization`` header, else None."""
        token = bearer_token(header)
        if token is None:
            return None
        index = self._checker.match(token)
        if index is None:
            return None
        return self._ids[index], self._scopes[index]


def request_identity(app: Flask) -> tuple[str, Scope] | None:
    """(token id, scope) of this request's valid bearer token; None without one or without auth.

    Computed once per request, so the rate limiter (which runs first) and the authentication
    hook compare the token once.
    """
    found = g.get("gpu_analytics_identity", _UNSET)
    if found is _UNSET:
        authenticator = app.extensions.get(_EXTENSION)
        found = (
            authenticator.identify(request.headers.get("Authorization"))
            if isinstance(authenticator, Authenticator)
            else None
        )
        g.gpu_analytics_identity = found
    return found


def install_auth(
    app: Flask, tokens: Iterable[str], scopes: Mapping[str, Scope] | None = None
) -> None:
    """Require one of ``tokens`` on every protected request of ``app``.

    ``scopes`` binds some tokens to teams or namespaces; the matched token's scope (or
    unrestricted) is recorded for the request (:func:`analytics.scope.current`).
    """
    app.extensions[_EXTENSION] = Authenticator(tokens, scopes)

    @app.before_request
    def _authenticate() -> None:
        if not requires_token(request.path):
            return
        if bearer_token(request.headers.get("Authorization")) is None:
            raise ApiError(
                ErrorCode.UNAUTHORIZED,
                "missing bearer token",
                {"fix": "send 'Authorization: Bearer <token>'"},
                headers=_CHALLENGE,
            )
        identity = request_identity(app)
        if identity is None:
            raise ApiError(
                ErrorCode.UNAUTHORIZED,
                "invalid bearer token",
                None,
                headers={"WWW-Authenticate": 'Bearer realm="gpu-analytics", error="invalid_token"'},
            )
        set_current(identity[1])
