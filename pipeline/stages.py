"""Console entry points of the stages: `arrl-proposer`, `arrl-applier`, `arrl-reward`, `arrl-evaluator`.

Each is a thin process around library code: parse options, open the bus, load the campaign,
run the stage's loop until the campaign stops or SIGTERM/SIGINT arrives (then finish the
message in hand and exit). Every stage is safe to run in several copies.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import redis
import structlog

from arrl.bus import REDIS_ERRORS, Backoff, Bus
from arrl.campaign import QUEUE_NAME, STOPPED, Campaign, latest_campaign_id
from arrl.logs import configure

log = structlog.get_logger()
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
STARTUP_WAIT_S = 120.0  # a stage started while Redis restarts waits this long for it


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--redis-url", default=os.environ.get("ARRL_REDIS_URL", DEFAULT_REDIS_URL),
                        help="the campaign's Redis (default $ARRL_REDIS_URL or %(default)s)")
    parser.add_argument("--campaign", default=os.environ.get("ARRL_CAMPAIGN"),
                        help="campaign id (default: the newest campaign in this Redis)")
    parser.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}", help="consumer name")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--claim-idle-ms", type=int, default=int(os.environ.get("ARRL_CLAIM_IDLE_MS", "30000")),
                        help="re-claim a message another consumer left unacknowledged this long (a crashed "
                             "copy of this stage); keep it above the slowest handler (default "
                             "$ARRL_CLAIM_IDLE_MS or %(default)s)")
    return parser


async def open_campaign(url: str, campaign_id: str | None, *, wait_s: float = 0.0, **bus_options: object) -> Campaign:
    """The campaign's state; with `wait_s`, Redis unreachable at start (restarting) is waited for that long."""
    deadline, backoff = time.monotonic() + wait_s, Backoff(0.2)
    while True:
        try:
            return await _open_campaign(url, campaign_id, **bus_options)
        except REDIS_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("stage.redis_unavailable", error=repr(exc), retry_in_s=backoff.delay_s)
            await backoff.pause()


async def _open_campaign(url: str, campaign_id: str | None, **bus_options: object) -> Campaign:
    probe = Bus.from_url(url, "probe")
    try:
        campaign_id = campaign_id or await latest_campaign_id(probe.redis)
    finally:
        await probe.aclose()
    if not campaign_id:
        raise SystemExit(f"no campaign in {url}; create one with `arrl init` or `arrl run`")
    bus = Bus.from_url(url, campaign_id, **bus_options)
    try:
        return await Campaign.load(bus)
    except LookupError:
        await bus.aclose()
        raise SystemExit(f"no campaign {campaign_id!r} in {url}; leave --campaign out for the newest one") from None


async def _serve(args: argparse.Namespace, stage: str,
                 body: Callable[[Campaign, anyio.Event], Awaitable[object]], *, ready_in_body: bool = False) -> None:
    """Run `body` until the campaign stops or a signal arrives. The stage is marked ready
    (`Campaign.mark_ready`) before `body`, or by `body` itself with `ready_in_body` (a stage with
    start-up work of its own, as the learner's first weights)."""
    configure(stage, args.log_level)
    campaign = await open_campaign(args.redis_url, args.campaign, wait_s=STARTUP_WAIT_S, claim_idle_ms=args.claim_idle_ms)
    structlog.contextvars.bind_contextvars(campaign_id=campaign.bus.campaign_id)
    stop = anyio.Event()

    async def on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stage.signal", signal=signum)
                stop.set()
                return

    async def until_stopped() -> None:
        while not stop.is_set():  # a stopped campaign ends every stage
            try:
                if await campaign.state() == STOPPED:
                    stop.set()
            except REDIS_ERRORS as exc:
                log.warning("stage.redis_unavailable", error=repr(exc))  # a restart: wait it out
            await anyio.sleep(0.5)

    log.info("stage.started", name=args.name)
    if not ready_in_body:
        await campaign.mark_ready(stage)
    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signal)
        tg.start_soon(until_stopped)
        await body(campaign, stop)
        tg.cancel_scope.cancel()
    await campaign.bus.aclose()
    log.info("stage.exited")


