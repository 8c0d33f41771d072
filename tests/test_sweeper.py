"""The sweeper against a real redis-server and real rq: a job taken off the queue by a worker that
died before starting it goes back to the front, once, without spending its retry.

The dying worker is rq's own dequeue (what `rq worker` does first) with nothing after it: the job is
left "queued" in rq's intermediate list, where rq alone would look only in a maintenance pass
minutes later. The fault suite (test_faults) meets this state by chance when a worker is killed
right after its job process; here it is made on purpose.
"""

from __future__ import annotations

import time

import pytest
import redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus

import pipeline.sweeper as sweeper_module
from arrl.campaign import QUEUE_NAME
from arrl.serialization import MsgpackSerializer
from pipeline.applier import job_id
from pipeline.redis_server import RedisServer
from pipeline.sweeper import Sweeper, return_to_queue

CAMPAIGN = "c1"
IDS = ("e00001", "e00002")


@pytest.fixture
def queued(redis_server: RedisServer) -> tuple[redis.Redis, Queue]:
    """Two experiments' jobs queued as the applier queues them (one retry each)."""
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue(QUEUE_NAME, connection=connection, serializer=MsgpackSerializer)
    for exp_id in IDS:
        queue.enqueue("rq_jobs.echo", {"experiment_id": exp_id}, job_id=job_id(CAMPAIGN, exp_id), retry=Retry(max=1))
    yield connection, queue
    connection.close()


def in_flight() -> dict[str, dict]:
    return {exp_id: {"proposal": {"created_at": time.time()}} for exp_id in IDS}


def sweep_twice(sweeper: Sweeper) -> list[tuple[str, str, str]]:
    """A first sweep that only notices, then one past STRANDED_FOR_S."""
    assert sweeper.sweep_once(in_flight()) == []
    time.sleep(sweeper_module.STRANDED_FOR_S + 0.1)
    return sweeper.sweep_once(in_flight())


def test_a_job_taken_by_a_worker_that_died_before_starting_it_goes_back_to_the_front(queued, monkeypatch) -> None:
    connection, queue = queued
    monkeypatch.setattr(sweeper_module, "STRANDED_FOR_S", 0.3)
    first, second = (job_id(CAMPAIGN, exp_id) for exp_id in IDS)
    taken, _ = Queue.dequeue_any([queue], None, connection=connection, serializer=MsgpackSerializer)
    assert taken.id == first and queue.job_ids == [second]
    assert taken.get_status() == JobStatus.QUEUED  # rq itself still calls it queued

    actions = sweep_twice(Sweeper(connection, CAMPAIGN))

    assert [(exp_id, action) for exp_id, action, _ in actions] == [("e00001", "returned")]
    assert queue.job_ids == [first, second], "back at the front, once"
    assert connection.llen(queue.intermediate_queue_key) == 0
    assert Job.fetch(first, connection=connection, serializer=MsgpackSerializer).retries_left == 1
    # A second sweeper (another reward computer) that saw the same state does nothing more.
    assert not return_to_queue(connection, taken)
    assert queue.job_ids == [first, second]
    # And a live worker runs both, each once.
    assert SimpleWorker([queue], connection=connection, serializer=MsgpackSerializer).work(burst=True)
    for exp_id in IDS:
        job = Job.fetch(job_id(CAMPAIGN, exp_id), connection=connection, serializer=MsgpackSerializer)
        assert job.get_status() == JobStatus.FINISHED and len(job.results()) == 1, exp_id


def test_a_job_its_job_process_started_or_still_waiting_is_left_alone(queued, monkeypatch) -> None:
    connection, queue = queued
    monkeypatch.setattr(sweeper_module, "STRANDED_FOR_S", 0.3)
    second = job_id(CAMPAIGN, IDS[1])
    taken, _ = Queue.dequeue_any([queue], None, connection=connection, serializer=MsgpackSerializer)
    # The job process of a live worker marks the job started and takes its lease.
    with connection.pipeline() as pipe:
        taken.prepare_for_execution("worker-alive", pipeline=pipe)
        pipe.execute()
    sweeper = Sweeper(connection, CAMPAIGN)
    connection.set(sweeper.lease_key("e00001"), 1, ex=30)

    assert sweep_twice(sweeper) == []
    assert queue.job_ids == [second], "the waiting job stays where it is, the started one is not re-queued"
    # A job process that marks the job started after the sweep judged it stranded wins the race.
    assert not return_to_queue(connection, taken)
    assert queue.job_ids == [second]
