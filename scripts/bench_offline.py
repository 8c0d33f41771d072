"""Quick search study outside the pipeline: campaigns run in-process with `arrl.pretrain.MiniCampaign`.

    python scripts/bench_offline.py                                   # shipped ppo, 5 landscapes, 20 seeds
    python scripts/bench_offline.py --action 0,2,2 --json big.json    # a fixed action (model, 3 edits, 0.35)
    python scripts/bench_offline.py --strategy tpe --landscapes arrl.families:rotated --seeds 40
    python scripts/bench_offline.py --compare ppo.json big.json       # paired differences, seed by seed
    python scripts/bench_offline.py --reach tpe.json ppo.json cold.json  # the claim: each run @50 against tpe @100
    python scripts/bench_offline.py --landscapes arrl.heldout_fifth:one_far --first-seed 3 --seeds 1 --trace
    python scripts/bench_offline.py --landscapes all --seeds 40 --experiments 50 --horizons 25,50 \
        --set arrl.operators.TEMPERATURE=0.5 --json cold.json          # a constant changed, 32 landscapes
    python scripts/bench_offline.py --landscapes all --seeds 40 --workers 8 --json ppo.json  # on 8 cores

A campaign here is the pipeline's rules without the pipeline: baseline repeats, keep-if-better,
the reward, and proposals made `--lag` experiments ahead of their outcomes (default 1, as the
pipeline's queue depth), but no Redis, no self-evaluator and no PPO updates (the policy stays as
loaded). A 100-experiment campaign takes about a second, so a change to the operators or the policy
can be screened on 20-40 seeds per landscape in a minute or two before the pipeline benchmark
(`scripts/bench_search.py`) measures it for real. Seed s is the landscape's and the strategy's.

It prints the median best val_bpb after each horizon. `--compare A B` prints, per landscape and
horizon, both medians and the mean of the seed-by-seed differences B - A with its standard error:
two runs on the same seeds meet the same landscapes, so the paired difference is far less noisy
than the difference of the medians. Then, per horizon, the pooled verdict: the mean of the
landscapes' paired changes, on how many B was better / worse, and the landscapes where the change
is beyond two standard errors. `--reach TARGET RUN...` tallies the benchmark's claim: per landscape,
whether each RUN's median best at 50 experiments is at or below TARGET's (say, tpe's) at 100, and
the paired difference of the two, seed by seed.
`--trace` prints every run of every campaign (`trace_lines`): what proposed it (the opening design,
its split, a pattern move, or the policy's action and radius), its edits, status and val_bpb, and
whether it was kept, to see why a campaign missed.

`--landscapes` takes MODULE:FACTORY names and the groups of `groups()` (`all`: the 32 landscapes the
search has been screened on). `--set MODULE.NAME=VALUE` changes a constant of the search (a Python
literal) before any campaign runs, so a variant is screened without editing the tree; it reaches the
code that reads the constant from its module when it runs (a name another module imported keeps its
old value there). `--workers N` plays the campaigns in N processes (`pipeline/pretrain_pool.py`), each
with the `--set` constants applied; the results are the same as in one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import statistics
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LANDSCAPES = ("arrl.landscapes:cpu_fitted,arrl.landscapes:cpu_fitted_hard,arrl.families:rotated,"
                      "arrl.families:bowl,arrl.families:chain")
GROUP_NAMES = ("first", "training", "shapes", "fresh", "sealed", "fourth", "fifth", "all")


def groups() -> dict[str, str]:
    """Named sets of landscapes (docs/search.md tells their story): the first five, the training
    families, the held-out shapes and the four sets written or sealed after the search was built;
    `all`, the 32 together."""
    from arrl.families import FRESH, SHAPES
    from arrl.heldout import SEALED
    from arrl.heldout_fifth import FIFTH
    from arrl.heldout_fourth import FOURTH

    named = {"first": DEFAULT_LANDSCAPES, "training": "arrl.families:mixed,arrl.families:wide", "shapes": SHAPES,
             "fresh": FRESH, "sealed": SEALED, "fourth": FOURTH, "fifth": FIFTH}
    named["all"] = ",".join(named[g] for g in ("fifth", "first", "training", "fresh", "shapes", "sealed", "fourth"))
    return named


def expand(landscapes: str) -> list[str]:
    """MODULE:FACTORY names, with each of `groups()` replaced by its members, in order, once each."""
    named, out = groups(), []
    for item in landscapes.split(","):
        for name in named[item].split(",") if item in named else [item]:
            if name not in out:
                out.append(name)
    return out


def set_constant(assignment: str) -> None:
    """`--set MODULE.NAME=VALUE`: VALUE, a Python literal, replaces an existing constant of MODULE."""
    import ast
    import importlib

    target, sep, text = assignment.partition("=")
    module_name, _, name = target.rpartition(".")
    if not sep or not module_name:
        raise SystemExit(f"--set {assignment!r}: expected MODULE.NAME=VALUE")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise SystemExit(f"--set {assignment!r}: {module_name} has no {name}")
    try:
        setattr(module, name, ast.literal_eval(text))
    except (ValueError, SyntaxError):
        raise SystemExit(f"--set {assignment!r}: {text!r} is not a Python literal") from None


def campaign(landscape: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """One campaign; the best val_bpb after each horizon (edit experiments, the baseline not counted)
    and, for ppo, under "wins", the share of its opening design's probes that won (`HyperAgent.radius`)."""
    import torch

    from arrl.edits import parse_tunables, search_space
    from arrl.hyper import WIDE_WINS, HyperAgent, pretrained_weights
    from arrl.landscape_loading import load_landscape
    from arrl.ppo import Learner
    from arrl.pretrain import MiniCampaign, Proposal, _profile_budget, hyper_proposal
    from arrl.strategies import make_strategy

    base = parse_tunables((ROOT / "target" / "train.py").read_text())
    space = search_space(base)
    run = MiniCampaign(load_landscape(landscape)(seed, space), base, budget_s=_profile_budget())
    run.baselines(2)
    strategy, agent, learner = None, None, None
    if args.strategy != "ppo":
        strategy = make_strategy(args.strategy, seed)
    else:
        agent = HyperAgent(space, seed, args.experiments,
                           wide_wins=WIDE_WINS if args.wide_wins is None else args.wide_wins)
        learner = Learner.from_bytes(args.weights.read_bytes() if args.weights else pretrained_weights(), space, seed)
        if args.action:
            fixed = [int(a) for a in args.action.split(",")]
            learner.policy.sample = lambda state, generator=None, noise=None: (list(fixed), 0.0, 0.0)  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(seed)
    horizons = sorted(int(h) for h in args.horizons.split(","))
    queue: deque[Proposal] = deque()
    best: dict[str, float] = {}
    for k in range(args.experiments):
        if strategy is not None:
            choice = asyncio.run(strategy.propose(run.context()))
            queue.append(Proposal(run.parent(), choice.program, choice.extra))
        else:
            assert agent is not None and learner is not None
            queue.append(hyper_proposal(agent, learner.policy, run, generator))
        while queue and (len(queue) > args.lag or k == args.experiments - 1):
            proposal = queue.popleft()
            run.run(proposal.program, proposal.extra, proposal.parent)
            done = sum(r["role"] == "edit" for r in run.records)
            if done in horizons and run.best() is not None:
                best[str(done)] = float(run.best())  # type: ignore[arg-type]
    if agent is not None and (wins := agent.design_wins()) is not None:
        best["wins"] = wins
    if args.trace:
        print(f"{landscape} seed {seed}:", *trace_lines(run.records), sep="\n", flush=True)
    return best


