"""Ignores the harness's time_up() and trains twice the budget, with an honest clock."""
import torch

from frozen_env.harness import Harness

harness = Harness.from_env()
model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
step = 0
while harness.training_seconds() < 2.5 * harness.profile.budget_s:
    harness.report(step, 5.5, tokens=1)
    step += 1
harness.finish(model)
