"""After a run of generated requests: the database (through the ``DATABASE_URL`` the live server
uses) and the bucket hold no half-written state for the organizations under test.

:func:`settle` waits until the workers have finished every job those organizations started
(deployments, archive jobs, bulk fan-outs); :func:`half_written` lists every broken invariant,
one readable line each (an empty list is the pass):

- deployments: each names its organization's widget, an archived copy of it, or a finished
  ``deleted`` archive (deployments outlive their widget, never point at one that never was);
  a final one has ``finished_at``; a frozen one (``config``) has its sequence, version, key and
  checksum; a success was frozen; a rollback names a successful deployment of the same widget;
  a bulk deployment's job exists; nothing left ``ready``/``running``;
- widgets: the model's non-null fields hold values; ``published_version <= version``; the live
  record (sequence, ETag, deployment, published version) is all set or all unset, and names a
  successful deployment of the widget with that sequence; ``publish_seq >= live_seq``; an
  archived widget has its archive job; a live widget's container file is on S3, of that
  deployment;
- archive jobs: final; a ``deleted`` one left no widget, no archived copy and no file; an
  ``archived`` one left the archived copy, no widget and no file;
- assets: ``stored`` only (none left ``uploading``), each with its object on S3 and every object
  under the organization's ``assets/`` prefix with its row;
- bulk jobs fanned out; preference values, API keys and live catalog references with their
  parent row.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from worker.db import unit_of_work
from worker.models import (
    FINAL_STATUSES,
    ApiKey,
    ArchivedWidget,
    ArchiveJob,
    BulkJob,
    Deployment,
    Organization,
    Preference,
    PreferenceValue,
    SnapshotCatalogRef,
    Widget,
    WidgetAsset,
)
from worker.storage_keys import container_key

_WIDGET_REQUIRED = (
    "name",
    "format",
    "template_id",
    "enabled_languages",
    "default_language",
    "selected_purposes_ids",
    "selected_preferences_ids",
    "components",
    "version",
    "publish_seq",
    "created_at",
    "updated_at",
)


def _pending(session: Session, org_ids: list[str]) -> list[str]:
    unfinished = col(Deployment.status).not_in(FINAL_STATUSES)
    deps = session.exec(
        select(Deployment.id).where(col(Deployment.organization_id).in_(org_ids), unfinished)
    ).all()
    jobs = session.exec(
        select(ArchiveJob.id).where(
            col(ArchiveJob.organization_id).in_(org_ids),
            col(ArchiveJob.status).not_in(FINAL_STATUSES),
        )
    ).all()
    bulks = session.exec(
        select(BulkJob.id).where(
            col(BulkJob.organization_id).in_(org_ids), col(BulkJob.fanned_out_at).is_(None)
        )
    ).all()
    return [*(f"deployment {d}" for d in deps), *(f"archive job {j}" for j in jobs)] + [
        f"bulk job {b}" for b in bulks
    ]


def settle(started: datetime, timeout: float = 90) -> list[str]:
    """Wait for the workers to finish the jobs of the organizations created since ``started``;
    returns what is still pending."""
    ids = organizations_since(started)
    deadline = time.monotonic() + timeout
    while True:
        with unit_of_work() as session:
            pending = _pending(session, ids)
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.25)


def organizations_since(started: datetime) -> list[str]:
    with unit_of_work() as session:
        stmt = select(Organization.id).where(col(Organization.created_at) >= started)
        return list(session.exec(stmt).all())


def _objects(s3: Any, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def _head_metadata(s3: Any, bucket: str, key: str) -> dict[str, str] | None:
    try:
        return dict(s3.head_object(Bucket=bucket, Key=key)["Metadata"])
    except Exception as exc:  # botocore's ClientError: 404 is the answer sought
        if "404" in str(exc) or "Not Found" in str(exc):
            return None
        raise


def half_written(started: datetime, s3: Any, bucket: str) -> list[str]:
    """Broken invariants of the organizations created since ``started`` (and their rows)."""
    ids = organizations_since(started)
    problems: list[str] = []
    with unit_of_work() as session:
        orgs = {
            o.id: o for o in session.exec(select(Organization).where(col(Organization.id).in_(ids)))
        }
        problems += [f"pending after the run: {p}" for p in _pending(session, ids)]
        widgets = {
            w.id: w
            for w in session.exec(select(Widget).where(col(Widget.organization_id).in_(ids)))
        }
        archived = {
            a.id: a
            for a in session.exec(
                select(ArchivedWidget).where(col(ArchivedWidget.organization_id).in_(ids))
            )
        }
        jobs = list(
            session.exec(select(ArchiveJob).where(col(ArchiveJob.organization_id).in_(ids)))
        )
        deps = list(
            session.exec(select(Deployment).where(col(Deployment.organization_id).in_(ids)))
        )
        bulk_ids = set(
            session.exec(select(BulkJob.id).where(col(BulkJob.organization_id).in_(ids))).all()
        )
        assets = list(
            session.exec(select(WidgetAsset).where(col(WidgetAsset.organization_id).in_(ids)))
        )
        values = list(
            session.exec(select(PreferenceValue).where(col(PreferenceValue.created_at) >= started))
        )
        keys = list(session.exec(select(ApiKey).where(col(ApiKey.organization_id).in_(ids))))
        refs = list(
            session.exec(
                select(SnapshotCatalogRef).where(col(SnapshotCatalogRef.organization_id).in_(ids))
            )
        )
        all_widget_ids = set(session.exec(select(Widget.id)).all())
        all_org_ids = set(session.exec(select(Organization.id)).all())
        all_pref_ids = set(session.exec(select(Preference.id)).all())

    deleted = {(j.organization_id, j.widget_id) for j in jobs if j.result == "deleted"}
    by_key = {(d.organization_id, d.deployment_id): d for d in deps}
    for d in deps:
        name = f"deployment {d.id} ({d.status})"
        widget = widgets.get(d.widget_id)
        known = (
            (widget is not None and widget.organization_id == d.organization_id)
            or (
                d.widget_id in archived
                and archived[d.widget_id].organization_id == d.organization_id
            )
            or (d.organization_id, d.widget_id) in deleted
        )
        if not known:
            problems.append(f"{name}: widget {d.widget_id} is neither there, archived nor deleted")
        if d.status in FINAL_STATUSES and d.finished_at is None:
            problems.append(f"{name}: final without finished_at")
        if d.config is not None and None in (
            d.sequence,
            d.widget_version,
            d.s3_key,
            d.content_checksum,
        ):
            problems.append(f"{name}: frozen snapshot without sequence/version/key/checksum")
        if d.status == "success" and d.config is None:
            problems.append(f"{name}: success without a snapshot")
        if d.source_deployment_id is not None:
            source = by_key.get((d.organization_id, d.source_deployment_id))
            if source is None or source.widget_id != d.widget_id:
                problems.append(f"{name}: rollback source {d.source_deployment_id} unknown")
            elif d.config is not None and source.status != "success":
                problems.append(f"{name}: rolled back to a source that did not succeed")
        if d.bulk_id is not None and d.bulk_id not in bulk_ids:
            problems.append(f"{name}: bulk job {d.bulk_id} missing")

    job_widgets = {j.widget_id for j in jobs}
    for w in widgets.values():
        name = f"widget {w.id}"
        empty = [f for f in _WIDGET_REQUIRED if getattr(w, f) is None]
        if empty:
            problems.append(f"{name}: null {', '.join(empty)}")
        if w.published_version is not None and w.published_version > w.version:
            problems.append(f"{name}: published_version {w.published_version} > {w.version}")
        live = (w.live_seq, w.live_etag, w.live_deployment_id, w.published_version)
        if any(v is None for v in live) and any(v is not None for v in live):
            problems.append(f"{name}: half a live record {live}")
        if w.live_seq is not None and w.publish_seq < w.live_seq:
            problems.append(f"{name}: publish_seq {w.publish_seq} < live_seq {w.live_seq}")
        if w.archived_at is not None and w.id not in job_widgets:
            problems.append(f"{name}: archived without an archive job")
        if w.live_deployment_id is not None:
            dep = by_key.get((w.organization_id, w.live_deployment_id))
            if dep is None or dep.widget_id != w.id or dep.status != "success":
                problems.append(f"{name}: live deployment {w.live_deployment_id} not a success")
            if w.archived_at is None and w.organization_id in orgs:
                key = container_key(orgs[w.organization_id].api_key, w.id)
                meta = _head_metadata(s3, bucket, key)
                if meta is None or meta.get("deployment-id") != w.live_deployment_id:
                    problems.append(f"{name}: live file {key} is not {w.live_deployment_id}")

    for j in jobs:
        name = f"archive job {j.id} ({j.status}, {j.result})"
        if j.status != "success":
            continue
        if j.widget_id in widgets:
            problems.append(f"{name}: widget {j.widget_id} still there")
        if j.result == "archived" and j.widget_id not in archived:
            problems.append(f"{name}: archived copy missing")
        if j.result == "deleted" and j.widget_id in archived:
            problems.append(f"{name}: archived copy of a deleted draft")
        org = orgs.get(j.organization_id)
        if org is not None and _head_metadata(s3, bucket, container_key(org.api_key, j.widget_id)):
            problems.append(f"{name}: container file of {j.widget_id} still on S3")

    rows = {a.s3_key for a in assets}
    for a in assets:
        if a.status != "stored":
            problems.append(f"asset {a.id}: left {a.status!r}")
        if a.widget_id not in all_widget_ids:
            problems.append(f"asset {a.id}: widget {a.widget_id} missing")
    for org in orgs.values():
        objects = _objects(s3, bucket, f"assets/{org.api_key}/")
        problems += [f"S3 object {k} has no asset row" for k in sorted(objects - rows)]
        stored = {a.s3_key for a in assets if a.organization_id == org.id and a.status == "stored"}
        problems += [f"asset row {k} has no S3 object" for k in sorted(stored - objects)]

    problems += [
        f"preference value {v.id}: preference {v.preference_id} missing"
        for v in values
        if v.preference_id not in all_pref_ids
    ]
    problems += [
        f"API key {k.id}: organization {k.organization_id} missing"
        for k in keys
        if k.organization_id not in all_org_ids
    ]
    problems += [
        f"live catalog ref {r.widget_id}/{r.item_id}: widget not live"
        for r in refs
        if r.widget_id not in widgets or widgets[r.widget_id].live_deployment_id is None
    ]
    return problems
