"""Re-runs of the incumbent (`remeasure_every`), against a real redis-server.

The incumbent's score is measured once, by the run that made it the incumbent: a score picked for
being the lowest, which on a machine whose speed drifts also grows stale. With `remeasure_every` N
the proposer re-runs the incumbent unmodified once its score is N experiments old, the reward
computer makes that re-run its score, and edits are judged against it from then on.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401
from structlog.testing import capture_logs
from test_evaluator import controls
from test_rewarder import Lab, commits, git, make_campaign, tsv_rows

from arrl.bus import Bus
from arrl.campaign import Campaign
from arrl.cli import main as arrl_main
from arrl.export import chain_from_ledger
from arrl.ledger import RunDir, leader, remeasures_of
from arrl.report import best_so_far, load_run, render_markdown, summarize
from arrl.scores import machine_speed_shift, score_speed
from arrl.sim import run_sim_campaign
from arrl.status import offline_snapshot, one_line, snapshot
from pipeline.evaluator import Evaluator
from pipeline.rewarder import RewardComputer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def setup(redis_server, prepared_data, tmp_path) -> AsyncIterator[tuple[Campaign, RunDir]]:  # noqa: F811
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, remeasure_every=3)
    yield campaign, run_dir
    await campaign.bus.aclose()


async def rerun(lab: Lab, val_bpb: float, of: dict[str, Any] | None = None) -> dict[str, Any]:
    """A re-run's result, as the proposer and the executor would make it: of the incumbent now,
    or of the run `of` (whose script may no longer lead by the time the result is handled)."""
    campaign = lab.campaign
    exp_id = await campaign.reserve_experiment()
    assert exp_id is not None
    if of is None:
        incumbent = await campaign.bus.get_incumbent()
        assert incumbent is not None
        of = {"experiment_id": incumbent["experiment_id"], "candidate_hash": incumbent["hash"]}
    proposal = {**lab._proposal(exp_id, "remeasure", "", f"remeasure {of['experiment_id']}"),
                "parent_hash": of["candidate_hash"]}
    return lab._result(exp_id, "ok", val_bpb, of["candidate_hash"], proposal)


async def baseline_then_kept(campaign: Campaign, run_dir: RunDir,
                             val_bpb: float) -> tuple[Lab, RewardComputer, dict[str, Any]]:
    """The baseline at 2.0, then an edit kept at `val_bpb`, both recorded; returns the edit."""
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    edit = await lab.edit(val_bpb)
    await computer.handle(edit)
    return lab, computer, edit


async def test_a_rerun_becomes_the_incumbents_score_and_the_next_edit_is_judged_against_it(
    setup: tuple[Campaign, RunDir],
) -> None:
    campaign, run_dir = setup
    lab, computer, lucky = await baseline_then_kept(campaign, run_dir, 1.80)  # a lucky (or fast-period) score
    again = await rerun(lab, 1.90)
    for run in (lucky, again):  # their loss curves, as the executor streams them
        for step, loss in enumerate((5.0, 3.0, 2.0, 1.5, 1.4)):
            await campaign.bus.publish_event(run["experiment_id"], {"event": "train.step", "step": step,
                                                                    "training_seconds": 0.2 * step, "loss": loss})
    await computer.handle(again)

    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None and incumbent["experiment_id"] == lucky["experiment_id"]
    assert incumbent["val_bpb"] == 1.90 and incumbent["first_bpb"] == 1.80
    assert incumbent["measured_by"] == again["experiment_id"] and incumbent["version"] == 3
    record = await campaign.get_record(again["experiment_id"])
    assert record is not None and record["status"] == "ok" and not record["kept"] and record["reward"] == 0.0
    assert (await campaign.counters())["since_improvement"] == 0  # a re-run is not a failed edit
    # The self-evaluator now compares runs with the re-run's curve and score.
    reference, _ = await Evaluator(campaign).reference()
    assert reference is not None and (reference.run_id, reference.val_bpb) == (again["experiment_id"], 1.90)

    # 1.85 loses to the lucky 1.80 but beats the re-run's 1.90: kept, and it is what the run
    # directory holds now, although a kept run with a lower score was written before it.
    better_now = await lab.edit(1.85)
    await computer.handle(better_now)
    kept = await campaign.get_record(better_now["experiment_id"])
    assert kept is not None and kept["kept"] and kept["incumbent_bpb"] == 1.90 and kept["lead_version"] == 4
    source = await campaign.bus.load_source(better_now["candidate_hash"])
    assert run_dir.best.read_text() == source and git(run_dir, "show", "HEAD:train.py") == source
    assert commits(run_dir)[-1].startswith(f"{better_now['experiment_id']}:")
    assert [row[3] for row in tsv_rows(run_dir)] == ["keep", "keep", "discard", "keep"]
    # `arrl export` without the lineage rebuilds the same chain from the ledger.
    chain = chain_from_ledger(TRAIN_PY.read_text(), campaign.config.baseline_hash, run_dir.records())
    assert [s.record and s.record["experiment_id"] for s in chain] == [None, lucky["experiment_id"],
                                                                       better_now["experiment_id"]]
    assert chain[-1].source == source


async def test_a_rerun_of_a_script_no_longer_leading_or_older_than_the_latest_changes_nothing(
    setup: tuple[Campaign, RunDir],
) -> None:
    campaign, run_dir = setup
    lab, computer, first = await baseline_then_kept(campaign, run_dir, 1.90)
    older, newer = await rerun(lab, 1.70), await rerun(lab, 1.95)
    await computer.handle(newer)
    await computer.handle(older)  # handled late: the later re-run stays the score
    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None and incumbent["val_bpb"] == 1.95 and incumbent["measured_by"] == newer["experiment_id"]

    second = await lab.edit(1.80)
    await computer.handle(second)
    stale = await rerun(lab, 1.60, of=first)  # proposed while `first` led, handled after it lost the lead
    await computer.handle(stale)
    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None and incumbent["experiment_id"] == second["experiment_id"]
    assert incumbent["val_bpb"] == 1.80 and "measured_by" not in incumbent
    assert not (await campaign.get_record(stale["experiment_id"]) or {}).get("kept")


async def test_proposers_claim_a_due_rerun_once_and_claim_again_one_that_gave_no_score(
    setup: tuple[Campaign, RunDir], redis_server, tmp_path: Path,
) -> None:
    campaign, _ = setup  # remeasure_every 3
    incumbent = {"experiment_id": "e00004", "hash": "h" * 64}
    assert not await campaign.claim_remeasure("e00006", incumbent)  # 2 experiments old: not due
    claims: list[str | None] = []

    async def claim(exp_id: str) -> None:
        claims.append(await campaign.claim_remeasure(exp_id, incumbent))

    async with anyio.create_task_group() as tg:  # three proposers at once
        for exp_id in ("e00007", "e00007", "e00008"):
            tg.start_soon(claim, exp_id)
    assert sorted(claims, key=str) == [None, None, "age"]
    # The claimed re-run crashed: no new score. It is claimed again once the claim is 3 old.
    assert not await campaign.claim_remeasure("e00009", incumbent)
    assert await campaign.claim_remeasure("e00011", incumbent)
    # Once re-measured (by e00011), the clock restarts from that run.
    assert not await campaign.claim_remeasure("e00013", {**incumbent, "measured_by": "e00011"})
    assert await campaign.claim_remeasure("e00014", {**incumbent, "measured_by": "e00011"})
    off, _ = await make_campaign(redis_server.url, tmp_path / "off")
    try:
        assert not await off.claim_remeasure("e00050", incumbent)  # remeasure_every 0: never
    finally:
        await off.bus.aclose()


async def test_a_simulated_campaign_reruns_its_incumbent_and_every_reader_follows_the_rerun(
    redis_server, tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    records = await run_sim_campaign(redis_server.url, "arrl.heldout_fifth:drift", "ppo", 1, 40, run_dir=run_dir,
                                     remeasure_every=5, campaign_id="simremeasure")
    reruns = [r for r in records if r["role"] == "remeasure"]
    assert len(reruns) >= 4
    for r in reruns:
        # The incumbent unmodified: its own script, no edit, no reward, never kept.
        assert r["candidate_hash"] == r["parent_hash"] and r["program"] == [] and not r["kept"]
        assert r["status"] == "ok" and r["reward"] == 0.0 and r["steps"] > 0
        n = int(r["experiment_id"][1:])
        assert n - int(r["description"].split()[-1][1:]) >= 5  # due: its score was 5 or more old
    bus = Bus.from_url(redis_server.url, "simremeasure")
    try:
        campaign = await Campaign.load(bus)
        incumbent = await bus.get_incumbent()
        assert incumbent is not None
        lead = max((r for r in records if r["kept"]), key=lambda r: r["lead_version"])
        assert incumbent["experiment_id"] == lead["experiment_id"]
        latest = [r for r in reruns if r["candidate_hash"] == lead["candidate_hash"]
                  and r["experiment_id"] > lead["experiment_id"]]
        scorer = latest[-1] if latest else lead  # seed 1: re-run at e00038, after the last keep
        assert incumbent.get("measured_by") == (latest[-1]["experiment_id"] if latest else None)
        assert incumbent["val_bpb"] == scorer["val_bpb"]
        # The self-evaluator compares runs with the run that scores the incumbent now.
        reference, _ = await Evaluator(campaign).reference()
        assert reference is not None and (reference.run_id, reference.val_bpb) == (scorer["experiment_id"],
                                                                                   scorer["val_bpb"])
    finally:
        await bus.aclose()
    # The run directory's readers: `arrl status` without Redis, and the report.
    snapshot = offline_snapshot(run_dir)
    assert snapshot["best_experiment"] == lead["experiment_id"] and snapshot["best_val_bpb"] == incumbent["val_bpb"]
    summary = summarize(load_run(run_dir))
    assert summary["best_experiment"] == lead["experiment_id"] and summary["remeasures"] == len(reruns)
    assert (run_dir / "best_train.py").read_text() == await _source(redis_server.url, lead["candidate_hash"])


async def _source(url: str, digest: str) -> str | None:
    bus = Bus.from_url(url, "simremeasure")
    try:
        return await bus.load_source(digest)
    finally:
        await bus.aclose()


def test_arrl_run_refuses_a_rerun_of_every_other_proposal(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        arrl_main(["run", "--remeasure-every", "1", "--max-experiments", "3"])
    assert exc.value.code == 2 and "must be 0 (never) or 2 or more" in capsys.readouterr().err


def test_the_staircase_follows_the_reruns_and_the_comparison_of_campaigns_does_not() -> None:
    def run(n: int, role: str, val: float, script: str, kept: bool = False, lead: int | None = None) -> dict:
        return {"experiment_id": f"e{n:05d}", "role": role, "status": "ok", "val_bpb": val, "candidate_hash": script,
                "kept": kept, **({"lead_version": lead} if lead else {})}

    records = [run(1, "baseline", 2.0, "a", True, 1), run(2, "edit", 1.8, "b", True, 2),
               run(3, "remeasure", 1.9, "b"), run(4, "edit", 1.85, "c", True, 4), run(5, "remeasure", 1.83, "c"),
               run(6, "remeasure", 1.7, "b")]  # a stale re-run of a script no longer leading
    assert best_so_far(records) == [2.0, 1.8, 1.9, 1.85, 1.83, 1.83]
    assert best_so_far(records, reruns=False) == [2.0, 1.8, 1.8, 1.8, 1.8, 1.8]
    assert leader(records)["experiment_id"] == "e00004" and remeasures_of(records, leader(records)) == [1.83]


async def test_a_machine_that_changed_speed_claims_one_rerun_per_score(redis_server, tmp_path: Path) -> None:
    campaign, _ = await make_campaign(redis_server.url, tmp_path, remeasure_on_speed=0.25)
    try:
        incumbent = {"experiment_id": "e00004", "hash": "h" * 64}
        assert await campaign.claim_remeasure("e00006", incumbent, (-0.1, incumbent)) is None  # within a quarter
        assert await campaign.claim_remeasure("e00006", incumbent, None) is None  # no run since its score
        claims = []

        async def claim(exp_id: str) -> None:
            claims.append(await campaign.claim_remeasure(exp_id, incumbent, (-0.3, incumbent)))

        async with anyio.create_task_group() as tg:  # three proposers see the slowdown at once
            for exp_id in ("e00007", "e00008", "e00009"):
                tg.start_soon(claim, exp_id)
        assert sorted(claims, key=str) == [None, None, "speed"]  # one re-run per score
        assert await campaign.claim_remeasure("e00010", incumbent, (-0.5, incumbent)) is None
        # Re-measured by e00007: a machine back to full speed has moved again, from that score.
        remeasured = {**incumbent, "measured_by": "e00007"}
        assert await campaign.claim_remeasure("e00012", remeasured, (0.4, remeasured)) == "speed"
    finally:
        await campaign.bus.aclose()
    off, _ = await make_campaign(redis_server.url, tmp_path / "off")
    try:
        assert await off.claim_remeasure("e00050", incumbent, (-0.9, incumbent)) is None  # remeasure_on_speed 0: never
    finally:
        await off.bus.aclose()


def test_the_speed_shift_compares_medians_of_runs_after_the_incumbents_score_and_up_to_it() -> None:
    def run(n: int, speed: float | None) -> dict[str, Any]:
        return {"experiment_id": f"e{n:05d}", "machine_gflops": speed}

    incumbent = {"experiment_id": "e00002", "measured_by": "e00004", "machine_gflops": 140.0}
    before = [run(1, 10.0), run(2, 100.0), run(3, 90.0), run(4, 140.0)]  # its own probe read high
    after = [run(5, 50.0), run(6, None), run(7, 60.0), run(8, 55.0), run(9, 0.0)]
    assert machine_speed_shift(before + after, incumbent) == pytest.approx(55.0 / 100.0 - 1)
    assert machine_speed_shift(before + after[:4], incumbent) == pytest.approx(55.0 / 100.0 - 1)
    assert machine_speed_shift(before + after[:2], incumbent) is None  # one probe since its score
    # The runs up to the score have left the window: the incumbent's own probe is the reference.
    assert machine_speed_shift(after, incumbent) == pytest.approx(55.0 / 140.0 - 1)


class SlowingMachine:
    """A bowl on a machine that runs at half speed from its `slow_from`-th run on: every run then
    trains fewer steps in its budget and scores `cost` bpb worse. Through `FACTORY(seed, space)`."""

    def __init__(self, seed: int, space: dict[str, Any], slow_from: int = 12, cost: float = 0.15) -> None:
        from arrl.families import bowl

        self.inner, self.runs, self.slow_from, self.cost = bowl(seed, space), 0, slow_from, cost

    def run(self, knobs: dict[str, Any], budget_s: float) -> dict[str, Any]:
        self.runs += 1
        out = dict(self.inner.run(knobs, budget_s))
        slow = self.runs >= self.slow_from
        if slow and out["status"] == "ok":
            out["val_bpb"] += self.cost
            out["curve"] = [[t, y + self.cost * math.log(2)] for t, y in out["curve"]]
        return {**out, "machine_gflops": 50.0 if slow else 100.0}


async def test_a_simulated_machine_that_slows_down_reruns_the_incumbent_once_at_the_slower_speed(
    redis_server, tmp_path: Path,
) -> None:
    records = await run_sim_campaign(redis_server.url, SlowingMachine, "random", 3, 30, selfeval=False,
                                     remeasure_on_speed=0.25, campaign_id="simslowing")
    # One re-run: of the score measured fast; every score since was measured at the slower speed.
    [rerun_] = [r for r in records if r["role"] == "remeasure"]
    assert rerun_["extra"] == {"why": "speed", "speed_shift": -0.5} and rerun_["machine_gflops"] == 50.0
    scored_at = {r["experiment_id"]: r["machine_gflops"] for r in records}
    assert scored_at[rerun_["description"].split()[-1]] == 100.0
    slowed = next(r for r in records if r["machine_gflops"] == 50.0)
    # Proposed once three slow runs were recorded (one more proposal waits in the queue meanwhile).
    assert 3 <= int(rerun_["experiment_id"][1:]) - int(slowed["experiment_id"][1:]) <= 5
    bus = Bus.from_url(redis_server.url, "simslowing")
    try:
        incumbent = await bus.get_incumbent()
    finally:
        await bus.aclose()
    assert incumbent is not None and incumbent["machine_gflops"] == 50.0  # scored on the machine of now
    steady = await run_sim_campaign(redis_server.url, SlowingMachine, "random", 3, 30, selfeval=False,
                                    remeasure_on_speed=0.0, campaign_id="simslowingoff")
    assert not [r for r in steady if r["role"] == "remeasure"]


def test_the_shared_machine_landscape_slows_every_run_of_a_busy_spell_alike() -> None:
    from arrl.edits import parse_tunables
    from arrl.shared_machine import SharedMachine
    from arrl.sim import search_space

    tunables = parse_tunables(TRAIN_PY.read_text())
    knobs = {n: t.value for n, t in tunables.items()}
    machine = SharedMachine(4, search_space(tunables), p_switch=0.0)
    quiet = [machine.run(knobs, 30.0) for _ in range(5)]
    machine.busy = True
    busy = [machine.run(knobs, 30.0) for _ in range(5)]
    cost = min(b["val_bpb"] for b in busy) - max(q["val_bpb"] for q in quiet)
    assert 0.05 < cost < 1.0  # the same script, fewer steps in its budget
    assert [b["true_val_bpb"] for b in busy] == [q["true_val_bpb"] for q in quiet]  # what it is worth
    assert max(b["machine_gflops"] for b in busy) < 0.8 * min(q["machine_gflops"] for q in quiet)
    # The curve is the quiet one slowed down: at the end it has not fallen as far.
    assert busy[0]["curve"][-1][1] > quiet[0]["curve"][-1][1]


def test_the_noisy_shared_machine_spreads_its_busy_probes_and_speeds_but_not_its_quiet_ones() -> None:
    from arrl.edits import parse_tunables
    from arrl.shared_machine import SharedMachine, shared_machine_noisy
    from arrl.sim import search_space

    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    knobs = {n: t.value for n, t in parse_tunables(TRAIN_PY.read_text()).items()}
    machine = shared_machine_noisy(4, space)
    machine.p_switch = 0.0
    quiet = [machine.run(knobs, 30.0) for _ in range(12)]
    machine.busy = True
    busy = [machine.run(knobs, 30.0) for _ in range(12)]
    def spread(runs: list[dict[str, Any]]) -> float:  # of the probes' log
        return statistics.stdev(math.log(r["machine_gflops"]) for r in runs)

    assert spread(quiet) < 0.1 and spread(busy) > 0.15
    assert len({round(r["val_bpb"], 6) for r in busy}) == len(busy)  # each busy run at its own pace
    # Without the tenant's jitter the plain machine draws as it always did: the benchmarks' seeds hold.
    plain, same = SharedMachine(4, space, p_switch=0.0), SharedMachine(4, space, p_switch=0.0, busy_probe_sd=0.05)
    plain.busy = same.busy = True
    assert [plain.run(knobs, 30.0)["machine_gflops"] for _ in range(3)] == [
        same.run(knobs, 30.0)["machine_gflops"] for _ in range(3)]


async def test_an_edit_run_at_another_machine_speed_than_the_incumbents_score_is_not_compared_with_it(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, remeasure_on_speed=0.25)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        base = await lab.baseline(2.0)
        await computer.handle({**base, "machine_gflops": 100.0})
        for val_bpb in (2.05, 2.04):  # three probes at 100: the score's speed is known
            await computer.handle(await lab.edit(val_bpb, machine_gflops=100.0))
        slow = await lab.edit(1.95, machine_gflops=60.0)  # lower, but on a machine 40% slower
        await computer.handle(slow)
        record = await campaign.get_record(slow["experiment_id"])
        assert record is not None and not record["kept"] and record["speed_mismatch"] == -0.4
        assert record["reward"] == 0.0  # nothing learnt from an incomparable pair
        again = await rerun(lab, 2.30)  # the incumbent on the slow machine
        await computer.handle({**again, "machine_gflops": 62.0})
        incumbent = await campaign.bus.get_incumbent()
        assert incumbent is not None and (incumbent["val_bpb"], incumbent["machine_gflops"]) == (2.30, 62.0)
        better = await lab.edit(2.20, machine_gflops=58.0)  # within a quarter of 62: compared, kept
        await computer.handle(better)
        assert (await campaign.get_record(better["experiment_id"]) or {}).get("kept")
        # Quick again: 2.10 beats the slow score by speed alone. The score's speed is the median probe of
        # the three runs up to it (60, 62, 58): one odd probe there would not block every edit.
        quick = await lab.edit(2.10, machine_gflops=100.0)
        await computer.handle(quick)
        record = await campaign.get_record(quick["experiment_id"])
        assert record is not None and not record["kept"] and record["speed_mismatch"] == pytest.approx(0.667, abs=1e-3)
        assert (await campaign.bus.get_incumbent() or {}).get("experiment_id") == better["experiment_id"]
    finally:
        await campaign.bus.aclose()


async def test_the_self_evaluator_stops_an_edit_run_at_a_speed_the_keep_rule_would_not_compare(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    """A run on a machine that slowed down cannot be kept against a score measured fast, whatever it
    reaches; judged against the fast curve it looked hopeless and its slow forecast misled the search,
    let run it spent a budget for nothing. Its probe alone says so, so it is stopped at once."""
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, remeasure_on_speed=0.25)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        base = await lab.baseline(2.0)
        for step, loss in enumerate((5.0, 3.0, 2.0, 1.5, 1.4)):  # the incumbent's curve: a reference
            await campaign.bus.publish_event(base["experiment_id"], {
                "event": "train.step", "step": step, "training_seconds": 6.0 * step, "loss": loss})
        await computer.handle({**base, "machine_gflops": 100.0})
        evaluator = Evaluator(campaign)
        for exp_id, probe in (("early", 60.0), ("slow", 60.0), ("steady", 95.0), ("unprobed", None)):
            if exp_id == "slow":  # two more probes at 100: the score's speed is known from here on
                for val_bpb in (2.05, 2.04):
                    await computer.handle(await lab.edit(val_bpb, machine_gflops=100.0))
            await evaluator.on_started({"experiment_id": exp_id, "budget_s": 30.0, "role": "edit"})
            if probe is not None:
                await campaign.bus.publish_event(exp_id, {"event": "train.clock_started", "machine_gflops": probe})
            for step, loss in enumerate((5.0, 2.9, 1.9)):  # as good as the incumbent's curve so far
                await campaign.bus.publish_event(exp_id, {"event": "train.step", "step": step,
                                                          "training_seconds": 0.5 * (step + 1), "loss": loss})
            if exp_id == "early":  # one probe up to the score: too few to refuse anything on
                assert await evaluator.tick() == []
        stops = await evaluator.tick()
        assert sorted(exp for exp, _ in stops) == ["early", "slow"]
        for exp_id in ("slow", "early"):
            [stop] = await controls(campaign, exp_id)
            assert stop["command"] == "abort" and "another speed" in stop["reason"] and "-40%" in stop["reason"]
            verdict = [e for _, e in await campaign.bus.read_events(exp_id, "0") if e["event"] == "selfeval.verdict"][-1]
            assert verdict["decision"] == "abort" and verdict["forecast_val_bpb"] is None  # nothing learnt of it
        assert await controls(campaign, "steady") == [] and await controls(campaign, "unprobed") == []
        assert await evaluator.uncompared(60.0, "") == {"speed_mismatch": -0.4}
    finally:
        await campaign.bus.aclose()
    off, off_dir = await make_campaign(redis_server.url, tmp_path / "off", remeasure_on_speed=0.0)
    try:  # without the speed keep rule every run is compared, so none is stopped for its speed
        lab, computer = Lab(off), RewardComputer(off, off_dir)
        await computer.handle({**await lab.baseline(2.0), "machine_gflops": 100.0})
        for val_bpb in (2.05, 2.04):
            await computer.handle(await lab.edit(val_bpb, machine_gflops=100.0))
        assert await Evaluator(off).uncompared(60.0, "") is None
    finally:
        await off.bus.aclose()


async def test_a_simulated_machine_that_slows_down_stops_the_edits_run_slow_until_the_rerun_lands(
    redis_server, tmp_path: Path,
) -> None:
    records = await run_sim_campaign(redis_server.url, SlowingMachine, "random", 3, 30, selfeval=True,
                                     remeasure_on_speed=0.25, campaign_id="simslowingstops", run_dir=tmp_path / "run")
    stopped = [r for r in records if "another speed" in (r.get("reason") or "")]
    [rerun_] = [r for r in records if r["role"] == "remeasure"]
    assert stopped and all(r["status"] == "aborted" and r["machine_gflops"] == 50.0 and r["reward"] == 0.0 and r["speed_mismatch"] == -0.5
                           and r["forecast_val_bpb"] is None and r["training_seconds"] < 3.0 for r in stopped)
    # Once the re-run has scored the incumbent on the slow machine, edits there are judged as before.
    assert all(r["experiment_id"] < rerun_["experiment_id"] for r in stopped)
    assert any(r["role"] == "edit" and r["machine_gflops"] == 50.0 and r["experiment_id"] > rerun_["experiment_id"]
               and r["status"] == "ok" for r in records)
    # The report counts them beside the machine's speed.
    summary = summarize(load_run(tmp_path / "run"))
    assert summary["machine_speed"]["other_speed_stopped"] == len(stopped)
    assert summary["machine_speed"]["other_speed"] == sum(r.get("speed_mismatch") is not None for r in records)
    text = render_markdown(load_run(tmp_path / "run"), summary, {"best": "b.png", "throughput": "t.png", "ppo": "p.png"})
    assert f"({len(stopped)} stopped at once)" in text
    steady = await run_sim_campaign(redis_server.url, SlowingMachine, "random", 3, 30, selfeval=True,
                                    remeasure_on_speed=0.0, campaign_id="simslowingstopsoff")
    assert not [r for r in steady if "another speed" in (r.get("reason") or "")]


async def test_the_first_runs_are_compared_whatever_the_baselines_lone_probe_read(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    """The baseline's probe, read while a campaign's stages start beside it, can be half the
    machine's speed; one probe is too few to refuse comparisons on, so the first edits are judged
    by their scores until three probes are known, and only then by speed as well."""
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, remeasure_on_speed=0.25)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        base = await lab.baseline(2.0)
        await computer.handle({**base, "machine_gflops": 50.0})
        worse = await lab.edit(2.10, machine_gflops=100.0)
        await computer.handle(worse)
        better = await lab.edit(1.80, machine_gflops=100.0)
        await computer.handle(better)
        records = [await campaign.get_record(r["experiment_id"]) or {} for r in (worse, better)]
        assert [r.get("speed_mismatch") for r in records] == [None, None]
        assert [r.get("kept") for r in records] == [False, True]
        # Three probes now lead up to the kept edit's score (50, 100, 100): median 100.
        slow = await lab.edit(1.50, machine_gflops=60.0)
        await computer.handle(slow)
        record = await campaign.get_record(slow["experiment_id"])
        assert record is not None and not record["kept"] and record["speed_mismatch"] == -0.4
    finally:
        await campaign.bus.aclose()


def test_the_keep_rule_reads_the_scores_speed_from_three_probes_topped_up_from_the_runs_after_it() -> None:
    def run(n: int, speed: float) -> dict[str, Any]:
        return {"experiment_id": f"e{n:05d}", "machine_gflops": speed}

    first = {"experiment_id": "e00001", "machine_gflops": 40.0}
    assert score_speed([run(1, 40.0)], first) == 40.0  # the re-run trigger's reading: the probe up to it
    assert score_speed([run(1, 40.0)], first, top_up=True) is None  # too few to refuse on
    assert score_speed([run(1, 40.0), run(2, 100.0)], first, top_up=True) is None
    assert score_speed([run(1, 40.0), run(2, 100.0), run(3, 98.0), run(4, 20.0)], first, top_up=True) == 98.0
    # Later scores have three probes up to them: nothing after them counts.
    later = {"experiment_id": "e00002", "measured_by": "e00005", "machine_gflops": 60.0}
    records = [run(n, s) for n, s in enumerate((100.0, 100.0, 100.0, 62.0, 60.0, 30.0, 30.0), start=1)]
    assert score_speed(records, later, top_up=True) == score_speed(records, later) == 62.0
    # A score older than the records at hand: its own probe, never topped up with today's.
    assert score_speed(records[5:], later, top_up=True) == 60.0


async def test_the_log_says_when_the_machine_turns_contended_and_steady_again(
    redis_server, prepared_data, tmp_path: Path,  # noqa: F811
) -> None:
    """The probes of a real cpu campaign on one core, quiet, then beside a busy loop on that core
    (docs/search.md, "A probe as noisy as the move it looks for"), then quiet again."""
    quiet = (150.1, 147.3, 145.4, 136.8, 135.8, 141.0)
    busy = (58.2, 64.1, 42.8, 39.3, 53.7, 57.2, 37.8, 60.2, 41.3, 53.1)
    again = (139.0, 142.5, 140.1, 138.7, 143.9, 141.2, 139.8, 140.6)
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        await computer.handle({**await lab.baseline(2.0), "machine_gflops": quiet[0]})
        said: list[tuple[int, str]] = []
        lines = {}
        for n, probe in enumerate((*quiet[1:], *busy, *again), start=2):
            with capture_logs() as logs:
                await computer.handle(await lab.edit(2.1, machine_gflops=probe))
            said += [(n, e["event"]) for e in logs if e["event"] in ("machine.contended", "machine.steady")]
            lines[n] = one_line(await snapshot(campaign))  # `arrl status`, the live line of `arrl run`
        assert "machine contended (probes spread" in lines[len(quiet) + len(busy)]
        assert "contended" not in lines[len(quiet)] and "contended" not in lines[max(lines)]
        # Said once each way: once most steps of the last 8 probes are the loop's (the median step reads
        # the noise, not one move), and once they have left the window.
        assert [event for _, event in said] == ["machine.contended", "machine.steady"], said
        assert len(quiet) < said[0][0] <= len(quiet) + 8 and said[1][0] > len(quiet) + len(busy)
    finally:
        await campaign.bus.aclose()
    report = summarize(load_run(run_dir.path))
    assert 5 <= report["machine_speed"]["contended"] <= len(busy) + 4  # each run recorded while it was so


def test_the_uniform_shared_machine_costs_every_configuration_the_same_in_a_busy_spell() -> None:
    from arrl.edits import parse_tunables
    from arrl.shared_machine import SharedMachine
    from arrl.sim import search_space

    tunables = parse_tunables(TRAIN_PY.read_text())
    space = search_space(tunables)
    base = {n: t.value for n, t in tunables.items()}
    costs = {}
    for uniform in (False, True):
        for label, knobs in (("train.py", base), ("big", {**base, "DEPTH": 8, "N_EMBD": 256})):
            quiet, busy = SharedMachine(4, space, p_switch=0.0, uniform=uniform), SharedMachine(4, space, p_switch=0.0, uniform=uniform)
            busy.busy = True
            costs[uniform, label] = busy.run(knobs, 30.0)["val_bpb"] - quiet.run(knobs, 30.0)["val_bpb"]
    assert costs[True, "train.py"] > 0.05 and abs(costs[True, "big"] - costs[True, "train.py"]) < 1e-9
    assert abs(costs[False, "big"] - costs[False, "train.py"]) > 0.01  # the plain shared machine: a little, by configuration
