"""A re-run meant for one hardware class waits in that class's queue (`arrl.queues`), against a real
redis-server and real rq: the applier sends it there while a live worker listens on it, every other
job to `gpu`; the sweeper moves it to `gpu` once that class's workers are gone or it has waited
longer than a run may last, so that a class queue never strands a job.

Workers are rq's own `Worker` objects registered in Redis (what `rq worker` does at start) and rq's
own dequeue; the real worker processes meet the class queues in
`test_hardware_classes.py::test_two_real_workers_...`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from test_applier import applier, campaign, proposal, sync_redis  # noqa: F401

from arrl.campaign import QUEUE_NAME, Campaign
from arrl.queues import class_queue_name, queue, queue_for
from arrl.serialization import MsgpackSerializer
from arrl.status import queue_numbers
from pipeline.applier import Applier, job_id
from pipeline.sweeper import Sweeper, move_to_shared_queue

pytestmark = pytest.mark.anyio
SLOW = "cpu:test x1"
SLOW_QUEUE = class_queue_name(SLOW)


def test_a_class_queue_is_named_in_one_word_of_the_class() -> None:
    assert class_queue_name("cpu:AMD EPYC 7B13 x2") == "gpu@cpu-AMD-EPYC-7B13-x2"
    assert class_queue_name("cuda:NVIDIA H200") == "gpu@cuda-NVIDIA-H200"
    assert class_queue_name("cpu:Intel(R) Xeon(R) Gold 6.1 x16") == "gpu@cpu-Intel-R-Xeon-R-Gold-6.1-x16"
    with pytest.raises(ValueError, match="no queue name"):
        class_queue_name(":: ")


def listening_worker(connection: redis.Redis, *queues: str) -> Worker:
    """A worker registered on `queues` as `rq worker Q1 Q2` registers itself at start."""
    worker = Worker([Queue(q, connection=connection) for q in queues], connection=connection,
                    name=f"w-{time.monotonic_ns()}", serializer=MsgpackSerializer)
    worker.register_birth()
    return worker


def rerun(campaign: Campaign, exp_id: str, for_class: str | None) -> dict[str, Any]:  # noqa: F811
    extra = {"why": "class", **({"for_class": for_class} if for_class else {})}
    return proposal(campaign, exp_id, "", role="remeasure", description="remeasure e00001", extra=extra)


def job_ids(connection: redis.Redis, name: str) -> list[str]:
    return queue(connection, name).job_ids


async def test_a_rerun_for_a_class_waits_in_its_queue_only_while_a_worker_listens_there(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis,  # noqa: F811
) -> None:
    cid = campaign.bus.campaign_id
    # No worker listens on the slow class's queue: the re-run goes to gpu, as before class queues.
    await applier.handle(rerun(campaign, "e00002", SLOW))
    assert job_ids(sync_redis, QUEUE_NAME) == [job_id(cid, "e00002")]
    worker = listening_worker(sync_redis, SLOW_QUEUE, QUEUE_NAME)
    await applier.handle(rerun(campaign, "e00003", SLOW))
    await applier.handle(rerun(campaign, "e00004", None))  # meant for no class (a re-run by age)
    await applier.handle(rerun(campaign, "e00005", "cpu:other x2"))  # a class whose workers do not listen on it
    assert job_ids(sync_redis, SLOW_QUEUE) == [job_id(cid, "e00003")]
    assert job_ids(sync_redis, QUEUE_NAME) == [job_id(cid, e) for e in ("e00002", "e00004", "e00005")]
    # The slow worker takes its class's job first, although three waited longer on gpu.
    taken, _ = Queue.dequeue_any(worker.queues, None, connection=sync_redis, serializer=MsgpackSerializer)
    assert taken.id == job_id(cid, "e00003") and taken.origin == SLOW_QUEUE
    # A worker that stopped cleanly unregisters: the next one goes to gpu again.
    worker.register_death()
    assert queue_for(sync_redis, rerun(campaign, "e00006", SLOW)) == QUEUE_NAME


async def test_the_sweeper_moves_a_class_queues_job_to_gpu_once_its_workers_are_gone_or_it_waited_too_long(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis,  # noqa: F811
) -> None:
    cid = campaign.bus.campaign_id
    worker = listening_worker(sync_redis, SLOW_QUEUE, QUEUE_NAME)
    await applier.handle(proposal(campaign, "e00002", "", role="baseline", description="baseline"))
    await applier.handle(rerun(campaign, "e00003", SLOW))
    assert job_ids(sync_redis, SLOW_QUEUE) == [job_id(cid, "e00003")]
    inflight = await campaign.inflight()
    sweeper = Sweeper(sync_redis, cid, class_wait_s=600.0)
    assert sweeper.sweep_once(inflight) == []  # its worker lives, and it has not waited long
    # The class's only worker is gone (killed: its key expired, or stopped): to the front of gpu.
    worker.register_death()
    [(exp_id, action, reason)] = sweeper.sweep_once(inflight)
    assert (exp_id, action) == ("e00003", "moved") and "no live worker" in reason
    assert job_ids(sync_redis, QUEUE_NAME) == [job_id(cid, "e00003"), job_id(cid, "e00002")]
    assert job_ids(sync_redis, SLOW_QUEUE) == []
    job = Job.fetch(job_id(cid, "e00003"), connection=sync_redis, serializer=MsgpackSerializer)
    assert job.origin == QUEUE_NAME and job.get_status() == JobStatus.QUEUED and job.retries_left == 1
    assert sweeper.sweep_once(inflight) == []  # moved once
    # Any worker runs it from there: rq's dequeue on gpu alone returns it first.
    taken, _ = Queue.dequeue_any([queue(sync_redis)], None, connection=sync_redis, serializer=MsgpackSerializer)
    assert taken.id == job_id(cid, "e00003")


async def test_a_job_that_waited_in_its_class_queue_longer_than_a_run_may_last_is_moved(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis,  # noqa: F811
) -> None:
    cid = campaign.bus.campaign_id
    listening_worker(sync_redis, SLOW_QUEUE, QUEUE_NAME)  # alive, but busy with a job that does not end
    await applier.handle(rerun(campaign, "e00002", SLOW))
    inflight = await campaign.inflight()
    assert Sweeper(sync_redis, cid, class_wait_s=600.0).sweep_once(inflight) == []
    job = Job.fetch(job_id(cid, "e00002"), connection=sync_redis, serializer=MsgpackSerializer)
    sync_redis.hset(job.key, "enqueued_at", (datetime.now(UTC) - timedelta(seconds=601)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    [(exp_id, action, reason)] = Sweeper(sync_redis, cid, class_wait_s=600.0).sweep_once(inflight)
    assert (exp_id, action) == ("e00002", "moved") and "over 600 s" in reason
    assert job_ids(sync_redis, QUEUE_NAME) == [job_id(cid, "e00002")]
    # A worker that took it from the class queue meanwhile wins: the move is a no-op.
    assert not move_to_shared_queue(sync_redis, job, "late")


async def test_status_counts_the_jobs_waiting_in_class_queues(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis,  # noqa: F811
) -> None:
    listening_worker(sync_redis, SLOW_QUEUE, QUEUE_NAME)
    await applier.handle(proposal(campaign, "e00002", "", role="baseline", description="baseline"))
    await applier.handle(rerun(campaign, "e00003", SLOW))
    numbers = queue_numbers(sync_redis)
    assert numbers["queued"] == 2 and numbers["workers"] == 1
