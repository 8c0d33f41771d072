"""Allocates without bound in three processes (itself and two forked children), none of them
large alone: only the memory of the whole process tree shows what it does."""
import os
import time

from frozen_env.harness import Harness

harness = Harness.from_env()
for _ in range(2):
    if os.fork() == 0:
        break
hoard = []
while True:
    hoard.append(b"\x01" * (16 << 20))  # written, so resident: 16 MiB every 20 ms per process
    time.sleep(0.02)
