"""The PPO learner stage (`arrl-learner`): transitions in, versioned policy weights out.

It consumes the `transitions` stream (group `learner`), keeps the PPO samples (transitions whose
`extra` carries a state and an action; other strategies' and baseline runs are ignored), and
every `batch_size` new samples runs one PPO update, publishes the weights as the next version of
`policy` (proposers reload when the version changes, so the GPU queue never waits for the
learner), writes `policy-v{version}.pt` and `policy-latest.pt`, logs `learner.update` and appends
the statistics to the Redis list `learner:stats` and, one JSON line per update, to
`checkpoints/ppo_updates.jsonl` in the run directory (what `arrl report` plots once Redis is gone).

Idempotent by experiment id: a Lua script adds the id to the `learner:seen` set and the sample to
the `learner:buffer` list in one step, so a redelivered transition is ignored, and samples
buffered before a crash are still there after a restart. On start the learner takes the
campaign's current weights if any, else `init_weights` (an earlier campaign's checkpoint: the
meta-learner carries over), else a fresh policy, and publishes it when the campaign has none.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import msgpack
import structlog
import torch

from arrl.campaign import TRANSITIONS, WEIGHTS, Campaign
from arrl.consumer import run_consumer
from arrl.edits import parse_tunables, search_space
from arrl.ppo import Learner, Sample, sample_from_transition

log = structlog.get_logger()
GROUP = "learner"
STATS_MAXLEN = 10_000
UPDATES_LOG = "ppo_updates.jsonl"  # beside the checkpoints, one line per PPO update

# Seen-set and buffer change together: returns the buffer's length, or -1 for a duplicate.
_BUFFER = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return -1 end
return redis.call('RPUSH', KEYS[2], ARGV[2])
"""


def stats_key(campaign: Campaign) -> str:
    return campaign.bus.key("learner", "stats")


async def learner_stats(campaign: Campaign) -> list[dict[str, Any]]:
    """Every update's statistics so far, oldest first (for the report)."""
    raw = await campaign.bus.redis.lrange(stats_key(campaign), 0, -1)
    return [msgpack.unpackb(r, raw=False) for r in raw]


