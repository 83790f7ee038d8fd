"""Schemathesis against the live API (a real uvicorn server, SQLite, Redis, moto S3 and a real
Celery worker), authenticated as a real organization, with a fixed seed:

1. stateless: every operation, the examples, coverage and fuzzing phases, positive and negative
   data;
2. stateful: schemathesis's state machine over the document's OpenAPI links (create a widget,
   edit, deploy, roll back, diff, upload, archive...);
3. afterwards, the database and the bucket hold no half-written state
   (:mod:`tests.support.db_invariants`).

Checks, on every response: schemathesis's built-in ``not_a_server_error``,
``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance``,
``response_headers_conformance``, ``negative_data_rejection``, ``ignored_auth`` (each secured
operation probed without and with invalid credentials), ``missing_required_header``,
``unsupported_method`` and ``allow_header_conformance`` (coverage phase), ``use_after_free``
(stateful); narrowed, in :mod:`tests.support.schemathesis_api`: ``positive_data_acceptance``
(minus the 400s for rules a JSON Schema cannot state, listed in ``SEMANTIC_REJECTIONS``) and
``ensure_resource_availability`` (for requests that do name the object just created, not one
deleted since); replaced: ``object_level_authorization`` (it swaps credentials only, while the
tenant is also named by ``?organization_id=``, so it could only see 403s) by
``other_organization_sees_nothing`` (another organization gets a 404 for every object reached);
added: ``location_resolves`` (a ``Location`` leads to the object answered); off:
``max_response_time`` (no latency target for a test run on a shared 2-core machine).

``SCHEMATHESIS_MAX_EXAMPLES`` (fuzzing examples per operation and mode) and
``SCHEMATHESIS_SCENARIOS`` (stateful scenarios) scale the run up for a longer job.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import httpx
import pytest
import schemathesis
import schemathesis.specs.openapi.stateful as stateful_module
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import overrides
from schemathesis.specs.openapi.checks import (
    ensure_resource_availability,
    positive_data_acceptance,
)

from api_stub.app import create_app
from tests.api_stub.live_server import live_server
from tests.conftest import BUCKET
from tests.conftest import _use_database as use_database
from tests.support.api import ADMIN, ADMIN_TOKEN, make_org_client
from tests.support.db_invariants import half_written, settle
from tests.support.schemathesis_api import Credentials, LiveApi

SEED = 20261129
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "50"))
SCENARIOS = int(os.environ.get("SCHEMATHESIS_SCENARIOS", "200"))
MAX_STEPS = 12
# The organization under test. Its id is in the configuration, which is read when the tests are
# collected, before any server runs; the fixture creates it under this id (the API has no way to
# choose one), then an API key (admin route) and an access token (POST /sessions) for it.
ORGANIZATION_ID = f"schemathesis-{SEED}"
CREDENTIALS = Credentials(admin_token=ADMIN_TOKEN)
RUN: Counter[str] = Counter()

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "generation": {
            "mode": "all",  # positive and negative
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # No NUL character in generated strings: the API refuses one anywhere in a body
            # (PostgreSQL cannot store it). The document says so with a pattern on every typed
            # string and key, but only in words on free-form objects (`metadata`, `components`:
            # a recursive schema breaks openapi-python-client, see test_generated_client.py),
            # so schemathesis would send them as valid. test_input_validation.py tests refusing.
            "allow-x00": False,
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {
                "enabled": True,
                "max-steps": MAX_STEPS,
                # The document's own links (api_stub.openapi_links.LINKS) chain the operations. The
                # dependency analysis guesses from names, wrongly here: it sends a deployment's
                # `deployment_id` where its `id` is meant, and a new organization's id to
                # routes whose token is for another one.
                "inference": {"algorithms": []},
            },
        },
        # Every request is this organization's (a body may repeat it, Didomi style).
        "parameters": {
            "query.organization_id": ORGANIZATION_ID,
            "body.organization_id": ORGANIZATION_ID,
        },
    }
)
schema = schemathesis.openapi.from_dict(create_app().openapi(), config=CONFIG)
CREDENTIALS.install(schema)


# Headers that frame the HTTP message itself. The HTTP server (uvicorn's h11), not the
# application, parses them, and answers a malformed one with its own `400 Invalid HTTP request
# received.` in text/plain before any route runs: not something the document can describe.
# Negative cases add random headers, and once in a while one of these (a `transfer-encoding: #!~`
# failed a CI run), so they are dropped from every generated case.
FRAMING_HEADERS = frozenset(
    {"transfer-encoding", "content-length", "host", "connection", "te", "trailer", "upgrade"}
    | {"keep-alive", "proxy-connection", "expect"}
)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """The configured parameters (``organization_id``), also on the state machine's cases, which
    schemathesis applies only when generating the stateless ones (its own engine does this too).
    Applied in this hook, schemathesis sees the edit: a negative case whose only invalid value was
    replaced is then labelled positive. A schema without parameters is left alone. Message
    framing headers are dropped (:data:`FRAMING_HEADERS`)."""
    overrides.for_operation(case.operation.schema.config, operation=case.operation).apply_to(case)
    for name in [h for h in case.headers or {} if h.lower() in FRAMING_HEADERS]:
        del case.headers[name]


@pytest.fixture(scope="module")
def live_api(services: dict[str, Any], celery_worker_session: Any) -> Iterator[LiveApi]:
    from worker.db import unit_of_work
    from worker.models import Organization

    use_database(services["sqlite_url"])
    RUN.clear()
    started = datetime.now(UTC)
    with unit_of_work() as session:
        session.add(Organization(id=ORGANIZATION_ID, name="schemathesis"))
    with live_server(create_app()) as address, httpx.Client(base_url=f"http://{address}") as http:
        key = http.post(f"/organizations/{ORGANIZATION_ID}/api-keys", headers=ADMIN)
        assert key.status_code == 201, key.text
        body = {"type": "api-key", "key": key.json()["key"], "secret": key.json()["secret"]}
        session_ = http.post("/sessions", json=body)
        assert session_.status_code == 201, session_.text
        CREDENTIALS.organization_token = session_.json()["access_token"]
        other = make_org_client(http, "schemathesis-other")
        api = LiveApi(
            base_url=f"http://{address}",
            organization_id=ORGANIZATION_ID,
            token=CREDENTIALS.organization_token,
            other_organization_id=other.id,
            other_token=other.token,
            started=started,
        )
        yield api
        api.http.close()


def _validate(api: LiveApi, case: Any, response: Any, **kwargs: Any) -> None:
    RUN[f"{case.meta.phase.name.value} {case.meta.generation.mode.value}"] += 1
    if case.method.upper() != case.operation.method.upper():
        RUN["of which unsupported methods"] += 1
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance, ensure_resource_availability],
        additional_checks=api.checks(),
        **kwargs,
    )


@schema.parametrize()
def test_stateless(case: Any, live_api: LiveApi) -> None:
    response = case.call(base_url=live_api.base_url)
    _validate(live_api, case, response, transport_kwargs={"base_url": live_api.base_url})


# Where scenarios start: what needs no object from an earlier answer. Schemathesis guesses that
# from field names, and `organization_id` or `theme_id` in a widget's body make it think
# POST /widgets needs objects no operation creates (the organization is the configured one, a
# theme is free text): left to itself it starts only from the admin routes.
SCENARIO_ROOTS = frozenset(
    {
        "POST /organizations",
        "POST /metadata/purposes",
        "POST /preferences",
        "POST /widgets",
        "GET /metadata/purposes",
        "GET /preferences",
        "GET /widgets",
        "GET /widgets/deployments",
        "GET /widgets/archived",
    }
)


def _scenario_roots(operations: Any, transitions: Any, graph: Any) -> Any:
    roots = stateful_module.RootTransitions()
    roots.reliable = {op.label for op in operations if op.label in SCENARIO_ROOTS}
    return roots


def test_stateful(live_api: LiveApi) -> None:
    with mock.patch.object(stateful_module, "classify_root_transitions", _scenario_roots):
        machine = schema.as_state_machine()

    class Workflow(machine):
        rule_order_seed = SEED

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": live_api.base_url}

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            try:
                _validate(live_api, case, response, transport_kwargs=kwargs, recorder=self.recorder)
            except Exception as exc:
                failures.append(exc)
                raise

    failures: list[Exception] = []
    try:
        Workflow.run(
            settings=settings(
                max_examples=SCENARIOS,
                stateful_step_count=MAX_STEPS,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
        )
    except Exception:
        # Hypothesis replays a failing scenario before reporting it; the server has moved on
        # since (more objects, jobs finished), so the replay can take other links and Hypothesis
        # then reports that ("FlakyStrategyDefinition") instead of the failure: report the first
        # failure as it was found.
        if failures:
            raise failures[0] from None
        raise


def test_no_half_written_rows(live_api: LiveApi, services: dict[str, Any]) -> None:
    """Once the workers are done, nothing the run touched is half written."""
    if not RUN:
        pytest.skip("runs after the schemathesis tests of this module")
    cases = sum(n for kind, n in RUN.items() if not kind.startswith("of which"))
    print(f"\nschemathesis: {cases} cases {dict(RUN)}")
    print(f"replayed as another organization: {live_api.replayed}, Locations: {live_api.followed}")
    still = settle(live_api.started)
    problems = half_written(live_api.started, services["s3"], BUCKET)
    assert not still and not problems, "\n".join(still + problems)


def test_the_invariants_catch_half_written_rows(services: dict[str, Any]) -> None:
    """The check above is not vacuous: planted half-written state (for a throwaway
    organization, removed afterwards) is reported, each kind by name."""
    from worker.db import unit_of_work
    from worker.models import Deployment, Organization, Widget, WidgetAsset

    use_database(services["sqlite_url"])
    started = datetime.now(UTC)
    org = Organization(name="planted")
    widget = Widget(organization_id=org.id, name="w", live_seq=1)  # half a live record
    asset = WidgetAsset(
        organization_id=org.id,
        widget_id=widget.id,
        filename="a.png",
        content_type="image/png",
        size=1,
        s3_key=f"assets/{org.api_key}/{widget.id}/uploading",
        checksum="0" * 64,
        status="uploading",
    )
    dep = Deployment(organization_id=org.id, widget_id="never-was", status="success")
    orphan = f"assets/{org.api_key}/{widget.id}/orphan"
    with unit_of_work() as session:
        session.add(org)
        session.flush()
        session.add_all([widget, dep])
        session.flush()
        session.add(asset)
    services["s3"].put_object(Bucket=BUCKET, Key=orphan, Body=b"x")
    try:
        report = "\n".join(half_written(started, services["s3"], BUCKET))
    finally:
        services["s3"].delete_object(Bucket=BUCKET, Key=orphan)
        with unit_of_work() as session:
            for row in (asset, dep, widget, org):
                session.delete(session.get(type(row), row.id))
                session.flush()
    for expected in (
        f"widget {widget.id}: half a live record",
        f"asset {asset.id}: left 'uploading'",
        f"S3 object {orphan} has no asset row",
        f"deployment {dep.id} (success): widget never-was is neither there",
        f"deployment {dep.id} (success): final without finished_at",
        f"deployment {dep.id} (success): success without a snapshot",
    ):
        assert expected in report, report
