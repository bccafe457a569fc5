"""Optional bearer-token authentication for ``/api/v1``.

With tokens configured, every ``/api/v1`` route needs ``Authorization: Bearer <token>``;
``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document stay open so probes, scrapes
and API discovery work without a secret. The check runs before routing, so an unauthenticated
client cannot tell existing routes from missing ones. Tokens are compared in constant time
against every configured token (no early exit), so timing reveals neither a token nor which
one matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from flask import Flask, request

from analytics.envelope import ApiError, ErrorCode

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
        candidate = presented.encode("utf-8", errors="replace")
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched


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


def install_auth(app: Flask, tokens: Iterable[str]) -> None:
    """Require one of ``tokens`` on every protected request of ``app``."""
    checker = TokenChecker(tokens)

    @app.before_request
    def _authenticate() -> None:
        if not requires_token(request.path):
            return
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise ApiError(
                ErrorCode.UNAUTHORIZED,
                "missing bearer token",
                {"fix": "send 'Authorization: Bearer <token>'"},
                headers=_CHALLENGE,
            )
        if not checker.accepts(token):
            raise ApiError(
                ErrorCode.UNAUTHORIZED,
                "invalid bearer token",
                None,
                headers={"WWW-Authenticate": 'Bearer realm="gpu-analytics", error="invalid_token"'},
            )
