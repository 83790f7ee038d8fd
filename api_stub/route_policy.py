"""Per-route policy of the HTTP edge (:mod:`api_stub.edge`): who may call a route, how large its
body may be, and how long it may take to answer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

KiB = 1024
MiB = 1024 * KiB
# Any request body but an upload: the largest valid JSON body is well below this.
JSON_BODY_LIMIT = 256 * KiB
# One asset (at most MAX_ASSET_BYTES) plus the multipart framing around it.
MAX_ASSET_BYTES = 2 * MiB
MULTIPART_OVERHEAD = 16 * KiB
UPLOAD_BODY_LIMIT = MAX_ASSET_BYTES + MULTIPART_OVERHEAD
# The whole body must have arrived this long after the application first asks for it.
BODY_READ_TIMEOUT_SECONDS = 30.0
# Every request is answered within this long of its arrival (or of its body's, for a body that
# is still arriving): past it, a 503 with Retry-After, whatever holds the request (a database
# that hangs, see the module). Routes that call S3 get its call budget on top.
REQUEST_DEADLINE_SECONDS = 20.0
S3_ROUTE_DEADLINE_SECONDS = 60.0

RouteKind = Literal["organization", "admin", "public"]


@dataclass(frozen=True)
class RoutePolicy:
    kind: RouteKind
    body_limit: int
    deadline: float = REQUEST_DEADLINE_SECONDS


# Routes anyone may call; the admin routes; every other path is an organization route (so a
# new route is authenticated here unless it is listed). tests/api_stub/test_body_limits.py checks
# these tables against the routes' own dependencies and bodies in the OpenAPI.
PUBLIC_PATHS = frozenset({"/", "/health", "/sessions", "/openapi.json", "/docs"})
PUBLIC_PREFIXES = ("/docs/",)
ADMIN_PATHS = frozenset({"/organizations"})
ADMIN_PREFIXES = ("/organizations/",)
# Multipart uploads (method, path pattern): one asset each.
UPLOAD_ROUTES = (("POST", re.compile(r"/widgets/[^/]+/assets")),)
# Routes that call S3 while the client waits (asset upload and deletion).
S3_ROUTES = (*UPLOAD_ROUTES, ("DELETE", re.compile(r"/widgets/[^/]+/assets/[^/]+")))


def route_policy(method: str, path: str) -> RoutePolicy:
    """Who may call ``method path`` and how large its body may be."""
    kind: RouteKind = "organization"
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        kind = "public"
    elif path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        kind = "admin"
    upload = any(method == m and pattern.fullmatch(path) for m, pattern in UPLOAD_ROUTES)
    s3 = any(method == m and pattern.fullmatch(path) for m, pattern in S3_ROUTES)
    return RoutePolicy(
        kind,
        UPLOAD_BODY_LIMIT if upload else JSON_BODY_LIMIT,
        S3_ROUTE_DEADLINE_SECONDS if s3 else REQUEST_DEADLINE_SECONDS,
    )
