"""SQLModel tables (DESIGN "Data model"). Importing this package registers all of them."""

from worker.models.catalog import PREFERENCE_TYPES, Preference, PreferenceValue, Purpose
from worker.models.jobs import FINAL_STATUSES, ArchivedWidget, ArchiveJob, Deployment, JobStatus
from worker.models.tenancy import ApiKey, Organization
from worker.models.types import utcnow
from worker.models.widgets import (
    WIDGET_FORMATS,
    WIDGET_TEMPLATES,
    PublicationStatus,
    Widget,
    WidgetAsset,
)

__all__ = [
    "FINAL_STATUSES",
    "PREFERENCE_TYPES",
    "WIDGET_FORMATS",
    "WIDGET_TEMPLATES",
    "ApiKey",
    "ArchiveJob",
    "ArchivedWidget",
    "Deployment",
    "JobStatus",
    "Organization",
    "Preference",
    "PreferenceValue",
    "PublicationStatus",
    "Purpose",
    "Widget",
    "WidgetAsset",
    "utcnow",
]
