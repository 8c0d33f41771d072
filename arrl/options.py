"""The options every campaign command shares (`arrl run`, `arrl init`, the simulated executor),
and the checks of what a command is given, made before it starts anything: a malformed option,
target, checkpoint or Redis URL ends it with exit status 2 and the reason, not with a traceback
or with stages that exit on it again and again."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from arrl.reward import DEFAULT_SIGMA


def config_from(args: argparse.Namespace):
    from arrl.campaign import CampaignConfig
    from arrl.strategies import STRATEGIES
    from pipeline.evaluator import options_from_pairs, selfeval_config

    if args.strategy not in STRATEGIES:  # else the proposer would exit on it until `arrl run` gave up
        usage_error(f"--strategy {args.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    config = CampaignConfig(profile=args.profile, budget_s=args.budget_s, strategy=args.strategy, seed=args.seed,
                            max_experiments=args.max_experiments, max_wall_s=args.max_wall_s,
                            max_gpu_hours=args.max_gpu_hours, patience=args.patience,
                            baseline_repeats=args.baseline_repeats, noise_sigma=args.noise_sigma,
                            keep_margin_sigmas=args.keep_margin, queue_depth_per_worker=args.queue_depth,
                            remeasure_every=args.remeasure_every, remeasure_on_speed=args.remeasure_on_speed,
                            selfeval=args.selfeval, selfeval_options=options_from_pairs(args.selfeval_option),
                            policy_checkpoint=str(args.checkpoint.resolve()) if args.checkpoint else "",
                            warm_executor=args.warm, hardware_class=args.hardware_class)
    try:
        selfeval_config(config.selfeval_options)  # a bad option fails here, not in a stage later
    except (TypeError, ValueError) as exc:
        usage_error(f"--selfeval-option: {exc}")
    if args.checkpoint:
        check_checkpoint(args.checkpoint, args.target)
    return config


def usage_error(message: str) -> NoReturn:
    """Exit 2 with `message`, as argparse does for a malformed option, before anything started."""
    print(f"arrl: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_target(path: Path) -> None:
    """Exit 2 unless `path` can start a campaign: it parses and keeps the harness contract
    (`arrl.patch.check_candidate`, what every edit of it must keep too), and its hyperparameter
    block declares tunables to search (`NAME = value  # search: ...`, `arrl.edits`)."""
    from arrl.edits import GrammarError, parse_tunables
    from arrl.patch import PatchRejected, check_candidate

    try:
        source = path.read_text(encoding="utf-8")
        check_candidate(source)
        parse_tunables(source)
    except (OSError, UnicodeDecodeError, PatchRejected, GrammarError) as exc:
        usage_error(f"{path} cannot start a campaign: {exc}")


def check_pretrain(args: argparse.Namespace) -> None:
    """Exit 2 unless `arrl pretrain`'s options can train, before anything is written: the landscape
    loads, the target and checkpoint are usable, and the credit suits the policy and `--workers`."""
    from arrl.landscape_loading import LandscapeError, load_landscape

    try:
        load_landscape(args.landscape)
    except LandscapeError as exc:
        usage_error(f"pretrain: {exc}")
    check_target(args.target)
    kind = check_checkpoint(args.checkpoint, args.target) if args.checkpoint else "hyper"
    if kind != "hyper" and args.credit == "campaign":
        usage_error(f"pretrain: --credit campaign trains the ppo strategy's policy; {args.checkpoint} holds the edit policy")
    credit = args.credit or ("campaign" if kind == "hyper" else "proposal")
    if args.workers > 1 and credit != "campaign":
        usage_error("pretrain: --workers plays a group's campaigns side by side; it needs --credit campaign "
                    "(with --credit proposal every update waits for the proposal before it)")


def check_checkpoint(path: Path, target: Path) -> str:
    """Exit when `path` cannot start the policy for `target`'s tunables: here, before any process
    starts, rather than in the learner and the proposer, which would exit on it again and again
    until `arrl run` gives up on them. Returns the policy's kind ("hyper" or "edit")."""
    from arrl import policy
    from arrl.edits import parse_tunables, search_space

    try:
        blob = path.read_bytes()
    except OSError as exc:
        usage_error(f"--checkpoint {path}: {exc.strerror or exc}")
    space = search_space(parse_tunables(target.read_text())) if target.is_file() else None
    try:
        loaded, _ = policy.from_bytes(blob, space)
    except policy.SpaceMismatch as exc:
        usage_error(f"--checkpoint {path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever torch.load makes of a foreign file, said plainly
        usage_error(f"--checkpoint {path} cannot be read as policy weights ({type(exc).__name__} from torch.load)")
    return getattr(loaded, "kind", "edit")


# `arrl run`'s default. Simulated, 100 experiments: no worse on four steady landscapes, better on
# two that drift (docs/search.md, "Re-running the incumbent"); benchmarks default to 0.
REMEASURE_EVERY = 10
# ... and when the machine's speed has moved a quarter since the incumbent's score: on a quiet
# machine one run's probe varies by a few percent (frozen_env.harness.machine_gflops).
REMEASURE_ON_SPEED = 0.25


def remeasure_every(text: str) -> int:
    n = int(text)
    if n != 0 and n < 2:  # 1 would re-run the incumbent instead of every edit
        raise argparse.ArgumentTypeError(f"must be 0 (never) or 2 or more, got {n}")
    return n


def at_least(low: float, kind: type = int, above: bool = False):
    """An argparse type: a number of `kind` that is `low` or more (more than `low` with `above`), so
    that a negative count or budget is refused with the option's name instead of starting a
    campaign that stops at once or never."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'a whole number' if kind is int else 'a number'}: {text!r}") from None
        if value != value or value < low or (above and value == low):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in "invalid int value"
    return parse


def lengths_list(text: str) -> list[int]:
    """An argparse type: one campaign length or several, comma-separated, each 2 or more."""
    parse = at_least(2)
    return [int(parse(part.strip())) for part in text.split(",")]


def add_campaign_options(p: argparse.ArgumentParser) -> None:
    from frozen_env.constants import PROFILES

    p.add_argument("--profile", default="cpu", choices=list(PROFILES),
                   help="frozen profile of every experiment (default cpu)")
    p.add_argument("--budget-s", type=at_least(0.0, float), default=0.0,
                   help="override the profile's training budget (benchmarks; changes the fingerprint)")
    p.add_argument("--strategy", default="ppo", help="ppo (default), random, greedy, tpe or cmaes")
    p.add_argument("--seed", type=int, default=0,
                   help="the first proposer's draws (the same seed, the same opening proposals; later "
                        "proposals also follow which runs finish first, and each further proposer draws its own)")
    p.add_argument("--max-experiments", type=at_least(0), default=0, help="stop after this many proposals")
    p.add_argument("--max-wall-s", type=at_least(0.0, float), default=0.0, help="stop after this many seconds")
    p.add_argument("--max-gpu-hours", type=at_least(0.0, float), default=0.0, help="stop after this much executor time")
    p.add_argument("--patience", type=at_least(0), default=0, help="stop after this many experiments without improvement")
    p.add_argument("--baseline-repeats", type=at_least(0), default=1, help="runs of the unmodified script first")
    p.add_argument("--noise-sigma", type=at_least(0.0, float, above=True), default=DEFAULT_SIGMA, help="val_bpb noise unit until measured")
    p.add_argument("--keep-margin", type=at_least(0.0, float), default=0.0, help="sigmas an edit must win by to be kept")
    p.add_argument("--remeasure-every", type=remeasure_every, default=REMEASURE_EVERY, metavar="N",
                   help="re-run the incumbent once its score is N experiments old; edits are then judged "
                        "against the re-run (a machine whose speed drifts, a lucky score; default "
                        f"{REMEASURE_EVERY}; 0: never)")
    p.add_argument("--remeasure-on-speed", type=at_least(0.0, float), default=REMEASURE_ON_SPEED, metavar="FRACTION",
                   help="also re-run the incumbent once the machine's speed (each run's machine_gflops, "
                        "measured before its clock starts) has moved this fraction from the speed its score "
                        "was measured at, and keep no edit run at a speed this far from that score's "
                        "(the self-evaluator stops such an edit at once; "
                        f"default {REMEASURE_ON_SPEED}; 0: never)")
    p.add_argument("--queue-depth", type=at_least(0), default=1,
                   help="proposals kept waiting per live worker (default 1: no worker waits, the next "
                        "candidate is prepared while one trains); 0: sequential, each proposal made "
                        "once every earlier one has its result")
    p.add_argument("--target", type=Path, default=Path("target/train.py"), help="the script to improve")
    p.add_argument("--selfeval", action=argparse.BooleanOptionalAction, default=True,
                   help="run the self-evaluator, which aborts runs forecast to lose (default on)")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="workers start the next trainer while one trains (default on)")
    p.add_argument("--checkpoint", type=Path, help="ppo: start from this policy checkpoint (pre-trained or an "
                   "earlier campaign's RUN_DIR/checkpoints/policy-latest.pt)")
    p.add_argument("--hardware-class", default="",
                   help="the hardware every result must be measured on, e.g. 'cuda:NVIDIA H100 80GB HBM3' "
                        "(default: the first worker's; 'any' lets workers of every class take jobs)")
    p.add_argument("--selfeval-option", action="append", metavar="KEY=VALUE",
                   help="override a setting of the decision rule (arrl.selfeval.SelfEvalConfig)")


def reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False