def campaign_in_worker(assignments: Sequence[str], landscape: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """`campaign` in a `--workers` process: quiet logging and the `--set` constants, as `main` has them here."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for assignment in assignments:
        set_constant(assignment)
    return campaign(landscape, seed, args)


def trace_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per run: number, status, val_bpb, K where kept, what proposed it (a rule, or the
    policy's operator, edit count and radius), its edits."""
    from arrl.operators import proposed_by

    out = []
    for i, r in enumerate(records):
        origin = proposed_by(r.get("extra")) or str(r.get("role", ""))
        val = "-" if r.get("val_bpb") is None else f"{r['val_bpb']:.4f}"  # a crash has none
        edits = " ".join(f"{e['name']}={e['value']}" for e in r.get("program") or [])
        out.append(f"{i:4d} {str(r.get('status')):8s} {val:>7} "
                   f"{'K' if r.get('kept') else ' '} {origin:16s} {edits}".rstrip())
    return out


def compare(a_path: Path, b_path: Path) -> None:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    pooled: dict[str, list[tuple[str, float, float]]] = {}  # horizon -> (landscape, mean change, s.e.)
    for land in a:
        for h in sorted({h for runs in a[land].values() for h in runs if h.isdigit()}, key=int):
            seeds = [s for s in a[land] if s in b.get(land, {}) and h in a[land][s] and h in b[land][s]]
            if len(seeds) < 2:
                continue
            diffs = [b[land][s][h] - a[land][s][h] for s in seeds]
            mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            pooled.setdefault(h, []).append((land.split(":")[-1], mean, se))
            print(f"{land.split(':')[-1]:16s} @{h:<4s} n={len(seeds):<3d} median {statistics.median(a[land][s][h] for s in seeds):.4f}"
                  f" -> {statistics.median(b[land][s][h] for s in seeds):.4f}   paired {mean:+.4f} ± {se:.4f}")
    for h in sorted(pooled, key=int):
        rows = pooled[h]
        beyond = ", ".join(f"{name} {mean:+.3f} ± {se:.3f}" for name, mean, se in rows if abs(mean) > 2 * se)
        print(f"over {len(rows)} landscapes @{h}: mean {statistics.mean(m for _, m, _ in rows):+.4f},"
              f" better {sum(m < 0 for _, m, _ in rows)} / worse {sum(m > 0 for _, m, _ in rows)};"
              f" beyond 2 s.e.: {beyond or 'none'}")


def reach(target_path: Path, run_paths: Sequence[Path], early: str = "50", late: str = "100") -> dict[str, int]:
    """Print, per landscape, TARGET's median best at `late` and each run's at `early` (marked `Y`
    where it is as low or lower), with the paired difference, seed by seed, of the run at `early`
    and TARGET at `late` (mean and standard error: steadier than two medians of 20-40 seeds, which
    move by 0.01-0.02 between runs of one configuration); then how many landscapes each run
    reached, and on how many its paired difference is at or below 0, or above it by more than two
    standard errors (a clear miss). Returns the counts reached by median."""
    target = json.loads(target_path.read_text())
    runs = {path.stem: json.loads(path.read_text()) for path in run_paths}
    lands = [land for land in target if all(land in run for run in runs.values())]
    reached, paired_at_or_below, clear_misses = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0), dict.fromkeys(runs, 0)
    for land in lands:
        goal = statistics.median(best[late] for best in target[land].values() if late in best)
        row = f"{land.split(':')[-1]:16s} target@{late} {goal:.4f}"
        for name, run in runs.items():
            mid = statistics.median(best[early] for best in run[land].values() if early in best)
            reached[name] += mid <= goal
            row += f"   {name}@{early} {mid:.4f} {'Y' if mid <= goal else '-'}"
            diffs = [run[land][s][early] - target[land][s][late] for s in run[land]
                     if s in target[land] and early in run[land][s] and late in target[land][s]]
            if diffs:
                mean = statistics.mean(diffs)
                se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
                paired_at_or_below[name] += mean <= 0
                clear_misses[name] += mean > 2 * se
                row += f" paired {mean:+.4f} ± {se:.4f}"
        print(row)
    print(f"reached on {len(lands)} landscapes: " + ", ".join(f"{name} {n}" for name, n in reached.items()))
    print("paired, at or below the target / above it by over two standard errors: "
          + ", ".join(f"{name} {paired_at_or_below[name]} / {clear_misses[name]}" for name in runs))
    return reached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--landscapes", default=DEFAULT_LANDSCAPES,
                   help=f"comma-separated MODULE:FACTORY or groups: {', '.join(GROUP_NAMES)}")
    p.add_argument("--strategy", default="ppo", help="ppo (the hyper-heuristic policy), random, greedy, tpe, cmaes")
    p.add_argument("--weights", type=Path, help="hyper policy checkpoint (default: the shipped weights)")
    p.add_argument("--action", help="a fixed action operator,edits-1,radius (indices) instead of the policy's")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--experiments", type=int, default=100)
    p.add_argument("--horizons", default="25,50,100")
    p.add_argument("--wide-wins", type=float, help="ppo: the share of winning design probes from which the radius "
                   "steps up (default: arrl.hyper.WIDE_WINS; 0: in every campaign, 2: in none)")
    p.add_argument("--lag", type=int, default=1, help="proposals waiting for their outcome (default 1)")
    p.add_argument("--json", type=Path, help="write every campaign's best per horizon here")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="paired differences of two --json files")
    p.add_argument("--reach", type=Path, nargs="+", metavar="JSON",
                   help="TARGET RUN...: does each run's median @50 reach TARGET's @100, landscape by landscape")
    p.add_argument("--reach-at", default="50,100", metavar="EARLY,LATE", help="--reach's two horizons (default 50,100)")
    p.add_argument("--trace", action="store_true", help="print every run of every campaign (with --seeds 1)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="change a constant of the search before the campaigns run (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="processes that play the campaigns (default 1)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.compare:
        compare(*args.compare)
        return 0
    if args.reach:
        if len(args.reach) < 2:
            p.error("--reach takes a TARGET json and at least one RUN json")
        early, _, late = args.reach_at.partition(",")
        if not (early.isdigit() and late.isdigit()):
            p.error(f"--reach-at takes two horizons as EARLY,LATE, not {args.reach_at!r}")
        reach(args.reach[0], args.reach[1:], early, late)
        return 0
    for assignment in args.set:
        set_constant(assignment)
    if args.strategy in ("greedy", "tpe", "cmaes"):
        import arrl.baselines  # noqa: F401  (registers them)
    if args.workers < 1 or (args.workers > 1 and args.trace):
        p.error("--workers takes 1 or more, and 1 with --trace (whose lines would interleave)")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(land, s) for land in expand(args.landscapes) for s in seeds]
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            from pipeline.pretrain_pool import campaign_pool

            pool = stack.enter_context(campaign_pool(args.workers))
            play = functools.partial(campaign_in_worker, args.set, args=args)
            results = pool.map(play, *zip(*jobs, strict=True))
        else:
            results = (campaign(land, s, args) for land, s in jobs)
        out = report(jobs, results, args)
    if args.json:
        args.json.write_text(json.dumps(out))
    return 0


def report(jobs: Sequence[tuple[str, int]], results: Iterable[dict[str, float]],
           args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """Gather the campaigns' results by landscape, printing each landscape's medians as it completes."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (land, s), best in zip(jobs, results, strict=True):
        out.setdefault(land, {})[str(s)] = best
        if len(out[land]) < args.seeds:
            continue
        runs = out[land]
        meds = [statistics.median(r[h] for r in runs.values() if h in r)
                for h in args.horizons.split(",") if any(h in r for r in runs.values())]
        print(f"{land.split(':')[-1]:16s} " + " / ".join(f"{m:.4f}" for m in meds), flush=True)
    return out


if __name__ == "__main__":
    import structlog

    # Quiet unless something is wrong; configured here, not in main(), so a caller's logging is left alone.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    raise SystemExit(main())
