"""Writes 2 GiB to stdout and stderr as fast as it can (long lines, one runaway line without a
newline, short lines), then trains and finishes honestly: only its log may suffer."""
import os
import sys

import torch

from frozen_env.harness import Harness

harness = Harness.from_env()
block = (b"x" * 1023 + b"\n") * 1024  # 1 MiB of 1 KiB lines
runaway = b"y" * (1 << 20)  # 1 MiB without a newline
for i in range(1536):
    os.write(1 if i % 2 else 2, block)
for _ in range(512):
    os.write(1, runaway)
os.write(1, b"\n")
sys.stdout.write("short line\n" * 100_000)
sys.stdout.flush()
for step in range(harness.profile.warmup_steps + 1):
    harness.report(step, 5.545, tokens=1)


class Uniform(torch.nn.Module):
    def forward(self, idx):
        return torch.zeros(*idx.shape, 256)


harness.finish(Uniform())
