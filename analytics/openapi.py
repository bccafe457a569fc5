"""The OpenAPI 3.0 document served at ``/api/v1/openapi.json``, assembled from the API areas.

Each area module declares its path items next to its routes (``OPENAPI_PATHS``) with the
helpers here, which wrap the data schema in the success envelope and add the standard error
responses; :func:`build_document` merges them with the shared components. The document is
built per app from its configuration, so it says "bearer token required" exactly when the
app requires one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

from analytics.auth import API_PREFIX, requires_token
from analytics.envelope import ErrorCode

OPENAPI_VERSION = "3.0.3"
JSON = "application/json"
SECURITY_SCHEME = "bearerAuth"

_ERRORS: dict[int, tuple[str, str, tuple[ErrorCode, ...]]] = {
    400: (
        "BadRequest",
        "Invalid parameter",
        (ErrorCode.INVALID_PARAMETER, ErrorCode.VALIDATION_ERROR),
    ),
    401: ("Unauthorized", "Missing or invalid bearer token", (ErrorCode.UNAUTHORIZED,)),
    403: ("Forbidden", "The token may not do this", (ErrorCode.FORBIDDEN,)),
    404: ("NotFound", "No such resource", (ErrorCode.RESOURCE_NOT_FOUND,)),
    429: (
        "TooManyRequests",
        "Rate limit exceeded; retry after Retry-After seconds (details.retryAfter)",
        (ErrorCode.RATE_LIMIT_EXCEEDED,),
    ),
    500: (
        "InternalError",
        "Unexpected error; details in the service log",
        (ErrorCode.INTERNAL_ERROR,),
    ),
    503: (
        "ServiceUnavailable",
        "Prometheus is unreachable or failed the query, or the service is busy; retry later",
        (ErrorCode.SERVICE_UNAVAILABLE,),
    ),
}


# Schema atoms the API areas share: values may be null where the data does not say.
NULLABLE_NUMBER: dict[str, Any] = {"type": "number", "nullable": True}
NULLABLE_INTEGER: dict[str, Any] = {"type": "integer", "nullable": True}
NULLABLE_STRING: dict[str, Any] = {"type": "string", "nullable": True}
NULLABLE_RATIO: dict[str, Any] = {"type": "number", "nullable": True, "minimum": 0, "maximum": 1}
DOLLARS: dict[str, Any] = {"type": "number", "nullable": True, "description": "US dollars"}


def ref(name: str) -> dict[str, str]:
    """A ``$ref`` to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


def success_envelope(data: Mapping[str, Any]) -> dict[str, Any]:
    """The success envelope schema with ``data`` as its payload schema."""
    return {
        "type": "object",
        "required": ["status", "data", "timestamp"],
        "properties": {
            "status": {"type": "string", "enum": ["success"]},
            "data": dict(data),
            "timestamp": ref("Timestamp"),
        },
    }


def query_param(
    name: str,
    schema: Mapping[str, Any],
    description: str,
    *,
    required: bool = False,
) -> dict[str, Any]:
    """A query-string parameter."""
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": dict(schema),
    }


#: The namespace and team filters of the report and list endpoints.
NAMESPACE_FILTER = query_param(
    "namespace", {"type": "string"}, "Only pods in this namespace (a DNS-1123 label)."
)
TEAM_FILTER = query_param(
    "team", {"type": "string"}, "Only pods whose team label has this value (a label value)."
)


def path_param(
    name: str, description: str, schema: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A path parameter (always required)."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": dict(schema or {"type": "string"}),
    }


