"""``widgets.deploy`` (keyword arguments ``organization_id``, ``widget_id``, ``deployment_id``)
and ``widgets.deploy_chunk`` (a bulk redeploy's deployments, several at once)."""

from __future__ import annotations

from typing import Any

from worker import constants as c
from worker import producer
from worker.celery import app
from worker.ids import is_safe_id
from worker.s3 import get_store
from worker.services import deploy as service
from worker.services import deploy_chunk as deploy_chunk_service
from worker.tasks.base import RETRY_ON_TRANSIENT_ERRORS, JobTask, run_chunk_task


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


@app.task(name=c.DEPLOY_CHUNK_TASK, acks_late=True)
def deploy_chunk(organization_id: str, items: list[list[str]]) -> dict[str, Any]:
    """``widgets.deploy_chunk``: keyword arguments ``organization_id`` and ``items``, a list of
    ``[widget_id, deployment_id]`` (:mod:`worker.services.deploy_chunk`)."""
    return run_chunk_task(
        organization_id,
        items,
        lambda pairs: deploy_chunk_service.run_chunk(
            organization_id, pairs, store=get_store, hand_back=producer.send_deploy
        ),
        producer.send_deploy,
    )
