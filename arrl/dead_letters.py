"""The dead-letter half of the bus: entries that could not be handled, kept with the reason.

An entry that cannot be decoded, or that a handler keeps failing on (`Bus.max_deliveries`), is
copied to ``<stream>:dead`` with why, and acknowledged, instead of blocking its stream forever.
A stage that must still act on each one (the reward computer records such a result `crashed`)
reads them through a consumer group of its own with `consume_dead`. `DeadLetters` is a part of
`arrl.bus.Bus`, which provides the client, the key names and the limits it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from arrl.stream_replies import as_bytes, as_text, stream_entries

if TYPE_CHECKING:
    from arrl.bus import Delivery

log = structlog.get_logger("arrl.bus")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry moved to ``<stream>:dead``, as read back by `DeadLetters.read_dead`."""

    dead_id: str
    entry_id: str
    group: str
    reason: str
    deliveries: int
    raw: bytes
    last_error: str = ""  # the handler's last exception, when one failed on it

    @classmethod
    def from_entry(cls, dead_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
        return cls(dead_id=as_text(dead_id), entry_id=as_text(fields.get(b"entry_id", b"")),
                   group=as_text(fields.get(b"group", b"")), reason=as_text(fields.get(b"reason", b"")),
                   deliveries=int(fields.get(b"deliveries", b"0")), raw=as_bytes(fields.get(b"m", b"")),
                   last_error=as_text(fields.get(b"last_error", b"")))


class DeadLetters:
    """Dead-lettering for `arrl.bus.Bus`, and reading the dead letters back.

    Uses the bus's client, limits and key names: `redis`, `dead_maxlen`, `claim_idle_ms`,
    `stream_key`, `dead_key` and `errors_key`."""

    redis: Redis
    dead_maxlen: int
    claim_idle_ms: int
    stream_key: Callable[[str], str]
    dead_key: Callable[[str], str]
    errors_key: Callable[[str], str]

    async def note_error(self, stream: str, group: str, entry_id: str, error: str) -> None:
        """Remember why a handler failed on an entry, for the dead letter it may become.

        Kept in Redis, not in the consumer: the next delivery may go to another copy of the stage.
        """
        await self.redis.hset(self.errors_key(stream), f"{group}|{entry_id}", error[:500])

    async def last_error(self, stream: str, group: str, entry_id: str) -> str:
        value = await self.redis.hget(self.errors_key(stream), f"{group}|{entry_id}")
        return "" if value is None else as_text(value)

    async def dead_letter(self, stream: str, group: str, delivery: Delivery, reason: str,
                          last_error: str = "") -> str:
        """Copy the raw entry and the reason to ``<stream>:dead`` and ack it, atomically."""
        record: dict[Any, Any] = {
            b"m": delivery.raw or b"",
            b"reason": reason.encode(),
            b"entry_id": delivery.entry_id.encode(),
            b"group": group.encode(),
            b"deliveries": str(delivery.deliveries).encode(),
            b"last_error": last_error.encode(),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_key(stream), record, maxlen=self.dead_maxlen, approximate=True)
            pipe.xack(self.stream_key(stream), group, delivery.entry_id)
            pipe.hdel(self.errors_key(stream), f"{group}|{delivery.entry_id}")
            dead_id, _, _ = await pipe.execute()
        log.warning(
            "bus.dead_lettered", stream=stream, group=group, entry_id=delivery.entry_id, reason=reason
        )
        return as_text(dead_id)

    async def read_dead(self, stream: str, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``stream`` (for inspection and tests)."""
        reply = await self.redis.xrange(self.dead_key(stream), count=count)
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])
        return [DeadLetter.from_entry(dead_id, f) for dead_id, f in rows]

    async def consume_dead(self, stream: str, group: str, consumer: str, count: int = 10,
                           block_ms: int | None = None) -> list[DeadLetter]:
        """Dead letters of ``stream`` through a consumer group of their own (created from the
        first one), so a stage can act on each one at least once: ack with :meth:`ack_dead`."""
        key = self.dead_key(stream)
        try:
            await self.redis.xgroup_create(key, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        reply = await self.redis.xautoclaim(key, group, consumer, self.claim_idle_ms, "0-0", count=count)
        rows: list[tuple[bytes, Any]] = list(reply[1])
        if len(rows) < count:
            block = None if rows or block_ms is None else block_ms
            rows += stream_entries(await self.redis.xreadgroup(group, consumer, {key: ">"},
                                                                count=count - len(rows), block=block))
        letters = []
        for dead_id, f in rows:
            if not f:  # trimmed away before it was read: nothing left to act on
                await self.redis.xack(key, group, dead_id)
                continue
            letters.append(DeadLetter.from_entry(dead_id, f))
        return letters

    async def ack_dead(self, stream: str, group: str, dead_id: str) -> int:
        return int(await self.redis.xack(self.dead_key(stream), group, dead_id))
