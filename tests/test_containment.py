"""Containment: a candidate's memory, its output and its processes never outgrow the run.

Real trainers under the frozen runner (smoke profile), hostile candidates from tests/candidates.
Each run's environment carries a mark of the test's own, so "nothing left behind" is checked by
scanning /proc for it, independently of the runner's token.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
import uuid
from pathlib import Path

import anyio
import pytest
from envfixtures import CANDIDATES, prepared_data  # noqa: F401
from test_warm import ready_without_adopting
from waiting import wait_until

from frozen_env import containment
from frozen_env.constants import get_profile
from frozen_env.runner import WarmSlot, run_candidate
from frozen_env.transcript import MAX_LOG_BYTES
from frozen_env.warm import spawn_warm, warm_key
from pipeline.procs import alive, processes_with

SMOKE = get_profile("smoke")
HUNG_DEADLINE_S = 8.0
MARK = "ARRL_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries the test's mark."""
    return processes_with(f"{MARK}={mark}".encode(), "environ")


def swapped_out_pages() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("pswpout "):
            return int(line.split()[1])
    return 0


def run(name: str, tmp_path: Path, **kwargs) -> tuple[dict, float, str]:
    """Run a candidate; returns its result, the wall time, and the mark its processes carry."""
    workdir = tmp_path / "exp"
    workdir.mkdir(exist_ok=True)
    shutil.copy(CANDIDATES / name, workdir / "train.py")
    mark = uuid.uuid4().hex
    started = time.monotonic()
    result = anyio.run(lambda: run_candidate(workdir / "train.py", SMOKE, workdir, env={MARK: mark}, **kwargs))
    return result, time.monotonic() - started, mark


# -- memory ---------------------------------------------------------------------------------------

def test_unbounded_allocation_across_processes_ends_at_the_cap(prepared_data, tmp_path):  # noqa: F811
    swapped = swapped_out_pages()
    result, elapsed, mark = run("allocates_without_bound.py", tmp_path, memory_cap_mb=400)
    assert result["status"] == "crashed", result
    assert result["reason"].startswith("out of memory: memory cap 400 MB exceeded (rss "), result["reason"]
    used = float(result["reason"].split("(rss ")[1].split()[0])
    # Seen within one poll of crossing it; the reason rounds to whole MB, so 400.3 reads "400".
    assert 400 <= used < 400 + 700
    assert result["memory_cap_mb"] == 400
    assert elapsed < SMOKE.deadline_s
    assert marked(mark) == []
    assert swapped_out_pages() == swapped


def test_one_huge_allocation_is_refused_and_said_to_be_out_of_memory(prepared_data, tmp_path):  # noqa: F811
    result, elapsed, mark = run("allocates_at_once.py", tmp_path, memory_cap_mb=512)
    assert result["status"] == "crashed", result
    assert result["reason"].startswith("out of memory: memory cap 512 MB exceeded ("), result["reason"]
    assert "can't allocate memory" in result["reason"]  # RLIMIT_DATA refused it: nothing was touched
    assert "Traceback" in result["traceback"]
    assert elapsed < SMOKE.deadline_s
    assert marked(mark) == []


def test_cuda_out_of_memory_is_recorded_like_the_cap(prepared_data, tmp_path):  # noqa: F811
    result, _, mark = run("cuda_out_of_memory.py", tmp_path, memory_cap_mb=0)
    assert result["status"] == "crashed", result
    assert result["reason"].startswith("out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 GiB")
    assert result["memory_cap_mb"] is None
    assert marked(mark) == []


def test_out_of_memory_exceptions_are_recognised_without_importing_torch():
    import torch

    gpu = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert containment.out_of_memory_detail(gpu) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert containment.oom_reason("OutOfMemoryError: CUDA out of memory.", 4096, "cuda") == \
        "out of memory: OutOfMemoryError: CUDA out of memory."
    assert containment.oom_reason("MemoryError", 4096, "cpu") == "out of memory: memory cap 4096 MB exceeded (MemoryError)"
    assert containment.out_of_memory_detail(MemoryError()) == "MemoryError"
    assert containment.out_of_memory_detail(RuntimeError("CUDA error: out of memory")) is not None
    assert containment.out_of_memory_detail(ZeroDivisionError("division by zero")) is None


