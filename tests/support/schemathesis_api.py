"""Schemathesis against the live API: credentials per security scheme, and the checks added to
(or narrowing) schemathesis's built-in ones.

* :class:`Credentials`: the bearer token each operation's security scheme asks for (the admin
  token for ``AdminToken`` routes, the organization's access token for the others), applied by
  a schemathesis auth provider, so ``ignored_auth`` knows the credentials are explicit and probes
  the operation without them and with invalid ones;
* :func:`positive_data_acceptance`: the built-in check, except for the rules a JSON Schema cannot
  state (listed in :data:`SEMANTIC_REJECTIONS`), answered 400 naming exactly those fields;
* :func:`ensure_resource_availability`: the built-in check, for requests that do name the
  object just created, and no object deleted since;
* :meth:`LiveApi.other_organization_sees_nothing`: what the built-in
  ``object_level_authorization`` cannot probe here (it swaps credentials only, while our tenant
  is also named by ``?organization_id=``, so it could only ever see the 403 of a token used for
  another organization): whatever one organization reached by a path with IDs, another
  organization (its own token and ``organization_id``) gets a 404 for (docs/api.md: another
  organization's objects are 404, never visible);
* :meth:`LiveApi.location_resolves`: a ``Location`` header leads to the object answered
  (``response_headers_conformance`` checks only that it is there and a string).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from schemathesis import AuthContext, Case, CheckContext, Response
from schemathesis.specs.openapi.checks import (
    ensure_resource_availability as builtin_ensure_resource_availability,
)
from schemathesis.specs.openapi.checks import (
    positive_data_acceptance as builtin_positive_data_acceptance,
)

# Schema-valid requests the API rightly answers 400, by operation: the rule involves other
# objects (which must exist in this organization), another field, or the uploaded bytes, none of
# which a JSON Schema can say. A 400 naming only these fields is not a rejected valid request.
SEMANTIC_REJECTIONS: dict[str, tuple[str, ...]] = {
    # selected purposes and preferences must be this organization's
    "POST /widgets": ("selected_purposes_ids", "selected_preferences_ids"),
    "PATCH /widgets/{widget_id}": ("selected_purposes_ids", "selected_preferences_ids"),
    # the widgets must be this organization's and not archived
    "POST /widgets/deployments/bulk": ("widget_ids",),
    # a rollback source must be a successful deployment of the same widget; publish_at must be
    # in the future (and within a year) when the request arrives
    "POST /widgets/deployments": ("source_deployment_id", "publish_at"),
    # only a preview can be promoted; publish_at as above
    "POST /widgets/deployments/{deployment_id}/promote": ("deployment_id", "publish_at"),
    # an endpoint must be https on a public address (WEBHOOK_ALLOW_PRIVATE_NETWORKS aside): the
    # host's addresses are not in the URL's text
    "POST /webhooks": ("url",),
    "PATCH /webhooks/{endpoint_id}": ("url",),
    # both deployments must have a frozen snapshot
    "GET /widgets/deployments/{deployment_id}/diff": ("deployment_id",),
    # the bytes must be an allowed image, of the declared type (docs/api.md: decided by the bytes)
    "POST /widgets/{widget_id}/assets": ("file",),
    # a value id must be one of this preference's values (given at most once)
    "PATCH /preferences/{preference_id}": ("values.",),
}


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _error_fields(response: Response) -> list[str]:
    body = _json(response.content)
    errors = body.get("errors") if isinstance(body, dict) else None
    return list(errors) if isinstance(errors, dict) else []


def is_semantic_rejection(case: Case, response: Response) -> bool:
    allowed = SEMANTIC_REJECTIONS.get(case.operation.label, ())
    fields = _error_fields(response)
    return (
        response.status_code == 400
        and bool(fields)
        and all(
            any(f == a or (a.endswith(".") and f.startswith(a)) for a in allowed) for f in fields
        )
    )


def positive_data_acceptance(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Schemathesis's ``positive_data_acceptance``, minus :data:`SEMANTIC_REJECTIONS`."""
    if is_semantic_rejection(case, response):
        return None
    return builtin_positive_data_acceptance(ctx, response, case)


def _deleted_ids(ctx: CheckContext) -> set[str]:
    """The objects this scenario deleted (or archived): path IDs of its successful DELETEs."""
    deleted: set[str] = set()
    for earlier in ctx.internals.find_all_cases():
        if earlier.method.upper() != "DELETE":
            continue
        answered = ctx.internals.find_response(case_id=earlier.id)
        if answered is not None and 200 <= answered.status_code < 300:
            deleted.update(str(v) for v in (earlier.path_parameters or {}).values())
    return deleted


