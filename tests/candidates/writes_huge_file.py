"""Writes one file without end (a runaway checkpoint or log), where the guard allows: the temp dir."""
import os
import tempfile

from frozen_env.harness import Harness

harness = Harness.from_env()
chunk = b"\1" * (1 << 20)
with tempfile.TemporaryDirectory() as scratch:  # removed again as the error unwinds
    with open(os.path.join(scratch, "huge.bin"), "wb") as f:
        while True:
            f.write(chunk)
