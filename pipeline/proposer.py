"""The proposer stage: keeps the `gpu` queue at a target depth per live worker.

It reserves an experiment id, asks the strategy for an edit program on the incumbent, renders
it as a unified diff and publishes the proposal. The first `baseline_repeats` proposals are the
unmodified script, which establish the incumbent and the noise floor.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from arrl.campaign import PROPOSALS, RUNNING, Campaign
from arrl.edits import apply_program, parse_tunables, render_diff
from arrl.logs import bind_experiment
from arrl.strategies import Context, Strategy

log = structlog.get_logger()


async def propose_one(campaign: Campaign, strategy: Strategy) -> str | None:
    """Publish one proposal; returns its experiment id, or None when the campaign allows no more."""
    bus = campaign.bus
    exp_id = await campaign.reserve_experiment()
    if exp_id is None:
        return None
    with bind_experiment(experiment_id=exp_id):
        incumbent = await bus.get_incumbent()
        parent_hash = incumbent["hash"] if incumbent else campaign.config.baseline_hash
        parent_bpb = incumbent.get("val_bpb") if incumbent else None
        parent = await bus.load_source(parent_hash)
        if parent is None:
            raise LookupError(f"parent source {parent_hash[:12]} is missing from Redis")
        proposal: dict[str, Any] = {
            "experiment_id": exp_id, "parent_hash": parent_hash, "parent_bpb": parent_bpb,
            "strategy": strategy.name, "created_at": time.time(),
        }
        if await campaign.count("baseline_claims") <= campaign.config.baseline_repeats:
            proposal.update(role="baseline", diff="", description="baseline", program=[],
                            logprob=0.0, value=0.0, policy_version=0)
        else:
            recent = await campaign.recent_records(32)
            choice = await strategy.propose(Context(parse_tunables(parent), incumbent, recent))
            child, description = apply_program(parent, choice.program)
            proposal.update(role="edit", diff=render_diff(parent, child), description=description,
                            program=choice.program, logprob=choice.logprob, value=choice.value,
                            policy_version=choice.policy_version, extra=choice.extra)
        await bus.publish(PROPOSALS, "proposal", proposal)
        log.info("proposal.created", role=proposal["role"], description=proposal["description"],
                 parent=parent_hash[:12], policy_version=proposal["policy_version"])
        return exp_id


async def outstanding(campaign: Campaign) -> int:
    """Proposals not yet started by a worker nor rejected by the applier."""
    c = await campaign.counters()
    return c.get("proposed", 0) - c.get("started", 0) - c.get("rejected", 0)


async def run_proposer(campaign: Campaign, strategy: Strategy, live_workers: Callable[[], Awaitable[int]], *,
                       stop: anyio.Event | None = None, poll_s: float = 0.2) -> int:
    """Propose while the campaign runs, keeping `queue_depth_per_worker` jobs ahead of each worker."""
    made = 0
    while stop is None or not stop.is_set():
        if await campaign.state() != RUNNING:
            log.info("proposer.stopping", state=await campaign.state())
            break
        # The job in progress counts as started; the target is what waits behind it.
        target = campaign.config.queue_depth_per_worker * max(1, await live_workers())
        if await outstanding(campaign) < target:
            if await propose_one(campaign, strategy) is None:
                break
            made += 1
            continue
        await anyio.sleep(poll_s)
    return made
