"""Search benchmark: every strategy through the same simulated pipeline, many seeds per landscape.

    python scripts/bench_search.py                                   # 20 seeds x 100 experiments
    python scripts/bench_search.py --strategies random,tpe --seeds 5 --experiments 50
    python scripts/bench_search.py --landscapes my_module:FACTORY --ppo-weights runs/pretrain/policy.pt

Each (landscape, strategy, seed) is one `arrl.sim.run_sim_campaign` (the real proposer, applier,
reward computer and, for ppo, learner, on virtual time) against one private redis-server for the
whole run; `--jobs` processes run campaigns side by side. Seed s is both the landscape's seed and
the strategy's, so every strategy meets the same landscapes.

For each landscape and strategy it prints the median over seeds of the best val_bpb after 25, 50
and 100 experiments (the baseline run counts as the first), and how many experiments the median
best-so-far curve needs to reach random search's median best at the last horizon; then, seed by
seed, how the learned strategy differs from each other one (`paired`): with `--remeasure-every 0,N`,
from itself with the incumbent re-run every N experiments too (and with `--remeasure-on-speed
0,F`, on a machine speed shift of F). `--metric true`
scores each campaign by the noise-free value of its incumbent instead (what it has really found,
luck removed). `ppo` starts from a fresh policy, `ppo-pretrained` from `--ppo-weights` (default: the
weights shipped in arrl/pretrained/).

`--compare A B` runs nothing: it pairs two `--json` files campaign by campaign (two versions of
the code, or two settings, run with the same command) and prints B minus A at each horizon, at a
quarter, a half and all of the shorter campaign's simulated time, and the change in time itself:

    python scripts/bench_search.py --landscapes arrl.shared_machine:shared_machine --strategies ppo-pretrained \
        --seeds 40 --metric true --json before.json         # then the variant, --json after.json
    python scripts/bench_search.py --compare before.json after.json --metric true
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LANDSCAPES = ("arrl.landscapes:cpu_fitted,arrl.landscapes:cpu_fitted_hard,arrl.families:rotated,"
                      "arrl.families:bowl,arrl.families:chain")
DEFAULT_STRATEGIES = "random,greedy,tpe,cmaes,ppo,ppo-pretrained"


def _quiet() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    logging.getLogger("optuna").setLevel(logging.ERROR)


def best_curve(records: list[dict[str, Any]], metric: str) -> list[float]:
    """Best-so-far after each experiment: the lowest observed val_bpb, or (metric "true") the
    noise-free value of the campaign's incumbent, the last run kept (without re-runs of the
    incumbent, the best observed run; with them, a run kept for beating the incumbent's re-run)."""
    out, best_obs, best_true = [], math.inf, math.inf
    for r in records:
        v = r.get("val_bpb")
        if r.get("status") == "ok" and isinstance(v, int | float):
            best_obs = min(best_obs, v)
            if r.get("kept"):
                best_true = r.get("true_val_bpb") if r.get("true_val_bpb") is not None else v
        out.append(best_obs if metric == "observed" else best_true)
    return out


