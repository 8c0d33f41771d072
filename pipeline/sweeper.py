"""The sweeper: finds experiments whose job ended without a result, so none is lost.

A job publishes its own result in every ordinary case, including crashes of the candidate.
Only a killed job process (OOM, kill -9) or a killed worker can end a job silently:

- the job process (rq's work horse) killed while its worker lives: rq retries the job once and
  moves it to the failed registry after that; the sweeper records a failed job as `crashed`.
- the worker killed together with its job process (a lost host, kill -9 of both): rq leaves
  the job "started" and would notice only minutes later. The running job renews a lease key
  every few seconds (`workers.experiment`); a started job whose lease has been gone for a
  while lost its process, and the sweeper requeues it once (its rq retry budget), or records
  it `crashed` when the budget is spent. A worker killed alone leaves its job process running:
  that one keeps its lease, finishes and publishes as usual, and nothing is done.
- the worker killed after it took the job off the queue but before its job process marked the
  job started: the job is left "queued" in rq's intermediate list, which rq itself inspects only
  in a worker's maintenance pass (every 10 minutes, then a minute more). A queued job seen out of
  the queue, without a lease, for `STRANDED_FOR_S` never ran: the sweeper puts it back at the
  front of the queue, without spending its retry.

A re-run meant for one hardware class waits in that class's queue (`arrl.queues`); should its
workers be gone, or busy for longer than a run may last (`class_wait_s`), the sweeper moves it to
the shared queue's front, where any worker takes it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from redis.exceptions import WatchError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from arrl.campaign import LEASE_TTL_S, RESULTS, Campaign
from arrl.queues import CLASS_QUEUE_PREFIX, listened, queue
from arrl.serialization import MsgpackSerializer
from pipeline.applier import job_id, job_timeout_s

log = structlog.get_logger()
# A started job gets this long to take its first lease (fork, imports) before a missing lease counts.
LEASE_START_GRACE_S = max(LEASE_TTL_S, 5.0)
# A lease must be seen missing for this long, in sweeps this far apart, before the job is judged
# dead: a job reconnecting after a Redis restart (whose lease expired meanwhile) renews it sooner.
LEASE_MISSING_FOR_S = min(5.0, LEASE_TTL_S)
# A job that never reached the queue within this long after its proposal was lost on the way.
MISSING_JOB_GRACE_S = 60.0
# A live worker's job process marks a dequeued job started within milliseconds of the fork; one
# still queued, out of the queue, this long after was taken by a worker that died.
STRANDED_FOR_S = 10.0


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _verdict(job: Job | None, job_info: dict[str, Any], now: datetime, lease_alive: bool) -> tuple[str, str] | None:
    """("crash" or "dead", reason) for an in-flight experiment whose job ended silently, else None.

    "dead": a started job whose process is gone (requeue it if its retry budget allows).
    """
    if job is None:
        created = job_info.get("proposal", {}).get("created_at") or 0
        if now.timestamp() - created > MISSING_JOB_GRACE_S:
            return "crash", "its job vanished from Redis before it ran"
        return None
    status = job.get_status()
    if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        result = job.latest_result()
        why = (result.exc_string or "").strip().splitlines()[-1:] if result else []
        return "crash", f"job {status.value}: {why[0] if why else 'no reason recorded'}"
    if status == JobStatus.STARTED and not lease_alive and job.started_at is not None:
        if (now - _utc(job.started_at)).total_seconds() > LEASE_START_GRACE_S:
            return "dead", f"its job process stopped renewing its lease (worker {job.worker_name or '?'} died)"
    return None


def requeue_or_fail(sync_redis, job: Job, reason: str) -> bool:
    """Take a dead started job out of the started registry; requeue it if it has a retry left
    (True), else mark it failed (False)."""
    origin = queue(sync_redis, job.origin)
    with sync_redis.pipeline() as pipe:
        origin.started_job_registry.remove_executions(job, pipeline=pipe)
        requeued = bool(job.retries_left and job.retries_left > 0)
        if requeued:
            job.retry(origin, pipe)
        else:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
        pipe.execute()
    log.warning("job.requeued" if requeued else "job.failed", job_id=job.id, reason=reason)
    return requeued


def return_to_queue(sync_redis, job: Job) -> bool:
    """Put a job that a dead worker took off the queue, and never started, back at the front.

    One transaction watching the job and the queue: a job process that marks the job started
    meanwhile, or another sweeper that already put it back, makes it a no-op (False)."""
    origin = queue(sync_redis, job.origin)
    with sync_redis.pipeline() as pipe:
        try:
            pipe.watch(job.key, origin.key)
            status = pipe.hget(job.key, "status")
            if status != JobStatus.QUEUED.value.encode() or pipe.lpos(origin.key, job.id) is not None:
                return False
            pipe.multi()
            pipe.lrem(origin.intermediate_queue_key, 0, job.id)
            origin.started_job_registry.remove_executions(job, pipeline=pipe)  # a worker may have made one
            origin.push_job_id(job.id, pipeline=pipe, at_front=True)
            pipe.execute()
        except WatchError:
            return False
    log.warning("job.returned", job_id=job.id, reason="taken off the queue by a worker that died before starting it")
    return True


def move_to_shared_queue(sync_redis, job: Job, reason: str) -> bool:
    """Move a job waiting in a class's queue to the front of the shared one. One transaction
    watching the class's queue: a worker that takes the job meanwhile makes it a no-op (False)."""
    origin, shared = queue(sync_redis, job.origin), queue(sync_redis)
    with sync_redis.pipeline() as pipe:
        try:
            pipe.watch(origin.key)
            if pipe.lpos(origin.key, job.id) is None:
                return False
            pipe.multi()
            pipe.lrem(origin.key, 0, job.id)
            pipe.hset(job.key, "origin", shared.name)  # its registries from now on: the shared queue's
            shared.push_job_id(job.id, pipeline=pipe, at_front=True)
            pipe.execute()
        except WatchError:
            return False
    log.warning("job.moved_to_shared_queue", job_id=job.id, queue=origin.name, reason=reason)
    return True