def test_the_default_cap_is_a_share_of_the_machine_split_between_workers(monkeypatch):
    total = containment.machine_memory_mb()
    monkeypatch.delenv(containment.MEMORY_CAP_VAR, raising=False)
    assert containment.memory_cap_mb(trainers=2) == int(total * containment.MEMORY_SHARE / 2)
    monkeypatch.setenv(containment.MEMORY_CAP_VAR, "3000")
    assert containment.memory_cap_mb() == 3000
    monkeypatch.setenv(containment.MEMORY_CAP_VAR, "0")
    assert containment.memory_cap_mb() is None


# -- output ---------------------------------------------------------------------------------------

def test_gigabytes_of_output_are_drained_and_the_log_stays_capped(prepared_data, tmp_path):  # noqa: F811
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Writing 2 GiB through a pipe takes 8-20 s on a shared 2-core machine, near the smoke profile's
    # 23 s deadline: a longer one, so only output that is not drained (the writer blocks until
    # killed, "timed_out") fails here, not a slow machine.
    result, _, mark = run("floods_output.py", tmp_path, deadline_s=120.0)
    assert result["status"] == "ok", result  # the output is only its log: the run itself is honest
    assert result["val_bpb"] == pytest.approx(8.0)
    assert result["output_bytes"] > 2 * 2**30
    log = tmp_path / "exp" / "train.log"
    assert log.stat().st_size <= MAX_LOG_BYTES + 100
    assert "[arrl: log truncated here]" in log.read_text(errors="replace")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_mb < 100  # nothing kept
    assert marked(mark) == []


# -- processes that escape ------------------------------------------------------------------------

def escaped(tmp_path: Path) -> list[int]:
    log = (tmp_path / "exp" / "train.log").read_text()
    return [int(line.split()[1]) for line in log.splitlines() if line.startswith("ESCAPED ")]


def check_none_escaped(result: dict, tmp_path: Path, mark: str) -> None:
    assert result["status"] == "crashed" and "without calling harness.finish()" in result["reason"], result
    pids = escaped(tmp_path)
    assert len(pids) == 3, pids
    # SIGKILL was sent before run_candidate returned; the kernel reaps them within moments.
    wait_until(lambda: not any(alive(p) for p in pids), 2, "the escaped processes to die", interval_s=0.05)
    assert marked(mark) == []


def test_processes_that_leave_the_group_are_killed_cold(prepared_data, tmp_path):  # noqa: F811
    result, _, mark = run("escapes.py", tmp_path)
    assert result["trainer"] == "cold"
    check_none_escaped(result, tmp_path, mark)


def test_processes_that_leave_the_group_are_killed_warm(prepared_data, tmp_path):  # noqa: F811
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    env = {**os.environ, "ARRL_PROFILE": "smoke", "OMP_WAIT_POLICY": "PASSIVE"}
    pid = spawn_warm(key, os.getpid(), env)
    # /proc/PID/environ can read empty for a moment while the new process finishes its exec.
    token = wait_until(lambda: containment.token_of(pid), 10, "the warm trainer's environment", interval_s=0.01)
    assert token and token != os.environ.get(containment.RUN_TOKEN_VAR)  # its own, from its start
    wait_until(lambda: ready_without_adopting(pid), 60, "the warm trainer to be ready")
    result, _, mark = run("escapes.py", tmp_path, warm=WarmSlot(key, os.getpid(), prepare_next=False))
    assert result["trainer"] == "warm"
    check_none_escaped(result, tmp_path, mark)
    assert containment.tagged(token) == set()


