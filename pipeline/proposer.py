"""The proposer stage: keeps the `gpu` queue at a target depth per live worker.

It reserves an experiment id, asks the strategy for an edit program on the incumbent, renders
it as a unified diff and publishes the proposal. The first `baseline_repeats` proposals are the
unmodified script, which establish the incumbent and the noise floor. With
`remeasure_every` N, a proposal is instead the incumbent unmodified once its score is N experiments
old, with `remeasure_on_speed` once the machine's speed has moved that much since the score was
measured, and once an edit on a hardware class found no score of the incumbent there
(`Campaign.claim_remeasure`, `arrl.scores`): the reward computer then scores the incumbent by that
re-run.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from arrl.bus import REDIS_ERRORS, Backoff
from arrl.campaign import RUNNING, Campaign
from arrl.edits import apply_program, parse_tunables, render_diff
from arrl.logs import bind_experiment
from arrl.scores import class_of, speed_shift, unscored_class
from arrl.strategies import Context, Strategy

log = structlog.get_logger()
# A reserved id whose proposal is not published this long after (its proposer died in between)
# is taken over and proposed by another proposer; making a proposal takes milliseconds.
ABANDONED_AFTER_S = 30.0


def _speed_shift(campaign: Campaign, records: list[dict[str, Any]],
                 incumbent: dict[str, Any] | None) -> tuple[float, dict[str, Any]] | None:
    """How far the machine's speed has moved since the incumbent's score (`arrl.scores.speed_shift`),
    read only when `remeasure_on_speed` asks for it."""
    if not incumbent or campaign.config.remeasure_on_speed <= 0:
        return None
    return speed_shift(records, incumbent)


async def propose_one(campaign: Campaign, strategy: Strategy, exp_id: str | None = None) -> str | None:
    """Publish one proposal; returns its experiment id, or None when the campaign allows no more.

    With `exp_id` (an abandoned reservation this proposer took over) that id is proposed.
    """
    bus = campaign.bus
    exp_id = exp_id or await campaign.reserve_experiment()
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
        recent = await campaign.recent_records(32)
        if await campaign.count("baseline_claims") <= campaign.config.baseline_repeats:
            proposal.update(role="baseline", diff="", description="baseline", program=[],
                            logprob=0.0, value=0.0, policy_version=0)
        elif incumbent and (why := await campaign.claim_remeasure(
                exp_id, incumbent, shift := _speed_shift(campaign, recent, incumbent),
                unscored := unscored_class(recent, incumbent))):
            moved = round(shift[0], 3) if shift is not None else None
            # With workers of several classes, the class it is for (the one without a score, or the
            # one whose speed moved): its job waits for a worker of that class where one listens on
            # its class's queue (`arrl.queues`). On one class every worker serves it alike.
            mixed = campaign.config.hardware_class == "any"
            for_class = unscored if why == "class" else class_of(shift[1]) if why == "speed" and shift and mixed else None
            log.info("proposal.remeasure", incumbent=incumbent["experiment_id"], why=why, speed_shift=moved,
                     for_class=for_class)
            proposal.update(role="remeasure", diff="", description=f"remeasure {incumbent['experiment_id']}",
                            program=[], logprob=0.0, value=0.0, policy_version=0,
                            extra={"why": why, **({"speed_shift": moved} if moved is not None else {}),
                                   **({"for_class": for_class} if for_class else {})})
        else:
            choice = await strategy.propose(Context(parse_tunables(parent), incumbent, recent))
            child, description = apply_program(parent, choice.program)
            proposal.update(role="edit", diff=render_diff(parent, child), description=description,
                            program=choice.program, logprob=choice.logprob, value=choice.value,
                            policy_version=choice.policy_version, extra=choice.extra)
        if not await campaign.publish_proposal(proposal):
            log.warning("proposal.taken_over")  # we were too slow; another proposer published this id
            return exp_id
        log.info("proposal.created", role=proposal["role"], description=proposal["description"],
                 parent=parent_hash[:12], policy_version=proposal["policy_version"])
        return exp_id


async def propose_abandoned(campaign: Campaign, strategy: Strategy, older_than_s: float = ABANDONED_AFTER_S) -> int:
    """Propose the reserved ids whose proposer died before publishing them; returns how many."""
    taken = await campaign.take_abandoned(older_than_s)
    for exp_id in taken:
        log.warning("proposal.abandoned_taken_over", experiment_id=exp_id)
        await propose_one(campaign, strategy, exp_id)
    return len(taken)


async def outstanding(campaign: Campaign) -> int:
    """Proposals not yet started by a worker nor rejected by the applier."""
    c = await campaign.counters()
    return c.get("proposed", 0) - c.get("started", 0) - c.get("rejected", 0)


async def room_for_a_proposal(campaign: Campaign, workers: int) -> bool:
    """Whether to propose now.

    `queue_depth_per_worker` N > 0: keep N proposals waiting behind each worker's running job, so
    no worker waits and the next candidate can be prepared (compiled) while one trains; each
    proposal is then made before the outcome of the run ahead of it is known. N = 0: sequential,
    autoresearch's loop: a worker's next proposal is made once every earlier one has its record,
    so each proposal sees all outcomes, and the worker waits milliseconds for it.
    """
    depth = campaign.config.queue_depth_per_worker
    if depth > 0:  # the job in progress counts as started; the target is what waits behind it
        return await outstanding(campaign) < depth * workers
    c = await campaign.counters()
    return c.get("proposed", 0) - c.get("recorded", 0) < workers


async def run_proposer(campaign: Campaign, strategy: Strategy, live_workers: Callable[[], Awaitable[int]], *,
                       stop: anyio.Event | None = None, poll_s: float = 0.2,
                       abandoned_after_s: float = ABANDONED_AFTER_S) -> int:
    """Propose while the campaign runs, keeping `queue_depth_per_worker` jobs ahead of each worker.

    Redis being briefly unreachable (a restart) is waited out; abandoned reservations are
    proposed on the way.
    """
    made = 0
    backoff = Backoff()
    next_gap_check = 0.0
    while stop is None or not stop.is_set():
        try:
            if time.monotonic() >= next_gap_check:
                made += await propose_abandoned(campaign, strategy, abandoned_after_s)
                next_gap_check = time.monotonic() + min(5.0, abandoned_after_s / 2)
            if await campaign.state() != RUNNING:
                log.info("proposer.stopping", state=await campaign.state())
                break
            if await room_for_a_proposal(campaign, max(1, await live_workers())):
                if await propose_one(campaign, strategy) is None:
                    break
                made += 1
                backoff.reset()
                continue
        except REDIS_ERRORS as exc:
            log.warning("proposer.redis_unavailable", error=repr(exc), retry_in_s=backoff.delay_s)
            await backoff.pause()
            continue
        backoff.reset()
        await anyio.sleep(poll_s)
    return made


async def fill_abandoned_until_stopped(campaign: Campaign, strategy: Strategy, stop: anyio.Event,
                                       abandoned_after_s: float = ABANDONED_AFTER_S) -> None:
    """After proposing has ended: keep proposing abandoned reservations, which the campaign waits on."""
    while not stop.is_set():
        try:
            await propose_abandoned(campaign, strategy, abandoned_after_s)
        except REDIS_ERRORS as exc:
            log.warning("proposer.redis_unavailable", error=repr(exc))
        with anyio.move_on_after(min(5.0, abandoned_after_s / 2)):
            await stop.wait()
