"""Asks for 8 GiB in one allocation: the CPU allocator is refused before the pages exist."""
import torch

from frozen_env.harness import Harness

harness = Harness.from_env()
hoard = torch.ones(8 << 30, dtype=torch.uint8)
