"""The JSON envelope of seed 001 and the error codes, shared by every blueprint.

Success: ``{"status": "success", "data": ..., "timestamp": "2025-08-03T12:00:00Z"}``.
Error: ``{"status": "error", "error": {"code", "message", "details"}, "timestamp": ...}``.

Blueprints return :func:`success` and raise :class:`ApiError` (or ``InvalidParameter`` from
``analytics.promql``, ``PrometheusUnavailable`` from ``analytics.prometheus``); the handlers
installed by :func:`register_error_handlers` turn every failure, Flask's own 404/405 and
unhandled exceptions included, into the error envelope, so clients parse one shape only.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("gpu-analytics")


class ErrorCode(enum.StrEnum):
    """Seed 001 section 4, plus the codes this service needs that the seed lacks."""

    RESOURCE_NOT_FOUND = "RESOURCE_NOT_FOUND"
    GPU_NOT_AVAILABLE = "GPU_NOT_AVAILABLE"
    MIG_NOT_SUPPORTED = "MIG_NOT_SUPPORTED"
    INVALID_PARAMETER = "INVALID_PARAMETER"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # Not in the seed: the seed's service owned its data; ours depends on Prometheus.
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    # Not in the seed's table, but what Flask's 405 and 406 need to say.
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"


#: The HTTP status each code is served with.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.RESOURCE_NOT_FOUND: 404,
    ErrorCode.GPU_NOT_AVAILABLE: 409,
    ErrorCode.MIG_NOT_SUPPORTED: 409,
    ErrorCode.INVALID_PARAMETER: 400,
    ErrorCode.VALIDATION_ERROR: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.NOT_ACCEPTABLE: 406,
    ErrorCode.RATE_LIMIT_EXCEEDED: 429,
}

# Werkzeug exceptions without a code of their own map by status.
_CODE_FOR_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_PARAMETER,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.RESOURCE_NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    406: ErrorCode.NOT_ACCEPTABLE,
    429: ErrorCode.RATE_LIMIT_EXCEEDED,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REQUEST_ID_HEADER = "X-Request-ID"


class ApiError(Exception):
    """An error the API reports to the client as the error envelope."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: Mapping[str, Any] | None = None,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details) if details is not None else None
        self.status = status if status is not None else HTTP_STATUS[code]
        self.headers = dict(headers or {})


def not_found(what: str, identifier: str) -> ApiError:
    """404 RESOURCE_NOT_FOUND for ``what`` (e.g. "device") named ``identifier``."""
    return ApiError(
        ErrorCode.RESOURCE_NOT_FOUND,
        f"{what} not found",
        {"resource": what, "id": identifier},
    )


def utc_timestamp(when: dt.datetime) -> str:
    """ISO-8601 UTC with a ``Z``, to the second, as in the seed's examples."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    clock = current_app.extensions.get("gpu_analytics_clock")
    return clock() if clock is not None else dt.datetime.now(dt.UTC)


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as null, numpy scalars as Python ones and datetimes as ISO text.

    "Unavailable is not zero": a missing number is served as ``null``; bare NaN is not JSON.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return utc_timestamp(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    item = getattr(value, "item", None)  # numpy / pandas scalars
    if callable(item):
        return jsonable(item())
    return value


def csv_attachment(name: str, text: str) -> Response:
    """A CSV report as a download named `<name>.csv` (spreadsheets open it as a file)."""
    return Response(
        text,
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def success(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """The success envelope around ``data``."""
    body = {"status": "success", "data": jsonable(data), "timestamp": utc_timestamp(_now())}
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(
    code: ErrorCode,
    message: str,
    details: Mapping[str, Any] | None = None,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The error envelope; ``status`` defaults to the code's."""
    body = {
        "status": "error",
        "error": {
            "code": str(code),
            "message": message,
            "details": jsonable(dict(details)) if details is not None else None,
        },
        "timestamp": utc_timestamp(_now()),
    }
    response = jsonify(body)
    response.status_code = status if status is not None else HTTP_STATUS[code]
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def request_id() -> str:
    """This request's id: the caller's ``X-Request-ID`` when sane, else a fresh one."""
    rid = g.get("request_id")
    if rid is None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.request_id = rid
    return str(rid)


def _on_api_error(exc: ApiError) -> Response:
    return error_response(
        exc.code, exc.message, exc.details, status=exc.status, headers=exc.headers
    )


def _on_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _CODE_FOR_STATUS.get(
        status, ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_PARAMETER
    )
    headers: dict[str, str] = {}
    details: dict[str, Any] | None = None
    if status == 404:
        message = "no such endpoint or resource"
        details = {"path": request.path}
    elif status == 405:
        allowed = sorted(getattr(exc, "valid_methods", None) or [])
        message = f"method {request.method} is not allowed here"
        details = {"allowed": allowed}
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    else:
        message = exc.description or exc.name
    return error_response(code, message, details, status=status, headers=headers)


def _on_unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # pragma: no cover - routed to its own handler
        return _on_http_exception(exc)
    rid = request_id()
    # The traceback goes to the log only: it can carry paths, queries and secrets.
    log.error(
        "unhandled error in %s %s (request %s)", request.method, request.path, rid, exc_info=exc
    )
    return error_response(
        ErrorCode.INTERNAL_ERROR,
        "internal error; the service log has the details under this request id",
        {"requestId": rid},
    )


def register_error_handlers(app: Flask) -> None:
    """Make every error, Flask's own included, answer with the error envelope."""
    app.register_error_handler(ApiError, _on_api_error)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(Exception, _on_unexpected)

    @app.after_request
    def _add_request_id(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = request_id()
        return response
