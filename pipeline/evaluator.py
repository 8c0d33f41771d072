"""The self-evaluator stage (`arrl-evaluator`): forecast running experiments, abort the hopeless.

Discovery goes through a consumer group on the campaign's `started` stream (the executor
announces each experiment there), so a restarted evaluator misses none: what it had not acked is
redelivered, and what it had acked is in the shared `watching` set. Each watched experiment's
curve is read from its own durable event stream (from the start after a restart), and every
`cadence_s` the decision rule runs on it (`arrl.selfeval.decide`; a run the keep rule will not
compare, at another machine speed than the incumbent's score, is stopped at once). An abort goes
to the experiment's control stream; every decision is written to the experiment's event stream as
`selfeval.verdict`, so the ledger and the per-experiment log keep what was decided and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from arrl.bus import REDIS_ERRORS
from arrl.campaign import Campaign
from arrl.consumer import run_consumer
from arrl.forecast import Reference
from arrl.reward import MEASUREMENTS
from arrl.scores import class_score, measured_by, of_class
from arrl.selfeval import (
    AuditTally,
    Decision,
    SelfEvalConfig,
    Verdict,
    audit_tally,
    audited,
    decide,
    gap_spread,
    verdict_event,
)

log = structlog.get_logger()
STARTED = "started"
GROUP = "evaluator"


def options_from_pairs(pairs: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` overrides from a command line, values parsed as numbers where they are numbers."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            options[key] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            options[key] = value
    return options


def selfeval_config(options: dict[str, Any] | None) -> SelfEvalConfig:
    """The decision rule's settings: defaults, overridden by the campaign's `selfeval_options`."""
    known = set(SelfEvalConfig.__dataclass_fields__) - {"forecast"}
    unknown = set(options or {}) - known
    if unknown:
        raise ValueError(f"unknown self-evaluator option(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
    return SelfEvalConfig(**(options or {}))


@dataclass
class Watched:
    exp_id: str
    budget_s: float
    last_id: str = "0"
    curve: list[list[float]] = field(default_factory=list)
    finished: bool = False
    audited: bool = False  # an audit, once begun, runs to the end (read back from its own verdicts)
    hardware_class: str = ""  # what it runs on: judged against the incumbent's run on that class
    machine_gflops: float | None = None  # its machine's speed before its clock started (`train.clock_started`)


class Evaluator:
    def __init__(self, campaign: Campaign, config: SelfEvalConfig | None = None) -> None:
        self.campaign = campaign
        self.bus = campaign.bus
        self.config = config or SelfEvalConfig()
        self.watched: dict[str, Watched] = {}
        self._references: dict[str, Reference | None] = {}  # by the run that measured the score
        self.audits = AuditTally()

    @property
    def watching_key(self) -> str:
        return self.bus.key("evaluator", "watching")

    async def restore(self) -> None:
        """After a restart: watch again what an earlier evaluator was watching."""
        for key, value in (await self.bus.redis.hgetall(self.watching_key)).items():
            budget, _, cls = value.decode().partition("|")
            self.watched[key.decode()] = Watched(key.decode(), float(budget), hardware_class=cls)

    async def on_started(self, message: dict[str, Any]) -> None:
        exp_id = message["experiment_id"]
        if message.get("role") in MEASUREMENTS:
            # A run of an unmodified script (a baseline, a re-run of the incumbent) measures the
            # noise or the machine of now: its score is wanted whatever it is, and judged against
            # the incumbent's older curve, a re-run on a machine that slowed down looked hopeless.
            log.info("selfeval.not_watching", experiment_id=exp_id, role=message["role"])
            return
        cls = str(message.get("hardware_class") or "")
        await self.bus.redis.hset(self.watching_key, exp_id, repr(float(message["budget_s"])) + f"|{cls}")
        self.watched.setdefault(exp_id, Watched(exp_id, float(message["budget_s"]), hardware_class=cls))
        log.info("selfeval.watching", experiment_id=exp_id)

    async def reference(self, hardware_class: str = "") -> tuple[Reference | None, list[float]]:
        """The incumbent's full curve on `hardware_class` (`arrl.scores`: a run on another class
        trains at another speed; cached per measuring run), with the gap spread of the finished
        runs (`arrl.selfeval.gap_spread`) and the miss the audits caught, and the val_bpb of past
        runs on that class. Keeps the tally of the audits (`arrl.selfeval.audit_tally`) in
        `audits`. All of it over the last 200 records: a long campaign audits again, and relearns
        a miss, as its curves change. No reference where no run of that class has scored the
        incumbent: nothing is then judged hopeless against it."""
        incumbent = await self.bus.get_incumbent()
        records = await self.campaign.recent_records(200)
        self.audits = audit_tally(records)
        finished = [r for r in records if r.get("status") == "ok" and isinstance(r.get("val_bpb"), int | float)]
        if incumbent:
            finished = of_class(finished, incumbent, hardware_class)
        history = [r["val_bpb"] for r in finished]
        score = class_score(incumbent, hardware_class) if incumbent else None
        if score is None:
            return None, history
        # The run that scores the incumbent now: its latest re-run (`remeasure_every`), else its own.
        run = measured_by(score)
        if run not in self._references:
            curve = [[e["training_seconds"], e["loss"]] for e in await self._all_events(run)
                     if e.get("event") == "train.step"]
            try:
                reference = Reference.from_curve(curve, self.campaign_budget(), float(score["val_bpb"]), run_id=run)
            except ValueError:
                reference = None
            if len(self._references) >= 16:  # older scores are not read again
                self._references.clear()
            self._references[run] = reference
        if (reference := self._references[run]) is None:
            return None, history
        spread = gap_spread([(r["val_bpb"], r["final_loss"]) for r in finished
                             if isinstance(r.get("final_loss"), int | float)])
        return dataclasses.replace(reference, gap_spread=spread, audit_miss=self.audits.miss), history

    async def uncompared(self, probe: float | None, hardware_class: str) -> dict[str, object] | None:
        """Why the keep rule (`pipeline.rewarder`) will not compare an edit running on
        `hardware_class` with a machine probe of `probe` with the incumbent's score, whatever it
        reaches, as the edit's record would say it: a speed that far from the score's
        (`speed_mismatch`, `Campaign.speed_shift`), or, with `stop_unscored_class`, no score on that
        class yet (`unscored_class`); None where it will be compared.

        By default an edit on a class where the incumbent has no score is let run although it is not
        compared: its outcome tells the search about its tunables through the class offsets, and
        stopping such edits lost at 100 experiments on a fleet of three classes (docs/search.md,
        "Slow spells and the self-evaluator")."""
        incumbent = await self.bus.get_incumbent()
        if not incumbent:
            return None
        if self.config.stop_unscored_class and class_score(incumbent, hardware_class) is None:
            return {"unscored_class": hardware_class}
        if probe is None or self.campaign.config.remeasure_on_speed <= 0:
            return None
        shift = await self.campaign.speed_shift(probe, incumbent, hardware_class)
        return None if shift is None else {"speed_mismatch": round(shift, 3)}

    def campaign_budget(self) -> float:
        return self.campaign.config.frozen_profile().budget_s

    async def _all_events(self, exp_id: str, last: str = "0") -> list[dict[str, Any]]:
        events = []
        while batch := await self.bus.read_events(exp_id, last, count=5000):
            for entry_id, event in batch:
                events.append(event)
                last = entry_id
        return events

    async def _catch_up(self, w: Watched) -> None:
        while batch := await self.bus.read_events(w.exp_id, w.last_id, count=5000):
            for entry_id, event in batch:
                w.last_id = entry_id
                kind = event.get("event")
                if kind == "train.step" and isinstance(event.get("loss"), int | float):
                    w.curve.append([float(event["training_seconds"]), float(event["loss"])])
                elif kind in ("experiment.finished", "summary", "train.diverged"):
                    w.finished = True
                elif kind == "selfeval.verdict" and event.get("audit"):
                    w.audited = True
                elif kind == "train.clock_started" and isinstance(event.get("machine_gflops"), int | float):
                    w.machine_gflops = float(event["machine_gflops"])

    async def tick(self) -> list[tuple[str, Verdict]]:
        """One round of decisions over every watched experiment; returns the stops it sent."""
        stops = []
        references: dict[str, tuple[Reference | None, list[float]]] = {}
        for exp_id, w in list(self.watched.items()):
            await self._catch_up(w)
            if w.finished:
                await self._forget(exp_id)
                continue
            if len(w.curve) < 3:
                continue
            if w.hardware_class not in references:
                references[w.hardware_class] = await self.reference(w.hardware_class)
            reference, history = references[w.hardware_class]
            verdict = decide(w.curve, w.budget_s or self.campaign_budget(), reference, history, self.config,
                             audit=w.audited or audited(self.bus.campaign_id, exp_id, self.config,
                                                        self.audits.confirmed),
                             uncompared=await self.uncompared(w.machine_gflops, w.hardware_class))
            # Every decision, with its why and the run whose curve it was judged against.
            await self.bus.publish_event(exp_id, {**verdict_event(verdict),
                                                  "reference": reference.run_id if reference else None})
            if verdict.audit and not w.audited:
                w.audited = True
                log.info("selfeval.audit", experiment_id=exp_id, reason=verdict.reason, fraction=verdict.fraction,
                         forecast=verdict.forecast.mean if verdict.forecast else None, tau=verdict.tau)
            if verdict.stop:
                # "diverged" makes the executor record that status rather than "aborted".
                command = "diverged" if verdict.decision is Decision.DIVERGED else "abort"
                await self.bus.send_control(exp_id, command, f"self-evaluator: {verdict.reason}")
                log.info("selfeval.abort", experiment_id=exp_id, decision=verdict.decision.value,
                         reason=verdict.reason, fraction=verdict.fraction,
                         forecast=verdict.forecast.mean if verdict.forecast else None)
                stops.append((exp_id, verdict))
                await self._forget(exp_id)
        return stops

    async def _forget(self, exp_id: str) -> None:
        self.watched.pop(exp_id, None)
        await self.bus.redis.hdel(self.watching_key, exp_id)


async def run_evaluator(campaign: Campaign, consumer: str, config: SelfEvalConfig | None = None,
                        stop: anyio.Event | None = None, cadence_s: float = 1.0) -> None:
    evaluator = Evaluator(campaign, config)
    await evaluator.restore()
    stop = stop or anyio.Event()

    async def decide_loop() -> None:
        while not stop.is_set():
            try:
                await evaluator.tick()
            except REDIS_ERRORS as exc:  # Redis restarting: decide again next round
                log.warning("selfeval.tick_failed", error=repr(exc))
            except Exception:  # one bad curve must not stop the evaluation of the others
                log.exception("selfeval.tick_failed")
            await anyio.sleep(cadence_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(decide_loop)
        await run_consumer(campaign.bus, STARTED, GROUP, consumer, evaluator.on_started, stop=stop,
                           expect_kind="started")
        tg.cancel_scope.cancel()

