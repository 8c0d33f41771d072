"""Leaves processes behind in three ways, then exits without finishing:
a child in a session of its own, a double-forked daemon, and a child started with an empty
environment that moves to a session of its own."""
import os
import subprocess
import sys
import time

from frozen_env.harness import Harness

harness = Harness.from_env()
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
own_session = subprocess.Popen(sleeper, start_new_session=True)
print(f"ESCAPED {own_session.pid}", flush=True)

read_end, write_end = os.pipe()
if os.fork() == 0:  # the classic daemon: fork, setsid, fork again, the middle one exits
    os.setsid()
    if os.fork() == 0:
        os.write(write_end, f"{os.getpid()}\n".encode())
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        time.sleep(600)
    os._exit(0)
daemon = int(os.read(read_end, 64).split()[0])
print(f"ESCAPED {daemon}", flush=True)

clean = subprocess.Popen(sleeper, env={}, start_new_session=True)
print(f"ESCAPED {clean.pid}", flush=True)
time.sleep(1.0)  # long enough to be seen in the tree once
raise SystemExit(0)
