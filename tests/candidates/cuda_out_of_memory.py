"""Dies of torch's own out-of-memory exception, as a GPU that runs out raises it
(torch.cuda.OutOfMemoryError is torch.OutOfMemoryError, constructible without a GPU)."""
import torch

from frozen_env.harness import Harness

harness = Harness.from_env()
for step in range(3):
    harness.report(step, 5.5, tokens=1)
raise torch.cuda.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 64.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
    "of which 3.12 GiB is free.")