def proposer_main(argv: list[str] | None = None) -> None:
    from arrl.strategies import make_strategy
    from pipeline.proposer import ABANDONED_AFTER_S, fill_abandoned_until_stopped, run_proposer

    parser = stage_parser("arrl-proposer", "propose edits, keeping the gpu queue at its target depth")
    parser.add_argument("--strategy", help="override the campaign's strategy")
    parser.add_argument("--abandoned-after-s", type=float,
                        default=float(os.environ.get("ARRL_ABANDONED_AFTER_S", ABANDONED_AFTER_S)),
                        help="propose a reserved id whose proposer died before publishing it after this "
                             "long (default $ARRL_ABANDONED_AFTER_S or %(default)s)")
    args = parser.parse_args(argv)

    async def body(campaign: Campaign, stop: anyio.Event) -> None:
        sync = redis.Redis.from_url(args.redis_url)
        from rq import Queue, Worker

        queue = Queue(QUEUE_NAME, connection=sync)

        async def live_workers() -> int:
            return await anyio.to_thread.run_sync(lambda: Worker.count(queue=queue))

        seed = await campaign.proposer_seed()
        name = args.strategy or campaign.config.strategy
        options = {}
        if name == "ppo":  # follows the learner's versions; a pre-trained start until the first one
            options = {"bus": campaign.bus, "horizon": campaign.config.max_experiments or 100,
                       "checkpoint": campaign.config.policy_checkpoint or None}
        strategy = make_strategy(name, seed, **options)
        await run_proposer(campaign, strategy, live_workers, stop=stop, abandoned_after_s=args.abandoned_after_s)
        # Stay until the campaign stops, so `arrl run` sees every stage alive, and propose what a
        # proposer that died mid-proposal left reserved (the campaign cannot stop without it).
        await fill_abandoned_until_stopped(campaign, strategy, stop, args.abandoned_after_s)

    anyio.run(_serve, args, "proposer", body)


def applier_main(argv: list[str] | None = None) -> None:
    from pipeline.applier import run_applier

    args = stage_parser("arrl-applier", "check proposals' diffs and enqueue experiments").parse_args(argv)

    async def body(campaign: Campaign, stop: anyio.Event) -> None:
        await run_applier(campaign, redis.Redis.from_url(args.redis_url), args.name, stop)

    anyio.run(_serve, args, "applier", body)


def reward_main(argv: list[str] | None = None) -> None:
    from arrl.ledger import RunDir
    from pipeline.rewarder import run_rewarder
    from pipeline.sweeper import make_sweeper

    parser = stage_parser("arrl-reward", "record results, keep or discard, publish transitions")
    parser.add_argument("--run-dir", type=Path, required=True, help="where the ledger and lineage go")
    args = parser.parse_args(argv)

    async def body(campaign: Campaign, stop: anyio.Event) -> None:
        run_dir = RunDir(args.run_dir)
        baseline = await campaign.bus.load_source(campaign.config.baseline_hash) or ""
        run_dir.init(campaign.config.to_dict(), baseline)
        sweeper = make_sweeper(redis.Redis.from_url(args.redis_url))
        await run_rewarder(campaign, run_dir, args.name, sweeper=sweeper, stop=stop)

    anyio.run(_serve, args, "reward", body)


def evaluator_main(argv: list[str] | None = None) -> None:
    from pipeline.evaluator import run_evaluator, selfeval_config

    parser = stage_parser("arrl-evaluator", "forecast running experiments from their loss and abort hopeless ones")
    parser.add_argument("--cadence-s", type=float, default=1.0, help="seconds between decisions")
    args = parser.parse_args(argv)

    async def body(campaign: Campaign, stop: anyio.Event) -> None:
        config = selfeval_config(campaign.config.selfeval_options)
        log.info("selfeval.config", **{k: str(v) for k, v in config.__dict__.items()})
        await run_evaluator(campaign, args.name, config, stop=stop, cadence_s=args.cadence_s)

    anyio.run(_serve, args, "evaluator", body)


if __name__ == "__main__":
    stages = {"proposer": proposer_main, "applier": applier_main, "reward": reward_main, "evaluator": evaluator_main}
    sys.exit(stages[sys.argv.pop(1)]())
