"""The simulator executor: the whole pipeline on virtual time, with a landscape instead of training.

Only the executor is replaced. The real proposer, patch applier, reward computer (and, for `ppo`,
the learner) run as anyio tasks in one process against one real Redis; the applier hands its jobs
to a `SimSink` (a Redis list) instead of rq's `gpu` queue, and `SimExecutor` plays the rq worker:
it reads the candidate's tunables from its source, asks the landscape for the outcome, and
publishes the same `started` message, `train.step` loss events and `result` message as
`workers.experiment` does. The self-evaluator's rule (`arrl.selfeval.decide`, with the
campaign's `selfeval_options` and the incumbent reference the real evaluator builds) runs inline
on the curve prefix every `cadence_s` virtual seconds; when it says stop, the curve is cut there
and the run is recorded `aborted` (or `diverged`) with its verdict, costing only that much time.

Virtual time, made deterministic: a job starts only after the previous one is recorded (and the
learner has caught up), and its result is published only after the proposer has refilled the
queue, exactly as when an experiment takes 30 s and everything else milliseconds. So proposal
n + 2 always sees the outcomes up to n. Timestamps in the ledger are virtual
(`created_at + executor seconds`); `training_seconds` is the budget (or where a run stopped).

A landscape is `FACTORY(seed, space) -> obj` with `obj.run(knobs, budget_s) -> {"curve": [[t, loss],
...], "val_bpb": float, "status": "ok" | "crashed"}` (built-ins: `arrl.landscapes`), named
`package.module:FACTORY` or `path/to/file.py:FACTORY` (`arrl.landscape_loading`).
"""

from __future__ import annotations

import functools
import inspect
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgpack

from arrl.bus import MESSAGE_FIELD, Bus
from arrl.campaign import PROPOSALS, RESULTS, STOPPED, TRANSITIONS, Campaign, CampaignConfig
from arrl.edits import block_lines, knobs, parse_tunables, search_space, split_lines
from arrl.landscape_loading import (
    Factory,
    Landscape,
    LandscapeError,
    check_outcome,
    landscape_error,
    load_landscape,
)
from arrl.ledger import RunDir
from arrl.messages import encode
from arrl.patch import check_candidate, content_hash
from arrl.reward import DEFAULT_SIGMA, MEASUREMENTS
from arrl.selfeval import Decision, SelfEvalConfig, audited, check_divergence, decide, verdict_event

DEFAULT_TARGET = Path(__file__).resolve().parents[1] / "target" / "train.py"
OVERHEAD_S = 15.0  # start-up and evaluation around the 30 s budget (a real cpu run: 45.9 s wall)
STALL_S = 120.0  # real seconds without progress before the driver gives up (a stage is stuck)


def compact_target(source: str) -> str:
    """The script reduced to its hyperparameter block (plus the harness calls the applier checks):
    identical knobs and diffs, a fifth of the parsing cost per proposal. For benchmarks."""
    start, end = block_lines(source)
    block = "".join(split_lines(source)[start - 1 : end])
    return ('"""A simulated stand-in for train.py: only its hyperparameter block matters here."""\n\n'
            "from frozen_env.harness import Harness\n\n" + block.rstrip("\n") +
            "\n\nharness = Harness.from_env()\nharness.finish(None)\n")


class SimSink:
    """The applier's JobSink for the simulator: a Redis list of msgpack jobs, and a set of ids."""

    def __init__(self, bus: Bus) -> None:
        self.redis = bus.redis
        self.key, self.ids = bus.key("sim", "jobs"), bus.key("sim", "job_ids")

    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.sismember(self.ids, job_id))

    async def enqueue(self, job_id: str, job: dict[str, Any]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.ids, job_id)
            pipe.rpush(self.key, msgpack.packb(job, use_bin_type=True))
            await pipe.execute()

    async def pop(self) -> dict[str, Any] | None:
        raw = await self.redis.lpop(self.key)
        return None if raw is None else msgpack.unpackb(raw, raw=False)


