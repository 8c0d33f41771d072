import torch

from frozen_env.harness import Harness

harness = Harness.from_env()
model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
for step, (x, y) in enumerate(harness.train_batches(4)):
    loss = torch.nn.functional.cross_entropy(model(x).view(-1, 256), y.view(-1))
    harness.report(step, loss.item(), tokens=x.numel())
    if step == 5:
        raise ZeroDivisionError("deliberate failure in the middle of training")
