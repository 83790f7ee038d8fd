"""SQLModel tables (DESIGN "Data model"). Importing this package registers all of them."""

from worker.models.catalog import Preference, PreferenceValue, Purpose
from worker.models.jobs import (
    CREATED_BY_ADMIN,
    CREATED_BY_PRODUCER,
    FINAL_STATUSES,
    SCHEDULED,
    ArchivedWidget,
    ArchiveJob,
    BulkJob,
    Deployment,
)
from worker.models.tenancy import ApiKey, Organization
from worker.models.types import utcnow
from worker.models.webhooks import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSubscription,
)
from worker.models.widgets import (
    PublicationStatus,
    SnapshotCatalogRef,
    Widget,
    WidgetAsset,
)

__all__ = [
    "CREATED_BY_ADMIN",
    "CREATED_BY_PRODUCER",
    "FINAL_STATUSES",
    "SCHEDULED",
    "ApiKey",
    "ArchiveJob",
    "ArchivedWidget",
    "BulkJob",
    "Deployment",
    "Organization",
    "Preference",
    "PreferenceValue",
    "PublicationStatus",
    "Purpose",
    "SnapshotCatalogRef",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookSubscription",
    "Widget",
    "WidgetAsset",
    "utcnow",
]
