"""CPU time and resident memory of process trees, read from /proc.

CPU of a tree = utime+stime of every live process in it, plus cutime+cstime (children that
already exited and were reaped), so nothing is counted twice. RSS of a tree = the sum of VmRSS.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces: split after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(pid)
    return kids


def tree(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """``root`` and all its live descendants."""
    kids = children_map() if kids is None else kids
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def pids_named(name: str) -> list[int]:
    found = []
    for pid in _all_pids():
        try:
            if (PROC / str(pid) / "comm").read_text().strip() == name:
                found.append(pid)
        except OSError:
            continue
    return found


def cpu_seconds(pids: Iterable[int], with_reaped_children: bool = True) -> float:
    # fields[0] is field 3 of stat(5): utime=14, stime=15, cutime=16, cstime=17.
    columns = (11, 12, 13, 14) if with_reaped_children else (11, 12)
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(fields[i]) for i in columns)
    return ticks / CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass(frozen=True)
class Group:
    """A process group to account for: a name and a function giving its current PIDs."""

    name: str
    pids: Callable[[dict[int, list[int]]], list[int]]
    with_reaped_children: bool = True


def tree_group(name: str, root: Callable[[], int | None]) -> Group:
    def pids(kids: dict[int, list[int]]) -> list[int]:
        pid = root()
        return tree(pid, kids) if pid else []

    return Group(name, pids)


def named_group(name: str, comm: str) -> Group:
    return Group(name, lambda _kids: pids_named(comm))


def self_group(name: str) -> Group:
    """This process alone (its children are the services, accounted for on their own)."""
    return Group(name, lambda _kids: [os.getpid()], with_reaped_children=False)


def cpu_snapshot(groups: Iterable[Group]) -> dict[str, float]:
    kids = children_map()
    return {g.name: cpu_seconds(g.pids(kids), g.with_reaped_children) for g in groups}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def tree_rss(root: int) -> int:
    return rss_bytes(tree(root))


class PeakRss:
    """Samples the RSS of a tree every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, root: Callable[[], int | None], interval: float = 0.2) -> None:
        self.root, self.interval = root, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self.root()
            if pid:
                self.peak = max(self.peak, tree_rss(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def settled_rss(root: int, samples: int = 3, gap: float = 0.3) -> list[int]:
    out = []
    for i in range(samples):
        if i:
            time.sleep(gap)
        out.append(tree_rss(root))
    return out


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size: shared pages (forked pool children) divided among sharers."""
    total = 0
    for pid in pids:
        try:
            for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total
