"""A "bare" deploy endpoint to compare the API with: ``uvicorn bench.bare_app:app``.

``POST /widgets/deployments`` parses the same body and only sends the Celery message (no auth,
no database): HTTP + FastAPI + the broker round trip. ``POST /auth/widgets/deployments`` adds
the real API's authentication dependency (token check and organization lookup), when it can be
imported. Both send through :func:`worker.producer.send_deploy`, as the real route does.
"""

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field

from worker import producer

app = FastAPI(title="bare deploy endpoint (benchmark)")


class DeployIn(BaseModel):
    widget_id: str = Field(min_length=1, max_length=64)
    deployment_id: str | None = None


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/widgets/deployments", status_code=202)
def bare_deploy(body: DeployIn, organization_id: Annotated[str, Query()]) -> dict[str, Any]:
    deployment_id = body.deployment_id or str(uuid.uuid4())
    producer.send_deploy(organization_id, body.widget_id, deployment_id)
    return {"deployment_id": deployment_id, "widget_id": body.widget_id, "status": "ready"}


try:
    from api_stub.deps import OrgDep
except ImportError:  # the API is being reworked: the bare route still works
    OrgDep = None  # type: ignore[assignment,misc]

if OrgDep is not None:

    @app.post("/auth/widgets/deployments", status_code=202)
    def bare_deploy_auth(body: DeployIn, org: OrgDep) -> dict[str, Any]:
        deployment_id = body.deployment_id or str(uuid.uuid4())
        producer.send_deploy(org.id, body.widget_id, deployment_id)
        return {"deployment_id": deployment_id, "widget_id": body.widget_id, "status": "ready"}
