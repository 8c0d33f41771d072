"""The experiment job (`workers.experiment`) with a real redis-server and real training.

`execute(client, job)` runs in-process with the smoke profile on the real `target/train.py`;
one test runs the job through a real forking `rq.Worker` with the msgpack serializer.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401
from rq import Queue, Worker
from rq.job import Job, JobStatus

from arrl.bus import MESSAGE_FIELD, Bus
from arrl.campaign import QUEUE_NAME, RESULTS, Campaign, CampaignConfig
from arrl.messages import decode
from arrl.serialization import MsgpackSerializer
from pipeline.applier import Applier, job_id
from pipeline.launcher import new_campaign
from pipeline.proposer import outstanding
from workers.experiment import execute, workdir_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def campaign(redis_server, prepared_data) -> AsyncIterator[Campaign]:  # noqa: F811
    the_campaign = await new_campaign(redis_server.url, CampaignConfig(profile="smoke"), TRAIN_PY)
    yield the_campaign
    await the_campaign.bus.aclose()


def job_for(campaign: Campaign, exp_id: str, **overrides: Any) -> dict[str, Any]:
    """The job the applier would enqueue for the unmodified script."""
    proposal = {"experiment_id": exp_id, "parent_hash": campaign.config.baseline_hash, "diff": "",
                "description": "baseline", "role": "baseline", "created_at": time.time()}
    return {"campaign_id": campaign.bus.campaign_id, "experiment_id": exp_id,
            "candidate_hash": campaign.config.baseline_hash, "fingerprint": campaign.config.fingerprint,
            "proposal": proposal, **overrides}


def client_for(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url)  # execute() closes it


async def results(bus: Bus) -> list[dict[str, Any]]:
    entries = await bus.redis.xrange(bus.stream_key(RESULTS))
    return [decode(fields[MESSAGE_FIELD], "result") for _, fields in entries]


async def events(bus: Bus, exp_id: str) -> list[dict[str, Any]]:
    return [event for _, event in await bus.read_events(exp_id, "0", count=100_000)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is not alive
    except FileNotFoundError:
        return False


def trainer_pids(script: Path) -> list[int]:
    """Processes whose command line runs this candidate script."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if str(script).encode() in argv:
                pids.append(int(entry))
    return pids


async def wait_for_event(bus: Bus, exp_id: str, name: str, timeout_s: float = 60) -> dict[str, Any]:
    last = "0"
    with anyio.fail_after(timeout_s):
        while True:
            for entry_id, event in await bus.read_events(exp_id, last, block_ms=200):
                last = entry_id
                if event.get("event") == name:
                    return event