def test_a_prepared_next_trainer_survives_the_run_that_started_it(prepared_data, tmp_path):  # noqa: F811
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    result, _, _ = run("syntax_error.py", tmp_path, warm=WarmSlot(key, os.getpid()))
    assert result["status"] == "crashed"
    [prepared] = wait_until(lambda: [p for p in marked_by_key(key)], 10, "the next trainer")
    assert alive(prepared)  # its own token: the end-of-run kill did not take it
    os.kill(prepared, 9)


def marked_by_key(key: str) -> list[int]:
    return processes_with(key.lstrip("\0").encode())


# -- every failure is a recorded experiment with nothing left behind -----------------------------

@pytest.mark.parametrize(("candidate", "status", "reason"), [
    ("endless_loop.py", "timed_out", "no exit within the deadline"),
    ("nan_loss.py", "diverged", "not finite"),
    ("syntax_error.py", "crashed", "SyntaxError"),
    ("import_error.py", "crashed", "ModuleNotFoundError: No module named 'torch_that_does_not_exist'"),
])
def test_failures_end_with_their_status_within_the_deadline_and_leave_nothing(
        prepared_data, tmp_path, candidate, status, reason):  # noqa: F811
    # The hung candidate gets a deadline shorter than the profile's (23 s): the same code path, and
    # 15 s less of a suite that waits for it (the others end long before either).
    deadline = HUNG_DEADLINE_S if status == "timed_out" else SMOKE.deadline_s
    result, elapsed, mark = run(candidate, tmp_path, deadline_s=deadline)
    assert result["status"] == status, result
    assert reason in result["reason"]
    assert elapsed <= deadline + 5
    if status == "timed_out":  # the deadline, not sooner
        assert elapsed >= deadline - 1
    assert marked(mark) == []


def test_the_cap_holds_for_an_adopted_warm_trainer(prepared_data, tmp_path):  # noqa: F811
    key = warm_key(f"test-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s)
    env = {**os.environ, "ARRL_PROFILE": "smoke", "OMP_WAIT_POLICY": "PASSIVE"}
    pid = spawn_warm(key, os.getpid(), env)
    wait_until(lambda: ready_without_adopting(pid), 60, "the warm trainer to be ready")
    result, _, mark = run("allocates_without_bound.py", tmp_path, memory_cap_mb=800,
                          warm=WarmSlot(key, os.getpid(), prepare_next=False))
    assert result["trainer"] == "warm"
    assert result["status"] == "crashed", result
    assert result["reason"].startswith("out of memory: memory cap 800 MB exceeded (rss "), result["reason"]
    assert marked(mark) == [] and not alive(pid)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a GPU")
def test_a_gpu_that_runs_out_is_recorded_like_the_cap(prepared_data, tmp_path):  # noqa: F811
    workdir = tmp_path / "exp"
    workdir.mkdir()
    shutil.copy(CANDIDATES / "exhausts_gpu_memory.py", workdir / "train.py")
    result = anyio.run(lambda: run_candidate(workdir / "train.py", get_profile("gpu"), workdir))
    assert result["status"] == "crashed", result
    assert result["reason"].startswith("out of memory: OutOfMemoryError: CUDA out of memory."), result["reason"]


# -- disk ---------------------------------------------------------------------------------------

def test_a_working_directory_past_the_disk_cap_ends_the_run(prepared_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ARRL_DISK_CAP_MB", "60")
    result, elapsed, mark = run("fills_disk.py", tmp_path)
    assert result["status"] == "crashed", result
    assert result["reason"].startswith("disk cap 60 MB exceeded: its working directory holds "), result["reason"]
    assert elapsed < SMOKE.deadline_s and marked(mark) == []


def test_one_file_past_the_size_limit_fails_the_write(prepared_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ARRL_DISK_CAP_MB", "40")
    result, _, mark = run("writes_huge_file.py", tmp_path)
    assert result["status"] == "crashed", result
    assert "File too large" in result["reason"], result["reason"]  # EFBIG at 40 MB, at once
    assert marked(mark) == []
