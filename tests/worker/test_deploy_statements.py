"""How many SQL statements one deploy costs (worker.services.deploy and publish), on SQLite and
PostgreSQL: the hot path stays lean. Counted with engine events on the real databases; the
deploy runs in this process against moto."""

from __future__ import annotations

from typing import Any

import pytest

from bench.statements import Statements, counting
from worker.db import api_engine, get_engine, unit_of_work
from worker.models import Deployment, utcnow
from worker.s3 import get_store
from worker.services.deploy import run_deployment

# Statements (reads and writes; BEGIN/COMMIT apart) of one deploy in the worker, for a widget
# with one purpose and one preference (with a value), and its transactions. What bounds them
# (docs/performance.md): the deployment's locked read comes before knowing whether a sequence is
# taken; the snapshot reads one statement per kind of catalog item, and writes its refs; the
# "newer waiting" check must come after the widget's lock; the outcome is the deployment's
# UPDATE and the widget's compare-and-set (a redeploy also prunes the older snapshots' refs; a
# same-content redeploy reads the fence in a third, read-only transaction). The outcome's
# transaction also writes its webhook event (one INSERT ... SELECT over the organization's
# subscriptions, writing nothing when it has none: worker.services.webhook_outbox).
FIRST_DEPLOY = 10
REDEPLOY = 11
SAME_CONTENT = 12
WITHOUT_CATALOG_ITEMS = 8
TRANSACTIONS = 2
# The API's POST /widgets/deployments: the token's key and organization (one statement, at the
# edge), the widget, the INSERT.
API_POST = 3


def _queue(org_id: str, widget_id: str) -> str:
    dep = Deployment(organization_id=org_id, widget_id=widget_id, enqueued_at=utcnow())
    with unit_of_work() as s:
        s.add(dep)
    return dep.deployment_id


def _deploy(org: Any, widget_id: str) -> Statements:
    dep_id = _queue(org.id, widget_id)
    with counting(get_engine(), this_thread=True) as seen:
        done = run_deployment(org.id, widget_id, dep_id, store=get_store)
    assert done.status == "success", done
    return seen


def _check(seen: Statements, what: str, limit: int, transactions: int = TRANSACTIONS) -> None:
    print(f"\n{what}: {seen.count} statements, {seen.begins} transactions\n{seen.breakdown()}")
    assert seen.count <= limit, f"{what}: {seen.count} > {limit}\n{seen.breakdown()}"
    assert seen.begins <= transactions and seen.commits <= transactions, seen


@pytest.fixture
def widget(org: Any) -> dict[str, Any]:
    return org.widget([org.purpose()], [org.preference()])


def test_first_deploy_of_a_widget(database: str, org: Any, widget: dict[str, Any]) -> None:
    _check(_deploy(org, widget["id"]), f"first deploy ({database})", FIRST_DEPLOY)


def test_first_deploy_of_a_widget_without_catalog_items(database: str, org: Any) -> None:
    bare = org.widget()
    _check(_deploy(org, bare["id"]), f"bare widget ({database})", WITHOUT_CATALOG_ITEMS)


def test_redeploy_with_new_content(database: str, org: Any, widget: dict[str, Any]) -> None:
    _deploy(org, widget["id"])
    r = org.req("PATCH", f"/widgets/{widget['id']}", json={"name": "renamed"})
    assert r.status_code == 200, r.text
    _check(_deploy(org, widget["id"]), f"redeploy ({database})", REDEPLOY)


def test_redeploy_of_the_same_content(database: str, org: Any, widget: dict[str, Any]) -> None:
    _deploy(org, widget["id"])
    seen = _deploy(org, widget["id"])
    _check(seen, f"same-content redeploy ({database})", SAME_CONTENT, TRANSACTIONS + 1)


def test_api_post_of_a_deploy(database: str, org: Any, widget: dict[str, Any]) -> None:
    with counting(api_engine()) as seen:
        org.deploy(widget["id"])
    print(f"\nPOST /widgets/deployments ({database}): {seen.count}\n{seen.breakdown()}")
    assert seen.count <= API_POST, seen.breakdown()
