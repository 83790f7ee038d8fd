"""The benchmark's sections; each takes the shared :class:`Context` and returns its rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench import procstat
from bench.fixtures import Api
from bench.options import Options
from bench.stack import Stack


@dataclass
class Context:
    opts: Options
    stack: Stack
    api: Api
    # Figures later sections build on (PUT floors, deploy throughput, published file size...).
    shared: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        return procstat.cpu_snapshot(self.stack.cpu_groups())

    def say(self, message: str) -> None:
        print(f"  .. {message}", flush=True)
