"""OpenAPI links of the widgets API: from an answer to the operations it leads to.

They document how the API is walked (create a widget, then read, edit, deploy, archive it...),
and schemathesis's stateful phase follows them (tests/api_stub/test_openapi_schemathesis.py).
"""

from __future__ import annotations

import copy
from typing import Any

# Links: (method, path, status) of an answer -> {name: (method, path of the next operation, its
# parameters, its request body)}. Values are OpenAPI runtime expressions or constants; the
# organization is always the caller's (``?organization_id=`` is not repeated).
_Link = tuple[str, str, dict[str, str], dict[str, Any] | None]
_WIDGET = "/widgets/{widget_id}"
_DEPLOYMENT = "/widgets/deployments/{deployment_id}"
_ID = "$response.body#/id"
_WIDGET_ID = "$response.body#/widget_id"
_WIDGET_LINKS: dict[str, _Link] = {
    "GetWidget": ("get", _WIDGET, {"path.widget_id": _ID}, None),
    "EditWidget": ("patch", _WIDGET, {"path.widget_id": _ID}, None),
    "ArchiveWidget": ("delete", _WIDGET, {"path.widget_id": _ID}, None),
    "DeployWidget": ("post", "/widgets/deployments", {}, {"widget_id": _ID}),
    "UploadAsset": ("post", f"{_WIDGET}/assets", {"path.widget_id": _ID}, None),
    "ListAssets": ("get", f"{_WIDGET}/assets", {"path.widget_id": _ID}, None),
    "ListDeployments": ("get", "/widgets/deployments", {"query.widget_id": _ID}, None),
}
LINKS: dict[tuple[str, str, str], dict[str, _Link]] = {
    ("post", "/organizations", "201"): {
        "GetOrganization": (
            "get",
            "/organizations/{organization_id}",
            {"path.organization_id": _ID},
            None,
        ),
        "CreateApiKey": (
            "post",
            "/organizations/{organization_id}/api-keys",
            {"path.organization_id": _ID},
            None,
        ),
    },
    ("post", "/organizations/{organization_id}/api-keys", "201"): {
        "CreateSession": (
            "post",
            "/sessions",
            {},
            {"type": "api-key", "key": "$response.body#/key", "secret": "$response.body#/secret"},
        ),
        "RevokeApiKey": (
            "delete",
            "/organizations/{organization_id}/api-keys/{key}",
            {
                "path.organization_id": "$response.body#/organization_id",
                "path.key": "$response.body#/key",
            },
            None,
        ),
    },
    ("post", "/metadata/purposes", "201"): {
        "GetPurpose": ("get", "/metadata/purposes/{purpose_id}", {"path.purpose_id": _ID}, None),
        "EditPurpose": ("patch", "/metadata/purposes/{purpose_id}", {"path.purpose_id": _ID}, None),
        "DeletePurpose": (
            "delete",
            "/metadata/purposes/{purpose_id}",
            {"path.purpose_id": _ID},
            None,
        ),
        "CreateWidgetWithIt": ("post", "/widgets", {}, {"selected_purposes_ids": [_ID]}),
        "RedeployEmbedding": ("post", "/widgets/deployments/bulk", {}, {"purpose_id": _ID}),
    },
    ("post", "/preferences", "201"): {
        "GetPreference": ("get", "/preferences/{preference_id}", {"path.preference_id": _ID}, None),
        "EditPreference": (
            "patch",
            "/preferences/{preference_id}",
            {"path.preference_id": _ID},
            None,
        ),
        "DeletePreference": (
            "delete",
            "/preferences/{preference_id}",
            {"path.preference_id": _ID},
            None,
        ),
        "CreateWidgetWithIt": ("post", "/widgets", {}, {"selected_preferences_ids": [_ID]}),
        "RedeployEmbedding": ("post", "/widgets/deployments/bulk", {}, {"preference_id": _ID}),
    },
    ("post", "/widgets", "201"): _WIDGET_LINKS,
    ("patch", _WIDGET, "200"): _WIDGET_LINKS,
    ("post", "/widgets/deployments", "202"): {
        "GetDeployment": ("get", _DEPLOYMENT, {"path.deployment_id": _ID}, None),
        "DiffWithLive": (
            "get",
            f"{_DEPLOYMENT}/diff",
            {"path.deployment_id": _ID, "query.against": "live"},
            None,
        ),
        "RepeatDeploy": (
            "post",
            "/widgets/deployments",
            {},
            {"widget_id": _WIDGET_ID, "deployment_id": "$response.body#/deployment_id"},
        ),
        "RollBackTo": (
            "post",
            "/widgets/deployments",
            {},
            {"widget_id": _WIDGET_ID, "source_deployment_id": _ID},
        ),
        "GetDeployedWidget": ("get", _WIDGET, {"path.widget_id": _WIDGET_ID}, None),
        "ArchiveDeployedWidget": ("delete", _WIDGET, {"path.widget_id": _WIDGET_ID}, None),
    },
    ("post", "/widgets/deployments/bulk", "202"): {
        "GetBulk": ("get", "/widgets/deployments/bulk/{bulk_id}", {"path.bulk_id": _ID}, None),
        "ListBulkDeployments": ("get", "/widgets/deployments", {"query.bulk_id": _ID}, None),
    },
    ("delete", _WIDGET, "202"): {
        "GetArchiveJob": ("get", "/widgets/archive-jobs/{job_id}", {"path.job_id": _ID}, None),
        "GetArchivedWidget": (
            "get",
            "/widgets/archived/{widget_id}",
            {"path.widget_id": _WIDGET_ID},
            None,
        ),
        "GetWidgetAfterArchive": ("get", _WIDGET, {"path.widget_id": _WIDGET_ID}, None),
        "RepeatArchive": ("delete", _WIDGET, {"path.widget_id": _WIDGET_ID}, None),
    },
    # The first item of a list (created by an earlier request, possibly long done by now).
    ("get", "/widgets", "200"): {
        "GetFirstWidget": ("get", _WIDGET, {"path.widget_id": "$response.body#/data/0/id"}, None),
    },
    ("get", "/metadata/purposes", "200"): {
        "GetFirstPurpose": (
            "get",
            "/metadata/purposes/{purpose_id}",
            {"path.purpose_id": "$response.body#/data/0/id"},
            None,
        ),
    },
    ("get", "/preferences", "200"): {
        "GetFirstPreference": (
            "get",
            "/preferences/{preference_id}",
            {"path.preference_id": "$response.body#/data/0/id"},
            None,
        ),
    },
    ("get", "/widgets/deployments", "200"): {
        "GetFirstDeployment": (
            "get",
            _DEPLOYMENT,
            {"path.deployment_id": "$response.body#/0/id"},
            None,
        ),
        "DiffFirstWithLive": (
            "get",
            f"{_DEPLOYMENT}/diff",
            {"path.deployment_id": "$response.body#/0/id", "query.against": "live"},
            None,
        ),
        "RollBackToFirst": (
            "post",
            "/widgets/deployments",
            {},
            {
                "widget_id": "$response.body#/0/widget_id",
                "source_deployment_id": "$response.body#/0/id",
            },
        ),
    },
    ("get", "/widgets/archived", "200"): {
        "GetFirstArchived": (
            "get",
            "/widgets/archived/{widget_id}",
            {"path.widget_id": "$response.body#/0/id"},
            None,
        ),
    },
    ("post", f"{_WIDGET}/assets", "201"): {
        "DeleteAsset": (
            "delete",
            f"{_WIDGET}/assets/{{asset_id}}",
            {"path.widget_id": _WIDGET_ID, "path.asset_id": _ID},
            None,
        ),
        "ListWidgetAssets": ("get", f"{_WIDGET}/assets", {"path.widget_id": _WIDGET_ID}, None),
    },
}


def _operation_ref(method: str, path: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def add_links(paths: dict[str, Any]) -> None:
    for (method, path, status), links in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        documented = response.setdefault("links", {})
        for name, (target_method, target_path, parameters, body) in links.items():
            if target_method not in paths.get(target_path, {}):
                continue
            link: dict[str, Any] = {"operationRef": _operation_ref(target_method, target_path)}
            if parameters:
                link["parameters"] = dict(parameters)
            if body is not None:
                link["requestBody"] = copy.deepcopy(body)
            documented[name] = link
