"""What one delivery of a deploy job reports (the task's return value)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from worker.models import Deployment


@dataclass(frozen=True)
class DeployOutcome:
    deployment_id: str
    status: str
    published: bool
    live_deployment_id: str | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome(dep: Deployment, published: bool = False) -> DeployOutcome:
    return DeployOutcome(
        dep.deployment_id, dep.status, published, dep.live_deployment_id, dep.error
    )
