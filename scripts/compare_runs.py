"""Compare campaigns on the same budget, from their run directories alone.

    python scripts/compare_runs.py runs/real7-ppo runs/real7-random

"Best" is the lowest own score of a kept run: a re-run of the incumbent (`--remeasure-every`) moves
the keep rule's reference, not what the campaign found. A comparison of strategies on real runs
must give each the same budget. Two budgets are printed
for each run directory: experiments (the best kept val_bpb once the first n experiments were
recorded, the baseline included) and wall time (the best among runs that finished within t minutes
of the campaign's first record, up to the shortest campaign's length). Wall time matters for
campaigns started side by side on one machine: the one that finishes last gets the machine to itself
for its last runs, which then train more steps than the other's did. Pinning each campaign to its
own cores (`taskset`) avoids that; comparing at the shortest campaign's length corrects for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _time(record: dict[str, Any], key: str) -> float | None:
    from arrl.report import finite_num

    return finite_num(record.get(key))


def summary(run_dir: Path, steps: int) -> dict[str, Any]:
    """What the table shows for one run directory: strategy, baseline, best by experiments, times."""
    from arrl.report import best_so_far, load_run

    run = load_run(run_dir)
    if not run.records:
        raise SystemExit(f"compare_runs: {run_dir} has no ledger.jsonl records")
    starts = [t for r in run.records if (t := _time(r, "created_at")) is not None]
    ends = [t for r in run.records if (t := _time(r, "finished_at")) is not None]
    start = min(starts) if starts else None
    best = best_so_far(run.records, reruns=False)
    marks = sorted({*range(steps, len(run.records), steps), len(run.records)})
    return {"dir": str(run_dir), "strategy": run.config.get("strategy", "?"), "records": run.records,
            "start": start, "minutes": (max(ends) - start) / 60 if ends and start is not None else None,
            "baseline": next((r.get("val_bpb") for r in run.records if r.get("role") == "baseline"), None),
            "by_count": {n: best[n - 1] for n in marks}}


def best_by(run: dict[str, Any], minutes: float) -> float | None:
    """The best kept val_bpb among runs that finished within `minutes` of the campaign's start."""
    from arrl.report import best_so_far

    if run["start"] is None:
        return None
    cut = run["start"] + 60 * minutes
    done = [r for r in run["records"] if (t := _time(r, "finished_at")) is not None and t <= cut]
    return best_so_far(done, reruns=False)[-1] if done else None


def table(runs: list[dict[str, Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)

    width = max(20, *(len(r["dir"]) + 2 for r in runs))
    rows = [("", [r["dir"] for r in runs]), ("strategy", [r["strategy"] for r in runs]),
            ("baseline", [r["baseline"] for r in runs])]
    for n in sorted({n for r in runs for n in r["by_count"]}):
        rows.append((f"best after {n} experiments", [r["by_count"].get(n) for r in runs]))
    lengths = [r["minutes"] for r in runs if r["minutes"] is not None]
    if len(lengths) == len(runs):
        shortest = min(lengths)
        for m in sorted({*range(10, int(shortest), 10), round(shortest, 1)}):
            label = f"best by {m} min" + (" (shortest)" if m == round(shortest, 1) else "")
            rows.append((label, [best_by(r, m) for r in runs]))
        rows.append(("wall time, min", [f"{r['minutes']:.1f}" for r in runs]))
    return [f"{label:32s}" + "".join(f"{cell(v):>{width}s}" for v in values) for label, values in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+", help="run directories of `arrl run` (two or more)")
    p.add_argument("--every", type=int, default=10, help="experiments between rows of the count budget")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print("\n".join(table([summary(d, max(1, args.every)) for d in args.run_dirs])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
