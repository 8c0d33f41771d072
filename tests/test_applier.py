"""The patch applier stage against a real redis-server and a real rq queue (no training).

`Applier.handle` is driven directly with proposals; what it does is read back from Redis: the
rq queue `gpu` (through rq with the msgpack serializer), the `results` stream, the stored
candidate sources and the in-flight table.
"""

from __future__ import annotations

import difflib
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import msgpack
import pytest
import redis
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401
from rq import Queue
from rq.job import Job

from arrl.bus import MESSAGE_FIELD
from arrl.campaign import PROPOSALS, QUEUE_NAME, RESULTS, Campaign, CampaignConfig
from arrl.consumer import run_consumer
from arrl.edits import apply_program, render_diff
from arrl.messages import decode
from arrl.patch import MAX_BYTES, content_hash
from arrl.serialization import MsgpackSerializer
from frozen_env.constants import get_profile
from pipeline.applier import GROUP, JOB_FUNCTION, RQ_TIMEOUT_SLACK_S, Applier, job_id
from pipeline.launcher import new_campaign

pytestmark = pytest.mark.anyio

BASELINE = TRAIN_PY.read_text()
PROGRAM = [{"op": "set", "name": "ACTIVATION", "value": "gelu"}, {"op": "scale", "name": "MATRIX_LR", "factor": 2.0}]


@pytest.fixture
async def campaign(redis_server, prepared_data) -> AsyncIterator[Campaign]:  # noqa: F811
    the_campaign = await new_campaign(redis_server.url, CampaignConfig(profile="smoke"), TRAIN_PY)
    yield the_campaign
    await the_campaign.bus.aclose()


@pytest.fixture
def sync_redis(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def applier(campaign: Campaign, sync_redis: redis.Redis) -> Applier:
    return Applier(campaign, sync_redis)


def gpu_queue(sync_redis: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=sync_redis, serializer=MsgpackSerializer)


def proposal(campaign: Campaign, exp_id: str, diff: str, **extra: Any) -> dict[str, Any]:
    return {
        "campaign_id": campaign.bus.campaign_id, "experiment_id": exp_id,
        "parent_hash": campaign.config.baseline_hash, "parent_bpb": None, "diff": diff,
        "description": "test edit", "program": [], "strategy": "test", "role": "edit",
        "logprob": -1.5, "value": 0.25, "policy_version": 3, "created_at": time.time(), **extra,
    }


async def results(campaign: Campaign) -> list[dict[str, Any]]:
    entries = await campaign.bus.redis.xrange(campaign.bus.stream_key(RESULTS))
    return [decode(fields[MESSAGE_FIELD], "result") for _, fields in entries]


def grammar_candidate() -> tuple[str, str]:
    child, description = apply_program(BASELINE, PROGRAM)
    return child, description


def edit_line(old: str, new: str, source: str = BASELINE) -> str:
    assert old in source
    return source.replace(old, new, 1)


def unified(old: str, new: str, a: str = "a/train.py", b: str = "b/train.py", n: int = 3) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), a, b, n=n))


# -- the good path ---------------------------------------------------------------------------