def operation(
    *,
    summary: str,
    data: Mapping[str, Any],
    tag: str,
    description: str = "",
    parameters: Sequence[Mapping[str, Any]] = (),
    errors: Iterable[int] = (),
    operation_id: str | None = None,
    status: int = 200,
    extra_responses: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON operation: success envelope around ``data``, plus the listed error statuses.

    500 is always added; 401 is added by :func:`build_document` when the path needs a token.
    """
    responses: dict[str, Any] = {
        str(status): {
            "description": summary,
            "content": {JSON: {"schema": success_envelope(data)}},
        }
    }
    for code in sorted({*errors, 500}):
        responses[str(code)] = {"$ref": f"#/components/responses/{_ERRORS[code][0]}"}
    responses.update(extra_responses or {})
    op: dict[str, Any] = {"tags": [tag], "summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = [dict(p) for p in parameters]
    if operation_id:
        op["operationId"] = operation_id
    return op


def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Timestamp": {
            "type": "string",
            "format": "date-time",
            "example": "2025-08-03T12:00:00Z",
            "description": "When the response was made, ISO-8601 UTC.",
        },
        "ErrorCode": {"type": "string", "enum": [str(code) for code in ErrorCode]},
        "Error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": ref("ErrorCode"),
                "message": {"type": "string"},
                "details": {
                    "type": "object",
                    "nullable": True,
                    "additionalProperties": True,
                    "description": "Machine-readable context: for INVALID_PARAMETER {field, "
                    "reason}; for INTERNAL_ERROR {requestId}; null when there is none.",
                },
            },
        },
        "ErrorEnvelope": {
            "type": "object",
            "required": ["status", "error", "timestamp"],
            "properties": {
                "status": {"type": "string", "enum": ["error"]},
                "error": ref("Error"),
                "timestamp": ref("Timestamp"),
            },
        },
    }
    responses = {
        name: {
            "description": f"{description} ({', '.join(str(c) for c in codes)})",
            "content": {JSON: {"schema": ref("ErrorEnvelope")}},
        }
        for name, description, codes in _ERRORS.values()
    }
    responses["TooManyRequests"]["headers"] = {
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."},
        **RATE_LIMIT_HEADERS,
    }
    return {
        "schemas": schemas,
        "responses": responses,
        "securitySchemes": {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "A token from the service's api_tokens_file.",
            }
        },
    }


def _version() -> str:
    try:
        return metadata.version("k8s-gpu-monitor")
    except metadata.PackageNotFoundError:
        return "0.0.0"


#: Seed 001 section 8's headers, on every /api/v1 response while rate limits are on.
RATE_LIMIT_HEADERS: dict[str, Any] = {
    "X-RateLimit-Limit": {
        "schema": {"type": "integer"},
        "description": "Requests allowed per minute for this token (or client address).",
    },
    "X-RateLimit-Remaining": {
        "schema": {"type": "integer"},
        "description": "Requests left in the current minute.",
    },
    "X-RateLimit-Reset": {
        "schema": {"type": "integer"},
        "description": "Unix time (seconds) when the current minute's count resets.",
    },
}


# Paths the app itself serves (not an area): its own metrics and this document.
CORE_PATHS: dict[str, Any] = {
    "/metrics": {
        "get": {
            "tags": ["service"],
            "summary": "The service's own metrics in the Prometheus text format",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus exposition (gpu_analytics_*)",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    f"{API_PREFIX}/openapi.json": {
        "get": {
            "tags": ["service"],
            "summary": "This OpenAPI document",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.0 document",
                    "content": {JSON: {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


def build_document(
    paths: Mapping[str, Any],
    *,
    auth_enabled: bool,
    scoped_tokens: bool = False,
    rate_limited: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document for ``paths`` (path items keyed by full path).

    ``scoped_tokens`` adds 403 (a team-scoped token asking beyond its scope) to protected
    operations; ``rate_limited`` adds 429 to every ``/api/v1`` operation.
    """
    merged: dict[str, Any] = {}
    for path, item in {**CORE_PATHS, **paths}.items():
        if path in merged:
            raise ValueError(f"OpenAPI path {path} is declared twice")
        new_item: dict[str, Any] = {}
        for method, op in item.items():
            op = dict(op)
            api = path.startswith(API_PREFIX + "/")
            if auth_enabled and requires_token(path):
                op["responses"] = {
                    **op["responses"],
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                }
                if scoped_tokens:
                    op["responses"]["403"] = {"$ref": "#/components/responses/Forbidden"}
            if rate_limited and api:
                op["responses"] = {
                    **op["responses"],
                    "429": {"$ref": "#/components/responses/TooManyRequests"},
                }
            elif auth_enabled:
                op.setdefault("security", [])  # open despite the document-wide requirement
            new_item[method] = op
        merged[path] = new_item
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "gpu-analytics",
            "version": _version(),
            "description": "GPU cost, usage and health over Prometheus. Every JSON response is "
            'an envelope: {"status": "success", "data", "timestamp"} or {"status": "error", '
            '"error": {"code", "message", "details"}, "timestamp"}.',
        },
        "paths": dict(sorted(merged.items())),
        "components": _components(),
    }
    if auth_enabled:
        document["security"] = [{SECURITY_SCHEME: []}]
    return document
