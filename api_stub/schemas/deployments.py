"""Deployments: the deploy request, the deployment resource, diffs and bulk redeploys."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints, model_validator

from api_stub.schemas.common import (
    JsonObject,
    OrgScopedInput,
    OutputModel,
    SafeId,
    Timestamp,
    document_input,
)
from worker.models.jobs import MAX_REASON_LENGTH
from worker.services.bulk import MAX_WIDGET_IDS

Reason = Annotated[str, StringConstraints(max_length=MAX_REASON_LENGTH)]
# ``production``: the container file websites load. ``preview``: the widget's preview object
# (configs/{api_key}/preview/{widget_id}.json, ``Cache-Control: no-store``), with its own order;
# it never changes the production file or the widget's publication status.
Target = Literal["production", "preview"]


class DeploymentCreate(OrgScopedInput):
    widget_id: SafeId
    # Optional idempotency key: sending the same one twice returns the first deployment.
    deployment_id: SafeId | None = None
    # A rollback: republish this earlier successful deployment's snapshot of the same widget.
    source_deployment_id: SafeId | None = None
    target: Target = "production"
    # RFC 3339 with an offset, in the future (at most a year ahead): the snapshot is frozen now
    # and published then (status ``scheduled`` until due; ``POST .../cancel`` cancels it).
    publish_at: AwareDatetime | None = None
    reason: Reason | None = None


class PromotionCreate(OrgScopedInput):
    """Promote a preview: publish its exact snapshot to production, as a new deployment."""

    # Optional idempotency key of the production deployment the promotion creates.
    deployment_id: SafeId | None = None
    # Promote later: as for a deploy, frozen now and published at this time.
    publish_at: AwareDatetime | None = None
    reason: Reason | None = None


class DeploymentPublic(OutputModel):
    id: str
    deployment_id: str
    organization_id: str
    widget_id: str
    target: Target
    config: JsonObject | None
    status: Literal["scheduled", "ready", "running", "success", "failure", "cancelled"]
    # When a scheduled deployment publishes (null: as soon as a worker takes it).
    publish_at: Timestamp | None
    error: str | None
    attempts: int
    widget_version: int | None
    s3_key: str | None
    checksum: str | None
    live_deployment_id: str | None
    # The widget's publish sequence given to this snapshot (None until frozen): higher wins.
    sequence: int | None
    source_deployment_id: str | None
    bulk_id: str | None
    # Who asked: the API key's id, "admin", or "producer" (a message sent without the API).
    created_by: str
    reason: str | None
    created_at: Timestamp
    updated_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class JsonPatchOperation(OutputModel):
    """One RFC 6902 operation."""

    op: Literal["add", "remove", "replace", "move", "copy", "test"]
    path: str
    value: Any = None
    from_: str | None = Field(default=None, alias="from")


BULK_SELECTORS = ("widget_ids", "purpose_id", "preference_id", "publication_status")


def _exactly_one_selector(schema: dict[str, Any]) -> None:
    """The document says what ``_one_selector`` checks: one selector given (not null), every
    other one absent or null."""
    document_input(schema)
    schema["oneOf"] = [
        {
            "required": [chosen],
            "properties": {
                name: {"not": {"type": "null"}} if name == chosen else {"type": "null"}
                for name in BULK_SELECTORS
            },
        }
        for chosen in BULK_SELECTORS
    ]


class BulkCreate(OrgScopedInput):
    """Exactly one selector: ``widget_ids``, ``purpose_id``, ``preference_id`` (the widgets
    whose live snapshot embeds it) or ``publication_status``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_selector)

    widget_ids: Annotated[list[SafeId], Field(min_length=1, max_length=MAX_WIDGET_IDS)] | None = (
        None
    )
    purpose_id: SafeId | None = None
    preference_id: SafeId | None = None
    publication_status: Literal["draft", "published", "unpublished_changes"] | None = None
    reason: Reason | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> BulkCreate:
        given = [k for k in BULK_SELECTORS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one selector: widget_ids, purpose_id, preference_id or "
                f"publication_status (got {', '.join(given) or 'none'})"
            )
        return self

    def selector(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, include=set(BULK_SELECTORS))


class BulkPublic(OutputModel):
    id: str
    organization_id: str
    status: Literal["ready", "running", "success", "failure"]
    total: int
    ready: int
    running: int
    success: int
    failure: int
    selector: JsonObject
    created_by: str
    reason: str | None
    # Why the fan-out was given up (the status then ends ``failure``); null otherwise.
    error: str | None
    created_at: Timestamp
    updated_at: Timestamp
