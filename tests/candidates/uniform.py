"""A model that predicts every byte with equal probability: val_bpb must be exactly 8."""
import torch

from frozen_env.harness import Harness


class Uniform(torch.nn.Module):
    def forward(self, idx):
        return torch.zeros(*idx.shape, 256)


harness = Harness.from_env()
for step in range(harness.profile.warmup_steps + 1):
    harness.report(step, 5.545, tokens=1)
harness.finish(Uniform())
