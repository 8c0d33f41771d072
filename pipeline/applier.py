"""The patch applier stage: turns a proposal's diff into a checked candidate and enqueues it.

Checks: the diff applies cleanly to the parent, the result parses, only the target changes,
no frozen internals are imported, the tunable block keeps its domains. A rejected edit becomes
an `invalid` result with the reason; a candidate identical to an earlier one becomes a
`duplicate` result that reuses the earlier outcome and costs no GPU time.
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio
import structlog
from rq import Retry
from rq.job import Job

from arrl.campaign import PROPOSALS, RESULTS, Campaign
from arrl.logs import bind_experiment
from arrl.patch import PatchRejected, prepare_candidate
from arrl.queues import queue, queue_for
from arrl.reward import MEASUREMENTS

log = structlog.get_logger()
GROUP = "applier"
JOB_FUNCTION = "workers.experiment.run_experiment"
# Slack on top of the profile's own deadline for rq's backstop timeout.
RQ_TIMEOUT_SLACK_S = 120


def job_timeout_s(campaign: Campaign) -> int:
    """rq's backstop timeout for one of the campaign's jobs: no job holds a worker for longer."""
    return int(campaign.config.job_timeout_s or campaign.config.frozen_profile().deadline_s + RQ_TIMEOUT_SLACK_S)


def job_id(campaign_id: str, exp_id: str) -> str:
    return f"arrl-{campaign_id}-{exp_id}"


class JobSink(Protocol):
    """Where checked candidates go to be run: rq's `gpu` queue, or the simulator (`arrl.sim`)."""

    async def exists(self, job_id: str) -> bool: ...

    async def enqueue(self, job_id: str, job: dict[str, Any]) -> None: ...


class Applier:
    def __init__(self, campaign: Campaign, sync_redis, sink: JobSink | None = None) -> None:
        self.campaign = campaign
        self.bus = campaign.bus
        self.sink = sink
        if sink is None:  # the default: rq's queue (a sink replaces only where jobs go)
            self.queue = queue(sync_redis)
        self.job_timeout = job_timeout_s(campaign)

    async def handle(self, proposal: dict[str, Any]) -> None:
        exp_id = proposal["experiment_id"]
        with bind_experiment(experiment_id=exp_id):
            if await self.campaign.get_record(exp_id) is not None or await self._enqueued(exp_id):
                log.info("proposal.already_handled")  # a redelivery after a crash: nothing to do
                return
            parent = await self.bus.load_source(proposal["parent_hash"])
            try:
                if parent is None:
                    raise PatchRejected("unknown_parent", f"parent {proposal['parent_hash'][:12]} is not stored")
                if proposal.get("role") in MEASUREMENTS:  # the parent unmodified
                    candidate, digest = parent, proposal["parent_hash"]
                else:
                    candidate, digest = prepare_candidate(parent, proposal.get("diff") or "")
            except PatchRejected as exc:
                await self._reject(proposal, "invalid", f"{exc.reason}: {exc.message}", candidate_hash=None)
                return
            if proposal.get("role") not in MEASUREMENTS:
                earlier = await self.bus.claim_hash(digest, exp_id)
                if earlier is not None:
                    await self._reject(proposal, "duplicate", f"same script as {earlier}", candidate_hash=digest,
                                       duplicate_of=earlier)
                    return
            await self.bus.store_source(digest, candidate)
            job = {"campaign_id": self.bus.campaign_id, "experiment_id": exp_id, "candidate_hash": digest,
                   "fingerprint": self.campaign.config.fingerprint, "proposal": proposal}
            await self.campaign.track(exp_id, job)
            if self.sink is not None:
                await self.sink.enqueue(job_id(self.bus.campaign_id, exp_id), job)
            else:
                await anyio.to_thread.run_sync(self._enqueue, exp_id, job)
            log.info("proposal.enqueued", candidate=digest[:12], description=proposal.get("description"))

    async def _enqueued(self, exp_id: str) -> bool:
        if self.sink is not None:
            return await self.sink.exists(job_id(self.bus.campaign_id, exp_id))
        return await anyio.to_thread.run_sync(
            lambda: Job.exists(job_id(self.bus.campaign_id, exp_id), connection=self.queue.connection))

    def _enqueue(self, exp_id: str, job: dict[str, Any]) -> None:
        # A re-run meant for a hardware class waits in that class's queue while a worker listens there.
        name = queue_for(self.queue.connection, job["proposal"])
        target = self.queue if name == self.queue.name else queue(self.queue.connection, name)
        # One retry: a worker whose job process was killed (OOM, kill -9) runs it once more.
        target.enqueue(JOB_FUNCTION, job, job_id=job_id(self.bus.campaign_id, exp_id),
                       job_timeout=self.job_timeout, retry=Retry(max=1), result_ttl=7 * 86400,
                       failure_ttl=7 * 86400, description=f"{exp_id} {job['proposal'].get('description')}")

    async def _reject(self, proposal: dict[str, Any], status: str, reason: str, **fields: Any) -> None:
        log.warning("proposal.rejected", status=status, reason=reason)
        result = {"experiment_id": proposal["experiment_id"], "status": status, "reason": reason,
                  "val_bpb": None, "curve": [], "proposal": proposal, **fields}
        await self.bus.publish(RESULTS, "result", result)
        # Once per experiment: a proposal redelivered after a crash right here must not count twice.
        await self.campaign.count_once("rejected", proposal["experiment_id"])


async def run_applier(campaign: Campaign, sync_redis, consumer: str, stop: anyio.Event | None = None,
                      sink: JobSink | None = None) -> int:
    from arrl.consumer import run_consumer

    applier = Applier(campaign, sync_redis, sink)
    return await run_consumer(campaign.bus, PROPOSALS, GROUP, consumer, applier.handle, stop=stop,
                              expect_kind="proposal")
