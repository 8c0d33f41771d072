"""Leaves a file in the user's home directory."""
from pathlib import Path

from frozen_env.harness import Harness

harness = Harness.from_env()
(Path.home() / "arrl-candidate-was-here.txt").write_text("escaped")