class SimExecutor:
    """Plays the rq worker on virtual time (see the module docstring)."""

    def __init__(self, campaign: Campaign, landscape: Landscape, sink: SimSink, *,
                 selfeval: SelfEvalConfig | None, cadence_s: float = 1.0, overhead_s: float = OVERHEAD_S,
                 poll_s: float = 0.001, learner_group: str | None = None) -> None:
        from pipeline.evaluator import Evaluator

        self.campaign, self.bus, self.landscape, self.sink = campaign, campaign.bus, landscape, sink
        self.selfeval, self.cadence_s, self.overhead_s, self.poll_s = selfeval, cadence_s, overhead_s, poll_s
        self.learner_group = learner_group
        self.routes_classes = _accepts(landscape.run, "for_class")  # it simulates a fleet's classes
        self.budget_s = float(campaign.config.frozen_profile().budget_s)
        self.evaluator = Evaluator(campaign, selfeval)  # its reference() is the real evaluator's
        self.clock = 0.0  # virtual executor seconds
        self.truth: dict[str, float | None] = {}  # noise-free val_bpb when the landscape tells it
        self.progress = time.monotonic()

    async def _wait(self, ready: Callable[[], Awaitable[bool]], what: str) -> None:
        while not await ready():
            if time.monotonic() - self.progress > STALL_S:
                raise TimeoutError(f"simulation stalled for {STALL_S:.0f} s waiting for {what}")
            await anyio.sleep(self.poll_s)
        self.progress = time.monotonic()

    async def _refilled(self, proposer_done: anyio.Event) -> bool:
        """The queue is topped up again and every reserved proposal is published (so its strategy
        has read its context before this job's outcome can be recorded)."""
        if proposer_done.is_set():
            return True
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.bus.key("counters"))
            pipe.xlen(self.bus.stream_key(PROPOSALS))
            raw, published = await pipe.execute()
        c = {k.decode(): int(v) for k, v in raw.items()}
        proposed = c.get("proposed", 0)
        depth = self.campaign.config.queue_depth_per_worker
        return published >= proposed and proposed - c.get("started", 0) - c.get("rejected", 0) >= depth

    async def _learner_idle(self) -> bool:
        """Every transition delivered to the learner and acked (acks follow its PPO updates)."""
        if self.learner_group is None:
            return True
        for group in await self.bus.redis.xinfo_groups(self.bus.stream_key(TRANSITIONS)):
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.learner_group:
                return int(group["pending"]) == 0 and int(group.get("lag") or 0) == 0
        return False

    async def serve(self, stop: anyio.Event, proposer_done: anyio.Event) -> None:
        while not stop.is_set():
            job = await self.sink.pop()
            if job is None:
                await anyio.sleep(self.poll_s)
                continue
            self.progress = time.monotonic()
            exp_id = job["experiment_id"]
            await self.campaign.mark_started(exp_id)
            await self._wait(functools.partial(self._refilled, proposer_done), "the proposer")
            await self.run_job(job)
            await self._wait(functools.partial(self._recorded, exp_id), f"the record of {exp_id}")
            await self._wait(self._learner_idle, "the learner")

    async def _recorded(self, exp_id: str) -> bool:
        return await self.campaign.get_record(exp_id) is not None

    async def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        exp_id = job["experiment_id"]
        source = await self.bus.load_source(job["candidate_hash"])
        if source is None:
            raise LookupError(f"candidate source {job['candidate_hash'][:12]} is missing from Redis")
        values = knobs(parse_tunables(source))
        extra = job["proposal"].get("extra") or {}
        # A re-run meant for one hardware class goes to a worker of it, as `arrl.queues` sends it,
        # where the landscape simulates workers of several classes.
        routed = {"for_class": extra["for_class"]} if extra.get("for_class") and self.routes_classes else {}
        try:
            out = check_outcome(self.landscape.run(values, self.budget_s, **routed), self.budget_s)
        except LandscapeError as exc:
            raise LandscapeError(f"{exp_id}: {exc}") from exc
        except Exception as exc:  # the user's landscape code: say whose bug it is, and on what
            raise LandscapeError(f"{exp_id}: landscape.run raised {type(exc).__name__}: {exc} "
                                 f"(knobs {values!r:.300})") from exc
        self.truth[exp_id] = out["true_val_bpb"]
        started = self.campaign.config.created_at + self.clock
        await self.bus.publish("started", "started", {"experiment_id": exp_id, "budget_s": self.budget_s,
                                                      "role": job["proposal"].get("role"),
                                                      "hardware_class": out["hardware_class"]})
        curve, status, reason, verdict, audit = out["curve"], out["status"], out["reason"], None, None
        # The self-evaluator leaves measurement runs alone (`pipeline.evaluator.Evaluator.on_started`).
        if self.selfeval is not None and len(curve) >= 3 and job["proposal"].get("role") not in MEASUREMENTS:
            cut, verdict, audit = await self._selfevaluate(curve, exp_id, out["hardware_class"] or "",
                                                           out.get("machine_gflops"))
            if verdict is not None and verdict.stop:
                curve = curve[:cut]
                status = "diverged" if verdict.decision is Decision.DIVERGED else "aborted"
                reason = f"self-evaluator: {verdict.reason}"
        val = out["val_bpb"] if status == "ok" else None
        training = self.budget_s if status == "ok" else (curve[-1][0] if curve else 0.0)
        events = [{"event": "train.step", "step": i, "training_seconds": t, "loss": y} for i, (t, y) in enumerate(curve)]
        # What the reward computer reads: an audit's verdict (for `arrl.selfeval.audit_record`), and the
        # last verdict (an aborted run's forecast).
        if audit is not None and audit is not verdict:
            events.append(verdict_event(audit))
        if verdict is not None:
            events.append(verdict_event(verdict))
        events.append({"event": "experiment.finished", "status": status, "val_bpb": val, "reason": reason})
        await self._publish_events(exp_id, events)
        wall = training + self.overhead_s
        self.clock += wall
        await self.campaign.add_busy_seconds(wall)
        result = {"experiment_id": exp_id, "proposal": job["proposal"], "candidate_hash": job["candidate_hash"],
                  "worker": "sim-0", "host": "sim", "started_at": started, "finished_at": started + wall,
                  "status": status, "reason": reason, "val_bpb": val, "curve": curve,
                  "training_seconds": training, "wall_seconds": wall, "steps": len(curve), "tokens": None,
                  "peak_memory_mb": None, "num_params": None, "device": "sim",
                  "fingerprint": job["fingerprint"], "exit_code": 0 if status == "ok" else 1,
                  # A landscape may simulate the machine's speed too (`remeasure_on_speed`).
                  "machine_gflops": out.get("machine_gflops"), "hardware_class": out["hardware_class"]}
        await self.bus.publish(RESULTS, "result", result)
        return result

    async def _selfevaluate(self, curve: list[list[float]], exp_id: str, hardware_class: str,
                            probe: float | None) -> tuple[int, Any, Any]:
        """Replay the evaluator's ticks over the prefix; (points kept, last verdict or the stop, the
        first audit verdict or None)."""
        cfg = self.selfeval
        assert cfg is not None
        reference, history = await self.evaluator.reference(hardware_class)
        uncompared = await self.evaluator.uncompared(probe, hardware_class)
        audit = audited(self.bus.campaign_id, exp_id, cfg, self.evaluator.audits.confirmed)
        last = first_audit = None
        n, tick = 0, self.cadence_s
        while n < len(curve):
            while n < len(curve) and curve[n][0] <= tick:
                n += 1
            tick += self.cadence_s
            if n < 3:  # the evaluator waits for 3 points
                continue
            prefix = curve[:n]
            if prefix[-1][0] / self.budget_s > cfg.max_budget_fraction:
                # Past the last abort point decide() can only report divergence: skip its forecast.
                why = check_divergence(prefix, self.budget_s, cfg)
                if why is None:
                    continue
            last = decide(prefix, self.budget_s, reference, history, cfg, audit=audit, uncompared=uncompared)
            first_audit = first_audit or (last if last.audit else None)
            if last.stop:
                return n, last, first_audit
        return len(curve), last, first_audit

    async def _publish_events(self, exp_id: str, events: list[dict[str, Any]]) -> None:
        """Bus.publish_event for many events in one round trip."""
        key = self.bus.events_key(exp_id)
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for event in events:
                data = encode("loss_event", {"campaign_id": self.bus.campaign_id, "experiment_id": exp_id,
                                             "event": event})
                pipe.xadd(key, {MESSAGE_FIELD: data}, maxlen=self.bus.events_maxlen, approximate=True)
            await pipe.execute()


