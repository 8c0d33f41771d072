"""The reward computer stage: records each result, keeps or discards, and feeds the learner.

For each result: compute the reward against the parent's val_bpb, decide keep or discard
against the current incumbent (updated by compare-and-set; a re-run of the incumbent updates its
score instead), store the record once in Redis (the commit point), write the run directory
(ledger, results.tsv, lineage, per-experiment log), and publish a transition. Every step is
idempotent by experiment id.

Beside that it runs the termination oracle and a sweeper that records experiments whose job
died without publishing a result (a killed worker), so nothing is lost; a result the handler
kept failing on, dead-lettered by the bus, is recorded `crashed` from the dead-letter stream.
"""

from __future__ import annotations

import math
import time
from typing import Any

import anyio
import msgpack
import structlog

from arrl.bus import REDIS_ERRORS
from arrl.campaign import (
    RESULTS,
    RUNNING,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    Campaign,
)
from arrl.consumer import run_consumer
from arrl.dead_letters import DeadLetter
from arrl.forecast import smoothed_final
from arrl.ledger import RunDir, for_files
from arrl.logs import bind_experiment
from arrl.messages import MessageError, decode
from arrl.oracle import Progress, stop_reason
from arrl.reward import beats, compute_reward, is_edit, pooled_noise_sigma
from arrl.scores import (
    CONTENDED_SPREAD,
    class_of,
    class_score,
    experiment_number,
    measured_by,
    probe_spread,
    score_entry,
    with_score,
)
from arrl.selfeval import audit_record

log = structlog.get_logger()
GROUP = "reward"
DEAD_GROUP = "reward-dead"  # reads the results that GROUP dead-lettered, to record them anyway
RECORD_FIELDS = ("status", "reason", "val_bpb", "training_seconds", "wall_seconds", "steps", "tokens",
                 "peak_memory_mb", "num_params", "device", "fingerprint", "worker", "host", "exit_code",
                 "duplicate_of", "abort_latency_s", "started_at", "finished_at", "candidate_hash", "trainer",
                 "startup_seconds", "hardware_class", "events_dropped", "gate_wait_seconds",
                 "training_started_at", "training_ended_at", "machine_gflops")
PROPOSAL_FIELDS = ("parent_hash", "parent_bpb", "diff", "description", "program", "strategy", "role",
                   "logprob", "value", "policy_version", "created_at", "extra")


