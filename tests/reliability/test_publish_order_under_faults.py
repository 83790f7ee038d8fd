"""The newest snapshot wins under S3 faults, with real ``celery -A worker worker`` (prefork)
subprocesses: concurrent deploys of one widget through a proxy that fails and delays writes
never move its file backwards, and a burst of deploys of one snapshot coalesces into a few writes.

Workers, broker and proxy: ``tests/support/publish_workers.py``, on this module's own Redis
database; the published file is read straight from moto (the ground truth).
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.api import OrgClient
from tests.support.chaos_s3 import ChaosS3Proxy
from tests.support.publish_workers import (
    Broker,
    SequenceReader,
    chaos_proxy,
    enqueue,
    finishing_org,
    live_file,
    own_broker,
    ready,
    wait_final,
    widget_row,
    without_identity,
    workers,
)

pytestmark = pytest.mark.e2e

# This module's own Redis database: unique across tests/ (grep BROKER_DB; the session uses 0).
BROKER_DB = 8


@pytest.fixture
def broker(services: dict[str, Any]) -> Iterator[Broker]:
    yield from own_broker(services["broker"], BROKER_DB)


@pytest.fixture
def proxy(services: dict[str, Any]) -> Iterator[ChaosS3Proxy]:
    yield from chaos_proxy(services["moto_url"])


@pytest.fixture
def chaos_org(org: OrgClient) -> Iterator[OrgClient]:
    yield from finishing_org(org)


def test_concurrent_deploys_of_one_widget_never_move_the_file_backwards(
    database, chaos_org, services, broker, proxy, s3, tmp_path
):
    org = chaos_org
    rng = random.Random(7)
    with workers(tmp_path, broker, proxy) as start:
        procs = [start("--concurrency", "4", wait_ready=False) for _ in range(2)]
        w = org.widget([org.purpose()])  # while the workers start
        key = org.container_key(w["id"])
        reader = SequenceReader(services["moto_url"], key)
        ready(broker, *procs)
        # Faults only once both workers are up (their start-up probe is not under test here).
        proxy.chaos({"PUT", "HEAD"}, p=0.2, delay_ms=(0, 80), seed=11)
        reader.start()
        try:
            dep_ids: list[str] = []
            for i in range(30):
                if rng.random() < 0.7:  # some consecutive deploys share their content
                    name = f"chaos-{i}-{uuid.uuid4().hex[:4]}"
                    r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": name})
                    assert r.status_code == 200, r.text
                dep_ids += enqueue(broker, org, w["id"])
                time.sleep(rng.uniform(0.02, 0.12))  # freezes interleave with the edits
            deps = wait_final(dep_ids, 150, procs, proxy)
            faults = dict(proxy.injected)
        finally:
            proxy.calm()
            time.sleep(0.1)
            reader.stop()
        for p in procs:
            assert p.proc.alive(), p.log(6000)

    assert reader.error is None, repr(reader.error)
    # The faults landed while the deploys were in flight (chaos was on until all were final).
    assert sum(faults.values()) >= 1, f"no fault was injected: {proxy.requests}"
    failed = {d.deployment_id: d.error for d in deps.values() if d.status != "success"}
    assert failed == {}, f"faults are transient, nothing may fail: {failed}"
    assert reader.seen, "the reader never saw the file"
    assert reader.backwards() == [], f"the file moved backwards: {reader.seen}"

    newest = max(deps.values(), key=lambda d: d.sequence or 0)
    assert newest.sequence is not None and newest.config is not None
    assert sorted(d.sequence for d in deps.values()) == list(
        range(newest.sequence - 29, newest.sequence + 1)
    )
    body, meta, _ = live_file(s3, key)
    # The newest snapshot's content is what websites see.
    assert without_identity(body) == without_identity(newest.config)
    assert meta["content-sha256"] == newest.content_checksum
    # The file is the one its metadata names: that deployment's bytes and sequence. It is the
    # newest deployment itself unless the newest had the same content (then nothing is uploaded
    # again): either way a deployment of the newest content.
    writer = deps[meta["deployment-id"]]
    assert body == writer.config
    assert int(meta["sequence"]) == writer.sequence
    assert writer.content_checksum == newest.content_checksum
    assert (reader.seen[-1][1], reader.seen[-1][2]) == (writer.sequence, writer.deployment_id)
    # The record moved to the newest sequence and names the file (or one of equal content).
    widget = widget_row(w["id"])
    assert widget.live_seq == newest.sequence
    assert widget.live_deployment_id is not None
    recorded = deps[widget.live_deployment_id]
    assert widget.live_deployment_id == meta["deployment-id"] or (
        recorded.content_checksum == meta["content-sha256"]
    )
    # Every deployment names the deployment whose file was live when it finished (itself, the
    # one it coalesced into, or the writer of the file that overtook it).
    for d in deps.values():
        assert d.live_deployment_id in deps, d
        assert deps[d.live_deployment_id].status == "success", d

    # Sequences order the snapshots: a higher sequence never carries an older widget version,
    # else "the highest sequence wins" publishes an edit that was already superseded and
    # websites see the widget go back to an older version while the sequence moves forward.
    seen_versions = [(seq, deps[dep].widget_version) for _, seq, dep in reader.seen]
    went_back = [(a, b) for a, b in itertools.pairwise(seen_versions) if (b[1] or 0) < (a[1] or 0)]
    by_seq = sorted(deps.values(), key=lambda d: d.sequence or 0)
    inversions = [
        (a.sequence, a.widget_version, b.sequence, b.widget_version)
        for a, b in itertools.pairwise(by_seq)
        if (b.widget_version or 0) < (a.widget_version or 0)
    ]
    assert (inversions, went_back) == ([], []), (
        f"(sequence, version, next sequence, its version) out of order: {inversions}; "
        f"(sequence, version) pairs of the live file that went back: {went_back}; "
        f"the live file's (sequence, version) over time: {seen_versions}"
    )


def test_burst_of_one_widget_coalesces(sqlite_database, chaos_org, broker, proxy, s3, tmp_path):
    org = chaos_org
    with workers(tmp_path, broker, proxy) as start:
        worker = start(wait_ready=False)  # default concurrency: 4 per core, at least 4
        w = org.widget([org.purpose()], [org.preference()])
        key = org.container_key(w["id"])
        ready(broker, worker)
        children = len(worker.children())
        dep_ids = enqueue(broker, org, w["id"], count=100)
        deps = wait_final(dep_ids, 120, [worker], proxy)
    assert children >= 4, f"expected the default pool size, got {children} children"
    statuses = {d.status for d in deps.values()}
    assert statuses == {"success"}, [(d.status, d.error) for d in deps.values() if d.error]
    puts = proxy.count("PUT", key=key)
    by_status = {
        status: proxy.count("PUT", key=key, status=status) for status in (200, 412, 409, 500)
    }
    t0 = proxy.journal[0][0] if proxy.journal else 0
    writes = [
        (round(t - t0, 3), status, note)
        for t, method, path, status, note in proxy.journal
        if method == "PUT" and path.endswith(key)
    ]
    assert 1 <= puts <= 10, (
        f"{puts} PUTs of {key} for 100 deploys of one snapshot: {by_status}\n"
        + ("\n".join(map(str, writes)))
    )
    newest = max(deps.values(), key=lambda d: d.sequence or 0)
    assert newest.sequence == widget_row(w["id"]).live_seq
    assert newest.config is not None
    body, meta, _ = live_file(s3, key)
    assert without_identity(body) == without_identity(newest.config)
    assert body == deps[meta["deployment-id"]].config