class MemoryRunDir:
    """A run directory that keeps nothing: benchmarks need the ledger in Redis, not on disk."""

    def append(self, record: dict[str, Any], source: str | None = None,
               log_lines: list[dict[str, Any]] | None = None) -> bool:
        return True


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params  # explicitly: **options of a strategy go to its own machinery


async def run_sim_campaign(url: str, landscape: str | Factory, strategy_name: str, seed: int, experiments: int,
                           selfeval: bool = True, *, target: str | Path | None = None, compact: bool = True,
                           landscape_seed: int | None = None, run_dir: str | Path | None = None,
                           strategy_options: Mapping[str, Any] | None = None,
                           selfeval_options: Mapping[str, Any] | None = None, weights: bytes | None = None,
                           learner: bool = True, learner_options: Mapping[str, Any] | None = None,
                           profile: str = "cpu", budget_s: float = 0.0, baseline_repeats: int = 1,
                           noise_sigma: float = DEFAULT_SIGMA, keep_margin_sigmas: float = 0.0, queue_depth: int = 1,
                           remeasure_every: int = 0, remeasure_on_speed: float = 0.0, overhead_s: float = OVERHEAD_S, campaign_id: str | None = None) -> list[dict[str, Any]]:
    """One simulated campaign of `experiments` proposals; returns its ledger records in order.

    `landscape` is a factory or its name; its seed is `landscape_seed` (default `seed`). `target`
    is the script to improve (default target/train.py), reduced by `compact_target` unless
    `compact=False`. `run_dir` lays out a real run directory (ledger, lineage, logs); without it
    nothing is written to disk. `weights` start a `ppo` strategy (and its learner) pre-trained.
    Each record gains `true_val_bpb`, the landscape's noise-free value when it reports one.
    """
    from arrl.strategies import STRATEGIES, make_strategy
    from pipeline.applier import run_applier
    from pipeline.evaluator import selfeval_config
    from pipeline.proposer import run_proposer
    from pipeline.rewarder import run_rewarder

    source = Path(target or DEFAULT_TARGET).read_text()
    if compact:
        source = compact_target(source)
    check_candidate(source)
    factory = load_landscape(landscape)
    space = search_space(parse_tunables(source))
    land = factory(seed if landscape_seed is None else landscape_seed, space)
    if not callable(getattr(land, "run", None)):
        raise LandscapeError(f"{landscape!r} returned {type(land).__name__}, which has no run(knobs, budget_s)")
    config = CampaignConfig(
        campaign_id=campaign_id or f"sim{seed}{strategy_name}{uuid.uuid4().hex[:8]}".replace(":", "-"),
        profile=profile, budget_s=budget_s, fingerprint=f"sim:{landscape if isinstance(landscape, str) else 'custom'}",
        strategy=strategy_name, seed=seed, max_experiments=experiments, baseline_repeats=baseline_repeats,
        noise_sigma=noise_sigma, keep_margin_sigmas=keep_margin_sigmas, queue_depth_per_worker=queue_depth,
        remeasure_every=remeasure_every, remeasure_on_speed=remeasure_on_speed, selfeval=selfeval,
        selfeval_options=dict(selfeval_options or {}), hardware_class="any")  # each run's class is the landscape's
    cfg = selfeval_config(config.selfeval_options) if selfeval else None
    bus = Bus.from_url(url, config.campaign_id)
    scratch = tempfile.TemporaryDirectory(prefix="arrl-sim-")  # learner checkpoints without a run dir
    try:
        campaign = await Campaign.create(bus, config, source, content_hash(source))
        store: Any = MemoryRunDir()
        if run_dir is not None:
            store = RunDir(run_dir)
            store.init(config.to_dict(), source)
        checkpoints = store.checkpoints if run_dir is not None else Path(scratch.name)
        options, factory_of = dict(strategy_options or {}), STRATEGIES.get(strategy_name)
        for name, value in (("bus", bus), ("weights", weights), ("horizon", experiments)):
            if value is not None and factory_of is not None and _accepts(factory_of, name):
                options.setdefault(name, value)
        strategy = make_strategy(strategy_name, seed, **options)
        run_learner = _learner() if learner and strategy_name == "ppo" else None
        sink = SimSink(bus)
        executor = SimExecutor(campaign, land, sink, selfeval=cfg, overhead_s=overhead_s,
                               learner_group="learner" if run_learner else None)
        stop, proposer_done = anyio.Event(), anyio.Event()

        async def one_worker() -> int:
            return 1

        async def propose() -> None:
            await run_proposer(campaign, strategy, one_worker, stop=stop, poll_s=executor.poll_s)
            proposer_done.set()

        async def until_done(scope: anyio.CancelScope) -> None:
            # STOPPED: every proposal is recorded; an empty in-flight set: the last record's
            # handler (transition published, untracked) has finished too. Then cancel the loops.
            await proposer_done.wait()  # no polling while the campaign is young
            await executor._wait(lambda: _finished(campaign), "the campaign to stop")
            stop.set()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(until_done, tg.cancel_scope)
            tg.start_soon(propose)
            tg.start_soon(run_applier, campaign, None, "applier-sim", stop, sink)
            tg.start_soon(executor.serve, stop, proposer_done)
            tg.start_soon(lambda: run_rewarder(campaign, store, "reward-sim", stop=stop, tick_s=0.01))
            if run_learner is not None:
                tg.start_soon(lambda: run_learner(campaign, checkpoints, "learner-sim", stop=stop,
                                                  init_weights=weights, **dict(learner_options or {})))
        records = list((await campaign.records()).values())
    finally:
        with anyio.CancelScope(shield=True):
            await bus.aclose()
        scratch.cleanup()
    for record in records:
        record["true_val_bpb"] = executor.truth.get(record["experiment_id"])
    return records


