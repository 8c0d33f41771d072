"""Message kinds exchanged between pipeline stages, and their wire format.

Every message on the bus is one msgpack map of plain types (dict, list, str, int, float,
bool, None, bytes) carrying a schema version ``v`` and its ``kind``. Consumers refuse what
they cannot interpret instead of guessing: a stage reading a message from a newer (or
older) schema must not act on half-understood fields, it must dead-letter it.

The wire format is deliberately not pickle: anything on the bus can be read by any host
and any language, and decoding never executes code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgpack

SCHEMA_VERSION: Final[int] = 1

# Fields every message carries: handlers are idempotent by experiment id (at-least-once
# delivery means duplicates), and the campaign id keeps shared streams unambiguous.
COMMON_FIELDS: Final[tuple[str, ...]] = ("campaign_id", "experiment_id")

# Required fields per kind. Extra fields are allowed (a producer may add information that
# an older consumer ignores); a missing required field is an error.
MESSAGE_KINDS: Final[Mapping[str, tuple[str, ...]]] = {
    "proposal": COMMON_FIELDS
    + (
        "parent_hash",
        "diff",
        "description",
        "program",
        "strategy",
        "logprob",
        "value",
        "policy_version",
        "created_at",
    ),
    "result": COMMON_FIELDS + ("status",),
    "transition": COMMON_FIELDS + ("reward",),
    "loss_event": COMMON_FIELDS + ("event",),
    "control": COMMON_FIELDS + ("command",),
    "started": COMMON_FIELDS + ("budget_s",),
}

# Keys the envelope owns; a payload may only repeat them with the same values (so a
# decoded message can be re-encoded unchanged).
_ENVELOPE_KEYS: Final[tuple[str, ...]] = ("v", "kind")


class MessageError(ValueError):
    """A message could not be encoded or decoded, or breaks the schema."""


def required_fields(kind: str) -> tuple[str, ...]:
    """The required fields of a message kind; raises MessageError for an unknown kind."""
    try:
        return MESSAGE_KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(MESSAGE_KINDS))
        raise MessageError(f"unknown message kind {kind!r} (known: {known})") from None


def validate(message: Mapping[str, Any], expect_kind: str | None = None) -> None:
    """Check envelope, kind and required fields of a decoded message (raises MessageError)."""
    if "v" not in message:
        raise MessageError("message has no schema version field 'v'")
    version = message["v"]
    # bool is an int subclass: True must not pass as version 1.
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version {version!r} (this build reads {SCHEMA_VERSION})")
    kind = message.get("kind")
    if not isinstance(kind, str):
        raise MessageError(f"message has no valid 'kind' field (got {kind!r})")
    fields = required_fields(kind)
    if expect_kind is not None and kind != expect_kind:
        raise MessageError(f"expected a {expect_kind!r} message, got {kind!r}")
    missing = [name for name in fields if name not in message]
    if missing:
        raise MessageError(f"{kind!r} message lacks required field(s): {', '.join(missing)}")
    for name in COMMON_FIELDS:
        if not isinstance(message[name], str) or not message[name]:
            raise MessageError(f"{kind!r} message field {name!r} must be a non-empty str")


def encode(kind: str, payload: Mapping[str, Any]) -> bytes:
    """Wrap ``payload`` in the envelope and pack it; validates before anything is sent.

    Validating on the producer side turns a schema mistake into an exception in the stage
    that made it, instead of a dead letter discovered later by someone else.
    """
    if not isinstance(payload, Mapping):
        raise MessageError(f"payload must be a mapping, got {type(payload).__name__}")
    for key in _ENVELOPE_KEYS:
        expected = SCHEMA_VERSION if key == "v" else kind
        if key in payload and payload[key] != expected:
            raise MessageError(f"payload field {key!r}={payload[key]!r} conflicts with envelope {expected!r}")
    message: dict[str, Any] = {**payload, "v": SCHEMA_VERSION, "kind": kind}
    validate(message)
    try:
        packed: bytes = msgpack.packb(message, use_bin_type=True)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        # msgpack refuses non-plain objects (datetime, numpy scalars, sets, ...): say which
        # message failed, so the producer can convert the value to a plain type.
        raise MessageError(f"{kind!r} payload is not plain msgpack data: {exc}") from exc


def decode(data: bytes, expect_kind: str | None = None) -> dict[str, Any]:
    """Unpack and validate one message; raises MessageError for anything unusable."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"message must be bytes, got {type(data).__name__}")
    try:
        # raw=False: str stays str, bytes stay bytes (thanks to use_bin_type on packing).
        message = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise MessageError(f"undecodable message ({len(data)} bytes): {type(exc).__name__}: {exc}") from exc
    if not isinstance(message, dict):
        raise MessageError(f"message must be a msgpack map, got {type(message).__name__}")
    validate(message, expect_kind)
    return message