def run_one(url: str, landscape: str, strategy: str, seed: int, experiments: int, selfeval: bool,
            weights_path: str | None, queue_depth: int = 1,
            selfeval_options: dict[str, Any] | None = None, remeasure_every: int = 0,
            remeasure_on_speed: float = 0.0) -> dict[str, Any]:
    import anyio

    from arrl.sim import run_sim_campaign

    weights = Path(weights_path).read_bytes() if weights_path else None
    name = "ppo" if strategy.startswith("ppo") else strategy
    # "ppo" starts from a fresh policy (not the shipped one), "ppo-pretrained" from --ppo-weights
    # or, without them, from the shipped weights: both strategy and learner start from the same.
    options = {"pretrained": strategy != "ppo"} if name == "ppo" else {}
    label = strategy + (f"/rm{remeasure_every}" if remeasure_every else "") + (
        f"/sp{remeasure_on_speed:g}" if remeasure_on_speed else "")
    # The self-evaluator audits the experiments a hash of the campaign id and experiment id picks
    # (`arrl.selfeval.audited`): a campaign id of its own per (landscape, strategy, seed) makes a
    # run repeat exactly, so two versions of the code compare seed by seed on the same audits.
    variant = f"{landscape}|{label}|{queue_depth}|{sorted((selfeval_options or {}).items())}"
    campaign_id = f"bench-{seed}-{hashlib.sha256(variant.encode()).hexdigest()[:12]}"
    started = time.perf_counter()
    records = anyio.run(lambda: run_sim_campaign(url, landscape, name, seed, experiments, selfeval, weights=weights,
                                                 strategy_options=options, learner_options=options,
                                                 queue_depth=queue_depth, selfeval_options=selfeval_options,
                                                 remeasure_every=remeasure_every,
                                                 remeasure_on_speed=remeasure_on_speed, campaign_id=campaign_id))
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"landscape": landscape, "strategy": label, "seed": seed, "wall_s": time.perf_counter() - started,
            "statuses": statuses, "keep_rule": keep_rule_counts(records), "observed": best_curve(records, "observed"),
            "true": best_curve(records, "true"), "virtual_s": sum(float(r.get("wall_seconds") or 0.0) for r in records),
            # Simulated seconds by the end of each experiment (one worker): to compare variants that
            # spend time differently (the self-evaluator's stops) at equal time, not only equal counts.
            "clock": list(itertools.accumulate(float(r.get("wall_seconds") or 0.0) for r in records))}


def keep_rule_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """What the keep rule did with a campaign's edits that ran to the end (kept, compared with the
    incumbent, or left uncompared: no score on their hardware class, or run at another machine
    speed), and the re-runs of the incumbent by why (`age`, `class`, `speed`)."""
    out = {"edits_ok": 0, "compared": 0, "kept": 0, "unscored_class": 0, "speed_mismatch": 0}
    for r in records:
        if r.get("role") == "remeasure":
            why = f"remeasure_{(r.get('extra') or {}).get('why') or 'age'}"
            out[why] = out.get(why, 0) + 1
        elif r.get("role") == "edit" and r.get("status") == "ok":
            out["edits_ok"] += 1
            out["kept"] += bool(r.get("kept"))
            uncompared = [k for k in ("unscored_class", "speed_mismatch") if r.get(k) is not None]
            out["compared"] += not uncompared
            for k in uncompared[:1]:
                out[k] += 1
    return out


def available(strategies: list[str], weights: str | None) -> list[str]:
    """The strategies that can run here; a note for each one skipped."""
    from arrl.strategies import STRATEGIES

    out = []
    for s in strategies:
        base = "ppo" if s.startswith("ppo") else s
        if base not in STRATEGIES:
            print(f"note: strategy {base!r} is not registered in arrl.strategies yet; skipping {s}")
        elif base in ("tpe", "cmaes") and not _has_optuna():
            print(f"note: {s} needs Optuna (pip install 'arrl[search]'); skipping it")
        elif s == "ppo-pretrained" and not (weights and Path(weights).is_file()) and not _shipped():
            print("note: ppo-pretrained needs --ppo-weights PATH (from `arrl pretrain`) or shipped weights; skipping it")
        else:
            out.append(s)
    return out


def _shipped() -> bool:
    from arrl.hyper import PRETRAINED

    return PRETRAINED.is_file()


def _has_optuna() -> bool:
    try:
        import cmaes  # noqa: F401
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def _percent(runs: list[dict[str, Any]], *names: str) -> str:
    """Share of the runs' experiments that ended with one of these statuses."""
    total = sum(sum(r["statuses"].values()) for r in runs)
    return f"{100 * sum(r['statuses'].get(x, 0) for r in runs for x in names) / max(total, 1):.1f}"


def median_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.median(c[k] for c in curves) for k in range(min(len(c) for c in curves))]


