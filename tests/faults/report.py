"""Print the figures of the last fault-injection run as the README's "Reliability" table.

Each fault scenario writes its figures as JSON to ``REPORT_DIR`` (``TEST_FAULTS_REPORT_DIR``,
else ``tasks-platform-faults`` in the temporary directory). ``make faults`` clears it, runs
``pytest tests/faults`` and then this, which prints one markdown row per scenario and broker.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPORT_DIR = Path(
    os.environ.get("TEST_FAULTS_REPORT_DIR", Path(tempfile.gettempdir()) / "tasks-platform-faults")
)
COLUMNS = (
    ("scenario", "scenario"),
    ("broker", "broker"),
    ("jobs_submitted", "jobs accepted"),
    ("submissions_refused", "submissions refused (resubmitted)"),
    ("jobs_lost", "lost"),
    ("duplicate_executions", "duplicate executions"),
    ("duplicate_effects", "duplicate effects"),
    ("history_terminal_and_correct", "history rows terminal and correct"),
    ("seconds", "run s"),
)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]  # fmt: skip
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--clear" in argv:
        shutil.rmtree(REPORT_DIR, ignore_errors=True)
        return 0
    files = sorted(REPORT_DIR.glob("*.json")) if REPORT_DIR.is_dir() else []
    if not files:
        print(f"no fault scenario figures in {REPORT_DIR}: run pytest tests/faults first")
        return 1
    rows = [json.loads(path.read_text()) for path in files]
    print(table(rows))
    for row in rows:
        for fault in sorted(set(row.get("faults", []))):
            print(f"- {row['scenario']} on {row['broker']}: {fault}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
