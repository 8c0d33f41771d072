"""Allocates GPU memory in 8 GiB blocks until the GPU has none left (gpu profile only)."""
import torch

from frozen_env.harness import Harness

harness = Harness.from_env()
blocks = []
while True:
    blocks.append(torch.empty(8 << 30, dtype=torch.uint8, device=harness.device))
