"""SQLModel tables (DESIGN "Data model"). Importing this package registers all of them."""

from worker.models.catalog import Preference, PreferenceValue, Purpose
from worker.models.jobs import FINAL_STATUSES, ArchivedWidget, ArchiveJob, Deployment
from worker.models.tenancy import ApiKey, Organization
from worker.models.types import utcnow
from worker.models.widgets import (
    PublicationStatus,
    Widget,
    WidgetAsset,
)

__all__ = [
    "FINAL_STATUSES",
    "ApiKey",
    "ArchiveJob",
    "ArchivedWidget",
    "Deployment",
    "Organization",
    "Preference",
    "PreferenceValue",
    "PublicationStatus",
    "Purpose",
    "Widget",
    "WidgetAsset",
    "utcnow",
]