def table(results: list[dict[str, Any]], strategies: list[str], horizons: list[int], metric: str) -> str:
    by: dict[str, list[list[float]]] = {s: [r[metric] for r in results if r["strategy"] == s] for s in strategies}
    by = {s: c for s, c in by.items() if c}
    curves = {s: median_curve(c) for s, c in by.items()}
    n = min(len(c) for c in curves.values())
    hs = [h for h in horizons if h <= n]
    target = curves["random"][hs[-1] - 1] if "random" in curves and hs else None
    head = f"{'strategy':<16}" + "".join(f"{'best@' + str(h):>10}" for h in hs)
    head += f"{'to random@' + str(hs[-1]) if hs else '':>16}{'crash%':>8}{'abort%':>8}{'dup%':>6}{'wall s':>8}"
    lines = [head]
    for s, curve in curves.items():
        runs = [r for r in results if r["strategy"] == s]
        pct = functools.partial(_percent, runs)
        reach = next((k + 1 for k, v in enumerate(curve) if target is not None and v <= target), None)
        lines.append(f"{s:<16}" + "".join(f"{curve[h - 1]:>10.4f}" for h in hs)
                     + f"{(str(reach) if reach else '>' + str(n)) if target is not None else '-':>16}"
                     + f"{pct('crashed', 'diverged', 'timed_out'):>8}{pct('aborted'):>8}{pct('duplicate'):>6}"
                     + f"{statistics.mean(r['wall_s'] for r in runs):>8.1f}")
    return "\n".join(lines)


def paired(results: list[dict[str, Any]], strategies: list[str], horizons: list[int], metric: str) -> str:
    """The learned strategy (ppo-pretrained, else ppo) minus each other strategy, seed by seed over the
    seeds both ran: mean ± standard error and on how many seeds it was lower, at each horizon, and at
    half the last horizon against the other's last (the claim: ppo at 50 reaches tpe at 100). Each
    seed is one landscape for every strategy, so these differences are far steadier than differences
    of medians over seeds, which move with the seeds' own levels; with seed counts that differ, only
    the shared seeds count."""
    learned = next((s for s in ("ppo-pretrained", "ppo") if s in strategies), None)
    if learned is None:
        return ""
    curves = {(r["strategy"], r["seed"]): r[metric] for r in results}
    ours = {seed: c for (s, seed), c in curves.items() if s == learned}
    lines = [f"paired, {learned} minus each (mean ± standard error over the seeds both ran; lower on how many):"]
    for other in (s for s in strategies if s != learned):
        pairs = [(ours[seed], c) for (s, seed), c in curves.items() if s == other and seed in ours]
        if len(pairs) < 2:
            continue
        n = min(min(len(a), len(b)) for a, b in pairs)
        hs = [h for h in horizons if h <= n]
        cells = [(f"@{h}", [a[h - 1] - b[h - 1] for a, b in pairs]) for h in hs]
        if hs and hs[-1] // 2 >= 1:
            half, last = hs[-1] // 2, hs[-1]
            cells.append((f"@{half} vs {other}@{last}", [a[half - 1] - b[last - 1] for a, b in pairs]))
        text = "  ".join(f"{label} {statistics.mean(d):+.4f} ± {statistics.stdev(d) / math.sqrt(len(d)):.4f}"
                         f" ({sum(x < 0 for x in d)}/{len(d)})" for label, d in cells)
        lines.append(f"  vs {other:<14}{text}")
    return "\n".join(lines) if len(lines) > 1 else ""


def best_by(curve: list[float], clock: list[float], t: float) -> float:
    """The best-so-far of a campaign at simulated time `t`: at its last experiment ended by then
    (its first, the baseline, where none had)."""
    k = sum(c <= t + 1e-9 for c in clock)
    return curve[max(k, 1) - 1]


