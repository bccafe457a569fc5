"""Team-scoped tokens: what a token bound to teams or namespaces may see, enforced per request.

A token from the tokens file may carry ``teams`` and ``namespaces``; it then sees the pods whose
namespace is one of its namespaces *or* whose team label is one of its teams (the union), and
nothing about anyone else. Every ``/api/v1`` view declares how it honours a scope with
:func:`scoped`:

- ``filtered``: the view filters its answer to the token's pods (and the devices they hold now)
  and refuses filters naming anything outside the scope with 403 FORBIDDEN;
- ``open``: the answer carries no team's data (exporter health, the pricing rules);
- ``cluster``: cluster-wide figures (capacity, cluster totals, cluster forecasts); 403 for a
  scoped token.

A view that declares nothing is refused to scoped tokens (fail closed), so a new endpoint can
never leak by omission. ``docs/security.md`` lists what each endpoint shows a scoped token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import Flask, current_app, g, request

from analytics.envelope import ApiError, ErrorCode

Policy = Literal["filtered", "open", "cluster"]
POLICIES: tuple[str, ...] = ("filtered", "open", "cluster")
_ATTRIBUTE = "gpu_analytics_scope_policy"
_G_KEY = "gpu_analytics_scope"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Scope:
    """The teams and namespaces a token may see; both empty means everything (unrestricted)."""

    teams: frozenset[str] = field(default_factory=frozenset)
    namespaces: frozenset[str] = field(default_factory=frozenset)

    @property
    def restricted(self) -> bool:
        """Whether this scope hides anything."""
        return bool(self.teams or self.namespaces)

    def allows(self, namespace: str | None, team: str | None) -> bool:
        """Whether a pod in ``namespace`` with team label ``team`` is visible."""
        if not self.restricted:
            return True
        return (namespace is not None and namespace in self.namespaces) or (
            team is not None and team in self.teams
        )

    def allows_labels(self, labels: Mapping[str, Any], team_label: str) -> bool:
        """:meth:`allows` for a series' labels (``namespace`` and the team label)."""
        namespace = labels.get("namespace")
        team = labels.get(team_label)
        return self.allows(
            str(namespace) if namespace else None,
            str(team) if team else None,
        )

    @property
    def key(self) -> str:
        """A stable text form, for cache keys (never shown to clients)."""
        if not self.restricted:
            return "*"
        return f"t={','.join(sorted(self.teams))};n={','.join(sorted(self.namespaces))}"

    def check_filters(self, namespace: str | None = None, team: str | None = None) -> None:
        """403 FORBIDDEN when a request filter names a namespace or team outside the scope.

        A request may narrow to a namespace only if the token is bound to it, and to a team only
        if the token is bound to that team: a team-bound token cannot see a whole namespace.
        """
        if not self.restricted:
            return
        if namespace is not None and namespace not in self.namespaces:
            raise forbidden(f"this token may not read namespace {namespace!r}", "namespace")
        if team is not None and team not in self.teams:
            raise forbidden(f"this token may not read team {team!r}", "team")


UNRESTRICTED = Scope()


def forbidden(message: str, field_name: str | None = None) -> ApiError:
    """403 FORBIDDEN with the envelope; ``field_name`` is the parameter that asked too much."""
    details: dict[str, Any] = {"reason": "outside_token_scope"}
    if field_name is not None:
        details["field"] = field_name
    return ApiError(ErrorCode.FORBIDDEN, message, details)


def scoped(policy: Policy) -> Callable[[F], F]:
    """Declare how a view honours a team-scoped token (put it under the route decorator)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown scope policy {policy!r}")

    def mark(view: F) -> F:
        setattr(view, _ATTRIBUTE, policy)
        return view

    return mark


def policy_of(view: Callable[..., Any] | None) -> Policy | None:
    """The policy a view declared with :func:`scoped`, or None."""
    found = getattr(view, _ATTRIBUTE, None)
    return found if found in POLICIES else None


def current() -> Scope:
    """The scope of the token of this request (unrestricted without auth or scopes)."""
    found = g.get(_G_KEY)
    return found if isinstance(found, Scope) else UNRESTRICTED


def set_current(scope: Scope) -> None:
    """Record the scope of this request's token (the authentication hook calls this)."""
    setattr(g, _G_KEY, scope)


def install_scope_guard(app: Flask) -> None:
    """Refuse scoped tokens on views that are cluster-wide or declare no policy (fail closed).

    Registered after authentication, so :func:`current` is the token's scope here.
    """

    @app.before_request
    def _guard() -> None:
        scope = current()
        if not scope.restricted or request.url_rule is None:
            return
        view = current_app.view_functions.get(request.endpoint or "")
        policy = policy_of(view)
        if policy in ("filtered", "open"):
            return
        raise forbidden(
            "this endpoint shows cluster-wide figures; a team-scoped token may not read it"
            if policy == "cluster"
            else "this endpoint is not available to team-scoped tokens"
        )


def visible(rows: Iterable[Mapping[str, Any]], team_key: str = "team") -> list[Any]:
    """The rows (each with ``namespace`` and ``team_key``) the current scope may see."""
    scope = current()
    return [
        row
        for row in rows
        if scope.allows(
            str(row.get("namespace")) if row.get("namespace") else None,
            str(row.get(team_key)) if row.get(team_key) else None,
        )
    ]
