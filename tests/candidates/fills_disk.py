"""Fills its working directory with many files, none of them large."""
import os

from frozen_env.harness import Harness

harness = Harness.from_env()
chunk = os.urandom(1 << 20)
for i in range(100_000):
    with open(f"dump-{i}.bin", "wb") as f:
        for _ in range(4):
            f.write(chunk)
