"""Median tokens/s and MFU of finished runs, read from their metrics.jsonl, as a Markdown table.

    python scripts/summarize_runs.py /tmp/dist/*      # one row per run directory

The first logged interval holds compilation, so it is left out of the medians.
"""

import json
import statistics
import sys
from pathlib import Path


def summarize(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r.get("tokens_per_s")][1:]
    if not timed:
        return f"| {run_dir.name} | — | — | — |"
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    mfu = f"{statistics.median(mfus):.1%}" if mfus else "—"
    return f"| {run_dir.name} | {tps:,.0f} | {mfu} | {timed[0]['step']}–{timed[-1]['step']} |"


if __name__ == "__main__":
    print("| run | tokens/s (median) | MFU | steps |\n| --- | --- | --- | --- |")
    for arg in sys.argv[1:]:
        if (Path(arg) / "metrics.jsonl").exists():
            print(summarize(Path(arg)))