def compare(a_path: Path, b_path: Path, horizons: list[int], metric: str) -> str:
    """B minus A, campaign by campaign (same landscape, strategy label and seed in both --json
    files), per landscape and strategy: at each horizon in experiments; at a quarter, a half and
    all of the shorter campaign's simulated time (variants that spend time differently, such as
    the self-evaluator's stops, compare at equal time too); and the change of the whole
    campaign's time. Mean ± standard error, then on how many campaigns B was lower."""
    def load(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
        return {(r["landscape"], r["strategy"], r["seed"]): r for r in json.loads(path.read_text())}

    a, b = load(a_path), load(b_path)
    keys = [k for k in a if k in b]
    if not keys:
        return f"no campaign (landscape, strategy, seed) is in both {a_path} and {b_path}"
    lines = [f"paired, {b_path.name} minus {a_path.name} (mean ± standard error; lower on how many), metric {metric}:"]

    def cell(label: str, diffs: list[float], fmt: str = "+.4f") -> str:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        return f"{label} {statistics.mean(diffs):{fmt}} ± {se:{fmt[1:]}} ({sum(d < 0 for d in diffs)}/{len(diffs)})"

    for group in dict.fromkeys(k[:2] for k in keys):
        pairs = [(a[k], b[k]) for k in keys if k[:2] == group]
        n = min(min(len(x[metric]), len(y[metric])) for x, y in pairs)
        cells = [cell(f"@{h}", [y[metric][h - 1] - x[metric][h - 1] for x, y in pairs]) for h in horizons if h <= n]
        timed = [(x, y) for x, y in pairs if x.get("clock") and y.get("clock")]
        if timed:
            for share, label in ((0.25, "1/4"), (0.5, "1/2"), (1.0, "all")):
                diffs = []
                for x, y in timed:
                    t = share * min(x["clock"][-1], y["clock"][-1])
                    diffs.append(best_by(y[metric], y["clock"], t) - best_by(x[metric], x["clock"], t))
                cells.append(cell(f"time {label}", diffs))
            changes = [100 * (y["clock"][-1] / x["clock"][-1] - 1) for x, y in timed if x["clock"][-1] > 0]
            if changes:
                cells.append(cell("time %", changes, "+.1f"))
        lines.append(f"  {group[0]} {group[1]} ({len(pairs)} seeds): " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--landscapes", default=DEFAULT_LANDSCAPES, help="comma-separated MODULE:FACTORY (default %(default)s)")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated (default %(default)s)")
    p.add_argument("--seeds", type=int, default=20, help="seeds per landscape (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--experiments", type=int, default=100, help="per campaign, the baseline included (default %(default)s)")
    p.add_argument("--horizons", default="25,50,100", help="report the best after this many experiments")
    p.add_argument("--jobs", type=int, default=2, help="campaigns run side by side in processes (default %(default)s)")
    p.add_argument("--selfeval", action=argparse.BooleanOptionalAction, default=True,
                   help="run the self-evaluator's rule on the simulated curves (default on)")
    p.add_argument("--selfeval-option", action="append", metavar="KEY=VALUE",
                   help="override a setting of the self-evaluator's rule, as `arrl run --selfeval-option` (repeatable)")
    p.add_argument("--metric", choices=("observed", "true"), default="observed")
    p.add_argument("--queue-depth", type=int, default=1,
                   help="proposals waiting per worker, as `arrl run --queue-depth` (default 1, the pipeline's "
                        "default; 0: sequential, each proposal sees every earlier outcome)")
    p.add_argument("--remeasure-every", default="0", metavar="N[,N...]",
                   help="as `arrl run --remeasure-every`; several values run every strategy under each, "
                        "labelled STRATEGY/rmN, and pair them seed by seed (default 0: never)")
    p.add_argument("--remeasure-on-speed", default="0", metavar="F[,F...]",
                   help="as `arrl run --remeasure-on-speed` (a landscape that reports machine_gflops, such as "
                        "arrl.shared_machine:shared_machine); several values as --remeasure-every, labelled "
                        "STRATEGY/spF, combined with each of its values (default 0: never)")
    p.add_argument("--ppo-weights", help="a pre-trained policy checkpoint for ppo-pretrained")
    p.add_argument("--json", type=Path, help="also write every campaign's best-so-far curves, keep-rule counts and simulated clock here")
    p.add_argument("--tables-from", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: print the tables of earlier --json files together")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"),
                   help="run nothing: B minus A campaign by campaign, at each horizon and at equal simulated time")
    args = p.parse_args(argv)
    if args.tables_from:
        return print_tables([r for f in args.tables_from for r in json.loads(f.read_text())], args)
    if args.compare:
        print(compare(*args.compare, sorted({int(h) for h in args.horizons.split(",")}), args.metric))
        return 0
    sys.path.insert(0, str(ROOT))
    from pipeline.evaluator import options_from_pairs, selfeval_config

    try:
        remeasures = [int(n) for n in args.remeasure_every.split(",")]
    except ValueError:
        p.error(f"--remeasure-every takes whole numbers separated by commas, got {args.remeasure_every!r}")
    if any(n != 0 and n < 2 for n in remeasures):
        p.error(f"--remeasure-every: each value must be 0 (never) or 2 or more, got {args.remeasure_every!r}")
    try:
        speeds = [float(f) for f in args.remeasure_on_speed.split(",")]
    except ValueError:
        p.error(f"--remeasure-on-speed takes fractions separated by commas, got {args.remeasure_on_speed!r}")
    if any(not 0 <= f < 10 for f in speeds):
        p.error(f"--remeasure-on-speed: each value must be 0 (never) or a positive fraction, got {args.remeasure_on_speed!r}")
    selfeval_options = options_from_pairs(args.selfeval_option)
    try:
        selfeval_config(selfeval_options)  # an unknown or invalid setting fails here, before any campaign
    except ValueError as exc:
        p.error(str(exc))
    # One thread per process for torch (ppo): two processes on two cores must not oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet()  # global logging settings: only once the run is certain to go ahead
    from pipeline.redis_server import RedisServer

    landscapes = [x for x in args.landscapes.split(",") if x]
    strategies = available([x for x in args.strategies.split(",") if x], args.ppo_weights)
    horizons = sorted({int(h) for h in args.horizons.split(",")} | {args.experiments})
    horizons = [h for h in horizons if h <= args.experiments]
    if not strategies:
        print("nothing to run")
        return 1
    tasks = [(lan, s, args.first_seed + i, n, f) for lan in landscapes for s in strategies for n in remeasures
             for f in speeds for i in range(args.seeds)]
    print(f"{len(tasks)} campaigns x {args.experiments} experiments, {args.jobs} processes, "
          f"selfeval {'on' if args.selfeval else 'off'}"
          + "".join(f", {k}={v}" for k, v in selfeval_options.items() if args.selfeval), flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            ctx = multiprocessing.get_context("spawn")  # no inherited event loops or sockets
            with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx, initializer=_quiet) as pool:
                futures = [pool.submit(run_one, server.url, lan, s, seed, args.experiments, args.selfeval,
                                       args.ppo_weights if s == "ppo-pretrained" else None, args.queue_depth,
                                       selfeval_options, n, f)
                           for lan, s, seed, n, f in tasks]
                for i, f in enumerate(futures, 1):
                    results.append(f.result())
                    if i % max(1, len(tasks) // 10) == 0:
                        print(f"  {i}/{len(tasks)} campaigns, {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(results))
    print_tables(results, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s for {len(tasks) * args.experiments} simulated experiments")
    return 0


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """One table per landscape, strategies in their order of first appearance."""
    strategies = list(dict.fromkeys(r["strategy"] for r in results))
    strategies.sort(key=lambda s: DEFAULT_STRATEGIES.split(",").index(s) if s in DEFAULT_STRATEGIES.split(",") else 99)
    experiments = min(len(r[args.metric]) for r in results)
    horizons = sorted({int(h) for h in args.horizons.split(",") if int(h) <= experiments} | {experiments})
    for lan in dict.fromkeys(r["landscape"] for r in results):
        runs = [r for r in results if r["landscape"] == lan]
        counts = sorted({len({r["seed"] for r in runs if r["strategy"] == s}) for s in strategies} - {0})
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} (by strategy)"
        print(f"\n{lan}: median over {seeds} seeds, metric {args.metric}")
        print(table(runs, strategies, horizons, args.metric))
        if text := paired(runs, strategies, horizons, args.metric):
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
