"""Print the "Guarantees" table of docs/guarantees.md from the fault suite's last run.

``python -m tests.support.guarantees_table`` reads ``var/reliability-last-run.json`` (written by
``tests/reliability/conftest.py`` at the end of a run) and prints one Markdown row per fault:
the fault, the test, then jobs, faults injected, lost, duplicated, stale, HTTP 5xx and the API's
p99 during the fault, and any other figure the test recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPORT = Path(__file__).resolve().parents[2] / "var" / "reliability-last-run.json"
COLUMNS = ("jobs", "faults", "lost", "duplicated", "stale", "http_5xx", "api_p99_s")
SKIPPED = {"test", "fault", "error", "first_errors", *COLUMNS}


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "-" if value is None else str(value)


def _others(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.items() if k not in SKIPPED)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| fault | test | " + " | ".join(COLUMNS) + " | other figures |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for row in rows:
        test = str(row["test"]).split("::")
        name = f"`{Path(test[0]).name}::{test[-1]}`"
        cells = " | ".join(_cell(row, k) for k in COLUMNS)
        lines.append(f"| {row['fault']} | {name} | {cells} | {_others(row)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else REPORT
    if not path.exists():
        print(f"no report at {path}: run pytest tests/reliability first", file=sys.stderr)
        return 1
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
