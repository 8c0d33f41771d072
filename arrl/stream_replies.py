"""Narrowing redis-py's replies for the bus and its dead letters.

redis-py annotates replies as ``bytes | str | ...`` whatever `decode_responses` says; the bus
always runs with `decode_responses=False`, so bytes is the norm and these make it so.
"""

from __future__ import annotations

from typing import Any


def as_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def stream_entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """Flatten an XREAD/XREADGROUP reply for a single stream (RESP2 list or RESP3 map)."""
    if not response:
        return []
    per_stream = response.values() if isinstance(response, dict) else (item[1] for item in response)
    entries: list[tuple[bytes, dict[bytes, bytes] | None]] = []
    for rows in per_stream:
        for entry in rows:
            entry_id, fields = entry[0], entry[1]
            if isinstance(fields, list):  # RESP3 can return the field list unpaired
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            entries.append((entry_id, fields))
    return entries
