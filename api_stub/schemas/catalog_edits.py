"""What a PATCH or DELETE of a purpose or preference answers: the item, and its reach."""

from __future__ import annotations

from pydantic import Field

from api_stub.schemas.catalog import PreferencePublic, PurposePublic


class PurposeEdited(PurposePublic):
    affected_widgets: int = Field(
        description="published widgets whose live snapshot embeds this purpose: they now have "
        "unpublished changes"
    )
    redeploy_bulk_id: str | None = Field(
        default=None, description="the bulk redeploy started by `?redeploy=true`"
    )


class PreferenceEdited(PreferencePublic):
    affected_widgets: int = Field(
        description="published widgets whose live snapshot embeds this preference (or its "
        "values): they now have unpublished changes"
    )
    redeploy_bulk_id: str | None = Field(
        default=None, description="the bulk redeploy started by `?redeploy=true`"
    )
