"""The campaign's message bus: Redis streams, versioned blobs and small shared state.

Stages never see a raw Redis client; they get a :class:`Bus` bound to one campaign, so a
unit test can drive a stage against a real server with a fresh campaign id and nothing
else. All keys live under ``arrl:<campaign>:``.

Delivery between stages is at-least-once: an entry is acknowledged only after the handler
returned, entries left pending by a crashed or failing consumer are re-claimed with
XAUTOCLAIM once idle, and an entry that keeps failing (or cannot be decoded at all) is
moved to ``<stream>:dead`` instead of blocking the stream forever (`arrl.dead_letters`).
Handlers must therefore be idempotent by experiment id.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import anyio
import msgpack
import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from arrl.dead_letters import DeadLetters
from arrl.messages import MessageError, decode, encode
from arrl.stream_replies import as_bytes, as_text, stream_entries

log = structlog.get_logger("arrl.bus")

MESSAGE_FIELD: Final[bytes] = b"m"
"""The one stream-entry field that holds the msgpack message."""

REDIS_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
"""What Redis being briefly unreachable (a restart, a network blip) raises: wait and try again."""


class Backoff:
    """Pauses between tries while Redis is unreachable: `first_s`, doubling up to `cap_s`."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.first_s, self.cap_s, self.delay_s = first_s, cap_s, first_s

    async def pause(self) -> None:
        await anyio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.cap_s)

    def reset(self) -> None:
        self.delay_s = self.first_s

