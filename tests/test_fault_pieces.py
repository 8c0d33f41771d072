"""The small pieces the fault scenarios of test_faults.py rely on, driven directly against a real
redis-server: one hardware class per campaign, a reservation left by a killed proposer, the
proposers' seed slots, a record and its counters in one step, ledger writes repeated after a crash,
and a result the reward computer keeps failing on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
import redis
import redis.asyncio
from envfixtures import TRAIN_PY, prepared_data, redis_url  # noqa: F401

from arrl.bus import MESSAGE_FIELD
from arrl.campaign import PROPOSALS, RESULTS, STOPPED, Campaign, CampaignConfig
from arrl.ledger import TSV_HEADER, RunDir, tsv_row
from arrl.messages import decode
from pipeline.launcher import new_campaign
from pipeline.proposer import run_proposer
from workers.experiment import execute, hardware_class

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- fairness: hardware class ----------------------------------------------------------------------------


@pytest.fixture
async def campaign(redis_server, prepared_data):  # noqa: F811
    the_campaign = await new_campaign(redis_server.url, CampaignConfig(profile="smoke"), TRAIN_PY)
    yield the_campaign
    await the_campaign.bus.aclose()


def baseline_job(campaign: Campaign, exp_id: str) -> dict[str, Any]:
    proposal = {"experiment_id": exp_id, "parent_hash": campaign.config.baseline_hash, "diff": "",
                "description": "baseline", "role": "baseline", "created_at": time.time()}
    return {"campaign_id": campaign.bus.campaign_id, "experiment_id": exp_id,
            "candidate_hash": campaign.config.baseline_hash, "fingerprint": campaign.config.fingerprint,
            "proposal": proposal}


async def published_results(campaign: Campaign) -> list[dict[str, Any]]:
    entries = await campaign.bus.redis.xrange(campaign.bus.stream_key(RESULTS))
    return [decode(fields[MESSAGE_FIELD], "result") for _, fields in entries]


def test_hardware_class_names_the_cpu_model_and_never_touches_cuda() -> None:
    mine = hardware_class("cpu")
    assert mine.startswith("cpu:") and len(mine) > len("cpu:") and " x" in mine
    code = "import sys; from workers.experiment import hardware_class; hardware_class('cpu'); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.anyio
async def test_first_worker_binds_the_hardware_class_later_ones_must_match(campaign: Campaign) -> None:
    assert await campaign.bind_hardware("cpu:Model A x2") == "cpu:Model A x2"
    assert await campaign.bind_hardware("cpu:Model B x8") == "cpu:Model A x2"  # the first one stays


@pytest.mark.anyio
async def test_job_on_another_hardware_class_is_refused_with_the_reason(campaign: Campaign, redis_server) -> None:
    await campaign.bus.redis.set(campaign.bus.key("hardware_class"), "cuda:NVIDIA H100 80GB HBM3")
    exp_id = await campaign.reserve_experiment()
    out = await execute(redis.asyncio.Redis.from_url(redis_server.url), baseline_job(campaign, exp_id), worker="w")
    assert out["status"] == "refused"
    [result] = await published_results(campaign)
    assert result["status"] == "refused" and result["hardware_class"] == hardware_class("cpu")
    assert "hardware class mismatch" in result["reason"]
    assert "NVIDIA H100" in result["reason"] and hardware_class("cpu") in result["reason"]
    assert not await campaign.bus.redis.exists(campaign.bus.key("exp", exp_id, "events"))  # nothing ran


@pytest.mark.anyio
async def test_campaign_option_fixes_the_hardware_class(redis_server, prepared_data) -> None:  # noqa: F811
    config = CampaignConfig(profile="smoke", hardware_class="cuda:NVIDIA A100-SXM4-40GB")
    campaign = await new_campaign(redis_server.url, config, TRAIN_PY)
    try:
        out = await execute(redis.asyncio.Redis.from_url(redis_server.url), baseline_job(campaign, "e00001"))
        assert out["status"] == "refused" and "NVIDIA A100" in out["reason"]
    finally:
        await campaign.bus.aclose()


# -- small pieces the scenarios rely on, driven directly ------------------------------------------------


@pytest.mark.anyio
async def test_reservation_of_a_proposer_killed_before_publishing_is_proposed_once(
        redis_server, prepared_data) -> None:  # noqa: F811
    config = CampaignConfig(profile="smoke", max_experiments=2, strategy="random")
    campaign = await new_campaign(redis_server.url, config, TRAIN_PY)
    try:
        dead = await campaign.reserve_experiment()  # then the proposer died: e00001 is never published
        assert dead == "e00001"
        late_proposer = await Campaign.load(campaign.bus)  # ... or was only very slow
        late_proposer._reservation_tokens = dict(campaign._reservation_tokens)
        campaign._reservation_tokens.clear()
        from arrl.strategies import make_strategy

        async def one_worker() -> int:
            return 1

        async def published() -> int:
            return await campaign.bus.redis.xlen(campaign.bus.stream_key(PROPOSALS))

        await anyio.sleep(0.3)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_proposer(campaign, make_strategy("random", 1), one_worker, stop=stop,
                                               poll_s=0.05, abandoned_after_s=0.2))
            with anyio.fail_after(30):
                while await published() < 1:  # the abandoned id, taken over
                    await anyio.sleep(0.05)
                await campaign.mark_started("e00001")  # a worker took it: room for the next one
                while await published() < 2:
                    await anyio.sleep(0.05)
            stop.set()
        entries = await campaign.bus.redis.xrange(campaign.bus.stream_key(PROPOSALS))
        ids = sorted(decode(f[MESSAGE_FIELD], "proposal")["experiment_id"] for _, f in entries)
        assert ids == ["e00001", "e00002"]
        # The dead proposer coming back late cannot publish its id a second time.
        assert not await late_proposer.publish_proposal({**decode(entries[0][1][MESSAGE_FIELD], "proposal"),
                                                         "experiment_id": "e00001"})
        assert await campaign.bus.redis.xlen(campaign.bus.stream_key(PROPOSALS)) == 2
        assert await campaign.bus.redis.hlen(campaign.bus.key("reserved")) == 0
    finally:
        await campaign.bus.aclose()


@pytest.mark.anyio
async def test_first_proposer_follows_the_seed_later_ones_differ(redis_server, prepared_data) -> None:  # noqa: F811
    """Two campaigns of one `--seed` give their first proposers one seed (the same opening
    proposals); a second proposer, or one started again after a kill, gets another."""
    seeds = []
    for _ in range(2):
        campaign = await new_campaign(redis_server.url, CampaignConfig(profile="smoke", seed=5), TRAIN_PY)
        try:
            seeds.append([await campaign.proposer_seed() for _ in range(3)])
        finally:
            await campaign.bus.aclose()
    assert seeds[0] == seeds[1]
    assert len(set(seeds[0])) == 3


@pytest.mark.anyio
async def test_record_and_its_counters_are_one_step(campaign: Campaign) -> None:
    record = {"experiment_id": "e00001", "status": "ok", "val_bpb": 2.0}
    for _ in range(2):  # a redelivery after a crash right after recording
        await campaign.record("e00001", record, counters=("recorded", "status_ok"), baseline_bpb=2.0)
    assert await campaign.counters() == {"recorded": 1, "status_ok": 1}
    assert await campaign.bus.redis.lrange(campaign.bus.key("baseline_bpbs"), 0, -1) == [b"2.0"]
    assert await campaign.count_once("rejected", "e00002") and not await campaign.count_once("rejected", "e00002")
    assert (await campaign.counters())["rejected"] == 1
    assert msgpack.unpackb(await campaign.bus.redis.hget(campaign.bus.key("ledger"), "e00001")) == record


def test_ledger_write_repeated_after_a_crash_at_any_point(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.init({"campaign_id": "c"}, "print(1)\n")
    first = {"experiment_id": "e00001", "status": "crashed", "reason": "boom", "val_bpb": None, "kept": False}
    second = {**first, "experiment_id": "e00002"}
    assert run.append(first, None, [{"event": "proposal"}])
    # A crash mid-way through the next write: its results.tsv row written, its ledger line torn.
    with (tmp_path / "results.tsv").open("a") as f:
        f.write(tsv_row(second))
    with (tmp_path / "ledger.jsonl").open("a") as f:
        f.write('{"experiment_id": "e00002", "sta')
    assert [r["experiment_id"] for r in RunDir(tmp_path).records()] == ["e00001"]  # the torn line is not a record
    assert run.append(second, None, [{"event": "proposal"}, {"event": "experiment.recorded"}])
    assert not run.append(second, None, [{"event": "proposal"}])
    assert [r["experiment_id"] for r in RunDir(tmp_path).records()] == ["e00001", "e00002"]
    rows = (tmp_path / "results.tsv").read_text()[len(TSV_HEADER):].splitlines()
    assert [row.split("\t")[4].split()[0] for row in rows] == ["e00001", "e00002"]
    assert len((tmp_path / "logs" / "e00002.jsonl").read_text().splitlines()) == 2  # replaced, not appended


# -- a result the reward computer keeps failing on ---------------------------------------------------


@pytest.mark.anyio
async def test_a_dead_lettered_result_is_recorded_crashed_and_the_campaign_stops(
        redis_server, prepared_data, tmp_path: Path) -> None:  # noqa: F811
    from arrl.bus import Bus
    from pipeline.rewarder import run_rewarder

    config = CampaignConfig(profile="smoke", max_experiments=1)
    made = await new_campaign(redis_server.url, config, TRAIN_PY)
    await made.bus.aclose()
    # Fast redelivery: re-claimed after 50 ms, dead-lettered at the third delivery.
    campaign = await Campaign.load(Bus.from_url(redis_server.url, config.campaign_id, claim_idle_ms=50,
                                                max_deliveries=2))
    run_dir = RunDir(tmp_path / "run")
    run_dir.init(campaign.config.to_dict(), TRAIN_PY.read_text())
    exp_id = await campaign.reserve_experiment()
    assert exp_id is not None
    # A malformed producer: the proposal is not a mapping, so every attempt to handle it fails.
    await campaign.bus.publish(RESULTS, "result", {"experiment_id": exp_id, "status": "ok", "val_bpb": 1.5,
                                                   "proposal": "not a mapping", "candidate_hash": "abc"})
    stop = anyio.Event()

    async def until_stopped() -> None:
        while await campaign.state() != STOPPED:
            await anyio.sleep(0.1)
        stop.set()

    started = time.monotonic()
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(until_stopped)
                await run_rewarder(campaign, run_dir, "reward-1", stop=stop, tick_s=0.2)
        elapsed = time.monotonic() - started
        record = await campaign.get_record(exp_id)
        assert record is not None
        assert record["status"] == "crashed"
        assert record["reason"] == ("dead-lettered after 3 deliveries: "
                                    "AttributeError: 'str' object has no attribute 'get'")
        assert record["val_bpb"] is None and record["reward"] < 0
        counters = await campaign.counters()
        assert counters["recorded"] == counters["proposed"] == 1 and counters["status_crashed"] == 1
        [dead] = await campaign.bus.read_dead(RESULTS)
        assert dead.deliveries == 3 and dead.last_error.startswith("AttributeError")
        assert "last error: AttributeError" in dead.reason
        assert [r["experiment_id"] for r in run_dir.records()] == [exp_id]
        assert await campaign.bus.redis.hlen(campaign.bus.errors_key(RESULTS)) == 0  # nothing left over
        assert await campaign.inflight() == {}
        assert elapsed < 15
    finally:
        await campaign.bus.aclose()
