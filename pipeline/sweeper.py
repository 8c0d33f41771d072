"""The sweeper: finds experiments whose job ended without a result, so none is lost.

A job publishes its own result in every ordinary case, including crashes of the candidate.
Only a killed job process (OOM, kill -9) or a killed worker can end a job silently: rq retries
the first once and moves it to the failed registry after that; the second leaves the job
"started" with a heartbeat that stops. The sweeper records both as `crashed` with the reason.

"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from arrl.campaign import RESULTS, Campaign
from arrl.serialization import MsgpackSerializer
from pipeline.applier import job_id

log = structlog.get_logger()
# A started job whose heartbeat is older than this lost its worker (rq beats every 30 s).
STALE_HEARTBEAT_S = 100.0
# A job that never reached the queue within this long after its proposal was lost on the way.
MISSING_JOB_GRACE_S = 60.0


def _verdict(job: Job | None, job_info: dict[str, Any], now: datetime) -> tuple[str, str] | None:
    """("crash", reason) for an in-flight experiment whose job ended silently, else None."""
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
    if status == JobStatus.STARTED and job.last_heartbeat is not None:
        beat = job.last_heartbeat if job.last_heartbeat.tzinfo else job.last_heartbeat.replace(tzinfo=UTC)
        if (now - beat).total_seconds() > STALE_HEARTBEAT_S:
            return "crash", f"its worker stopped sending heartbeats over {STALE_HEARTBEAT_S:.0f} s ago"
    return None


def sweep_once(sync_redis, campaign_id: str, inflight: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Blocking rq calls, run in a thread: the actions to take for each in-flight experiment."""
    actions = []
    now = datetime.now(UTC)
    for exp_id, job_info in inflight.items():
        try:
            job = Job.fetch(job_id(campaign_id, exp_id), connection=sync_redis, serializer=MsgpackSerializer)
        except NoSuchJobError:
            job = None
        decision = _verdict(job, job_info, now)
        if decision is None:
            continue
        actions.append((exp_id, *decision))
    return actions


def make_sweeper(sync_redis):
    async def sweep(campaign: Campaign) -> None:
        inflight = await campaign.inflight()
        if not inflight:
            return
        actions = await anyio.to_thread.run_sync(sweep_once, sync_redis, campaign.bus.campaign_id, inflight)
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