async def _finished(campaign: Campaign) -> bool:
    return await campaign.state() == STOPPED and not await campaign.inflight()


def _learner() -> Callable[..., Awaitable[Any]] | None:
    try:
        from pipeline.learner import run_learner
    except ImportError:
        return None
    return run_learner


def run_sim_cli(args: Any) -> int:
    """`arrl run --executor sim --landscape MODULE:FACTORY`: one simulated campaign in the foreground
    with `arrl run`'s campaign options, a real run directory (ledger, results.tsv, lineage, logs)
    and a private redis-server unless `--redis-url`; prints the kept edits and a summary."""
    import logging

    import structlog

    from pipeline.evaluator import options_from_pairs
    from pipeline.redis_server import RedisServer

    if getattr(args, "resume", None):
        print("arrl run: a simulated campaign cannot be resumed (it takes seconds: run it again)")
        return 2
    if not getattr(args, "landscape", None):
        print("arrl run --executor sim needs --landscape MODULE:FACTORY (e.g. arrl.landscapes:cpu_fitted)")
        return 2
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S"))
    if (run_dir / "campaign.json").exists():
        print(f"arrl run: {run_dir} already holds a campaign (a simulated one cannot be resumed)")
        return 2
    checkpoint = getattr(args, "checkpoint", None)
    weights = Path(checkpoint).read_bytes() if checkpoint else None
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server, url = None, getattr(args, "redis_url", None)
    if not url:
        (run_dir / "redis").mkdir(parents=True, exist_ok=True)
        server = RedisServer(run_dir / "redis").start()
        url = server.url
    experiments = args.max_experiments or 100
    started = time.perf_counter()
    try:
        records = anyio.run(functools.partial(
            run_sim_campaign, url, args.landscape, args.strategy, args.seed, experiments, args.selfeval,
            target=args.target, compact=False, landscape_seed=getattr(args, "landscape_seed", None), run_dir=run_dir,
            selfeval_options=options_from_pairs(getattr(args, "selfeval_option", None)), weights=weights,
            profile=args.profile, budget_s=args.budget_s, baseline_repeats=args.baseline_repeats,
            noise_sigma=args.noise_sigma, keep_margin_sigmas=args.keep_margin, queue_depth=args.queue_depth,
            remeasure_every=args.remeasure_every, remeasure_on_speed=getattr(args, "remeasure_on_speed", 0.0)))
    except Exception as exc:  # raised inside the campaign's task group, it arrives wrapped
        error = landscape_error(exc)
        if error is None:
            raise
        done = len((run_dir / "ledger.jsonl").read_text().splitlines()) if (run_dir / "ledger.jsonl").is_file() else 0
        print(f"arrl run: {error}\narrl run: the campaign stopped; the {done} experiments recorded before it "
              f"are in {run_dir}")
        return 2
    finally:
        structlog.configure(**previous)
        if server is not None:
            server.stop()
    statuses: dict[str, int] = {}
    mixed = len({r.get("hardware_class") for r in records}) > 1  # a kept run's score holds on its class only
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        if r.get("kept"):
            on = f"  [{r.get('hardware_class')}]" if mixed else ""
            print(f"{r['experiment_id']}  {r['val_bpb']:.4f}{on}  {r.get('description') or ''}")
    oks = [r["val_bpb"] for r in records if r["status"] == "ok"]
    virtual_h = sum(float(r.get("wall_seconds") or 0.0) for r in records) / 3600
    print(f"{len(records)} simulated experiments ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}); "
          f"best val_bpb {min(oks) if oks else float('nan'):.4f}, baseline {records[0].get('val_bpb') or float('nan'):.4f}; "
          f"{virtual_h:.2f} h of virtual executor time in {time.perf_counter() - started:.1f} s; ledger in {run_dir}")
    return 0