def ensure_resource_availability(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Schemathesis's ``ensure_resource_availability`` (a 404 right after the object's creation),
    for requests that name the created object and no object deleted before. The built-in one
    counts only the parameters taken from the link, and recognizes a deletion by its path only:
    a deploy names its widget in the body (``widget_id``), which the state machine sometimes
    leaves generated to explore, and after ``DELETE /widgets/{widget_id}`` (archived) a deploy
    or a rollback of that widget is rightly a 404."""
    if response.status_code == 404:
        parent = ctx.internals.find_parent(case_id=case.id)
        parent_response = ctx.internals.find_response(case_id=parent.id) if parent else None
        created = _json(parent_response.content) if parent_response is not None else None
        if isinstance(created, dict) and isinstance(created.get("id"), str):
            sent = json.dumps([case.path_parameters, case.body], default=str)
            if json.dumps(created["id"]) not in sent:
                return None
            if any(json.dumps(gone) in sent for gone in _deleted_ids(ctx)):
                return None
    return builtin_ensure_resource_availability(ctx, response, case)


def _security_schemes(operation: Any) -> set[str]:
    raw = operation.definition.raw
    return {name for requirement in raw.get("security", []) for name in requirement}


@dataclass
class Credentials:
    """Filled by the test's fixture once the organization exists (schemas are built at import)."""

    admin_token: str
    organization_token: str = ""

    def token_for(self, operation: Any) -> str | None:
        schemes = _security_schemes(operation)
        if "AdminToken" in schemes:
            return self.admin_token
        if "OrganizationToken" in schemes:
            return self.organization_token
        return None

    def install(self, schema: Any) -> None:
        """Register the auth provider on ``schema``."""
        credentials = self

        @schema.auth(refresh_interval=None)
        class _Bearer:
            def get(self, case: Case, ctx: AuthContext) -> str | None:
                return credentials.token_for(ctx.operation)

            def set(self, case: Case, data: str | None, ctx: AuthContext) -> None:
                if data is not None:
                    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@dataclass
class LiveApi:
    """The live server, the organization under test and a second one, and the checks that need
    to send requests of their own."""

    base_url: str
    organization_id: str
    token: str
    other_organization_id: str
    other_token: str
    started: datetime  # everything created since belongs to the run
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))
    replayed: int = 0
    followed: int = 0

    def checks(self) -> list[Callable[[CheckContext, Response, Case], bool | None]]:
        return [
            positive_data_acceptance,
            self.location_resolves,
            self.other_organization_sees_nothing,
        ]

    def replay_as_other(self, response: Response) -> httpx.Response:
        """The request of ``response``, sent again as the other organization (its token, its
        ``organization_id``), byte for byte otherwise."""
        sent = response.request
        assert sent.url is not None and sent.method is not None
        parts = urlsplit(sent.url)
        query = [
            (k, self.other_organization_id if k == "organization_id" else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        url = urlunsplit(parts._replace(query=urlencode(query)))
        headers = {k: v for k, v in sent.headers.items() if k.lower() != "content-length"}
        headers["Authorization"] = f"Bearer {self.other_token}"
        body = sent.body.encode() if isinstance(sent.body, str) else sent.body
        self.replayed += 1
        return self.http.request(sent.method, url, headers=headers, content=body)

    def other_organization_sees_nothing(
        self, ctx: CheckContext, response: Response, case: Case
    ) -> bool | None:
        """An object one organization reached (2xx on a path with IDs) is a 404 for another."""
        if not 200 <= response.status_code < 300:
            return None
        if "OrganizationToken" not in _security_schemes(case.operation) or not case.path_parameters:
            return None
        got = self.replay_as_other(response)
        assert got.status_code == 404, (
            f"another organization got {got.status_code} (not 404) for {case.operation.label} "
            f"on this organization's object: {got.text[:300]}"
        )
        return True

    def location_resolves(self, ctx: CheckContext, response: Response, case: Case) -> bool | None:
        """A ``Location`` answered with a 2xx is where the created or accepted object is: a GET
        of it (same credentials) answers 200 with that object."""
        location = response.headers.get("location")
        if not 200 <= response.status_code < 300 or not location:
            return None
        auth = response.request.headers.get("Authorization")
        self.followed += 1
        got = self.http.get(
            f"{self.base_url}{location[0]}", headers={"Authorization": auth} if auth else {}
        )
        assert got.status_code == 200, (
            f"GET {location[0]} answered {got.status_code}: {got.text[:300]}"
        )
        answered, found = json.loads(response.content).get("id"), got.json().get("id")
        assert found == answered, f"GET {location[0]} is {found}, not the answered {answered}"
        return True
