"""Each of issue #15's seven defects, put back one at a time: the test named for it must fail.

    .venv/bin/python -m tests.explorer.mutations [NAME ...]

For every mutation a throw-away ``git worktree`` of HEAD gets the code as it behaved before the
fix (a few lines, below), the named test runs there (real SQLite, moto, Redis, as always), and
the table says whether it failed, as it must. Not part of ``./dev test``: about 3 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPLORER = "tests/explorer/test_interleavings.py::test_every_interleaving_keeps_the_invariants"


@dataclass(frozen=True)
class Mutation:
    name: str
    defect: str  # issue #15's item
    path: str
    old: str
    new: str
    test: str
    also: tuple[tuple[str, str, str], ...] = ()  # more (path, old, new) of the same defect


MUTATIONS = [
    Mutation(
        "catalog-refs-only-when-live",
        "1: a catalog edit during an in-flight deploy is lost",
        "worker/services/deploy.py",
        "        add_snapshot_refs("
        "session, dep.organization_id, dep.widget_id, dep.sequence, dep.config)\n",
        "        pass\n",
        f"{EXPLORER}[first-deploy-vs-catalog-edit]",
    ),
    Mutation(
        "reconciler-ignores-bulk-jobs",
        "2: a bulk job accepted during a broker blip is never run",
        "worker/services/reconcile.py",
        "    bulks = _candidates(BulkJob, policy)\n",
        "    bulks: list[str] = []\n",
        "tests/worker/test_bulk_reconcile.py",
    ),
    Mutation(
        "no-same-content-fence",
        "3: an older If-Match write lands after a same-content record",
        "worker/services/publish.py",
        "    if dep.attempts > 1:\n        return True\n    with read_session",
        "    return False\n    with read_session",
        f"{EXPLORER}[older-deploy-crashing-vs-revert-to-live-content]",
    ),
    Mutation(
        "probe-checks-if-none-match-only",
        "4: the start-up probe checks only If-None-Match",
        "worker/s3.py",
        "            try:\n"
        "                self.put_json("
        'key, b"{}", metadata={}, if_match=f\'"{PROBE_WRONG_ETAG}"\')\n'
        "                return False  # If-Match ignored\n"
        "            except PreconditionFailed:\n"
        "                return True",
        "            return True",
        "tests/worker/test_s3_store.py::test_probe_refuses_a_store_that_ignores_either_condition",
    ),
    Mutation(
        "refused-record-ignores-archive",
        "5: a write landing after the archive is recorded success",
        "worker/services/publish.py",
        "    state = _read_state(dep)\n    if state.gone is not None:\n"
        "        return _take_down(dep, state.gone, store)\n    if (state.live.seq",
        "    state = _read_state(dep)\n    if (state.live.seq",
        f"{EXPLORER}[failing-first-deploy-vs-archive]",
    ),
    Mutation(
        "no-late-archive-sweep",
        "6: a late upload brings an archived widget back",
        "worker/services/late_writes.py",
        "    for _ in range(max_batches):\n"
        "        if sweep_archived(now, horizon, store, report) < BATCH:\n            break\n",
        "",
        f"{EXPLORER}[first-deploy-held-vs-archive]",
    ),
    Mutation(
        "give-up-fails-blind",
        "7: failure recorded while the bytes may be live",
        "worker/services/publish.py",
        "        if not frozen_ok and row.sequence is not None:\n            return row\n",
        "",
        f"{EXPLORER}[delivery-vs-give-up-of-the-same-deployment]",
        also=(
            (
                "worker/services/deploy.py",
                '            if dep.status == "failure" and dep.sequence is not None:',
                "            if False:",
            ),
        ),
    ),
]


# Not one of the seven: the bulk fan-out's own order (send, then move the cursor).
MUTATIONS.append(
    Mutation(
        "bulk-cursor-before-sends",
        "bulk: a crash between cursor and sends loses deploys",
        "worker/services/bulk.py",
        "        for chunk in chunks(ready):  # after the commit, outside any transaction\n"
        "            send(organization_id, chunk)\n"
        "            sent += len(chunk)\n"
        "        _advance(bulk_id, cursor)\n",
        "        _advance(bulk_id, cursor)\n"
        "        for chunk in chunks(ready):\n"
        "            send(organization_id, chunk)\n"
        "            sent += len(chunk)\n",
        "tests/explorer/test_interleavings.py::"
        "test_every_interleaving_of_a_bulk_fan_out_keeps_its_invariants",
    )
)

# Not one of the seven: a bulk redeploy's chunk must hand back what it could not finish.
MUTATIONS.append(
    Mutation(
        "chunk-drops-what-it-cannot-finish",
        "chunk: a deployment whose upload failed is left running",
        "worker/services/chunking.py",
        "        self.send_single(self.organization_id, self.widget_of[job_id], job_id)\n",
        "",
        f"{EXPLORER}[chunk-vs-edit-and-deploy]",
    )
)


# Not one of the seven: a preview has its own order and its own file.
MUTATIONS += [
    Mutation(
        "production-coalesces-into-a-preview",
        "preview: a production deploy counts a newer preview as its newer snapshot",
        "worker/services/live_state.py",
        "            Deployment.target == dep.target,\n            Deployment.deployment_id != dep",
        "            Deployment.deployment_id != dep",
        f"{EXPLORER}[deploy-vs-preview]",
    ),
    Mutation(
        "archive-leaves-the-preview-file",
        "preview: an archive takes down the container file only",
        "worker/services/archive.py",
        "        store().delete(preview_key(api_key, widget_id))\n",
        "        pass\n",
        f"{EXPLORER}[preview-vs-archive]",
    ),
]


def _git(*args: str, cwd: Path = ROOT) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def run(mutation: Mutation) -> tuple[bool, str]:
    """(the test failed, the first line that says why)."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(tree), "HEAD")
        try:
            for path, old, new in ((mutation.path, mutation.old, mutation.new), *mutation.also):
                target = tree / path
                text = target.read_text()
                if old not in text:
                    return False, f"mutation does not apply to {path} (code moved?)"
                target.write_text(text.replace(old, new, 1))
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
                 "-p", "no:cacheprovider", mutation.test],
                cwd=tree, capture_output=True, text=True, timeout=900,
                env={**os.environ, "EXPLORER_ALL": "1"},
            )  # fmt: skip
        finally:
            _git("worktree", "remove", "--force", str(tree))
    why = next(
        (line.strip() for line in out.stdout.splitlines() if line.startswith("E ")),
        out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "",
    )
    return out.returncode == 1, why[:110]


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    missed = 0
    print("| defect (issue #15) | mutation | test | caught |\n|---|---|---|---|")
    for mutation in chosen:
        caught, why = run(mutation)
        missed += not caught
        test = mutation.test.split("::")[-1]
        verdict = "yes" if caught else "NO"
        print(f"| {mutation.defect} | {mutation.name} | `{test}` | {verdict}: {why} |")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
