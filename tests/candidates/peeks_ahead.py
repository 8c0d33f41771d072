"""A 'model' that reads the byte it is asked to predict."""
import torch

from frozen_env.harness import Harness


class Cheat(torch.nn.Module):
    def forward(self, idx):
        return torch.nn.functional.one_hot(torch.roll(idx, -1, dims=1), 256).float() * 30.0


harness = Harness.from_env()
for step in range(3):
    harness.report(step, 5.5, tokens=1)
harness.finish(Cheat())
