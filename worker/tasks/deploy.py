"""``widgets.deploy``: keyword arguments ``organization_id``, ``widget_id``, ``deployment_id``."""

from __future__ import annotations

from typing import Any

from worker import constants as c
from worker.celery import app
from worker.ids import is_safe_id
from worker.s3 import get_store
from worker.services import deploy as service
from worker.tasks.base import RETRY_ON_TRANSIENT_ERRORS, JobTask


def _ids(kwargs: dict[str, Any]) -> tuple[str, str, str] | None:
    ids = (kwargs.get("organization_id"), kwargs.get("widget_id"), kwargs.get("deployment_id"))
    return ids if all(is_safe_id(i) for i in ids) else None  # type: ignore[return-value]


class DeployTask(JobTask):
    def record_failure(self, kwargs: dict[str, Any], error: str) -> None:
        ids = _ids(kwargs)
        if ids is not None:
            service.record_failure(*ids, error, store=get_store)

    def record_retry(self, kwargs: dict[str, Any], error: str) -> None:
        ids = _ids(kwargs)
        if ids is not None:
            service.note_retry(ids[0], ids[2], error)


@app.task(
    bind=True,
    base=DeployTask,
    name=c.DEPLOY_TASK,
    **RETRY_ON_TRANSIENT_ERRORS,
)
def deploy(
    self: DeployTask, organization_id: str, widget_id: str, deployment_id: str
) -> dict[str, Any]:
    outcome = service.run_deployment(organization_id, widget_id, deployment_id, store=get_store)
    return outcome.as_dict()
