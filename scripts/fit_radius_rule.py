"""Fit the radius rule's threshold (`arrl.hyper.WIDE_WINS`) on training landscapes.

    python scripts/fit_radius_rule.py --campaigns 400 --jobs 2
    python scripts/fit_radius_rule.py --from runs.json          # the table again

`HyperAgent.radius` steps every radius up by one for the rest of a campaign once at least a share
WIDE_WINS of its opening design's probes beat the first baseline. This script picks that share
from training landscapes alone (default `arrl.families:mixed`: half `randomized`, the family the
shipped weights were pre-trained on, half `anchored`, scripts already nearly tuned; none of the
evaluation landscapes, docs/search.md says why both): every campaign runs twice from the same
seed, outside the pipeline as `scripts/bench_offline.py` runs it (the pipeline's rules, proposals
one experiment ahead, no self-evaluator, no PPO updates), once stepping up after its design and
once never. The design is the same in both runs (the radius is first used after it), so each
campaign gives its design's winning share w and the paired difference of its best val_bpb at
each horizon, with shared noise.

For each threshold t it prints how many campaigns would step up (w >= t) and the mean change of
the best val_bpb against never stepping up, with its standard error, at each horizon, then the
change at `--fit-horizon` of the campaigns whose share is exactly t (the design has a handful of
probes, so w takes few values: 0, 1/6, ..., 1 on train.py). The
threshold it suggests is the one with the lowest mean at `--fit-horizon` (default 50, the horizon
of the target: ppo at 50 against tpe at 100).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_offline  # noqa: E402  (a sibling script: its in-process campaign)

NEVER = 2.0  # a threshold no winning share reaches


def paired(landscape: str, seed: int, experiments: int, horizons: str) -> dict[str, object]:
    """One seed run with the radius stepped up after the design and never: both runs' best per
    horizon and the design's winning share."""
    args = argparse.Namespace(strategy="ppo", weights=None, action=None, experiments=experiments,
                              horizons=horizons, lag=1, trace=False)
    up = bench_offline.campaign(landscape, seed, argparse.Namespace(**vars(args), wide_wins=0.0))
    down = bench_offline.campaign(landscape, seed, argparse.Namespace(**vars(args), wide_wins=NEVER))
    return {"seed": seed, "wins": up.get("wins"), "up": up, "down": down}


def quiet() -> None:
    """Log warnings only; set in the processes this script owns, not in a caller's (tests import main)."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def table(runs: list[dict], fit_horizon: str) -> float:
    """Print the threshold table (module docstring); return the suggested threshold."""
    runs = [r for r in runs if r["wins"] is not None]
    horizons = sorted({h for r in runs for h in r["up"] if h.isdigit() and h in r["down"]}, key=int)
    thresholds = sorted({round(float(r["wins"]), 6) for r in runs}) + [NEVER]
    print(f"{len(runs)} campaigns; the design's winning share w: median {statistics.median(r['wins'] for r in runs):.2f}")
    print("step up when w >= t   campaigns   " + "   ".join(f"change @{h:<4s}      " for h in horizons))
    best_t, best_mean = NEVER, 0.0
    for t in thresholds:
        cells = []
        for h in horizons:
            diffs = [(r["up"][h] - r["down"][h]) if r["wins"] >= t - 1e-6 else 0.0 for r in runs]
            mean = statistics.mean(diffs)
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            cells.append(f"{mean:+.4f} ± {se:.4f}")
            if h == fit_horizon and mean < best_mean:
                best_t, best_mean = t, mean
        alone = [r["up"][fit_horizon] - r["down"][fit_horizon] for r in runs if abs(r["wins"] - t) < 1e-6]
        if len(alone) > 1:  # the campaigns with exactly this share: where the threshold's choice matters
            cells.append(f"w = t alone, n={len(alone)}: {statistics.mean(alone):+.4f} ± "
                         f"{statistics.stdev(alone) / math.sqrt(len(alone)):.4f}")
        name = "never" if t == NEVER else f"{t:.3f}"
        print(f"{name:>21s}   {sum(r['wins'] >= t - 1e-6 for r in runs):9d}   " + "   ".join(cells))
    print(f"lowest mean at @{fit_horizon}: step up when w >= {'never' if best_t == NEVER else f'{best_t:.3f}'}"
          f" ({best_mean:+.4f} against never)")
    return best_t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--landscape", default="arrl.families:mixed", help="MODULE:FACTORY of the training family")
    p.add_argument("--campaigns", type=int, default=400)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--experiments", type=int, default=100)
    p.add_argument("--horizons", default="25,50,100")
    p.add_argument("--fit-horizon", default="50")
    p.add_argument("--jobs", type=int, default=1, help="processes running campaigns at once")
    p.add_argument("--json", type=Path, help="write every campaign's pair here")
    p.add_argument("--from", dest="load", type=Path, help="print the table of an earlier --json")
    args = p.parse_args(argv)
    if args.load:
        runs = json.loads(args.load.read_text())
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.campaigns))
        jobs = ([args.landscape] * len(seeds), seeds, [args.experiments] * len(seeds), [args.horizons] * len(seeds))
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, initializer=quiet) as pool:
                runs = list(pool.map(paired, *jobs))
        else:
            runs = list(map(paired, *jobs))
        if args.json:
            args.json.write_text(json.dumps(runs))
    table(runs, args.fit_horizon)
    return 0


if __name__ == "__main__":
    quiet()
    raise SystemExit(main())
