"""Warm trainers: prepared during one experiment, adopted by the next, never left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import anyio
from envfixtures import CANDIDATES, TRAIN_PY, prepared_data  # noqa: F401

from frozen_env.constants import get_profile
from frozen_env.runner import RunControl, WarmSlot, run_candidate
from frozen_env.warm import adopt, spawn_warm, warm_key

SMOKE = get_profile("smoke")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def warm_pids(key: str) -> set[int]:
    """The warm trainers waiting at `key` (their command line names it)."""
    out = subprocess.run(["pgrep", "-f", key.lstrip("\0")], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()} - {os.getpid()}


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def run(script, workdir, slot: WarmSlot, **kwargs):
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(script, workdir / "train.py")
    return anyio.run(lambda: run_candidate(workdir / "train.py", SMOKE, workdir, warm=slot, **kwargs))


def test_the_next_experiment_adopts_the_prepared_trainer(prepared_data, tmp_path):  # noqa: F811
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    slot = WarmSlot(key, os.getpid())
    first = run(TRAIN_PY, tmp_path / "one", slot)
    assert first["status"] == "ok" and first["trainer"] == "cold"
    # The next trainer was started during the first run; it listens once torch, the data and
    # one warm-up step are ready.
    assert wait_until(lambda: bool(warm_pids(key)), 10)
    [prepared] = warm_pids(key)
    assert wait_until(lambda: ready_without_adopting(prepared), 60)
    second = run(TRAIN_PY, tmp_path / "two", WarmSlot(key, os.getpid(), prepare_next=False))
    assert second["status"] == "ok", second.get("traceback")
    assert second["trainer"] == "warm"
    assert second["startup_seconds"] < 0.5  # torch and the data were ready before the job came
    assert second["val_bpb"] < 6.0
    assert wait_until(lambda: not warm_pids(key), 10), "a warm trainer was left behind"


def test_a_warm_trainer_that_crashes_is_recorded_with_its_traceback(prepared_data, tmp_path):  # noqa: F811
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    env = {**os.environ, "ARRL_PROFILE": "smoke", "OMP_WAIT_POLICY": "PASSIVE"}
    pid = spawn_warm(key, os.getpid(), env)
    assert wait_until(lambda: ready_without_adopting(pid), 60)
    result = run(CANDIDATES / "raises_mid_training.py", tmp_path / "x", WarmSlot(key, os.getpid(), prepare_next=False))
    assert result["trainer"] == "warm"
    assert result["status"] == "crashed"
    assert "ZeroDivisionError" in result["reason"]
    assert result["exit_code"] == 1  # from the trainer's own last event: it is not our child
    assert wait_until(lambda: not alive(pid), 10)


def test_an_abort_stops_an_adopted_trainer(prepared_data, tmp_path):  # noqa: F811
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    env = {**os.environ, "ARRL_PROFILE": "smoke", "OMP_WAIT_POLICY": "PASSIVE"}
    pid = spawn_warm(key, os.getpid(), env)
    assert wait_until(lambda: ready_without_adopting(pid), 60)
    control = RunControl()

    async def on_event(event):
        if event["event"] == "train.step" and event["step"] >= 3:
            control.abort("test abort")

    result = run(TRAIN_PY, tmp_path / "a", WarmSlot(key, os.getpid(), prepare_next=False),
                 on_event=on_event, control=control)
    assert result["trainer"] == "warm" and result["status"] == "aborted"
    assert result["abort_latency_s"] < 1.0
    assert wait_until(lambda: not alive(pid), 5)


def test_a_warm_trainer_exits_when_its_worker_dies(prepared_data, tmp_path):  # noqa: F811
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    pid = spawn_warm(key, owner.pid, {**os.environ, "ARRL_PROFILE": "smoke"})
    assert wait_until(lambda: alive(pid), 5)
    owner.kill()
    owner.wait()
    assert wait_until(lambda: not alive(pid), 15), "the warm trainer outlived its worker"
    read_end, write_end = os.pipe()
    assert adopt(key, TRAIN_PY, tmp_path, {}, write_end) is None  # nobody to adopt: the caller starts cold
    os.close(read_end)
    os.close(write_end)


def ready_without_adopting(pid: int) -> bool:
    """The trainer listens once its socket shows in /proc/net/unix; looking does not adopt it."""
    if not alive(pid):
        return False
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return False
    with open("/proc/net/unix") as f:
        # Columns: Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
        return any(len(cols) >= 7 and cols[6] in inodes and cols[3] == "00010000"
                   for cols in (line.split() for line in list(f)[1:]))
