"""The reward computer against a real redis-server, on synthetic result messages (no training).

What it must do per result: reward, keep or discard against the incumbent (compare-and-set),
record once in Redis, write the run directory once (ledger, results.tsv, lineage commit,
best_train.py, per-experiment log) and publish a transition; and run the termination oracle.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401

from arrl.bus import MESSAGE_FIELD
from arrl.campaign import RUNNING, STOPPED, STOPPING, TRANSITIONS, Campaign, CampaignConfig
from arrl.edits import apply_program, render_diff
from arrl.ledger import TSV_HEADER, RunDir
from arrl.messages import decode
from arrl.patch import content_hash
from arrl.reward import CLIP, DUPLICATE_PENALTY, FAILURE_PENALTY
from pipeline.launcher import new_campaign
from pipeline.rewarder import RewardComputer

pytestmark = pytest.mark.anyio

BASELINE = TRAIN_PY.read_text()


async def make_campaign(url: str, tmp_path: Path, **options: Any) -> tuple[Campaign, RunDir]:
    campaign = await new_campaign(url, CampaignConfig(profile="smoke", **options), TRAIN_PY)
    run_dir = RunDir(tmp_path / "run")
    run_dir.init(campaign.config.to_dict(), BASELINE)
    return campaign, run_dir


@pytest.fixture
async def setup(redis_server, prepared_data, tmp_path) -> AsyncIterator[tuple[Campaign, RunDir]]:  # noqa: F811
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path)
    yield campaign, run_dir
    await campaign.bus.aclose()


class Lab:
    """Makes proposals and their results the way the proposer, applier and executor would."""

    def __init__(self, campaign: Campaign) -> None:
        self.campaign = campaign
        self.edits = 0

    async def baseline(self, val_bpb: float | None = 2.0, status: str = "ok", **fields: Any) -> dict[str, Any]:
        exp_id = await self.campaign.reserve_experiment()
        assert exp_id is not None
        proposal = self._proposal(exp_id, "baseline", "", "baseline")
        return self._result(exp_id, status, val_bpb, self.campaign.config.baseline_hash, proposal, **fields)

    async def edit(self, val_bpb: float | None, status: str = "ok", **fields: Any) -> dict[str, Any]:
        exp_id = await self.campaign.reserve_experiment()
        assert exp_id is not None
        self.edits += 1
        # A distinct script per edit (BATCH_SIZE is 16 in the baseline, its domain 2..64).
        program = [{"op": "set", "name": "BATCH_SIZE", "value": 16 + self.edits}]
        source, description = apply_program(BASELINE, program)
        digest = content_hash(source)
        await self.campaign.bus.store_source(digest, source)
        proposal = self._proposal(exp_id, "edit", render_diff(BASELINE, source), description)
        return self._result(exp_id, status, val_bpb, digest, proposal, **fields)

    def _proposal(self, exp_id: str, role: str, diff: str, description: str) -> dict[str, Any]:
        return {"experiment_id": exp_id, "parent_hash": self.campaign.config.baseline_hash, "parent_bpb": None,
                "diff": diff, "description": description, "program": [], "strategy": "test", "role": role,
                "logprob": -0.5, "value": 0.1, "policy_version": 1, "created_at": time.time()}

    def _result(self, exp_id: str, status: str, val_bpb: float | None, digest: str,
                proposal: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {"campaign_id": self.campaign.bus.campaign_id, "experiment_id": exp_id, "status": status,
                "reason": "" if status == "ok" else f"{status} on purpose", "val_bpb": val_bpb,
                "candidate_hash": digest, "proposal": proposal, "curve": [[0.1, 5.0], [1.0, 3.0]],
                "training_seconds": 3.0, "wall_seconds": 6.0, "steps": 40, "peak_memory_mb": 512.0,
                **fields}


def tsv_rows(run_dir: RunDir) -> list[list[str]]:
    text = run_dir.tsv.read_text()
    assert text.startswith(TSV_HEADER)
    return [line.split("\t") for line in text[len(TSV_HEADER):].splitlines()]


def git(run_dir: RunDir, *args: str) -> str:
    return subprocess.run(["git", "-C", str(run_dir.lineage), *args], check=True, text=True,
                          capture_output=True).stdout


def commits(run_dir: RunDir) -> list[str]:
    """Lineage commit subjects, oldest first."""
    return git(run_dir, "log", "--reverse", "--format=%s").splitlines()


async def transitions(campaign: Campaign) -> list[dict[str, Any]]:
    entries = await campaign.bus.redis.xrange(campaign.bus.stream_key(TRANSITIONS))
    return [decode(fields[MESSAGE_FIELD], "transition") for _, fields in entries]


# -- keep, discard, crash ----------------------------------------------------------------------


async def test_baseline_becomes_the_incumbent(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))

    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None
    assert incumbent["experiment_id"] == "e00001" and incumbent["val_bpb"] == 2.0
    assert incumbent["hash"] == campaign.config.baseline_hash and incumbent["version"] == 1
    record = await campaign.get_record("e00001")
    assert record is not None and record["kept"] is True and record["reward"] == 0.0
    assert await campaign.score(campaign.config.baseline_hash) == 2.0
    [row] = tsv_rows(run_dir)
    assert row[1:4] == ["2.000000", "0.5", "keep"] and row[4].startswith("e00001 baseline")
    assert run_dir.best.read_text() == BASELINE
    [transition] = await transitions(campaign)
    assert transition["experiment_id"] == "e00001" and transition["reward"] == 0.0
    assert (await campaign.counters())["recorded"] == 1


async def test_better_result_is_kept_with_lineage_commit_and_best_script(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    better = await lab.edit(1.99)
    await computer.handle(better)

    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None
    assert incumbent["experiment_id"] == "e00002" and incumbent["val_bpb"] == 1.99
    assert incumbent["version"] == 2  # one compare-and-set after the baseline's
    source = await campaign.bus.load_source(better["candidate_hash"])
    assert source is not None and source != BASELINE

    record = await campaign.get_record("e00002")
    assert record is not None and record["kept"] is True
    assert record["reward"] == pytest.approx((2.0 - 1.99) / campaign.config.noise_sigma)
    assert record["parent_bpb"] == 2.0 and record["incumbent_bpb"] == 2.0

    # Lineage: a commit for the kept edit, whose train.py is the candidate; best_train.py too.
    assert commits(run_dir)[-1].startswith("e00002: BATCH_SIZE 16 -> 17")
    assert git(run_dir, "show", "HEAD:train.py") == source
    assert run_dir.best.read_text() == source
    [ledger_row] = [r for r in run_dir.records() if r["experiment_id"] == "e00002"]
    head = git(run_dir, "rev-parse", "--short", "HEAD").strip()
    assert ledger_row["commit"] == head and ledger_row["kept"] is True
    row = tsv_rows(run_dir)[-1]
    assert row == [head, "1.990000", "0.5", "keep", f"e00002 {better['proposal']['description']}"]
    log_lines = (run_dir.logs / "e00002.jsonl").read_text().splitlines()
    assert '"event": "proposal"' in log_lines[0] and '"event": "experiment.recorded"' in log_lines[-1]


@pytest.mark.parametrize("edit_bpb, edit_keeps_the_lead", [(2.1, False), (1.5, True)])
async def test_an_edit_finished_before_the_baseline_is_compared_with_it_once_it_arrives(
    setup: tuple[Campaign, RunDir], edit_bpb: float, edit_keeps_the_lead: bool,
) -> None:
    """With several workers an edit may finish first; the baseline, once measured, is the reference."""
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    baseline = await lab.baseline(2.0)
    edit = await lab.edit(edit_bpb)
    await computer.handle(edit)
    assert (await campaign.bus.get_incumbent())["unreferenced"] is True
    await computer.handle(baseline)

    incumbent = await campaign.bus.get_incumbent()
    assert incumbent["unreferenced"] is False
    winner = edit if edit_keeps_the_lead else baseline
    assert incumbent["experiment_id"] == winner["experiment_id"]
    assert (await campaign.get_record(baseline["experiment_id"]))["kept"] is not edit_keeps_the_lead
    assert run_dir.best.read_text() == await campaign.bus.load_source(winner["candidate_hash"])
    # A later baseline repeat measures noise only: it never takes the lead again.
    await computer.handle(await lab.baseline(1.0))
    assert (await campaign.bus.get_incumbent())["experiment_id"] == winner["experiment_id"]


async def test_worse_result_is_discarded(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    lineage_before = commits(run_dir)
    await computer.handle(await lab.edit(2.02))

    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None and incumbent["experiment_id"] == "e00001" and incumbent["version"] == 1
    record = await campaign.get_record("e00002")
    assert record is not None and record["kept"] is False
    assert record["reward"] == 0.0  # worse than its parent: no credit, and no graded blame
    assert commits(run_dir) == lineage_before
    assert run_dir.best.read_text() == BASELINE
    row = tsv_rows(run_dir)[-1]
    assert row[1:4] == ["2.020000", "0.5", "discard"]
    assert (await campaign.counters())["since_improvement"] == 1


async def test_much_better_and_much_worse_rewards_are_clipped(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    await computer.handle(await lab.edit(5.0))
    await computer.handle(await lab.edit(1.0))
    assert (await campaign.get_record("e00002") or {})["reward"] == 0.0
    assert (await campaign.get_record("e00003") or {})["reward"] == CLIP


@pytest.mark.parametrize("status", ["crashed", "timed_out", "diverged", "invalid", "refused"])
async def test_failed_run_gets_the_penalty_and_a_crash_row(setup: tuple[Campaign, RunDir], status: str) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    await computer.handle(await lab.edit(None, status=status))

    record = await campaign.get_record("e00002")
    assert record is not None
    # A refusal (a worker with other data) says nothing about the edit: no penalty for the policy.
    expected = 0.0 if status == "refused" else FAILURE_PENALTY
    assert record["status"] == status and record["reward"] == expected and record["kept"] is False
    row = tsv_rows(run_dir)[-1]
    assert row[1:4] == ["0.000000", "0.5", "crash"]
    assert f"[{status}: {status} on purpose]" in row[4]
    assert (await campaign.bus.get_incumbent() or {})["experiment_id"] == "e00001"
    assert (await campaign.counters())[f"status_{status}"] == 1


async def test_ok_without_a_finite_val_bpb_is_a_crash(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    await computer.handle(await lab.edit(float("nan")))
    record = await campaign.get_record("e00002")
    assert record is not None and record["status"] == "crashed" and record["reward"] == FAILURE_PENALTY
    assert (await campaign.bus.get_incumbent() or {})["experiment_id"] == "e00001"


async def test_duplicate_reuses_the_earlier_outcome(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    first = await lab.edit(2.05)
    await computer.handle(first)
    dup = await lab.edit(None, status="duplicate", duplicate_of=first["experiment_id"])
    await computer.handle(dup)
    record = await campaign.get_record(dup["experiment_id"])
    assert record is not None
    assert record["status"] == "duplicate" and record["duplicate_of"] == first["experiment_id"]
    assert record["val_bpb"] == 2.05 and record["reward"] == DUPLICATE_PENALTY and record["kept"] is False
    assert tsv_rows(run_dir)[-1][3] == "discard"


# -- idempotence and races ---------------------------------------------------------------------


async def test_same_result_twice_is_recorded_once(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
    await computer.handle(await lab.baseline(2.0))
    better = await lab.edit(1.9)
    await computer.handle(better)
    await computer.handle(better)  # redelivered to the same computer
    # ... and to another reward computer with its own view of the same run directory
    await RewardComputer(campaign, RunDir(run_dir.path)).handle(better)

    assert [r["experiment_id"] for r in run_dir.records()] == ["e00001", "e00002"]
    assert [row[4].split()[0] for row in tsv_rows(run_dir)] == ["e00001", "e00002"]
    assert sum(subject.startswith("e00002:") for subject in commits(run_dir)) == 1
    counters = await campaign.counters()
    assert counters["recorded"] == 2 and counters["status_ok"] == 2
    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None and incumbent["version"] == 2
    assert (run_dir.logs / "e00002.jsonl").read_text().count('"event": "experiment.recorded"') == 1


async def test_same_result_handled_concurrently_is_recorded_once(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab = Lab(campaign)
    await RewardComputer(campaign, run_dir).handle(await lab.baseline(2.0))
    better = await lab.edit(1.9)
    computers = [RewardComputer(campaign, RunDir(run_dir.path)) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for computer in computers:
            tg.start_soon(computer.handle, better)

    assert [r["experiment_id"] for r in run_dir.records()] == ["e00001", "e00002"]
    assert len(tsv_rows(run_dir)) == 2
    assert sum(subject.startswith("e00002:") for subject in commits(run_dir)) == 1
    assert (await campaign.counters())["recorded"] == 2
    assert (await campaign.bus.get_incumbent() or {})["version"] == 2


async def test_run_dir_follows_the_incumbent_when_kept_records_are_written_out_of_order(
    setup: tuple[Campaign, RunDir],
) -> None:
    """A reward computer keeps A and records it in Redis, then dies before writing the run
    directory; meanwhile another keeps the better B and writes it. When A is redelivered and
    finally written, best_train.py and the lineage's head must still be B, the incumbent."""
    campaign, run_dir = setup
    lab = Lab(campaign)
    first, second = RewardComputer(campaign, run_dir), RewardComputer(campaign, RunDir(run_dir.path))
    await first.handle(await lab.baseline(2.0))
    a, b = await lab.edit(1.9), await lab.edit(1.8)
    # A is recorded in Redis (the commit point), then writing the run directory fails.
    unwritable = RewardComputer(campaign, RunDir(run_dir.path / "missing"))
    with pytest.raises(OSError):
        await unwritable.handle(a)
    assert (await campaign.get_record(a["experiment_id"]) or {}).get("kept") is True
    await second.handle(b)
    await first.handle(a)  # the redelivery

    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None and incumbent["experiment_id"] == b["experiment_id"]
    source_b = await campaign.bus.load_source(b["candidate_hash"])
    assert run_dir.best.read_text() == source_b
    assert git(run_dir, "show", "HEAD:train.py") == source_b
    assert {r["experiment_id"] for r in run_dir.records()} == {"e00001", "e00002", "e00003"}
    # A stays a kept experiment in the ledger and results.tsv, only without a lineage commit.
    assert [row[3] for row in tsv_rows(run_dir)] == ["keep", "keep", "keep"]
    assert not any(subject.startswith(f"{a['experiment_id']}:") for subject in commits(run_dir))


