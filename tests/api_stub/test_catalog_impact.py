"""Catalog edits reach published widgets: a PATCH or DELETE of a purpose or preference marks
exactly the widgets whose live snapshot embeds it, and can start their bulk redeploy."""

from __future__ import annotations

from typing import Any

from tests.support.jobs import poll


def status(org: Any, widget_id: str) -> str:
    return org.req("GET", f"/widgets/{widget_id}").json()["publication_status"]


def published(org: Any, *args: Any, **kw: Any) -> dict[str, Any]:
    w = org.widget(*args, **kw)
    done = org.wait_deployment(org.deploy(w["id"])["id"])
    assert done["status"] == "success", done
    return w


def test_purpose_edit_flips_exactly_the_embedding_published_widgets(
    database, org, make_org, celery_worker
):
    p, other_p = org.purpose(), org.purpose()
    embedding = [published(org, [p]), published(org, [p, other_p])]
    not_embedding = published(org, [other_p])
    draft_selecting = org.widget([p])  # never published: nothing live embeds it
    stranger = make_org()
    foreign = published(stranger, [stranger.purpose()])

    r = org.req("PATCH", f"/metadata/purposes/{p['id']}", json={"metadata": {"v": 2}})
    assert r.status_code == 200, r.text
    assert r.json()["affected_widgets"] == 2 and r.headers["X-Affected-Widgets"] == "2"
    assert r.json()["redeploy_bulk_id"] is None
    assert [status(org, w["id"]) for w in embedding] == ["unpublished_changes"] * 2
    assert status(org, not_embedding["id"]) == "published"
    assert status(org, draft_selecting["id"]) == "draft"
    assert status(stranger, foreign["id"]) == "published"

    # Redeploying one of them makes it published again; the edit reached its new snapshot.
    done = org.wait_deployment(org.deploy(embedding[0]["id"])["id"])
    assert done["config"]["purposes"][0]["metadata"] == {"v": 2}
    assert status(org, embedding[0]["id"]) == "published"


def test_preference_value_edit_and_delete_mark_embedding_widgets(database, org, celery_worker):
    pref = org.preference()
    w = published(org, [], [pref])
    untouched = published(org)
    value = pref["values"][0]
    r = org.req(
        "PATCH",
        f"/preferences/{pref['id']}",
        json={"values": [{"id": value["id"], "name": {"en": "Monthly"}}]},
    )
    assert r.status_code == 200 and r.json()["affected_widgets"] == 1, r.text
    assert status(org, w["id"]) == "unpublished_changes"
    assert status(org, untouched["id"]) == "published"

    w2 = published(org, [], [pref])
    r = org.req("DELETE", f"/preferences/{pref['id']}")
    assert r.status_code == 200 and r.json()["affected_widgets"] == 2, r.text
    assert status(org, w2["id"]) == "unpublished_changes"


def test_edit_with_redeploy_republishes_the_affected_widgets(database, org, celery_worker):
    p = org.purpose(metadata={"v": 1})
    widgets = [published(org, [p]) for _ in range(3)]
    bystander = published(org)
    r = org.req(
        "PATCH",
        f"/metadata/purposes/{p['id']}",
        params={"redeploy": "true"},
        json={"metadata": {"v": 2}},
    )
    assert r.status_code == 200 and r.json()["affected_widgets"] == 3, r.text
    bulk_id = r.json()["redeploy_bulk_id"]
    assert bulk_id

    def finished() -> dict[str, Any] | None:
        job = org.req("GET", f"/widgets/deployments/bulk/{bulk_id}").json()
        return job if job["status"] in ("success", "failure") else None

    job = poll(finished, 60, "the bulk redeploy")
    assert (job["status"], job["total"], job["success"]) == ("success", 3, 3), job
    deps = org.req("GET", "/widgets/deployments", params={"bulk_id": bulk_id}).json()
    assert sorted(d["widget_id"] for d in deps) == sorted(w["id"] for w in widgets)
    assert all(d["config"]["purposes"][0]["metadata"] == {"v": 2} for d in deps)
    assert [status(org, w["id"]) for w in widgets] == ["published"] * 3
    assert status(org, bystander["id"]) == "published"
