"""Workers of several hardware classes in one campaign (`--hardware-class any`), against a real
redis-server: the incumbent keeps a score per class (`arrl.scores`), an edit is judged against the
score on its own class, and a class without one gets a re-run of the incumbent.

A run's budget is wall-clock time, so the faster device trains more steps in it; before, an edit
on the slower class was compared with the faster class's score (and lost by speed alone), or was
refused as run at another machine speed, for as long as the campaign ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401
from test_evaluator import BUDGET, stream_prefix
from test_rewarder import Lab, make_campaign
from waiting import reap, wait_until

from arrl.bus import MESSAGE_FIELD
from arrl.campaign import PROPOSALS, STOPPED, Campaign
from arrl.messages import decode
from arrl.report import load_run, render_markdown, summarize
from arrl.scores import class_score, speed_shift
from arrl.selfeval import SelfEvalConfig
from arrl.sim import run_sim_campaign
from arrl.status import one_line, snapshot
from arrl.strategies import make_strategy
from pipeline.evaluator import Evaluator
from pipeline.proposer import propose_one
from pipeline.redis_server import RedisServer
from pipeline.rewarder import RewardComputer

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAST, SLOW = "cpu:test x2", "cpu:test x1"
SPEED = {FAST: 100.0, SLOW: 50.0}


def on(cls: str, **fields: Any) -> dict[str, Any]:
    """A result's fields for a run on class `cls`, probed at that class's speed."""
    return {"hardware_class": cls, "machine_gflops": SPEED[cls], **fields}


async def record_of(campaign: Campaign, result: dict[str, Any]) -> dict[str, Any]:
    record = await campaign.get_record(result["experiment_id"])
    assert record is not None
    return record


async def scores(campaign: Campaign) -> dict[str, float]:
    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None
    return {cls: entry["val_bpb"] for cls, entry in incumbent["scores"].items()}


async def test_each_edit_is_judged_against_the_incumbents_score_on_its_own_class(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, hardware_class="any", remeasure_on_speed=0.25)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        for cls, val_bpb in ((FAST, 2.00), (SLOW, 2.40), (FAST, 2.02), (SLOW, 2.42)):
            await computer.handle(await lab.baseline(val_bpb, **on(cls)))
        assert await scores(campaign) == {FAST: 2.00, SLOW: 2.40}  # the baseline, measured on each class
        status = await snapshot(campaign)  # `arrl status` shows both
        assert status["best_by_class"] == {FAST: 2.00, SLOW: 2.40} and f"{SLOW} 2.4000" in one_line(status)
        # The noise floor pools the repeats within each class: the classes differ by 0.4 bpb, which is
        # not noise (over all four runs it would read 0.23).
        assert await computer.sigma() == pytest.approx(0.02 / 2 ** 0.5)
        # 2.30 is worse than the fast class's 2.00 but beats the slow class's 2.40; the speed rule reads
        # the slow class's own probes (50), so this run at 50 is not "at another speed".
        slow_win = await lab.edit(2.30, **on(SLOW))
        await computer.handle(slow_win)
        record = await record_of(campaign, slow_win)
        assert record["kept"] and record.get("speed_mismatch") is None and record["incumbent_bpb"] == 2.40
        assert record["reward"] > 0  # rewarded against the slow class's score of its parent
        assert await scores(campaign) == {SLOW: 2.30}
        # The new incumbent has no score on the fast class yet: an edit there is not compared.
        fast = await lab.edit(1.90, **on(FAST))
        fast["proposal"]["parent_hash"] = slow_win["candidate_hash"]
        await computer.handle(fast)
        record = await record_of(campaign, fast)
        assert not record["kept"] and record["unscored_class"] == FAST and record["reward"] == 0.0
        # The speed keep rule still holds within a class: a slow-class run at the fast speed is refused.
        quick = await lab.edit(2.10, **on(SLOW, machine_gflops=100.0))
        await computer.handle(quick)
        assert (await record_of(campaign, quick))["speed_mismatch"] == pytest.approx(1.0)
    finally:
        await campaign.bus.aclose()


async def test_an_incumbent_stored_before_scores_were_kept_per_class_is_its_own_score_on_every_class(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    """A campaign resumed from before this change: its incumbent has one score and no `scores`."""
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, remeasure_on_speed=0.25, remeasure_every=2)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        await campaign.bus.cas_incumbent(0, {"hash": campaign.config.baseline_hash, "val_bpb": 2.0,
                                             "experiment_id": "e00001", "machine_gflops": 100.0})
        await campaign.reserve_experiment()  # e00001, recorded before the upgrade
        for val_bpb in (2.05, 1.90):
            result = await lab.edit(val_bpb, **on(FAST))
            result["proposal"]["parent_bpb"] = 2.0  # as the proposer wrote it
            await computer.handle(result)
        record = await record_of(campaign, result)
        assert record["kept"] and record["incumbent_bpb"] == 2.0 and record["reward"] > 0
        assert await scores(campaign) == {FAST: 1.90}
        exp_id = await propose_one(campaign, make_strategy("random", 0))  # the proposer reads it too
        assert exp_id is not None
    finally:
        await campaign.bus.aclose()


async def test_an_unscored_class_gets_a_rerun_of_the_incumbent_until_one_lands_on_it(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, hardware_class="any")
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        strategy = make_strategy("random", 0)
        await campaign.count("baseline_claims")  # as the proposer does when it proposes the baseline
        await computer.handle(await lab.baseline(2.40, **on(SLOW)))  # which ran on the slow class

        async def edit_on(cls: str, val_bpb: float) -> dict[str, Any]:
            incumbent = await campaign.bus.get_incumbent()
            assert incumbent is not None
            result = await lab.edit(val_bpb, **on(cls))
            result["proposal"]["parent_hash"] = incumbent["hash"]
            await computer.handle(result)
            return await record_of(campaign, result)

        async def propose() -> dict[str, Any]:
            exp_id = await propose_one(campaign, strategy)
            assert exp_id is not None
            entries = await campaign.bus.redis.xrange(campaign.bus.stream_key(PROPOSALS))
            proposals = [decode(fields[MESSAGE_FIELD], "proposal") for _, fields in entries]
            return next(p for p in proposals if p["experiment_id"] == exp_id)

        assert (await edit_on(FAST, 1.90))["unscored_class"] == FAST
        rerun = await propose()
        assert rerun["role"] == "remeasure" and rerun["extra"] == {"why": "class", "for_class": FAST}
        assert (await propose())["role"] == "edit"  # claimed once: the next proposal is an edit
        # The re-run lands on a slow worker (any worker may take it): it re-scores the slow class.
        await computer.handle({**lab._result(rerun["experiment_id"], "ok", 2.44, rerun["parent_hash"], rerun),
                               **on(SLOW)})
        assert await scores(campaign) == {SLOW: 2.44}
        assert (await propose())["role"] == "edit"  # nothing due until another fast edit finds no score
        assert (await edit_on(FAST, 1.95))["unscored_class"] == FAST
        rerun = await propose()
        assert rerun["extra"]["why"] == "class"
        await computer.handle({**lab._result(rerun["experiment_id"], "ok", 2.01, rerun["parent_hash"], rerun),
                               **on(FAST)})
        assert await scores(campaign) == {SLOW: 2.44, FAST: 2.01}
        record = await edit_on(FAST, 1.95)  # compared with 2.01 now, and kept
        assert record["kept"] and record.get("unscored_class") is None and record["incumbent_bpb"] == 2.01
    finally:
        await campaign.bus.aclose()


async def test_the_speed_shift_of_each_class_is_read_from_that_classs_runs() -> None:
    def run(n: int, cls: str, speed: float) -> dict[str, Any]:
        return {"experiment_id": f"e{n:05d}", "hardware_class": cls, "machine_gflops": speed}

    incumbent = {"experiment_id": "e00001", "hash": "h", "val_bpb": 2.0, "measured_by": "e00002",
                 "scores": {FAST: {"val_bpb": 2.0, "measured_by": "e00001", "machine_gflops": 100.0},
                            SLOW: {"val_bpb": 2.4, "measured_by": "e00002", "machine_gflops": 50.0}}}
    # The classes alternate, as two workers' runs do: pooled, the probes would swing by half every run.
    steady = [run(n, FAST if n % 2 else SLOW, SPEED[FAST if n % 2 else SLOW]) for n in range(1, 13)]
    shift, _ = speed_shift(steady, incumbent) or (None, None)
    assert shift == pytest.approx(0.0)
    busy = steady + [run(n, SLOW, 30.0) for n in range(13, 16)]  # the slow class's machine slowed down
    shift, score = speed_shift(busy, incumbent) or (None, None)
    assert shift == pytest.approx(-0.4) and score == class_score(incumbent, SLOW)


async def test_a_speed_rerun_that_landed_on_another_class_is_claimed_again(redis_server, tmp_path: Path) -> None:
    campaign, _ = await make_campaign(redis_server.url, tmp_path, hardware_class="any", remeasure_on_speed=0.25)
    try:
        incumbent = {"experiment_id": "e00001", "hash": "h", "val_bpb": 2.0, "measured_by": "e00002",
                     "scores": {FAST: {"val_bpb": 2.0, "measured_by": "e00001"},
                                SLOW: {"val_bpb": 2.4, "measured_by": "e00002"}}}
        moved = (-0.4, class_score(incumbent, SLOW))
        assert await campaign.claim_remeasure("e00016", incumbent, moved) == "speed"
        assert await campaign.claim_remeasure("e00017", incumbent, moved) is None  # claimed: once
        # The re-run was taken by a fast worker: it re-scored the fast class; the slow class's speed
        # has still moved since its score, so the next proposal claims another.
        fast_again = {**incumbent, "measured_by": "e00016",
                      "scores": {**incumbent["scores"], FAST: {"val_bpb": 2.01, "measured_by": "e00016"}}}
        assert await campaign.claim_remeasure("e00018", fast_again, (-0.4, class_score(fast_again, SLOW))) == "speed"
    finally:
        await campaign.bus.aclose()


async def test_the_self_evaluator_follows_the_curve_of_the_run_that_scored_the_class_it_watches(redis_server) -> None:
    from test_evaluator import make_campaign as evaluator_campaign

    campaign = await evaluator_campaign(redis_server.url)
    try:
        # The incumbent's runs: 1.80 nats at the end on the fast class, 2.20 on the slow one.
        for exp_id, cls, loss, bpb in (("f1", FAST, 1.80, 2.62), ("s1", SLOW, 2.20, 3.20)):
            await stream_prefix(campaign, exp_id, loss, upto=1.0)
            await campaign.record(exp_id, {"experiment_id": exp_id, "status": "ok", "val_bpb": bpb,
                                           "hardware_class": cls})
        await campaign.bus.cas_incumbent(0, {
            "hash": "h", "experiment_id": "f1", "val_bpb": 2.62,
            "scores": {FAST: {"val_bpb": 2.62, "measured_by": "f1"}, SLOW: {"val_bpb": 3.20, "measured_by": "s1"}}})
        evaluator = Evaluator(campaign, SelfEvalConfig(audit_first=0, audit_every=0))
        for exp_id, cls in (("slow_ok", SLOW), ("fast_bad", FAST), ("third", "cpu:other x4")):
            await evaluator.on_started({"experiment_id": exp_id, "budget_s": BUDGET, "hardware_class": cls})
        # Each of the three runs at the slow class's pace: on track on the slow class, hopeless on the fast
        # one, and not judged on a class that has no score (it might be the fastest of all).
        for exp_id in ("slow_ok", "fast_bad", "third"):
            await stream_prefix(campaign, exp_id, 2.18, upto=0.5)
        stops = await evaluator.tick()
        assert [exp_id for exp_id, _ in stops] == ["fast_bad"]
        reference, history = await evaluator.reference(SLOW)
        assert reference is not None and reference.run_id == "s1" and history == [3.20]
        assert (await evaluator.reference("cpu:other x4"))[0] is None
        # A restarted evaluator reads back each watched run's class.
        fresh = Evaluator(campaign)
        await fresh.restore()
        assert {e: w.hardware_class for e, w in fresh.watched.items()} == {"slow_ok": SLOW, "third": "cpu:other x4"}
        # Asked to, it stops the run on the class without a score at once: the keep rule compares
        # nothing there, whatever the run reaches; its record will say so.
        stopping = Evaluator(campaign, SelfEvalConfig(audit_first=0, audit_every=0, stop_unscored_class=1))
        await stopping.restore()
        [(exp_id, verdict)] = await stopping.tick()
        assert exp_id == "third" and verdict.forecast is None and "no score yet" in verdict.reason
        assert verdict.uncompared == {"unscored_class": "cpu:other x4"}
    finally:
        await campaign.bus.aclose()


# -- two real workers of two classes -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="two classes are made by pinning one worker to one core and one to two")
def test_two_real_workers_of_two_classes_each_compare_edits_with_their_own_classs_score(
    tmp_path: Path, prepared_data,  # noqa: F811
) -> None:
    """`rq worker` processes pinned to one core and to two: their hardware classes differ (the
    usable cores are part of a cpu class), and so does their speed."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    run_dir, procs = tmp_path / "run", {}
    try:
        init = subprocess.run([str(BIN / "arrl"), "init", "--redis-url", server.url, "--profile", "smoke",
                               "--max-experiments", "10", "--hardware-class", "any", "--baseline-repeats", "1",
                               "--seed", "3", "--run-dir", str(run_dir)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert init.returncode == 0, init.stderr
        campaign_id = init.stdout.split()[-1]
        pinned = {"one_core": ["taskset", "-c", str(cores[0])], "two_cores": ["taskset", "-c", ",".join(map(str, cores))]}
        # As the README starts a worker of a mixed fleet: on its class's queue too, so that a
        # re-run meant for its class waits for it (`arrl.queues`).
        queues = {name: subprocess.run([*taskset, str(BIN / "arrl"), "worker-queues", "--device", "cpu"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=60, check=True).stdout.split()
                  for name, taskset in pinned.items()}
        assert queues["one_core"][0].endswith("-x1") and queues["two_cores"][0].endswith("-x2"), queues
        worker = ["-S", "arrl.serialization.MsgpackSerializer", "--url", server.url]
        commands = {
            **{name: [*taskset, str(BIN / "rq"), "worker", *queues[name], *worker] for name, taskset in pinned.items()},
            "applier": [str(BIN / "arrl-applier"), "--redis-url", server.url],
            "reward": [str(BIN / "arrl-reward"), "--redis-url", server.url, "--run-dir", str(run_dir)],
            "evaluator": [str(BIN / "arrl-evaluator"), "--redis-url", server.url],
            "proposer": [str(BIN / "arrl-proposer"), "--redis-url", server.url],
        }
        for name, command in commands.items():
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        sync = redis.Redis.from_url(server.url)
        try:
            wait_until(lambda: sync.get(f"arrl:{campaign_id}:state") == STOPPED.encode()
                       or any(p.poll() is not None for p in procs.values()), 300, "the campaign to stop", interval_s=0.5)
            assert sync.get(f"arrl:{campaign_id}:state") == STOPPED.encode(), "\n".join(
                f"--- {n}\n{(tmp_path / f'{n}.log').read_text()[-1500:]}" for n in procs)
            incumbent = msgpack.unpackb(sync.hget(f"arrl:{campaign_id}:incumbent", "data"), raw=False)
        finally:
            sync.close()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        reap(procs.values())
        server.stop()
    records = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]
    ran = [r for r in records if r["status"] == "ok"]
    classes = {r["hardware_class"] for r in ran}
    assert len(classes) == 2 and all(c.endswith((" x1", " x2")) for c in classes), classes
    for i, r in enumerate(records):
        if r["status"] != "ok" or r["role"] != "edit":
            continue
        if r.get("unscored_class") is not None or r.get("speed_mismatch") is not None:
            assert not r["kept"] and r["reward"] == 0.0
            assert r.get("unscored_class") in (None, r["hardware_class"])
            continue
        # Compared: with a score measured by an earlier run of its own class.
        own_class = {e["val_bpb"] for e in records[:i] if e["status"] == "ok" and e["hardware_class"] == r["hardware_class"]}
        assert r["incumbent_bpb"] in own_class, (r["experiment_id"], r["incumbent_bpb"], own_class)
    by_id = {r["experiment_id"]: r for r in records}
    # The self-evaluator judged each run against the curve of a run of its own class.
    judged = [(r, json.loads(line)) for r in records
              for line in (run_dir / "logs" / f"{r['experiment_id']}.jsonl").read_text().splitlines()
              if '"selfeval.verdict"' in line]
    assert judged, "the self-evaluator judged no run"
    for r, verdict in judged:
        if verdict.get("reference"):
            assert by_id[verdict["reference"]]["hardware_class"] == r["hardware_class"], (r["experiment_id"], verdict)
    for cls, entry in incumbent["scores"].items():
        assert by_id[entry["measured_by"]]["hardware_class"] == cls
        assert by_id[entry["measured_by"]]["val_bpb"] == entry["val_bpb"]
    # One baseline scored one class: the other class's first edit found no score, and the re-run
    # meant for that class waited in its queue for its worker.
    routed = [r for r in records if r["role"] == "remeasure" and (r.get("extra") or {}).get("for_class")]
    assert routed, "no re-run was meant for a class"
    for r in routed:
        assert r["hardware_class"] == r["extra"]["for_class"], r["experiment_id"]


async def test_a_simulated_mixed_fleet_records_each_runs_class_and_scores_the_incumbent_on_both(
    redis_server, tmp_path: Path,
) -> None:
    """`arrl.shared_machine:mixed_fleet` (the benchmark of docs/search.md): the simulator passes a
    landscape's `hardware_class` through, and the whole pipeline keeps the classes apart."""
    records = await run_sim_campaign(redis_server.url, "arrl.shared_machine:mixed_fleet", "random", 2, 40,
                                     selfeval=True, baseline_repeats=4, remeasure_on_speed=0.25,
                                     campaign_id="simfleet", run_dir=tmp_path / "run")
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["hardware_class"] for r in ok} == {"sim:fast", "sim:slow"}
    for i, r in enumerate(records):
        if r["status"] == "ok" and r["role"] == "edit" and r.get("unscored_class") is None and r.get("speed_mismatch") is None:
            own = {e["val_bpb"] for e in records[:i] if e["status"] == "ok" and e["hardware_class"] == r["hardware_class"]}
            assert r["incumbent_bpb"] in own
    assert any(r.get("unscored_class") for r in records)  # kept on one class, then met on the other
    reruns = sum((r.get("extra") or {}).get("why") == "class" for r in records if r["role"] == "remeasure")
    assert reruns
    # Each re-run meant for a class ran on it: the simulated workers listen on their class's queue.
    routed = [r for r in records if r["role"] == "remeasure" and (r.get("extra") or {}).get("for_class")]
    assert len(routed) >= reruns
    assert all(r["hardware_class"] == r["extra"]["for_class"] for r in routed)
    # The report says how the classes shared the campaign, and what the split cost.
    summary = summarize(load_run(tmp_path / "run"))
    assert summary["hardware_classes"] == {
        "runs": {c: sum(r.get("hardware_class") == c for r in records) for c in ("sim:fast", "sim:slow")},
        "uncompared": sum(r.get("unscored_class") is not None for r in records), "reruns": reruns}
    # Each class's probes are read against their own median: the slow class's runs are not "slow".
    assert set(summary["machine_speed"]["by_class"]) == {"sim:fast", "sim:slow"}
    assert summary["machine_speed"]["slow"] < sum(r.get("hardware_class") == "sim:slow" for r in records)
    figures = {"best": "best.png", "throughput": "throughput.png", "ppo": "ppo.png"}
    text = render_markdown(load_run(tmp_path / "run"), summary, figures)
    assert "edits uncompared for want of a score on their class" in text and "sim:slow" in text


async def test_asked_to_the_self_evaluator_stops_the_edits_a_simulated_fleet_could_not_compare(
    redis_server, tmp_path: Path,
) -> None:
    records = await run_sim_campaign(redis_server.url, "arrl.shared_machine:mixed_fleet", "random", 2, 40,
                                     selfeval=True, baseline_repeats=4, remeasure_on_speed=0.25,
                                     selfeval_options={"stop_unscored_class": 1}, campaign_id="simfleetstop")
    stopped = [r for r in records if r.get("unscored_class")]
    assert stopped and all(r["status"] == "aborted" and r["unscored_class"] == r["hardware_class"]
                           and r["reward"] == 0.0 and r["forecast_val_bpb"] is None and r["training_seconds"] < 3.0
                           for r in stopped)
    # The class's re-run still falls due, and lands on its class: afterwards edits there are compared.
    routed = [r for r in records if r["role"] == "remeasure" and (r.get("extra") or {}).get("why") == "class"]
    assert routed and all(r["hardware_class"] == r["extra"]["for_class"] for r in routed)
    assert not any(r["status"] == "ok" and r["role"] == "edit" and r.get("unscored_class") for r in records)


def test_the_search_models_every_run_on_one_classs_scale_by_the_offsets_the_incumbent_shows() -> None:
    """A run on the slow class scores higher by its class alone: `Memory` takes the class's offset,
    read from the incumbent's scores on both classes, off its runs before the surrogate sees them."""
    from arrl.edits import parse_tunables
    from arrl.operators import Memory

    tunables = parse_tunables(TRAIN_PY.read_text())
    base = {n: t.value for n, t in tunables.items()}
    incumbent = {"experiment_id": "e00001", "hash": "h", "val_bpb": 2.30, "hardware_class": SLOW, "measured_by": "e00002",
                 "scores": {FAST: {"val_bpb": 2.00, "measured_by": "e00001"},
                            SLOW: {"val_bpb": 2.30, "measured_by": "e00002"}}}

    def run(n: int, cls: str, val_bpb: float, batch: int) -> dict[str, Any]:
        return {"experiment_id": f"e{n:05d}", "status": "ok", "val_bpb": val_bpb, "hardware_class": cls,
                "extra": {"knobs": {**base, "BATCH_SIZE": batch}}}

    memory = Memory()
    memory.observe(tunables, None, [run(3, SLOW, 2.25, 20)])  # before any offset is known: as measured
    assert memory.points["e00003"].val == 2.25
    memory.observe(tunables, incumbent, [run(3, SLOW, 2.25, 20), run(4, FAST, 1.98, 24)])
    scale = {e: p.val for e, p in memory.points.items()}
    # The slow class scores 0.3 higher: the incumbent's slow run lands on its fast score, and the
    # slow run (2.25, 0.05 below its class's incumbent) is put on the fast run's scale.
    assert memory.classes.of(SLOW) - memory.classes.of(FAST) == pytest.approx(0.30)
    assert scale["e00002"] == pytest.approx(2.00 - memory.classes.of(FAST))
    assert scale["e00003"] - scale["e00004"] == pytest.approx(2.25 - 0.30 - 1.98)
    # A second incumbent's pair of scores refines the offset: the mean of the differences seen.
    later = {**incumbent, "experiment_id": "e00005", "measured_by": "e00006", "val_bpb": 2.40,
             "scores": {FAST: {"val_bpb": 2.00, "measured_by": "e00005"}, SLOW: {"val_bpb": 2.40, "measured_by": "e00006"}}}
    memory.observe(tunables, later, [])
    assert memory.classes.of(SLOW) - memory.classes.of(FAST) == pytest.approx(0.35)
    assert memory.points["e00003"].val - memory.points["e00004"].val == pytest.approx(2.25 - 0.35 - 1.98)
    # One class: nothing moves.
    alone = Memory()
    alone.observe(tunables, {"experiment_id": "e00001", "hash": "h", "val_bpb": 2.0, "scores": {"": {}}}, [run(3, "", 2.1, 20)])
    assert alone.points["e00003"].val == 2.1 and alone.classes.offsets == {}


@pytest.mark.parametrize("name", ["tpe", "cmaes"])
async def test_the_optuna_strategies_are_told_every_run_on_one_classs_scale(name: str) -> None:
    """As the ppo surrogate: once the incumbent's scores on two classes show the slow class's offset,
    tpe and cmaes are told a slow run's score less that offset; a sampler told the raw score takes
    the class a run landed on for an effect of its tunables."""
    pytest.importorskip("optuna")
    pytest.importorskip("cmaes")
    from arrl.edits import parse_tunables
    from arrl.strategies import Context

    tunables = parse_tunables(TRAIN_PY.read_text())
    strategy: Any = make_strategy(name, 1)
    one_class = {"experiment_id": "e00001", "hash": "h", "val_bpb": 2.00, "hardware_class": FAST,
                 "scores": {FAST: {"val_bpb": 2.00, "measured_by": "e00001"}}}
    first = await strategy.propose(Context(tunables, one_class, []))
    # The slow class's first run lands before any offset is known: told as measured.
    early = on(SLOW, experiment_id="e00002", status="ok", val_bpb=2.40, extra=first.extra)
    second = await strategy.propose(Context(tunables, one_class, [early]))
    two_classes = {**one_class, "hardware_class": SLOW, "measured_by": "e00003", "val_bpb": 2.30,
                   "scores": {**one_class["scores"], SLOW: {"val_bpb": 2.30, "measured_by": "e00003"}}}
    late = on(SLOW, experiment_id="e00004", status="ok", val_bpb=2.25, extra=second.extra)
    await strategy.propose(Context(tunables, two_classes, [early, late]))
    told = sorted(t.value for t in strategy.study.trials if t.state.name == "COMPLETE")
    offset = strategy.classes.of(SLOW) - strategy.classes.of(FAST)
    assert offset == pytest.approx(0.30)
    # The baseline (fast), the slow re-run of the incumbent and the later slow edit, on the fast
    # class's scale: 2.00, 2.30 - 0.30 and 2.25 - 0.30; the early slow run as it was told.
    assert told == pytest.approx(sorted([2.00, 2.00, 1.95, 2.40]))


def test_a_simulated_fleet_sends_a_rerun_meant_for_a_class_to_it_and_draws_the_others_at_random() -> None:
    from arrl.edits import parse_tunables
    from arrl.shared_machine import MixedFleet
    from arrl.sim import search_space

    tunables = parse_tunables(TRAIN_PY.read_text())
    space, knobs = search_space(tunables), {n: t.value for n, t in tunables.items()}
    fleet = MixedFleet(5, space, classes=3)
    drawn = [fleet.run(knobs, 30.0)["hardware_class"] for _ in range(60)]
    assert set(drawn) == {"sim:slow", "sim:slow2", "sim:fast"}
    assert len(set(fleet.speeds)) == 3 and fleet.speeds[-1] == 1.0
    # A routed run lands on its class, and leaves the later draws as they were.
    routed, unrouted = MixedFleet(5, space, classes=3), MixedFleet(5, space, classes=3)
    assert routed.run(knobs, 30.0, for_class="sim:slow2")["hardware_class"] == "sim:slow2"
    unrouted.run(knobs, 30.0)
    assert ([routed.run(knobs, 30.0)["hardware_class"] for _ in range(10)]
            == [unrouted.run(knobs, 30.0)["hardware_class"] for _ in range(10)])
