"""Task names, queues and the timing budget the delivery guarantees are built from."""

from __future__ import annotations

DEPLOY_TASK = "widgets.deploy"
DEPLOY_CHUNK_TASK = "widgets.deploy_chunk"
ARCHIVE_TASK = "widgets.archive"
ARCHIVE_CHUNK_TASK = "widgets.archive_chunk"
CLEANUP_TASK = "widgets.cleanup_drafts"
RECONCILE_TASK = "widgets.reconcile"
BULK_DEPLOY_TASK = "widgets.bulk_deploy"
LATE_WRITES_TASK = "widgets.check_late_writes"
SEND_DUE_TASK = "widgets.send_due_deployments"
DISPATCH_WEBHOOKS_TASK = "widgets.dispatch_webhooks"
DELIVER_WEBHOOKS_TASK = "widgets.deliver_webhooks"

DEPLOY_QUEUE = "deployments"
ARCHIVE_QUEUE = "archives"
MAINTENANCE_QUEUE = "maintenance"
# Webhook attempts wait on receivers (up to WEBHOOK_TIMEOUT_SECONDS each): their own queue, so a
# slow receiver never holds up a deploy's message.
WEBHOOK_QUEUE = "webhooks"
# Celery's default queue, for producers that send a task without naming a queue or routes.
DEFAULT_CELERY_QUEUE = "celery"
QUEUES = (DEPLOY_QUEUE, ARCHIVE_QUEUE, MAINTENANCE_QUEUE, WEBHOOK_QUEUE, DEFAULT_CELERY_QUEUE)

TASK_ROUTES = {
    DEPLOY_TASK: {"queue": DEPLOY_QUEUE},
    DEPLOY_CHUNK_TASK: {"queue": DEPLOY_QUEUE},
    BULK_DEPLOY_TASK: {"queue": DEPLOY_QUEUE},
    ARCHIVE_TASK: {"queue": ARCHIVE_QUEUE},
    ARCHIVE_CHUNK_TASK: {"queue": ARCHIVE_QUEUE},
    CLEANUP_TASK: {"queue": MAINTENANCE_QUEUE},
    RECONCILE_TASK: {"queue": MAINTENANCE_QUEUE},
    LATE_WRITES_TASK: {"queue": MAINTENANCE_QUEUE},
    SEND_DUE_TASK: {"queue": MAINTENANCE_QUEUE},
    DISPATCH_WEBHOOKS_TASK: {"queue": WEBHOOK_QUEUE},
    DELIVER_WEBHOOKS_TASK: {"queue": WEBHOOK_QUEUE},
}

# A task is soft-interrupted (and retried) after SOFT, killed after HARD seconds.
# A deploy takes well under a second; the limits only bound a hung S3 call or database lock.
TASK_SOFT_TIME_LIMIT = 45
TASK_TIME_LIMIT = 60
# S3 refuses a signed request more than 15 minutes after its signature date (SigV4), so a write
# held up in the network lands within this long of being sent, or never.
S3_REQUEST_VALIDITY_SECONDS = 15 * 60
LATE_WRITE_HORIZON_SECONDS = TASK_TIME_LIMIT + S3_REQUEST_VALIDITY_SECONDS + 60
# Celery retries for S3 outages that outlast botocore's own quick retries.
RETRY_BACKOFF_SECONDS = 2
RETRY_BACKOFF_MAX_SECONDS = 120
MAX_RETRIES = 8
# An unacknowledged message whose worker stopped refreshing it (worker.delivery) is redelivered
# after this long. Live workers refresh what they hold, so this only delays recovery from a worker
# killed outright; it is kept above the time limit plus the longest retry countdown anyway.
VISIBILITY_TIMEOUT = TASK_TIME_LIMIT + RETRY_BACKOFF_MAX_SECONDS + 60

# Broker sockets (workers, beat, the API's health checks, the reconciler's scans): no call waits
# forever on a broker that accepts connections and never answers. The API's sends use tighter
# bounds of their own (worker.producer).
BROKER_SOCKET_TIMEOUT = 5.0
BROKER_CONNECT_TIMEOUT = 3.0
