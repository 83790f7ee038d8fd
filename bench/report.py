"""Results: one aligned plain-text table, and the same figures as JSON with the machine."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.options import Options
from bench.stats import Figure

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    metric: str
    figure: Figure | None
    unit: str = ""
    text: str = ""  # shown instead of a number (n/a, yes/no...)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "unit": self.unit}
        if self.figure is not None:
            out.update(self.figure.as_dict())
        if self.text:
            out["text"] = self.text
        return out


@dataclass
class SectionResult:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | skipped | error
    data: dict[str, Any] = field(default_factory=dict)  # JSON-only details (plans...)

    def add(self, metric: str, figure: Figure | None, unit: str = "", text: str = "") -> None:
        self.rows.append(Row(metric, figure, unit, text))

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "rows": [r.as_dict() for r in self.rows],
            "notes": self.notes,
            **self.data,
        }


def fmt(value: float, integral: bool = False) -> str:
    """Three significant digits or so; counts (``integral``) as plain integers."""
    if math.isnan(value):
        return "n/a"
    value = round(value, 6)  # 0.9999999 (CPU ticks / count) is 1
    size = abs(value)
    if (integral and value.is_integer()) or size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


DASH = "\u2013"  # en dash between min and max


def table(results: list[SectionResult], header: str) -> str:
    rows: list[tuple[str, ...]] = []  # 5 columns, or 1 for a title or a note
    for res in results:
        rows.append((f"[{res.name}] {res.title}",))
        if res.status == "skipped" and not res.rows:
            rows.append(("  " + "; ".join(res.notes or ["skipped"]),))
            continue
        for row in res.rows:
            fig = row.figure
            if fig is None:
                rows.append(("  " + row.metric, row.text or "n/a", "", row.unit, ""))
                continue
            whole = all(v.is_integer() for v in fig.values)
            span = (
                f"{fmt(fig.low, whole)}{DASH}{fmt(fig.high, whole)}" if len(fig.values) > 1 else ""
            )
            reps = str(len(fig.values))
            rows.append(("  " + row.metric, fmt(fig.median, whole), span, row.unit, reps))
        if res.status != "skipped":
            rows.extend((("  " if note.startswith(" ") else "  * ") + note,) for note in res.notes)
    titles = ("metric", "median", f"min{DASH}max", "unit", "runs")
    cells = [r for r in rows if len(r) == 5]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]
    aligns = ("<", ">", ">", "<", ">")

    def line(cols: tuple[str, ...]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cols, aligns, widths, strict=True))

    out = [header, "", line(titles).rstrip(), "-" * (sum(widths) + 8)]
    out.extend(line(r).rstrip() if len(r) == 5 else r[0] for r in rows)
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_total_kb": _meminfo_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": list(os.getloadavg()),
    }


def _meminfo_total() -> int | None:
    try:
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        return int(first.split()[1])
    except (OSError, IndexError, ValueError):
        return None


def write_json(
    path: Path,
    opts: Options,
    info: dict[str, Any],
    results: list[SectionResult],
    context: dict[str, Any],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        "options": opts.as_dict(),
        "context": context,
        "sections": {r.name: r.as_dict() for r in results},
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