class Sweeper:
    """Blocking rq calls; `sweep_once` runs in a thread. Remembers since when each lease has been
    missing and each queued job has been out of the queue."""

    def __init__(self, sync_redis, campaign_id: str, class_wait_s: float = 600.0) -> None:
        self.redis = sync_redis
        self.campaign_id = campaign_id
        self.class_wait_s = class_wait_s  # the longest a job waits in a class's queue (a run's deadline)
        # (what, experiment id) -> when it was first seen: "lease" missing, or the job "stranded".
        self.seen_since: dict[tuple[str, str], float] = {}

    def lease_key(self, exp_id: str) -> str:
        return f"arrl:{self.campaign_id}:exp:{exp_id}:lease"

    def _held_for(self, what: str, exp_id: str, holds: bool, for_s: float) -> bool:
        """Whether `holds` has been true at every sweep for at least `for_s`."""
        if not holds:
            self.seen_since.pop((what, exp_id), None)
            return False
        first = self.seen_since.setdefault((what, exp_id), time.monotonic())
        return time.monotonic() - first >= for_s

    def _lease_gone_long_enough(self, exp_id: str) -> bool:
        return self._held_for("lease", exp_id, not self.redis.exists(self.lease_key(exp_id)), LEASE_MISSING_FOR_S)

    def _stranded_long_enough(self, exp_id: str, job: Job) -> bool:
        """Queued, yet neither in the queue nor holding a lease, at every sweep for STRANDED_FOR_S."""
        stranded = (queue(self.redis, job.origin).get_job_position(job.id) is None
                    and not self.redis.exists(self.lease_key(exp_id)))
        return self._held_for("stranded", exp_id, stranded, STRANDED_FOR_S)

    def _class_queue_gave_up(self, job: Job) -> str | None:
        """Why a job waiting in a class's queue should wait in the shared one, if it should."""
        if not job.origin.startswith(CLASS_QUEUE_PREFIX):
            return None
        if not listened(self.redis, job.origin):
            return "no live worker listens on its class's queue"
        if job.enqueued_at and (datetime.now(UTC) - _utc(job.enqueued_at)).total_seconds() > self.class_wait_s:
            return f"it waited in its class's queue for over {self.class_wait_s:.0f} s"
        return None

    def sweep_once(self, inflight: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
        """The actions taken or to take for each in-flight experiment:
        (id, "crash" | "requeued" | "returned" | "moved", reason)."""
        actions = []
        now = datetime.now(UTC)
        for gone in [key for key in self.seen_since if key[1] not in inflight]:
            self.seen_since.pop(gone, None)
        for exp_id, job_info in inflight.items():
            try:
                job = Job.fetch(job_id(self.campaign_id, exp_id), connection=self.redis, serializer=MsgpackSerializer)
            except NoSuchJobError:
                job = None
            status = job.get_status() if job is not None else None
            if (status == JobStatus.QUEUED and (why := self._class_queue_gave_up(job)) is not None
                    and move_to_shared_queue(self.redis, job, why)):
                actions.append((exp_id, "moved", why))
                continue
            if status == JobStatus.QUEUED and self._stranded_long_enough(exp_id, job):
                if return_to_queue(self.redis, job):
                    self.seen_since.pop(("stranded", exp_id), None)
                    actions.append((exp_id, "returned", "a worker died after taking its job off the queue"))
                continue
            lease_alive = status != JobStatus.STARTED or not self._lease_gone_long_enough(exp_id)
            decision = _verdict(job, job_info, now, lease_alive)
            if decision is None:
                continue
            action, reason = decision
            if action == "dead":
                assert job is not None
                # One sweeper acts per attempt, however many reward computers run one.
                marker = f"arrl:{self.campaign_id}:exp:{exp_id}:swept:{job.started_at.timestamp() if job.started_at else 0}"
                if not self.redis.set(marker, 1, nx=True, ex=3600):
                    continue
                self.seen_since.pop(("lease", exp_id), None)
                if requeue_or_fail(self.redis, job, reason):
                    actions.append((exp_id, "requeued", reason))
                    continue
                action, reason = "crash", f"{reason}; no retry left"
            actions.append((exp_id, action, reason))
        return actions


def make_sweeper(sync_redis):
    sweepers: dict[str, Sweeper] = {}

    async def sweep(campaign: Campaign) -> None:
        inflight = await campaign.inflight()
        if not inflight:
            return
        campaign_id = campaign.bus.campaign_id
        if campaign_id not in sweepers:
            # A worker of the class takes the job once its current one ends, within rq's timeout.
            sweepers[campaign_id] = Sweeper(sync_redis, campaign_id, class_wait_s=job_timeout_s(campaign))
        sweeper = sweepers[campaign_id]
        actions = await anyio.to_thread.run_sync(sweeper.sweep_once, inflight)
        for exp_id, action, reason in actions:
            log.warning("experiment.swept", experiment_id=exp_id, action=action, reason=reason)
            if action == "crash":
                job_info = inflight[exp_id]
                await campaign.bus.publish(RESULTS, "result", {
                    "experiment_id": exp_id, "status": "crashed", "reason": reason, "val_bpb": None,
                    "curve": [], "proposal": job_info.get("proposal", {}),
                    "candidate_hash": job_info.get("candidate_hash")})
                await campaign.untrack(exp_id)

    return sweep

