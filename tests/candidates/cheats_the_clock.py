"""Trains past its budget by cheating the harness's clock, one of three ways ($ARRL_TEST_CHEAT):

extends_budget  swaps the harness's frozen profile for one with three times the budget
slows_clock     slows the clock the harness reads, so it reports less than it trained
shadows_clock   shadows the harness's clock on its instance, so time never runs out
"""
import dataclasses
import os
import time

import torch

from frozen_env.harness import Harness

cheat = os.environ["ARRL_TEST_CHEAT"]
if cheat == "slows_clock":
    _real = time.perf_counter
    _start = _real()
    time.perf_counter = lambda: _start + (_real() - _start) / 3
harness = Harness.from_env()
if cheat == "extends_budget":
    harness.profile = dataclasses.replace(harness.profile, budget_s=harness.profile.budget_s * 3)
elif cheat == "shadows_clock":
    started = time.monotonic()
    harness.training_seconds = lambda: 0.0 if time.monotonic() - started < 2 * harness.profile.budget_s else 1e9
model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
step = 0
while not harness.time_up():
    harness.report(step, 5.5, tokens=1)
    step += 1
harness.finish(model)