class LearnerStage:
    def __init__(self, campaign: Campaign, checkpoints: Path, learner: Learner, batch_size: int) -> None:
        self.campaign, self.bus = campaign, campaign.bus
        self.checkpoints = checkpoints
        self.learner = learner
        self.batch_size = max(1, batch_size)
        self.signature = learner.policy.signature
        self._buffer = self.bus.redis.register_script(_BUFFER)
        self.seen_key, self.buffer_key = self.bus.key("learner", "seen"), self.bus.key("learner", "buffer")

    async def publish(self, stats: dict[str, Any] | None = None) -> int:
        blob = self.learner.to_bytes()
        version = await self.bus.put_versioned(WEIGHTS, blob)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for name in (f"policy-v{version}.pt", "policy-latest.pt"):
            tmp = self.checkpoints / f".{name}.tmp"
            tmp.write_bytes(blob)
            tmp.replace(self.checkpoints / name)  # a reader never sees half a checkpoint
        if stats is not None:
            await self.bus.redis.rpush(stats_key(self.campaign), msgpack.packb({**stats, "version": version}))
            await self.bus.redis.ltrim(stats_key(self.campaign), -STATS_MAXLEN, -1)
            self._log_update({**stats, "version": version})
        return version

    def _log_update(self, stats: dict[str, Any]) -> None:
        """One JSON line per update in the run directory: Redis may be gone when the report is made.
        One write with O_APPEND, so a reader of a live campaign sees whole lines only (or a torn
        last one after a crash, which readers skip)."""
        line = json.dumps({**stats, "time": time.time()}, default=float, sort_keys=True) + "\n"
        fd = os.open(self.checkpoints / UPDATES_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    async def handle(self, message: dict[str, Any]) -> None:
        sample = sample_from_transition(message, self.signature)
        if sample is None:
            return  # not a PPO proposal of this space: nothing to learn from
        length = int(await self._buffer(keys=[self.seen_key, self.buffer_key],
                                        args=[sample.experiment_id, msgpack.packb(sample.to_plain())]))
        if length < 0:
            log.debug("learner.duplicate", experiment_id=sample.experiment_id)
        elif length >= self.batch_size:
            await self.update()

    async def update(self) -> int | None:
        raw = await self.bus.redis.lrange(self.buffer_key, 0, -1)
        samples = [Sample.from_plain(msgpack.unpackb(r, raw=False)) for r in raw]
        current = await self.bus.get_version(WEIGHTS)
        # Torch runs in a worker thread so the event loop (stop signals, Redis) stays responsive.
        stats = await anyio.to_thread.run_sync(self.learner.update, samples, current)
        version = await self.publish(stats) if stats["steps"] else None
        # Only what was read is removed: a sample buffered meanwhile stays for the next batch.
        await self.bus.redis.ltrim(self.buffer_key, len(raw), -1)
        log.info("learner.update", version=version, samples=stats["samples"],
                 dropped_stale=stats["dropped_stale"], epochs=stats["epochs"], loss=stats["policy_loss"],
                 value_loss=stats["value_loss"], entropy=stats["entropy"], kl=stats["approx_kl"],
                 clip_fraction=stats["clip_fraction"], reward_mean=stats.get("reward_mean"))
        return version


async def make_learner(campaign: Campaign, init_weights: bytes | None, seed: int = 0,
                       pretrained: bool = True) -> tuple[Learner, bool]:
    """(learner, from_campaign): the campaign's current weights, else `init_weights`, else the
    shipped pre-trained hyper-heuristic policy (`pretrained`, as the ppo strategy starts from it),
    else a fresh hyper-heuristic policy."""
    baseline = await campaign.bus.load_source(campaign.config.baseline_hash)
    if baseline is None:
        raise LookupError("the campaign's baseline script is missing from Redis")
    space = search_space(parse_tunables(baseline))
    current = await campaign.bus.get_versioned(WEIGHTS)
    if current is not None:
        return Learner.from_bytes(current[1], space, seed), True
    if init_weights is None and pretrained:
        from arrl.hyper import pretrained_weights

        init_weights = pretrained_weights()
    if init_weights is not None:
        return Learner.from_bytes(init_weights, space, seed), False
    return Learner.fresh(space, seed, kind="hyper"), False


async def run_learner(campaign: Campaign, run_dir_checkpoints: Path, consumer: str, *,
                      stop: anyio.Event | None = None, batch_size: int = 8,
                      init_weights: bytes | None = None, pretrained: bool = True) -> LearnerStage:
    """Consume transitions and train until `stop` is set; returns the stage (for tests)."""
    learner, resumed = await make_learner(campaign, init_weights, campaign.config.seed, pretrained)
    stage = LearnerStage(campaign, Path(run_dir_checkpoints), learner, batch_size)
    if not resumed:
        version = await stage.publish()
        log.info("learner.published_initial", version=version, pretrained=init_weights is not None)
    await campaign.mark_ready("learner")
    await run_consumer(campaign.bus, TRANSITIONS, GROUP, consumer, stage.handle, stop=stop,
                       expect_kind="transition")
    return stage


def production_priority(nice: int = 10) -> None:
    """The learner's CPU settings (also what scripts/bench_learner.py measures): one torch thread,
    since on a CPU-only machine the trainer owns the cores and the policy is tiny anyway, and the
    lowest priority. nice 10 alone still took a quarter of a 2-core trainer's steps while the
    learner updated back to back; SCHED_IDLE (Linux; threads made later inherit it) runs the
    learner only on a core nothing else wants. Called before any thread is started."""
    if nice > 0:
        os.nice(nice)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # not allowed here: nice alone
    torch.set_num_threads(1)


def learner_main(argv: list[str] | None = None) -> None:
    from pipeline.stages import _serve, stage_parser

    parser = stage_parser("arrl-learner", "train the proposal policy with PPO on the campaign's transitions")
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints go to RUN_DIR/checkpoints")
    parser.add_argument("--checkpoint", type=Path, help="start from this policy checkpoint (an earlier campaign's)")
    parser.add_argument("--batch-size", type=int, default=8, help="new samples per PPO update (default %(default)s)")
    parser.add_argument("--nice", type=int, default=10,
                        help="lower this process's CPU priority by N so it never slows the trainer (default %(default)s)")
    args = parser.parse_args(argv)
    production_priority(args.nice)
    init = args.checkpoint.read_bytes() if args.checkpoint else None

    async def body(campaign: Campaign, stop: anyio.Event) -> None:
        await run_learner(campaign, args.run_dir / "checkpoints", args.name, stop=stop,
                          batch_size=args.batch_size, init_weights=init)

    anyio.run(functools.partial(_serve, args, "learner", body, ready_in_body=True))


if __name__ == "__main__":
    learner_main()
