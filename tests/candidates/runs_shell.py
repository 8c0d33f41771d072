"""Starts a shell: how a candidate could delete files or reach the network out of the guard's sight."""
import os
import subprocess

from frozen_env.harness import Harness

harness = Harness.from_env()
try:
    os.system("echo hello from a shell")
except PermissionError:
    pass
subprocess.run(["curl", "--version"], check=False)
