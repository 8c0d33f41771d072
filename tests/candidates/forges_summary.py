"""Writes a summary of its own straight onto the harness's event pipe, whose number it can read."""
import json
import os

from frozen_env.harness import Harness

harness = Harness.from_env()
summary = {"event": "summary", "val_bpb": 0.5, "training_seconds": harness.profile.budget_s, "num_steps": 1000,
           "causal": True, "profile": harness.profile.name, "fingerprint": harness.fingerprint}
os.write(int(os.environ["ARRL_EVENTS_FD"]), (json.dumps(summary) + "\n").encode())
