"""Deployments: the deploy request and the deployment resource."""

from __future__ import annotations

from typing import Literal

from api_stub.schemas.common import JsonObject, OrgScopedInput, OutputModel, SafeId, Timestamp


class DeploymentCreate(OrgScopedInput):
    widget_id: SafeId
    # Optional idempotency key: sending the same one twice returns the first deployment.
    deployment_id: SafeId | None = None


class DeploymentPublic(OutputModel):
    id: str
    deployment_id: str
    organization_id: str
    widget_id: str
    config: JsonObject | None
    status: Literal["ready", "running", "success", "failure"]
    error: str | None
    attempts: int
    widget_version: int | None
    s3_key: str | None
    checksum: str | None
    live_deployment_id: str | None
    # The widget's publish sequence given to this snapshot (None until frozen): higher wins.
    sequence: int | None
    created_at: Timestamp
    updated_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