_CAS_INCUMBENT: Final[str] = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', current + 1, 'data', ARGV[2])
return current + 1
"""

# One hash holds version and blob together, so a reader's HMGET can never pair a new
# version with an old blob (two separate keys could be read between INCR and SET).
_PUT_VERSIONED: Final[str] = """
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'blob', ARGV[1])
return version
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to a consumer.

    ``message`` is the decoded message, or None when ``error`` says why it is unusable.
    ``raw`` is the stored field as it was (kept for dead-lettering). ``deliveries`` counts
    how often the group handed this entry out, this time included.
    """

    stream: str
    entry_id: str
    message: dict[str, Any] | None
    error: MessageError | None
    deliveries: int
    raw: bytes | None


class Bus(DeadLetters):
    """Redis access for one campaign; see the module docstring for delivery guarantees."""

    def __init__(
        self,
        redis: Redis,
        campaign_id: str,
        *,
        maxlen: int = 100_000,
        events_maxlen: int = 10_000,
        control_maxlen: int = 1_000,
        dead_maxlen: int = 10_000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        owns_client: bool = False,
    ) -> None:
        if not campaign_id or ":" in campaign_id:
            raise ValueError(f"campaign id must be non-empty and contain no ':' (got {campaign_id!r})")
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            # Messages are msgpack bytes; a decoding client would corrupt them.
            raise ValueError("Bus needs a Redis client with decode_responses=False")
        self.redis = redis
        self.campaign_id = campaign_id
        self.maxlen = maxlen
        self.events_maxlen = events_maxlen
        self.control_maxlen = control_maxlen
        self.dead_maxlen = dead_maxlen
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self._owns_client = owns_client
        self._prefix = f"arrl:{campaign_id}"
        # XAUTOCLAIM is a cursor scan; remembering the cursor per (stream, group) means a
        # long list of busy (not yet idle) pending entries cannot starve the ones after it.
        self._claim_cursor: dict[tuple[str, str], bytes | str] = {}
        self._cas_incumbent = redis.register_script(_CAS_INCUMBENT)
        self._put_versioned = redis.register_script(_PUT_VERSIONED)

    @classmethod
    def from_url(
        cls, url: str, campaign_id: str, *, socket_timeout: float = 30.0, retries: int = 3, **options: Any
    ) -> Bus:
        """Open a client for ``url``; keep every ``block_ms`` well below ``socket_timeout``.

        redis-py's default socket timeout (5 s) would cut a longer blocking read short, and
        ``Redis.from_url`` retries nothing by default, so the first command after a server
        restart would fail on its stale pooled connection. A retried write whose reply was
        lost may apply twice; delivery is at-least-once anyway.
        """
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries)
        client = Redis.from_url(url, decode_responses=False, socket_timeout=socket_timeout, retry=retry)
        return cls(client, campaign_id, owns_client=True, **options)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- key names -----------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """``arrl:<campaign>:<part>:<part>...``: every key this campaign uses."""
        return ":".join((self._prefix, *parts))

    def stream_key(self, stream: str) -> str:
        return self.key(stream)

    def dead_key(self, stream: str) -> str:
        return self.key(stream, "dead")

    def errors_key(self, stream: str) -> str:
        """A hash of the last handler error per pending entry (``<group>|<entry id>``)."""
        return self.key(stream, "errors")

    def events_key(self, exp_id: str) -> str:
        return self.key("exp", exp_id, "events")

    def control_key(self, exp_id: str) -> str:
        return self.key("exp", exp_id, "control")

    def lease_key(self, exp_id: str) -> str:
        """Kept alive by the job running the experiment; gone soon after its process dies."""
        return self.key("exp", exp_id, "lease")

    # -- stage-to-stage streams ----------------------------------------------------------

    def _with_campaign(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        message = dict(payload)
        campaign = message.setdefault("campaign_id", self.campaign_id)
        if campaign != self.campaign_id:
            raise MessageError(f"message for campaign {campaign!r} published on bus of {self.campaign_id!r}")
        return message

    async def _append(self, key: str, kind: str, payload: Mapping[str, Any], maxlen: int) -> str:
        # Approximate MAXLEN trims whole radix-tree nodes: far cheaper than an exact cap.
        data = encode(kind, self._with_campaign(payload))
        return as_text(await self.redis.xadd(key, {MESSAGE_FIELD: data}, maxlen=maxlen, approximate=True))

    async def publish(self, stream: str, kind: str, payload: Mapping[str, Any]) -> str:
        """Append one message (campaign id filled in) to ``stream``; returns the entry id."""
        return await self._append(self.stream_key(stream), kind, payload, self.maxlen)

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create the group (and stream) if missing.

        Starting at "0" means a stage started after its producer still sees what the
        producer already published.
        """
        try:
            await self.redis.xgroup_create(self.stream_key(stream), group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _delivery(
        self,
        stream: str,
        entry_id: bytes,
        fields: dict[bytes, bytes] | None,
        count: int,
        expect_kind: str | None,
    ) -> Delivery:
        raw = None if fields is None else fields.get(MESSAGE_FIELD)
        message: dict[str, Any] | None = None
        error: MessageError | None = None
        if fields is None:
            error = MessageError("entry was deleted from the stream (trimmed) before it was handled")
        elif raw is None:
            error = MessageError(f"entry has no {MESSAGE_FIELD!r} field (fields: {sorted(fields)})")
        else:
            try:
                message = decode(raw, expect_kind)
            except MessageError as exc:
                error = exc
        return Delivery(stream, as_text(entry_id), message, error, count, raw)

    async def _delivery_counts(
        self, key: str, group: str, consumer: str, ids: list[bytes]
    ) -> dict[bytes, int]:
        # XAUTOCLAIM does not report delivery counts; XPENDING per id does, in one round trip.
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1, consumername=consumer)
            replies = await pipe.execute()
        return {row["message_id"]: int(row["times_delivered"]) for reply in replies for row in reply}

    async def _claim(self, stream: str, group: str, consumer: str, count: int) -> list[tuple[bytes, Any]]:
        key = self.stream_key(stream)
        cursor = self._claim_cursor.get((key, group), "0-0")
        reply = await self.redis.xautoclaim(key, group, consumer, self.claim_idle_ms, cursor, count=count)
        self._claim_cursor[(key, group)] = reply[0]
        if len(reply) > 2 and reply[2]:
            # Redis 7 drops trimmed entries from the pending list itself; they are lost.
            log.warning(
                "bus.pending_trimmed", stream=stream, group=group, entry_ids=[as_text(i) for i in reply[2]]
            )
        return list(reply[1])

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int = 10,
        block_ms: int | None = None,
        *,
        expect_kind: str | None = None,
        auto_dead_letter: bool = True,
    ) -> list[Delivery]:
        """Claim idle pending entries, then read new ones, up to ``count`` in all.

        With ``auto_dead_letter`` (the default) undecodable entries and entries handed out
        more than ``max_deliveries`` times are dead-lettered here and not returned, so
        every returned delivery has a valid message. ``block_ms=None`` does not block; the
        read never blocks when claimed entries are already waiting.
        """
        key = self.stream_key(stream)
        try:
            claimed = await self._claim(stream, group, consumer, count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group vanished (a server restarted without persistence): recreate it.
            await self.ensure_group(stream, group)
            claimed = await self._claim(stream, group, consumer, count)
        counts = await self._delivery_counts(key, group, consumer, [i for i, _ in claimed]) if claimed else {}
        deliveries = [self._delivery(stream, i, f, counts.get(i, 1), expect_kind) for i, f in claimed]
        if len(deliveries) < count:
            block = None if deliveries or block_ms is None else block_ms
            reply = await self.redis.xreadgroup(
                group, consumer, {key: ">"}, count=count - len(deliveries), block=block
            )
            deliveries += [self._delivery(stream, i, f, 1, expect_kind) for i, f in stream_entries(reply)]
        if not auto_dead_letter:
            return deliveries
        usable = []
        for delivery in deliveries:
            if delivery.error is not None:
                await self.dead_letter(stream, group, delivery, str(delivery.error))
            elif delivery.deliveries > self.max_deliveries:
                last_error = await self.last_error(stream, group, delivery.entry_id)
                reason = f"delivered {delivery.deliveries} times (max_deliveries={self.max_deliveries})"
                if last_error:
                    reason += f"; last error: {last_error}"
                await self.dead_letter(stream, group, delivery, reason, last_error=last_error)
            else:
                usable.append(delivery)
        return usable

    async def ack(self, stream: str, group: str, entry_id: str) -> int:
        """Acknowledge one entry (after its side effect happened); returns 1 if it was pending."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream_key(stream), group, entry_id)
            pipe.hdel(self.errors_key(stream), f"{group}|{entry_id}")
            acked, _ = await pipe.execute()
        return int(acked)

    # -- per-experiment loss events and control --------------------------------------------

    async def publish_event(self, exp_id: str, event: Mapping[str, Any]) -> str:
        """Append one loss event (a plain dict) to the experiment's event stream."""
        payload = {"experiment_id": exp_id, "event": dict(event)}
        return await self._append(self.events_key(exp_id), "loss_event", payload, self.events_maxlen)

    async def _read_after(
        self, key: str, kind: str, last_id: str, block_ms: int | None, count: int
    ) -> list[tuple[str, dict[str, Any]]]:
        reply = await self.redis.xread({key: last_id}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, Any]]] = []
        for entry_id, fields in stream_entries(reply):
            try:
                out.append((as_text(entry_id), decode((fields or {}).get(MESSAGE_FIELD, b""), kind)))
            except MessageError as exc:
                # A plain reader has no group to dead-letter into; one bad entry must not
                # stop a live tail, so it is logged and skipped.
                log.warning("bus.bad_entry_skipped", key=key, entry_id=as_text(entry_id), error=str(exc))
        return out

    async def read_events(
        self, exp_id: str, last_id: str = "0", block_ms: int | None = None, count: int = 1_000
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after ``last_id`` as ``(entry_id, event)``; pass the last id back to follow."""
        rows = await self._read_after(self.events_key(exp_id), "loss_event", last_id, block_ms, count)
        return [(entry_id, message["event"]) for entry_id, message in rows]

    async def send_control(self, exp_id: str, command: str, reason: str) -> str:
        """Durably append a command (e.g. "abort") for one experiment; returns the entry id."""
        payload = {"experiment_id": exp_id, "command": command, "reason": reason, "sent_at": time.time()}
        return await self._append(self.control_key(exp_id), "control", payload, self.control_maxlen)

    async def read_control(
        self, exp_id: str, last_id: str = "0", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        """Control messages after ``last_id``; reading from "0" sees commands sent before start."""
        return await self._read_after(self.control_key(exp_id), "control", last_id, block_ms, count)

    async def expire_experiment(self, exp_id: str, ttl_s: int) -> None:
        """Let a finished experiment's event and control streams expire after ``ttl_s``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(self.events_key(exp_id), ttl_s)
            pipe.expire(self.control_key(exp_id), ttl_s)
            await pipe.execute()

    # -- versioned blobs and the incumbent -------------------------------------------------

    async def put_versioned(self, name: str, blob: bytes) -> int:
        """Store ``blob`` as the next version of ``name``; returns the new version (1, 2, ...)."""
        return int(await self._put_versioned(keys=[self.key("blob", name)], args=[blob]))

    async def get_versioned(self, name: str) -> tuple[int, bytes] | None:
        """The current ``(version, blob)`` of ``name``, read atomically, or None."""
        version, blob = await self.redis.hmget(self.key("blob", name), ["version", "blob"])
        if version is None or blob is None:
            return None
        return int(version), as_bytes(blob)

    async def get_version(self, name: str) -> int:
        """The current version of ``name`` (0 if never stored): cheap to poll."""
        version = await self.redis.hget(self.key("blob", name), "version")
        return 0 if version is None else int(version)

    async def get_incumbent(self) -> dict[str, Any] | None:
        """The best script so far with its ``version``, or None before the first one."""
        version, data = await self.redis.hmget(self.key("incumbent"), ["version", "data"])
        if version is None or data is None:
            return None
        incumbent: dict[str, Any] = msgpack.unpackb(data, raw=False)
        incumbent["version"] = int(version)
        return incumbent

    async def cas_incumbent(self, expected_version: int, new: Mapping[str, Any]) -> bool:
        """Replace the incumbent only if its version is still ``expected_version`` (0: none yet).

        The loser of a race re-reads with :meth:`get_incumbent` and decides again; the
        winner's incumbent gets version ``expected_version + 1``.
        """
        missing = [name for name in ("hash", "val_bpb", "experiment_id") if name not in new]
        if missing:
            raise ValueError(f"incumbent lacks field(s): {', '.join(missing)}")
        data = msgpack.packb({k: v for k, v in new.items() if k != "version"}, use_bin_type=True)
        result = await self._cas_incumbent(keys=[self.key("incumbent")], args=[int(expected_version), data])
        return int(result) > 0

    # -- small shared state ------------------------------------------------------------------

    async def put_obj(self, key: str, obj: Any) -> None:
        """Store a plain object (e.g. the campaign config) as msgpack under ``obj:<key>``."""
        await self.redis.set(self.key("obj", key), msgpack.packb(obj, use_bin_type=True))

    async def get_obj(self, key: str, default: Any = None) -> Any:
        data = await self.redis.get(self.key("obj", key))
        return default if data is None else msgpack.unpackb(data, raw=False)

    async def store_source(self, content_hash: str, source: str) -> None:
        """Store a candidate script by its content hash (idempotent: same hash, same text)."""
        await self.redis.set(self.key("source", content_hash), source.encode())

    async def load_source(self, content_hash: str) -> str | None:
        data = await self.redis.get(self.key("source", content_hash))
        return None if data is None else as_text(data)

    async def claim_hash(self, content_hash: str, exp_id: str) -> str | None:
        """Claim a script hash for ``exp_id``; returns the earlier claimant, else None.

        Claiming again with the same experiment id returns None, so a redelivered proposal
        is not mistaken for its own duplicate. SET NX GET (Redis >= 7.0) is one atomic step.
        """
        reply = await self.redis.set(self.key("claim", content_hash), exp_id, nx=True, get=True)
        earlier = cast(bytes | None, reply)
        if earlier is None or as_text(earlier) == exp_id:
            return None
        return as_text(earlier)
