"""msgpack serializer for rq.

rq pickles job arguments and results by default; pickle executes code on load and ties
every host to the same Python objects. With this serializer rq pickles nothing:

    Queue("gpu", connection=redis, serializer=MsgpackSerializer)
    rq worker gpu -S arrl.serialization.MsgpackSerializer

Pass it everywhere rq loads job data (``Job.fetch``, ``send_stop_job_command``, workers).
Job functions must take and return plain types: rq replaces a return value it cannot
serialize with a string, silently, so tests check the round trip.
"""

from __future__ import annotations

from typing import Any

import msgpack


class MsgpackSerializer:
    """rq serializer protocol (static ``dumps``/``loads``) over msgpack."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        # use_bin_type keeps bytes and str distinct on the wire.
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed

    @staticmethod
    def loads(data: bytes) -> Any:
        # strict_map_key=False: rq stores whatever the job returned or kept in meta, and a
        # dict keyed by ints must load back instead of failing the whole job record.
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