async def test_racing_reward_computers_keep_a_consistent_incumbent(setup: tuple[Campaign, RunDir]) -> None:
    campaign, run_dir = setup
    lab = Lab(campaign)
    await RewardComputer(campaign, run_dir).handle(await lab.baseline(2.0))
    rng = random.Random(7)
    results = [await lab.edit(round(rng.uniform(1.5, 2.1), 4)) for _ in range(12)]
    computers = [RewardComputer(campaign, RunDir(run_dir.path)) for _ in range(2)]

    async def drain(computer: RewardComputer, mine: list[dict[str, Any]]) -> None:
        for result in mine:
            await computer.handle(result)
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, computers[0], results[0::2])
        tg.start_soon(drain, computers[1], results[1::2])

    best = min(results, key=lambda r: r["val_bpb"])
    incumbent = await campaign.bus.get_incumbent()
    assert incumbent is not None
    assert incumbent["experiment_id"] == best["experiment_id"] and incumbent["val_bpb"] == best["val_bpb"]
    records = await campaign.records()
    kept = [r for r in records.values() if r["kept"]]
    # Every compare-and-set that succeeded is one kept record, and each improved on what it replaced.
    assert incumbent["version"] == len(kept)
    assert all(r["incumbent_bpb"] is None or r["val_bpb"] < r["incumbent_bpb"] for r in kept)
    assert len(run_dir.records()) == len(records) == 13
    source = await campaign.bus.load_source(best["candidate_hash"])
    assert run_dir.best.read_text() == source
    assert git(run_dir, "show", "HEAD:train.py") == source


