"""The bus against a real redis-server: delivery guarantees, dead letters, shared state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgpack
import pytest
import redis.asyncio
from structlog.testing import capture_logs

from arrl.bus import Bus
from arrl.consumer import run_consumer
from arrl.messages import SCHEMA_VERSION, MessageError, decode, encode, required_fields
from pipeline.redis_server import RedisServer

pytestmark = pytest.mark.anyio

CAMPAIGN = "c1"


def result(exp_id: str, status: str = "ok") -> dict[str, Any]:
    return {"experiment_id": exp_id, "status": status, "val_bpb": 1.0}


@pytest.fixture
async def bus(redis_server: RedisServer) -> AsyncIterator[Bus]:
    # Short idle time so redelivery tests take a fraction of a second, not 30 s.
    async with Bus.from_url(redis_server.url, CAMPAIGN, claim_idle_ms=100) as the_bus:
        yield the_bus


async def pending_count(bus: Bus, stream: str, group: str) -> int:
    return int((await bus.redis.xpending(bus.stream_key(stream), group))["pending"])


async def test_keys_are_namespaced_by_campaign(bus: Bus) -> None:
    assert bus.stream_key("results") == "arrl:c1:results"
    assert bus.dead_key("results") == "arrl:c1:results:dead"
    assert bus.events_key("e1") == "arrl:c1:exp:e1:events"
    assert bus.control_key("e1") == "arrl:c1:exp:e1:control"


async def test_bus_refuses_bad_setup(redis_server: RedisServer) -> None:
    decoding = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        Bus(decoding, CAMPAIGN)
    await decoding.aclose()
    with pytest.raises(ValueError, match="campaign id"):
        Bus.from_url(redis_server.url, "a:b")


async def test_publish_consume_ack(bus: Bus) -> None:
    await bus.ensure_group("results", "reward")
    await bus.ensure_group("results", "reward")  # idempotent
    entry_id = await bus.publish("results", "result", result("e1"))
    [delivery] = await bus.consume("results", "reward", "w1", count=10)
    assert delivery.entry_id == entry_id
    assert delivery.deliveries == 1 and delivery.error is None
    assert delivery.message is not None
    assert delivery.message["campaign_id"] == CAMPAIGN  # filled in by publish
    assert delivery.message["v"] == SCHEMA_VERSION and delivery.message["kind"] == "result"
    assert await pending_count(bus, "results", "reward") == 1
    assert await bus.ack("results", "reward", entry_id) == 1
    assert await pending_count(bus, "results", "reward") == 0
    assert await bus.consume("results", "reward", "w1", block_ms=20) == []


async def test_publish_refuses_other_campaign_and_bad_payload(bus: Bus) -> None:
    with pytest.raises(MessageError, match="campaign"):
        await bus.publish("results", "result", {**result("e1"), "campaign_id": "other"})
    with pytest.raises(MessageError, match="status"):
        await bus.publish("results", "result", {"experiment_id": "e1"})


async def test_group_created_before_publish_sees_everything_and_missing_group_is_recreated(bus: Bus) -> None:
    await bus.publish("results", "result", result("early"))
    # No ensure_group: consume recreates a missing group (e.g. after a restart without AOF).
    [delivery] = await bus.consume("results", "late-stage", "w1")
    assert delivery.message is not None and delivery.message["experiment_id"] == "early"


async def test_two_consumers_never_share_an_entry(bus: Bus) -> None:
    await bus.ensure_group("results", "reward")
    for i in range(10):
        await bus.publish("results", "result", result(f"e{i}"))
    first = await bus.consume("results", "reward", "a", count=4)
    second = await bus.consume("results", "reward", "b", count=10)
    ids_a = {d.entry_id for d in first}
    ids_b = {d.entry_id for d in second}
    assert len(ids_a) == 4 and len(ids_b) == 6
    assert not ids_a & ids_b


async def test_failed_handler_is_redelivered_to_another_consumer(bus: Bus) -> None:
    await bus.publish("results", "result", result("e1"))
    stop_a = anyio.Event()
    seen_b: list[dict[str, Any]] = []
    pending_during_handler: list[int] = []

    async def crashing(message: dict[str, Any]) -> None:
        stop_a.set()
        raise RuntimeError("handler bug")

    async def working(message: dict[str, Any]) -> None:
        # At-least-once: the entry is still pending while the handler runs.
        pending_during_handler.append(await pending_count(bus, "results", "reward"))
        seen_b.append(message)

    with capture_logs() as logs, anyio.fail_after(5):
        assert await run_consumer(bus, "results", "reward", "a", crashing, stop=stop_a, block_ms=20) == 0
        assert await pending_count(bus, "results", "reward") == 1
        handled = await run_consumer(bus, "results", "reward", "b", working, block_ms=20, max_messages=1)
    assert handled == 1
    assert [m["experiment_id"] for m in seen_b] == ["e1"]
    assert pending_during_handler == [1]
    assert await pending_count(bus, "results", "reward") == 0  # acked after success
    failures = [entry for entry in logs if entry["event"] == "bus.handler_failed"]
    assert failures and failures[0]["consumer"] == "a" and failures[0]["experiment_id"] == "e1"


async def test_claimed_entry_reports_its_delivery_count(bus: Bus) -> None:
    await bus.ensure_group("results", "reward")
    await bus.publish("results", "result", result("e1"))
    [first] = await bus.consume("results", "reward", "a")
    assert await bus.consume("results", "reward", "b") == []  # not idle long enough yet
    await anyio.sleep(0.15)
    [again] = await bus.consume("results", "reward", "b")
    assert again.entry_id == first.entry_id and again.deliveries == 2


async def test_dead_letter_after_max_deliveries(redis_server: RedisServer) -> None:
    async with Bus.from_url(redis_server.url, CAMPAIGN, claim_idle_ms=30, max_deliveries=2) as bus:
        entry_id = await bus.publish("results", "result", result("poison"))
        calls: list[str] = []
        stop = anyio.Event()

        async def always_fails(message: dict[str, Any]) -> None:
            calls.append(message["experiment_id"])
            raise ValueError("cannot handle")

        async def watch_dead() -> None:
            while not await bus.read_dead("results"):
                await anyio.sleep(0.01)
            stop.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_dead)
                await run_consumer(bus, "results", "reward", "a", always_fails, stop=stop, block_ms=10)
        assert calls == ["poison", "poison"]  # exactly max_deliveries attempts
        [dead] = await bus.read_dead("results")
        assert dead.entry_id == entry_id and dead.group == "reward" and dead.deliveries == 3
        assert "max_deliveries=2" in dead.reason
        assert decode(dead.raw)["experiment_id"] == "poison"  # raw bytes kept intact
        assert await pending_count(bus, "results", "reward") == 0


async def test_garbage_is_dead_lettered_and_good_messages_still_flow(bus: Bus) -> None:
    await bus.ensure_group("results", "reward")
    key = bus.stream_key("results")
    future = msgpack.packb({**result("e0"), "campaign_id": CAMPAIGN, "v": 99, "kind": "result"})
    await bus.redis.xadd(key, {b"m": b"\xc1 not msgpack"})
    await bus.redis.xadd(key, {b"other": b"no message field"})
    await bus.redis.xadd(key, {b"m": future})
    await bus.publish(
        "results",
        "proposal",
        {
            "experiment_id": "e9",
            **{k: 0 for k in required_fields("proposal") if k not in ("campaign_id", "experiment_id")},
        },
    )
    await bus.publish("results", "result", result("good"))
    seen: list[str] = []

    async def handler(message: dict[str, Any]) -> None:
        seen.append(message["experiment_id"])

    with anyio.fail_after(5):
        await run_consumer(bus, "results", "reward", "a", handler, expect_kind="result", max_messages=1)
    assert seen == ["good"]
    reasons = [dead.reason for dead in await bus.read_dead("results")]
    assert len(reasons) == 4
    assert "undecodable" in reasons[0]
    assert "no b'm' field" in reasons[1]
    assert "unsupported schema version 99" in reasons[2]
    assert "expected a 'result' message, got 'proposal'" in reasons[3]
    assert (await bus.read_dead("results"))[0].raw == b"\xc1 not msgpack"
    assert await pending_count(bus, "results", "reward") == 0


async def test_control_read_from_zero_sees_abort_sent_before_start(bus: Bus) -> None:
    sent_id = await bus.send_control("e1", "abort", "forecast worse than incumbent")
    [(entry_id, message)] = await bus.read_control("e1")  # the job starts only now
    assert entry_id == sent_id
    assert message["command"] == "abort" and message["reason"] == "forecast worse than incumbent"
    assert message["experiment_id"] == "e1" and message["campaign_id"] == CAMPAIGN
    assert await bus.read_control("e1", last_id=entry_id, block_ms=20) == []
    assert await bus.read_control("other") == []

    async def send_later() -> None:
        await anyio.sleep(0.05)
        await bus.send_control("e1", "abort", "second")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_later)
            # A blocking read needs its own connection; the pool hands one out per command.
            rows = await bus.read_control("e1", last_id=entry_id, block_ms=2_000)
    assert [m["reason"] for _, m in rows] == ["second"]


async def test_loss_events_follow_and_are_capped(redis_server: RedisServer) -> None:
    async with Bus.from_url(redis_server.url, CAMPAIGN, events_maxlen=100) as bus:
        for step in range(3):
            await bus.publish_event("e1", {"step": step, "loss": 4.0 - step})
        rows = await bus.read_events("e1")
        assert [event["step"] for _, event in rows] == [0, 1, 2]
        await bus.publish_event("e1", {"step": 3, "loss": 0.5})
        [(_, event)] = await bus.read_events("e1", last_id=rows[-1][0])
        assert event == {"step": 3, "loss": 0.5}
        await bus.redis.xadd(bus.events_key("e1"), {b"m": b"junk"})  # skipped, not fatal
        assert len(await bus.read_events("e1")) == 4
        async with bus.redis.pipeline(transaction=False) as pipe:
            for step in range(1_000):
                pipe.xadd(
                    bus.events_key("e2"),
                    {
                        b"m": encode(
                            "loss_event",
                            {"campaign_id": CAMPAIGN, "experiment_id": "e2", "event": {"step": step}},
                        )
                    },
                    maxlen=bus.events_maxlen,
                    approximate=True,
                )
            await pipe.execute()
        await bus.publish_event("e2", {"step": 1_000})
        # Approximate trimming drops whole radix-tree nodes (100 entries by default).
        assert await bus.redis.xlen(bus.events_key("e2")) <= 300
        await bus.expire_experiment("e2", 60)
        assert 0 < await bus.redis.ttl(bus.events_key("e2")) <= 60


async def test_versioned_blobs(bus: Bus) -> None:
    assert await bus.get_versioned("policy") is None
    assert await bus.get_version("policy") == 0
    assert await bus.put_versioned("policy", b"w1") == 1
    assert await bus.put_versioned("policy", b"\x00w2") == 2
    assert await bus.get_versioned("policy") == (2, b"\x00w2")
    assert await bus.get_version("policy") == 2

    versions: dict[int, bytes] = {}

    async def put(i: int) -> None:
        blob = f"blob{i}".encode()
        versions[await bus.put_versioned("policy", blob)] = blob

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(put, i)
    assert sorted(versions) == list(range(3, 23))  # every writer got its own version
    assert await bus.get_versioned("policy") == (22, versions[22])  # blob matches version


async def test_incumbent_compare_and_set_under_concurrent_writers(
    bus: Bus, redis_server: RedisServer
) -> None:
    assert await bus.get_incumbent() is None
    with pytest.raises(ValueError, match="val_bpb"):
        await bus.cas_incumbent(0, {"hash": "h", "experiment_id": "e"})
    # Separate clients, as two reward computers would have.
    writers = [Bus.from_url(redis_server.url, CAMPAIGN) for _ in range(2)]
    outcomes: dict[str, bool] = {}

    async def write(writer: Bus, exp_id: str) -> None:
        new = {"hash": f"h-{exp_id}", "val_bpb": 0.9, "experiment_id": exp_id}
        outcomes[exp_id] = await writer.cas_incumbent(0, new)

    async with anyio.create_task_group() as tg:
        for writer, exp_id in zip(writers, ["e1", "e2"], strict=True):
            tg.start_soon(write, writer, exp_id)
    for writer in writers:
        await writer.aclose()
    winners = [exp_id for exp_id, won in outcomes.items() if won]
    assert len(winners) == 1
    incumbent = await bus.get_incumbent()
    assert incumbent == {"hash": f"h-{winners[0]}", "val_bpb": 0.9, "experiment_id": winners[0], "version": 1}

    assert not await bus.cas_incumbent(0, {"hash": "h3", "val_bpb": 0.8, "experiment_id": "e3"})  # stale
    assert await bus.cas_incumbent(1, {"hash": "h3", "val_bpb": 0.8, "experiment_id": "e3", "version": 99})
    assert await bus.get_incumbent() == {"hash": "h3", "val_bpb": 0.8, "experiment_id": "e3", "version": 2}

    results: list[bool] = []

    async def race(i: int) -> None:
        results.append(
            await bus.cas_incumbent(2, {"hash": f"r{i}", "val_bpb": 0.7, "experiment_id": f"r{i}"})
        )

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(race, i)
    assert results.count(True) == 1
    assert (await bus.get_incumbent() or {})["version"] == 3


async def test_claim_hash_dedup(bus: Bus) -> None:
    assert await bus.claim_hash("h1", "e1") is None
    assert await bus.claim_hash("h1", "e1") is None  # a redelivered proposal is not its own duplicate
    assert await bus.claim_hash("h1", "e2") == "e1"
    assert await bus.claim_hash("h2", "e2") is None


async def test_objects_and_sources(bus: Bus) -> None:
    assert await bus.get_obj("config") is None
    assert await bus.get_obj("config", default={}) == {}
    config = {"budget_s": 300, "profile": "h100", "seeds": [1, 2], "fp": b"\x01"}
    await bus.put_obj("config", config)
    assert await bus.get_obj("config") == config
    assert await bus.load_source("abc") is None
    source = "print('héllo ∑')\n"
    await bus.store_source("abc", source)
    assert await bus.load_source("abc") == source
    other = Bus(bus.redis, "c2")  # campaigns do not see each other's state
    assert await other.get_obj("config") is None and await other.load_source("abc") is None


async def test_pending_entries_survive_a_redis_crash_with_aof(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(appendonly=True)
    async with Bus.from_url(server.url, CAMPAIGN, claim_idle_ms=50) as bus:
        await bus.ensure_group("results", "reward")
        entry_id = await bus.publish("results", "result", result("e1"))
        [delivery] = await bus.consume("results", "reward", "a")  # taken, never acked
        await bus.put_versioned("policy", b"w")
        await anyio.to_thread.run_sync(lambda: server.restart(hard=True))
        await anyio.sleep(0.06)
        seen: list[str] = []

        async def handler(message: dict[str, Any]) -> None:
            seen.append(message["experiment_id"])

        with anyio.fail_after(5):
            await run_consumer(bus, "results", "reward", "b", handler, block_ms=20, max_messages=1)
        assert seen == ["e1"]
        assert delivery.entry_id == entry_id
        assert await bus.get_versioned("policy") == (1, b"w")


async def test_run_consumer_stops_promptly_and_rides_out_a_redis_outage(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(appendonly=True)
    async with Bus.from_url(server.url, CAMPAIGN, retries=1) as bus:
        stop = anyio.Event()
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_consumer, bus, "results", "reward", "a", _ignore)
                await anyio.sleep(0.05)
                tg.cancel_scope.cancel()  # cancellation is a clean way out, too
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: run_consumer(bus, "results", "reward", "a", _ignore, stop=stop, block_ms=20)
                )
                await anyio.sleep(0.05)
                stop.set()

        seen: list[str] = []

        async def handler(message: dict[str, Any]) -> None:
            seen.append(message["experiment_id"])

        async def outage() -> None:
            await anyio.to_thread.run_sync(server.stop)
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(server.start)
            await bus.publish("results", "result", result("after-outage"))

        with capture_logs() as logs, anyio.fail_after(8):
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                handled = await run_consumer(
                    bus, "results", "reward", "a", handler, block_ms=20, max_messages=1
                )
        assert handled == 1 and seen == ["after-outage"]
        assert any(entry["event"] == "bus.consume_failed" for entry in logs)


async def _ignore(message: dict[str, Any]) -> None:
    return None
