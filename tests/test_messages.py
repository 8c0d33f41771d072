"""Wire formats: the message envelope and the rq serializer (with a real rq round trip)."""

from __future__ import annotations

import datetime as dt
import zlib
from typing import Any

import msgpack
import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from arrl.messages import MESSAGE_KINDS, SCHEMA_VERSION, MessageError, decode, encode, required_fields
from arrl.serialization import MsgpackSerializer
from pipeline.redis_server import RedisServer


def proposal(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "campaign_id": "c1",
        "experiment_id": "e1",
        "parent_hash": "abc123",
        "diff": "--- a/train.py\n+++ b/train.py\n",
        "description": "raise lr",
        "program": [3, 1, 4],
        "strategy": "policy",
        "logprob": -1.25,
        "value": 0.5,
        "policy_version": 7,
        "created_at": 1_700_000_000.5,
    }
    payload.update(overrides)
    return payload


def test_round_trip_keeps_plain_types() -> None:
    payload = proposal(extra={"blob": b"\x00\xff", "none": None, "flag": True, "nested": [1.5, "x"]})
    message = decode(encode("proposal", payload), expect_kind="proposal")
    assert message == {**payload, "v": SCHEMA_VERSION, "kind": "proposal"}
    # bytes stay bytes and str stays str (use_bin_type / raw=False).
    assert isinstance(message["extra"]["blob"], bytes)
    assert isinstance(message["diff"], str)


def test_decoded_message_can_be_reencoded() -> None:
    message = decode(encode("proposal", proposal()))
    assert decode(encode("proposal", message)) == message


def test_every_kind_requires_campaign_and_experiment() -> None:
    for kind, fields in MESSAGE_KINDS.items():
        assert fields[:2] == ("campaign_id", "experiment_id"), kind
        payload = {name: 1 for name in fields} | {"campaign_id": "c", "experiment_id": "e"}
        assert decode(encode(kind, payload), expect_kind=kind)["kind"] == kind
        for name in ("campaign_id", "experiment_id"):
            with pytest.raises(MessageError, match=name):
                encode(kind, {k: v for k, v in payload.items() if k != name})


def test_result_transition_loss_event_control_fields() -> None:
    assert required_fields("result") == ("campaign_id", "experiment_id", "status")
    assert required_fields("transition") == ("campaign_id", "experiment_id", "reward")
    assert required_fields("loss_event") == ("campaign_id", "experiment_id", "event")
    assert required_fields("control") == ("campaign_id", "experiment_id", "command")


def test_message_error_is_value_error() -> None:
    assert issubclass(MessageError, ValueError)


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"", b"\xa5ab"])
def test_garbage_bytes_refused(data: bytes) -> None:
    with pytest.raises(MessageError, match="undecodable"):
        decode(data)


def test_non_bytes_refused() -> None:
    with pytest.raises(MessageError, match="must be bytes"):
        decode("not bytes")  # type: ignore[arg-type]


def test_non_map_payload_refused() -> None:
    with pytest.raises(MessageError, match="msgpack map"):
        decode(msgpack.packb([1, 2, 3]))


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_unknown_schema_version_refused(version: object) -> None:
    data = msgpack.packb({**proposal(), "v": version, "kind": "proposal"}, use_bin_type=True)
    with pytest.raises(MessageError, match="unsupported schema version"):
        decode(data)


def test_missing_schema_version_refused() -> None:
    data = msgpack.packb({**proposal(), "kind": "proposal"}, use_bin_type=True)
    with pytest.raises(MessageError, match="no schema version"):
        decode(data)


def test_wrong_kind_refused() -> None:
    data = encode("result", {"campaign_id": "c1", "experiment_id": "e1", "status": "ok"})
    with pytest.raises(MessageError, match="expected a 'proposal' message, got 'result'"):
        decode(data, expect_kind="proposal")


def test_unknown_kind_refused_both_ways() -> None:
    with pytest.raises(MessageError, match="unknown message kind"):
        encode("gossip", {"campaign_id": "c1", "experiment_id": "e1"})
    data = msgpack.packb({"v": SCHEMA_VERSION, "kind": "gossip", "campaign_id": "c", "experiment_id": "e"})
    with pytest.raises(MessageError, match="unknown message kind"):
        decode(data)


def test_missing_required_field_refused_both_ways() -> None:
    payload = proposal()
    del payload["logprob"]
    with pytest.raises(MessageError, match="logprob"):
        encode("proposal", payload)
    data = msgpack.packb({**payload, "v": SCHEMA_VERSION, "kind": "proposal"}, use_bin_type=True)
    with pytest.raises(MessageError, match="lacks required field.*logprob"):
        decode(data)


def test_empty_or_non_str_ids_refused() -> None:
    with pytest.raises(MessageError, match="experiment_id"):
        encode("result", {"campaign_id": "c1", "experiment_id": 5, "status": "ok"})
    with pytest.raises(MessageError, match="campaign_id"):
        encode("result", {"campaign_id": "", "experiment_id": "e1", "status": "ok"})


def test_non_plain_values_refused_on_encode() -> None:
    with pytest.raises(MessageError, match="not plain msgpack data"):
        encode("proposal", proposal(created_at=dt.datetime.now(dt.UTC)))


def test_envelope_fields_cannot_be_overridden() -> None:
    with pytest.raises(MessageError, match="conflicts with envelope"):
        encode("proposal", proposal(v=2))
    with pytest.raises(MessageError, match="conflicts with envelope"):
        encode("proposal", proposal(kind="result"))


def test_serializer_round_trip() -> None:
    obj = {"a": [1, 2.5, None, True], "b": b"\x00bytes", 3: "int key"}
    assert MsgpackSerializer.loads(MsgpackSerializer.dumps(obj)) == obj
    # Tuples come back as lists: job code must not rely on tuple identity.
    assert MsgpackSerializer.loads(MsgpackSerializer.dumps((1, "x"))) == [1, "x"]


def test_rq_round_trip_with_msgpack(redis_server: RedisServer) -> None:
    connection = redis.Redis.from_url(redis_server.url)
    try:
        queue = Queue("gpu", connection=connection, serializer=MsgpackSerializer)
        payload = {"experiment_id": "e1", "blob": b"\x01\x02", "loss": [3.5, 2.25], "meta": {"ok": None}}
        job = queue.enqueue("rq_jobs.echo", payload)
        # rq stores the call (zlib-compressed) with our serializer, not pickle.
        raw = connection.hget(job.key, "data")
        assert isinstance(raw, bytes)
        stored = zlib.decompress(raw)
        assert MsgpackSerializer.loads(stored)[0] == "rq_jobs.echo"
        worker = SimpleWorker([queue], connection=connection, serializer=MsgpackSerializer)
        assert worker.work(burst=True)
        fetched = Job.fetch(job.id, connection=connection, serializer=MsgpackSerializer)
        assert fetched.get_status() == JobStatus.FINISHED
        assert fetched.return_value() == {**payload, "echoed": True}
    finally:
        connection.close()