# -- the termination oracle --------------------------------------------------------------------


async def test_max_experiments_stops_proposing_then_stops_when_all_are_recorded(
    redis_server, prepared_data, tmp_path  # noqa: F811
) -> None:
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, max_experiments=2)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        baseline = await lab.baseline(2.0)
        assert await computer.check_termination() == RUNNING
        edit = await lab.edit(1.9)
        assert await campaign.reserve_experiment() is None  # the cap holds even before the oracle runs

        assert await computer.check_termination() == STOPPING
        assert (await campaign.stop_reason()).startswith("max_experiments: 2 of 2")
        await computer.handle(baseline)
        assert await computer.check_termination() == STOPPING  # one still in flight
        await computer.handle(edit)
        assert await computer.check_termination() == STOPPED
        assert await campaign.state() == STOPPED
        assert await campaign.reserve_experiment() is None
        assert (await campaign.counters())["proposed"] == 2
    finally:
        await campaign.bus.aclose()


async def test_patience_stops_after_that_many_records_without_improvement(
    redis_server, prepared_data, tmp_path  # noqa: F811
) -> None:
    campaign, run_dir = await make_campaign(redis_server.url, tmp_path, patience=2)
    try:
        lab, computer = Lab(campaign), RewardComputer(campaign, run_dir)
        await computer.handle(await lab.baseline(2.0))  # the baseline does not count
        await computer.handle(await lab.edit(2.1))
        assert await computer.check_termination() == RUNNING
        await computer.handle(await lab.edit(1.9))  # an improvement resets the count
        assert (await campaign.counters())["since_improvement"] == 0
        await computer.handle(await lab.edit(2.1))
        assert await computer.check_termination() == RUNNING
        await computer.handle(await lab.edit(None, status="crashed"))
        # Everything proposed is recorded, so it goes straight through stopping to stopped.
        assert await computer.check_termination() == STOPPED
        assert (await campaign.stop_reason()).startswith("patience: 2")
        assert await campaign.reserve_experiment() is None
    finally:
        await campaign.bus.aclose()
