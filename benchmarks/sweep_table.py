"""One screen: the newest record of each benchmark subject and its summary figures.

    python benchmarks/sweep_table.py [--since-git REV]
Reads benchmarks/results/*.jsonl, or $RLPT_RESULTS_DIR's (each line one benchmark run, see
common.Report) and prints, per subject, the device, date and every entry of the run's summary.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# the folder common.Report appends to (RLPT_RESULTS_DIR: a dry run's records, kept out of results/)
RESULTS = Path(os.environ.get("RLPT_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def newest_records(since_git: str | None) -> list[dict]:
    records = []
    for path in sorted(RESULTS.glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if since_git:
            lines = [r for r in lines if r.get("git") == since_git] or lines
        if lines:
            records.append(lines[-1])
    return records


def _flatten(summary: dict, prefix: str = ""):
    """(dotted key, value) pairs of a possibly nested summary."""
    for key, value in summary.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--since-git", help="prefer records of this git revision")
    args = p.parse_args()
    rows = []
    for rec in newest_records(args.since_git):
        head = f"{rec.get('subject')} on {rec.get('device')} ({rec.get('date', '?')[:10]})"
        for key, value in _flatten(rec.get("summary") or {}):
            shown = f"{value:.3g}" if isinstance(value, float) else str(value)
            rows.append((head, key, shown))
        if not rec.get("summary"):
            rows.append((head, "(no summary)", ""))
    width = [max(len(r[i]) for r in rows) if rows else 0 for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))


if __name__ == "__main__":
    main()