class RewardComputer:
    def __init__(self, campaign: Campaign, run_dir: RunDir) -> None:
        self.campaign = campaign
        self.bus = campaign.bus
        self.run_dir = run_dir

    async def sigma(self) -> float:
        """The noise unit: spread of the baseline repeats once measured (within each hardware class,
        which may differ by a constant: `arrl.scores`), else the configured one."""
        by_class = await self.campaign.baseline_bpbs()
        return pooled_noise_sigma(by_class.values()) or self.campaign.config.noise_sigma

    async def handle(self, result: dict[str, Any]) -> None:
        exp_id = result["experiment_id"]
        with bind_experiment(experiment_id=exp_id):
            record = await self.campaign.get_record(exp_id)
            events = await self._events(exp_id)
            if record is None:
                record = await self._decide(result, events)
                if not await self.campaign.record(exp_id, record, **self._counts(record)):
                    # another copy of this stage recorded it first
                    record = await self.campaign.get_record(exp_id) or record
            source = await self.bus.load_source(record["candidate_hash"]) if record.get("kept") else None
            lines = [{"event": "proposal", **result.get("proposal", {})}, *events,
                     {"event": "experiment.recorded", **{k: v for k, v in for_files(record).items() if k != "diff"}}]
            if self.run_dir.append(record, source, lines):
                log.info("experiment.recorded", status=record["status"], val_bpb=record["val_bpb"],
                         reward=record["reward"], kept=record["kept"], description=record.get("description"))
                await self._note_contention(record)
            await self.bus.publish(TRANSITIONS, "transition", {
                "experiment_id": exp_id, "reward": record["reward"], "status": record["status"],
                "program": record.get("program"), "logprob": record.get("logprob"), "value": record.get("value"),
                "policy_version": record.get("policy_version"), "extra": record.get("extra"),
                "strategy": record.get("strategy"), "val_bpb": record.get("val_bpb")})
            await self.campaign.untrack(exp_id)

    async def _note_contention(self, record: dict[str, Any]) -> None:
        """Say in the log when the machine turns contended, or steady again: the spread of the
        probes of the latest runs of `record`'s class (`arrl.scores.probe_spread`) with `record`,
        against without it. On a contended machine scores move with the load, so a user tailing
        the log learns why edits stop being compared or kept."""
        if not isinstance(record.get("machine_gflops"), int | float):
            return
        cls = class_of(record)
        runs = [r for r in await self.campaign.recent_records(32) if class_of(r) == cls]
        now = probe_spread(runs)
        before = probe_spread([r for r in runs if r.get("experiment_id") != record["experiment_id"]])
        if now is None or before is None or (now >= CONTENDED_SPREAD) == (before >= CONTENDED_SPREAD):
            return
        if now >= CONTENDED_SPREAD:
            log.warning("machine.contended", probe_spread=round(now, 3), hardware_class=cls,
                        why="the device's speed moves from run to run (another tenant?): scores move with it, "
                            "and edits run at another speed than the incumbent's score are not compared")
        else:
            log.info("machine.steady", probe_spread=round(now, 3), hardware_class=cls)

    async def record_dead_letter(self, dead: DeadLetter) -> str | None:
        """Record a result the handler kept failing on as `crashed`; returns its experiment id.

        Otherwise the experiment would never be recorded: the campaign's counts would never add
        up and it would never stop. Only what is sure to work is done here (no events, no lineage).
        """
        if dead.group != GROUP:
            return None
        try:
            result = decode(dead.raw, "result")
        except MessageError:
            try:  # undecodable as a result; perhaps its id can still be read
                result = msgpack.unpackb(dead.raw, raw=False)
            except Exception:  # noqa: BLE001 - garbage: there is no experiment to record
                result = None
        exp_id = result.get("experiment_id") if isinstance(result, dict) else None
        if not isinstance(exp_id, str) or not exp_id:
            log.error("reward.dead_letter_unrecordable", entry_id=dead.entry_id, reason=dead.reason)
            return None
        with bind_experiment(experiment_id=exp_id):
            if await self.campaign.get_record(exp_id) is not None:
                # Recorded before its handler failed (on the run directory, say): only untrack it.
                await self.campaign.untrack(exp_id)
                return exp_id
            proposal = result.get("proposal") if isinstance(result.get("proposal"), dict) else {}
            record: dict[str, Any] = {"experiment_id": exp_id, **{k: proposal.get(k) for k in PROPOSAL_FIELDS}}
            for key in RECORD_FIELDS:
                value = result.get(key)
                record[key] = value if value is None or isinstance(value, str | int | float | bool) else str(value)
            why = dead.last_error or dead.reason
            record.update(status="crashed", reason=f"dead-lettered after {dead.deliveries} deliveries: {why}",
                          val_bpb=None, kept=False, reward=compute_reward("crashed", None, None, 1.0),
                          sigma=None, recorded_at=time.time())
            if not await self.campaign.record(exp_id, record, **self._counts(record)):
                return exp_id
            log.error("experiment.recorded_dead_letter", reason=record["reason"])
            try:  # the run directory may be what failed: Redis holds the record either way
                self.run_dir.append(record, None, [{"event": "experiment.recorded", **record}])
            except Exception:  # noqa: BLE001
                log.exception("reward.dead_letter_not_written")
            await self.bus.publish(TRANSITIONS, "transition", {
                "experiment_id": exp_id, "reward": record["reward"], "status": "crashed",
                "program": record.get("program"), "logprob": record.get("logprob"), "value": record.get("value"),
                "policy_version": record.get("policy_version"), "extra": record.get("extra"),
                "strategy": record.get("strategy"), "val_bpb": None})
            await self.campaign.untrack(exp_id)
        return exp_id

    async def _decide(self, result: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
        proposal = result.get("proposal") or {}
        record: dict[str, Any] = {"experiment_id": result["experiment_id"]}
        record.update({k: proposal.get(k) for k in PROPOSAL_FIELDS})
        record.update({k: result.get(k) for k in RECORD_FIELDS})
        record["curve_points"] = len(result.get("curve") or [])
        status, val = record["status"], record["val_bpb"]
        if status == "ok" and result.get("curve"):  # the self-evaluator measures the gap to val_bpb from it
            final = smoothed_final(result["curve"], self.campaign.config.frozen_profile().budget_s)
            record["final_loss"] = final if math.isfinite(final) else None
        if status == "duplicate" and record.get("duplicate_of"):
            earlier = await self.campaign.get_record(record["duplicate_of"])
            record["val_bpb"] = val = earlier.get("val_bpb") if earlier else None
        if status == "ok" and not (isinstance(val, int | float) and math.isfinite(val)):
            record.update(status="crashed", reason="no finite val_bpb")
            status = "crashed"
        sigma = await self.sigma()
        parent_bpb = record.get("parent_bpb")
        if parent_bpb is None and record.get("parent_hash"):
            parent_bpb = await self.campaign.score(record["parent_hash"])
        kept, incumbent, compared = False, await self.bus.get_incumbent(), None
        remeasure = record.get("role") == "remeasure"
        if status == "ok":
            await self.campaign.set_score(record["candidate_hash"], val)
            if remeasure:
                incumbent = await self._remeasure_incumbent(record)
            else:
                kept, incumbent, compared = await self._maybe_replace_incumbent(record, sigma)
        latest_on = (incumbent or {}).get("hardware_class")  # the class of the incumbent's latest score
        if (compared is not None and record.get("parent_hash") == compared["hash"]
                and latest_on is not None and compared.get("hardware_class") not in (None, latest_on)):
            parent_bpb = compared["val_bpb"]  # the parent's score on this run's class, not on another's
        # The self-evaluator's last verdict on this run; an aborted run is rewarded from its forecast.
        verdicts = [e for e in events if e.get("event") == "selfeval.verdict"]
        record["selfeval"] = verdicts[-1] if verdicts else None
        forecast = verdicts[-1].get("forecast_val_bpb") if verdicts and status == "aborted" else None
        record["forecast_val_bpb"] = forecast
        record["audit"] = audit_record(verdicts)  # what the self-evaluator learns its own misses from
        if status == "aborted" and verdicts and isinstance(why := verdicts[-1].get("uncompared"), dict):
            # Stopped because the keep rule would not compare it: its record says so as if it had run
            # to the end (`arrl.selfeval.decide`), so that a class's re-run falls due
            # (`arrl.scores.unscored_class`) and reports count it.
            if isinstance(shift := why.get("speed_mismatch"), int | float):
                record["speed_mismatch"] = shift
            if isinstance(cls := why.get("unscored_class"), str):
                record["unscored_class"] = cls
        record.update(
            parent_bpb=parent_bpb, sigma=sigma, kept=kept,
            incumbent_bpb=(compared or incumbent or {}).get("val_bpb"),
            reward=0.0 if (remeasure and status == "ok") or record.get("speed_mismatch") is not None
            or record.get("unscored_class") is not None else
            compute_reward(status, val if status != "duplicate" else None, parent_bpb, sigma, forecast),
            recorded_at=time.time(),
        )
        return record

    async def _remeasure_incumbent(self, record: dict[str, Any]) -> dict | None:
        """A re-run of the incumbent becomes its score on the re-run's hardware class (`arrl.reward`,
        `arrl.scores`); returns the incumbent it measured. Compare-and-set like a replacement; a
        re-run of a script that is no longer the incumbent, or older than the incumbent's latest
        score on its class, changes nothing."""
        exp_id = record["experiment_id"]
        while True:
            incumbent = await self.bus.get_incumbent()
            if not incumbent or incumbent["hash"] != record["candidate_hash"]:
                return incumbent
            own = class_score(incumbent, class_of(record))
            if own is not None and experiment_number(measured_by(own)) >= experiment_number(exp_id):
                return incumbent
            new = {**with_score(incumbent, record), "first_bpb": incumbent.get("first_bpb", incumbent["val_bpb"])}
            if await self.bus.cas_incumbent(int(incumbent["version"]), new):
                previous = own["val_bpb"] if own is not None else None
                log.info("incumbent.remeasured", incumbent=incumbent["experiment_id"], val_bpb=record["val_bpb"],
                         previous=previous, hardware_class=class_of(record),
                         shift=None if previous is None else record["val_bpb"] - previous)
                return incumbent

    async def _maybe_replace_incumbent(self, record: dict[str, Any],
                                       sigma: float) -> tuple[bool, dict | None, dict | None]:
        """Compare-and-set loop: several reward computers may race for the incumbent. Returns
        whether `record` took the lead, the incumbent it was judged against, and that incumbent's
        score on `record`'s hardware class as compared (`arrl.scores.class_score`; None: not compared).

        A run that takes the lead is stamped with the incumbent version it made (`lead_version`),
        which orders the kept runs for the run directory even when their scores do not (a re-run
        can raise the incumbent's score above an earlier kept run's)."""
        margin = self.campaign.config.keep_margin_sigmas
        cls = class_of(record)
        while True:
            incumbent = await self.bus.get_incumbent()
            if incumbent and incumbent.get("experiment_id") == record["experiment_id"]:
                record["lead_version"] = int(incumbent["version"])
                return True, incumbent, None  # replaced before a crash, now redelivered
            score = class_score(incumbent, cls) if incumbent else None
            current = score.get("val_bpb") if score else None
            baseline = record.get("role") == "baseline"
            if baseline and incumbent and incumbent.get("unreferenced"):
                # With several workers an edit can finish before any baseline and take the empty
                # lead. Once the baseline is measured, the edit keeps the lead only if it beats the
                # baseline by the margin, like any other edit (on another class it cannot be
                # compared, and gives the lead back); else the baseline takes it back.
                edit_wins = current is not None and beats(current, record["val_bpb"], sigma, margin)
                new = ({**incumbent, "unreferenced": False} if edit_wins else self._incumbent(record, False))
                if await self.bus.cas_incumbent(int(incumbent["version"]), new):
                    log.info("incumbent.referenced", edit_kept=edit_wins, baseline_bpb=record["val_bpb"], edit_bpb=current)
                    if not edit_wins:
                        record["lead_version"] = int(incumbent["version"]) + 1
                    return not edit_wins, incumbent, None
                continue
            if incumbent and score is None:  # no run of this class has scored the incumbent yet
                if not baseline:
                    record["unscored_class"] = cls  # not compared: a re-run of the incumbent is due
                    log.info("keep.unscored_class", hardware_class=cls, incumbent=incumbent["experiment_id"])
                    return False, incumbent, None
                if incumbent["hash"] != record["candidate_hash"] or await self.bus.cas_incumbent(
                        int(incumbent["version"]), with_score(incumbent, record)):
                    return False, incumbent, None  # a baseline repeat scores the baseline on its class
                continue
            mismatch = await self.campaign.speed_shift(record.get("machine_gflops"), incumbent, cls)
            if mismatch is not None and not baseline:
                record["speed_mismatch"] = round(mismatch, 3)  # not compared: the re-run will catch up
                log.info("keep.speed_mismatch", shift=mismatch, incumbent=(incumbent or {}).get("experiment_id"))
                return False, incumbent, None
            if not beats(record["val_bpb"], current, sigma, margin if not baseline else 0.0):
                return False, incumbent, score
            if incumbent and baseline:
                return False, incumbent, score  # a baseline repeat measures noise; it never replaces
            new = self._incumbent(record, unreferenced=not baseline and incumbent is None)
            version = int(incumbent["version"]) if incumbent else 0
            if await self.bus.cas_incumbent(version, new):
                log.info("incumbent.replaced", val_bpb=record["val_bpb"], previous=current)
                record["lead_version"] = version + 1
                return True, incumbent, score

    @staticmethod
    def _incumbent(record: dict[str, Any], unreferenced: bool) -> dict[str, Any]:
        """`unreferenced`: taken before any baseline was measured, so never compared with one."""
        return {"hash": record["candidate_hash"], "val_bpb": record["val_bpb"], "unreferenced": unreferenced,
                "experiment_id": record["experiment_id"], "description": record.get("description") or "",
                "machine_gflops": record.get("machine_gflops"),  # the speed its score was measured at
                "hardware_class": class_of(record),
                "scores": {class_of(record): score_entry(record)}}  # by hardware class (`arrl.scores`)

    @staticmethod
    def _counts(record: dict[str, Any]) -> dict[str, Any]:
        """Counters that follow the commit point; `Campaign.record` applies them in the same atomic
        step, so a reward computer killed right after recording neither loses nor doubles one."""
        baseline = record.get("role") == "baseline"
        return {
            "counters": ("recorded", f"status_{record['status']}"),
            "baseline_bpb": record["val_bpb"] if baseline and record["status"] == "ok" else None,
            "baseline_class": class_of(record),
            "since_improvement": "" if not is_edit(record) else ("reset" if record["kept"] else "incr"),
        }

    async def _events(self, exp_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        last = "0"
        while True:
            batch = await self.bus.read_events(exp_id, last, count=5000)
            if not batch:
                return events
            for entry_id, event in batch:
                events.append(event)
                last = entry_id

    # -- the termination oracle ---------------------------------------------------------
    async def check_termination(self) -> str | None:
        state = await self.campaign.state()
        counters = await self.campaign.counters()
        if state == RUNNING:
            config = self.campaign.config
            progress = Progress(
                proposed=counters.get("proposed", 0), recorded=counters.get("recorded", 0),
                elapsed_s=time.time() - config.created_at - await self._paused_s(),
                executor_s=await self.campaign.busy_seconds(),
                since_improvement=counters.get("since_improvement", 0))
            reason = stop_reason(progress, max_experiments=config.max_experiments, max_wall_s=config.max_wall_s,
                                 max_gpu_hours=config.max_gpu_hours, patience=config.patience)
            if reason:
                log.info("campaign.stopping", reason=reason)
                await self.campaign.set_state(STOPPING, reason)
                state = STOPPING
        if state == STOPPING and counters.get("recorded", 0) >= counters.get("proposed", 0):
            log.info("campaign.stopped", reason=await self.campaign.stop_reason())
            await self.campaign.set_state(STOPPED)
            return STOPPED
        return state

    async def _paused_s(self) -> float:
        value = await self.bus.redis.get(self.bus.key("paused_s"))
        return float(value or 0.0)


async def run_rewarder(campaign: Campaign, run_dir: RunDir, consumer: str, sweeper=None,
                       stop: anyio.Event | None = None, tick_s: float = 1.0) -> None:
    """Consume results until stopped; check termination and sweep dead jobs every tick."""
    computer = RewardComputer(campaign, run_dir)
    stop = stop or anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            try:
                if sweeper is not None:
                    await sweeper(campaign)
                await computer.check_termination()
            except REDIS_ERRORS as exc:  # a Redis restart: try again next tick
                log.warning("reward.tick_failed", error=repr(exc))
            await anyio.sleep(tick_s)

    async def dead_letters() -> None:
        while not stop.is_set():
            try:
                for dead in await campaign.bus.consume_dead(RESULTS, DEAD_GROUP, consumer, block_ms=500):
                    await computer.record_dead_letter(dead)
                    await campaign.bus.ack_dead(RESULTS, DEAD_GROUP, dead.dead_id)
            except REDIS_ERRORS as exc:
                log.warning("reward.dead_letters_unavailable", error=repr(exc))
                await anyio.sleep(tick_s)
            except Exception:  # left pending: claimed again after claim_idle_ms
                log.exception("reward.dead_letter_failed")
                await anyio.sleep(tick_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(dead_letters)
        await run_consumer(campaign.bus, RESULTS, GROUP, consumer, computer.handle, stop=stop, expect_kind="result")
        tg.cancel_scope.cancel()