async def test_events_stream_live_and_the_result_is_published(campaign: Campaign, redis_server) -> None:
    bus = campaign.bus
    job = job_for(campaign, "e00001")
    returned: dict[str, Any] = {}
    results_when_first_step: list[dict[str, Any]] = []

    async def run() -> None:
        returned.update(await execute(client_for(redis_server.url), job, worker="test-worker"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for_event(bus, "e00001", "train.step")
        # The loss is visible to the self-evaluator and `arrl tail` while the run goes on.
        results_when_first_step.extend(await results(bus))

    assert results_when_first_step == []
    [result] = await results(bus)
    assert result["experiment_id"] == "e00001" and result["campaign_id"] == bus.campaign_id
    assert result["status"] == "ok", result.get("reason")
    assert isinstance(result["val_bpb"], float) and 0 < result["val_bpb"] < 10
    assert result["proposal"] == job["proposal"] and result["candidate_hash"] == job["candidate_hash"]
    assert result["worker"] == "test-worker" and result["steps"] > 0 and len(result["curve"]) > 0
    assert result["machine_gflops"] > 0  # the device's speed, probed before the clock started
    assert returned == {"status": "ok", "val_bpb": result["val_bpb"]}

    names = [e["event"] for e in await events(bus, "e00001")]
    assert names[0] == "harness.ready"
    assert "train.step" in names and "summary" in names
    assert names[-1] == "experiment.finished"
    assert (await campaign.counters())["started"] == 1
    assert await campaign.busy_seconds() > 0
    # Only the trainer's log stays behind in the working directory.
    assert [p.name for p in workdir_for(bus.campaign_id, "e00001").iterdir()] == ["train.log"]


async def test_abort_sent_before_the_job_starts_is_honoured(campaign: Campaign, redis_server) -> None:
    bus = campaign.bus
    await bus.send_control("e00001", "abort", "not worth it")
    with anyio.fail_after(60):
        returned = await execute(client_for(redis_server.url), job_for(campaign, "e00001"))

    [result] = await results(bus)
    assert returned["status"] == result["status"] == "aborted"
    assert result["reason"] == "not worth it"
    # The trainer never trained: it was stopped before it reported a single step.
    assert result["curve"] == [] and result["steps"] == 0
    assert "train.step" not in [e["event"] for e in await events(bus, "e00001")]
    assert trainer_pids(workdir_for(bus.campaign_id, "e00001") / "train.py") == []


async def test_abort_during_the_run_stops_the_trainer_within_a_second(campaign: Campaign, redis_server) -> None:
    bus = campaign.bus
    script = workdir_for(bus.campaign_id, "e00001") / "train.py"
    sent_at: list[float] = []
    result_at: list[float] = []
    trainers: list[int] = []

    async def run() -> None:
        await execute(client_for(redis_server.url), job_for(campaign, "e00001"))
        result_at.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for_event(bus, "e00001", "train.step")
        trainers.extend(trainer_pids(script))
        sent_at.append(time.monotonic())
        await bus.send_control("e00001", "abort", "hopeless")

    [result] = await results(bus)
    assert result["status"] == "aborted" and result["reason"] == "hopeless"
    assert result["steps"] > 0  # it really was training when the abort came
    assert len(trainers) == 1, "exactly one trainer process ran the candidate"
    assert not alive(trainers[0])
    latency = result_at[0] - sent_at[0]
    assert latency < 1.0, f"abort took {latency:.2f} s from send to result"
    assert result["abort_latency_s"] is not None and result["abort_latency_s"] < 1.0


async def test_job_with_another_fingerprint_is_refused(campaign: Campaign, redis_server) -> None:
    bus = campaign.bus
    job = job_for(campaign, "e00001", fingerprint="0123456789abcdef")
    await campaign.reserve_experiment()  # as the proposer did for it
    returned = await execute(client_for(redis_server.url), job)

    [result] = await results(bus)
    assert returned["status"] == result["status"] == "refused"
    assert "fingerprint" in result["reason"]
    assert "0123456789abcdef" in result["reason"] and campaign.config.fingerprint in result["reason"]
    assert result["val_bpb"] is None
    assert await events(bus, "e00001") == []  # no trainer was started
    # A refused job no longer waits anywhere: the proposer must not count it as queued forever.
    assert await outstanding(campaign) == 0


def test_job_round_trips_through_a_real_forking_rq_worker(redis_server, prepared_data) -> None:  # noqa: F811
    sync = redis.Redis.from_url(redis_server.url)

    async def enqueue() -> tuple[str, str]:
        campaign = await new_campaign(redis_server.url, CampaignConfig(profile="smoke"), TRAIN_PY)
        exp_id = await campaign.reserve_experiment()
        assert exp_id is not None
        await Applier(campaign, sync).handle(
            {"experiment_id": exp_id, "parent_hash": campaign.config.baseline_hash, "diff": "",
             "description": "baseline", "program": [], "strategy": "test", "role": "baseline",
             "logprob": 0.0, "value": 0.0, "policy_version": 0, "created_at": time.time()})
        await campaign.bus.aclose()
        return campaign.bus.campaign_id, exp_id

    campaign_id, exp_id = anyio.run(enqueue)
    queue = Queue(QUEUE_NAME, connection=sync, serializer=MsgpackSerializer)
    assert queue.count == 1
    worker = Worker([queue], connection=sync, serializer=MsgpackSerializer, name="test-forking-worker")
    assert type(worker) is Worker  # the default forking worker, a fresh work horse per job
    assert worker.work(burst=True) is True

    job = Job.fetch(job_id(campaign_id, exp_id), connection=sync, serializer=MsgpackSerializer)
    latest = job.latest_result()
    assert job.get_status() == JobStatus.FINISHED, latest.exc_string if latest else "no result"
    returned = job.return_value()
    assert isinstance(returned, dict) and returned["status"] == "ok"

    async def published() -> list[dict[str, Any]]:
        async with Bus.from_url(redis_server.url, campaign_id) as bus:
            return await results(bus)

    [result] = anyio.run(published)
    assert result["status"] == "ok" and result["val_bpb"] == returned["val_bpb"]
    assert result["worker"] == "test-forking-worker"
    sync.close()