async def test_grammar_diff_is_enqueued_on_gpu_as_a_msgpack_job(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    child, description = grammar_candidate()
    digest = content_hash(child)
    p = proposal(campaign, "e00001", render_diff(BASELINE, child), description=description, program=PROGRAM)

    await applier.handle(p)

    queue = gpu_queue(sync_redis)
    assert queue.count == 1
    jid = job_id(campaign.bus.campaign_id, "e00001")
    assert queue.job_ids == [jid]
    job = Job.fetch(jid, connection=sync_redis, serializer=MsgpackSerializer)
    assert job.func_name == JOB_FUNCTION
    assert job.kwargs == {}
    [payload] = job.args
    assert payload == {
        "campaign_id": campaign.bus.campaign_id, "experiment_id": "e00001", "candidate_hash": digest,
        "fingerprint": campaign.config.fingerprint, "proposal": p,
    }
    assert payload["fingerprint"], "the campaign's data fingerprint travels with the job"
    assert job.retries_left == 1  # a killed work horse gets one more try
    assert job.timeout == int(get_profile("smoke").deadline_s + RQ_TIMEOUT_SLACK_S)

    # The stored job data is msgpack (rq zlib-compresses it), not pickle, and decodes to the
    # very same payload with no Python objects involved.
    raw = zlib.decompress(sync_redis.hget(job.key, "data"))
    func_name, instance, args, kwargs = msgpack.unpackb(raw, raw=False)
    assert (func_name, instance, kwargs) == (JOB_FUNCTION, None, {})
    assert args == [payload]

    # The candidate is stored by its content hash, and the experiment is tracked as in flight.
    assert await campaign.bus.load_source(digest) == child
    inflight = await campaign.inflight()
    assert list(inflight) == ["e00001"] and inflight["e00001"]["candidate_hash"] == digest
    assert await results(campaign) == []  # nothing rejected
    assert (await campaign.counters()).get("rejected", 0) == 0


async def test_baseline_proposal_enqueues_the_unmodified_script(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    await applier.handle(proposal(campaign, "e00001", "", role="baseline", description="baseline"))
    [job] = gpu_queue(sync_redis).jobs
    assert job.args[0]["candidate_hash"] == campaign.config.baseline_hash
    assert await campaign.bus.load_source(campaign.config.baseline_hash) == BASELINE


# -- rejections ------------------------------------------------------------------------------


def _garbage() -> str:
    return "this is not a diff at all\njust some words\n"


def _malformed() -> str:
    return "--- a/train.py\n+++ b/train.py\n@@ -22,1 +22,1 @@\n garbage that fits no hunk\n+x\n-y\n"


def _other_file() -> str:
    return unified("print('a')\n", "print('b')\n", "a/README.md", "b/README.md")


def _frozen_env() -> str:
    evaluate = (TRAIN_PY.parents[1] / "frozen_env" / "evaluate.py").read_text()
    lines = evaluate.splitlines(True)
    changed = "".join(lines[:5] + ["# tampered\n"] + lines[5:])
    return unified(evaluate, changed, "a/frozen_env/evaluate.py", "b/frozen_env/evaluate.py")


def _huge() -> str:
    padding = "".join(f"# padding line {i:06d} {'x' * 60}\n" for i in range(MAX_BYTES // 70 + 10))
    return unified(BASELINE, edit_line("# --- end hyperparameters ---\n", "# --- end hyperparameters ---\n" + padding))


def _syntax_error() -> str:
    return unified(BASELINE, edit_line("DEPTH = 3  #", "DEPTH = = 3  #"))


def _imports_evaluate() -> str:
    return unified(BASELINE, edit_line(
        "from frozen_env.harness import Harness\n",
        "from frozen_env.harness import Harness\nfrom frozen_env.evaluate import evaluate_bpb\n"))


def _does_not_apply() -> str:
    return unified(edit_line("DEPTH = 3  #", "DEPTH = 5  #"), edit_line("DEPTH = 3  #", "DEPTH = 6  #"))


def _domain_changed() -> str:
    return unified(BASELINE, edit_line("DEPTH = 3  # search: int 1..8", "DEPTH = 30  # search: int 1..64"))


REJECTIONS = {
    "garbage": (_garbage, "empty_diff"),
    "malformed": (_malformed, "malformed_diff"),
    "another_file": (_other_file, "wrong_file"),
    "frozen_env": (_frozen_env, "wrong_file"),
    "huge": (_huge, "too_large"),
    "syntax_error": (_syntax_error, "syntax_error"),
    "imports_frozen_env_evaluate": (_imports_evaluate, "forbidden_import"),
    "does_not_apply": (_does_not_apply, "does_not_apply"),
    "tunable_domain_changed": (_domain_changed, "frozen_tunable_block"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_bad_diff_becomes_an_invalid_result_and_enqueues_nothing(
    case: str, campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    make_diff, code = REJECTIONS[case]
    diff = make_diff()
    if case == "huge":
        assert len(diff.encode()) > MAX_BYTES
    p = proposal(campaign, "e00001", diff)

    await applier.handle(p)

    [result] = await results(campaign)
    assert result["status"] == "invalid"
    assert result["experiment_id"] == "e00001"
    assert result["campaign_id"] == campaign.bus.campaign_id
    assert result["reason"].startswith(f"{code}: "), result["reason"]
    assert len(result["reason"]) > len(code) + 5, "the reason says what is wrong, not only a code"
    assert result["val_bpb"] is None and result["candidate_hash"] is None
    assert result["proposal"] == p  # the reward computer needs the behaviour logprob etc.
    assert gpu_queue(sync_redis).count == 0
    assert not Job.exists(job_id(campaign.bus.campaign_id, "e00001"), connection=sync_redis)
    assert await campaign.inflight() == {}
    assert (await campaign.counters())["rejected"] == 1


async def test_unknown_parent_is_invalid(campaign: Campaign, applier: Applier, sync_redis: redis.Redis) -> None:
    child, _ = grammar_candidate()
    await applier.handle(proposal(campaign, "e00001", render_diff(BASELINE, child), parent_hash="ab" * 32))
    [result] = await results(campaign)
    assert result["status"] == "invalid" and result["reason"].startswith("unknown_parent: ")
    assert gpu_queue(sync_redis).count == 0


# -- duplicates and redelivery -----------------------------------------------------------------


async def test_same_candidate_twice_is_a_duplicate_of_the_first(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    child, _ = grammar_candidate()
    await applier.handle(proposal(campaign, "e00001", render_diff(BASELINE, child)))
    # The same script reached through a differently written diff (one line of context, no a/ b/
    # prefixes) is still the same candidate: duplicates are found by content, not by diff text.
    other_diff = unified(BASELINE, child, "train.py", "train.py", n=1)
    assert other_diff != render_diff(BASELINE, child)
    await applier.handle(proposal(campaign, "e00002", other_diff))

    [result] = await results(campaign)
    assert result["experiment_id"] == "e00002"
    assert result["status"] == "duplicate"
    assert result["duplicate_of"] == "e00001"
    assert result["candidate_hash"] == content_hash(child)
    assert "e00001" in result["reason"]
    queue = gpu_queue(sync_redis)
    assert queue.job_ids == [job_id(campaign.bus.campaign_id, "e00001")]
    assert list(await campaign.inflight()) == ["e00001"]


async def test_redelivered_proposal_is_enqueued_once(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    child, _ = grammar_candidate()
    p = proposal(campaign, "e00001", render_diff(BASELINE, child))
    await applier.handle(p)
    await applier.handle(p)  # at-least-once delivery: the same entry again
    await Applier(campaign, sync_redis).handle(p)  # or another applier copy got it

    assert gpu_queue(sync_redis).count == 1
    assert await results(campaign) == []  # and it is not mistaken for its own duplicate


async def test_redelivery_after_the_hash_claim_but_before_enqueue_still_enqueues(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    # An applier that died between claiming the candidate's hash and enqueueing the job.
    child, _ = grammar_candidate()
    assert await campaign.bus.claim_hash(content_hash(child), "e00001") is None
    await applier.handle(proposal(campaign, "e00001", render_diff(BASELINE, child)))
    assert gpu_queue(sync_redis).count == 1
    assert await results(campaign) == []


# -- the consumer loop: poison entries are dead-lettered, the stream goes on -----------------------


async def test_undecodable_and_wrong_schema_entries_are_dead_lettered_and_the_next_is_handled(
    campaign: Campaign, applier: Applier, sync_redis: redis.Redis
) -> None:
    bus = campaign.bus
    key = bus.stream_key(PROPOSALS)
    child, _ = grammar_candidate()
    good = proposal(campaign, "e00003", render_diff(BASELINE, child))
    await bus.redis.xadd(key, {MESSAGE_FIELD: b"\xc1\xc1 not msgpack"})
    await bus.redis.xadd(key, {MESSAGE_FIELD: msgpack.packb({**good, "experiment_id": "e00001", "v": 99,
                                                            "kind": "proposal"})})
    await bus.redis.xadd(key, {b"other": b"no message field"})
    await bus.publish(PROPOSALS, "proposal", good)

    with anyio.fail_after(20):
        handled = await run_consumer(bus, PROPOSALS, GROUP, "test-applier", applier.handle,
                                     expect_kind="proposal", block_ms=100, max_messages=1)

    assert handled == 1
    assert gpu_queue(sync_redis).job_ids == [job_id(bus.campaign_id, "e00003")]
    dead = await bus.read_dead(PROPOSALS)
    assert len(dead) == 3
    reasons = [d.reason for d in dead]
    assert "undecodable" in reasons[0]
    assert "schema version 99" in reasons[1]
    assert "no b'm' field" in reasons[2]
    assert all(d.group == GROUP for d in dead)
    assert dead[0].raw == b"\xc1\xc1 not msgpack"  # kept as it was, for inspection
    # Everything was acknowledged: nothing waits to be redelivered to the applier group.
    assert (await bus.redis.xpending(key, GROUP))["pending"] == 0
    assert await results(campaign) == []
