"""The frozen runner: real subprocesses, real deadlines, the right status for each failure."""

from __future__ import annotations

import os
import shutil
import time

import anyio
import pytest
from envfixtures import CANDIDATES, TRAIN_PY, prepared_data  # noqa: F401

from frozen_env.constants import get_profile
from frozen_env.runner import RunControl, run_candidate

SMOKE = get_profile("smoke")


def run(script, tmp_path, **kwargs):
    workdir = tmp_path / "exp"
    workdir.mkdir(exist_ok=True)
    shutil.copy(script, workdir / "train.py")
    return anyio.run(lambda: run_candidate(workdir / "train.py", SMOKE, workdir, **kwargs))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_syntax_error_is_crashed_with_the_error(prepared_data, tmp_path):  # noqa: F811
    result = run(CANDIDATES / "syntax_error.py", tmp_path)
    assert result["status"] == "crashed"
    assert "SyntaxError" in result["reason"]
    assert "SyntaxError" in result["traceback"]


def test_exception_mid_training_is_crashed_with_traceback_and_partial_curve(prepared_data, tmp_path):  # noqa: F811
    result = run(CANDIDATES / "raises_mid_training.py", tmp_path)
    assert result["status"] == "crashed"
    assert "ZeroDivisionError: deliberate failure" in result["reason"]
    assert "Traceback" in result["traceback"]
    assert len(result["curve"]) >= 1
    assert (tmp_path / "exp" / "train.log").read_text().count("ZeroDivisionError") >= 1


def test_nan_loss_is_diverged(prepared_data, tmp_path):  # noqa: F811
    result = run(CANDIDATES / "nan_loss.py", tmp_path)
    assert result["status"] == "diverged"
    assert "not finite" in result["reason"]


def test_no_process_outlives_the_run(prepared_data, tmp_path):  # noqa: F811
    result = run(CANDIDATES / "leaves_child.py", tmp_path)
    assert result["status"] == "crashed"
    log = (tmp_path / "exp" / "train.log").read_text()
    child = int(log.split("CHILD_PID ")[1].split()[0])
    deadline = time.monotonic() + 3
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the candidate's child process survived the run"


def test_abort_stops_the_trainer_within_a_second(prepared_data, tmp_path):  # noqa: F811
    control = RunControl()
    seen: list[dict] = []

    async def on_event(event):
        seen.append(event)
        if event["event"] == "train.step" and event["step"] >= 5:
            control.abort("test abort")

    started = time.monotonic()
    result = run(TRAIN_PY, tmp_path, on_event=on_event, control=control)
    assert result["status"] == "aborted"
    assert result["reason"] == "test abort"
    assert result["abort_latency_s"] is not None and result["abort_latency_s"] < 0.1
    assert time.monotonic() - started < SMOKE.deadline_s
    assert len(result["curve"]) >= 5


def test_uniform_model_through_the_harness_scores_eight(prepared_data, tmp_path):  # noqa: F811
    result = run(CANDIDATES / "uniform.py", tmp_path)
    assert result["status"] == "ok", result
    assert result["val_bpb"] == pytest.approx(8.0, abs=1e-9)


@pytest.mark.slow
def test_real_smoke_run_of_train_py_beats_uniform(prepared_data, tmp_path):  # noqa: F811
    result = run(TRAIN_PY, tmp_path)
    assert result["status"] == "ok", result.get("traceback") or result
    assert result["val_bpb"] < 6.0  # well below the uniform predictor's 8.0 bits
    assert result["steps"] > SMOKE.warmup_steps
    assert result["training_seconds"] == pytest.approx(SMOKE.budget_s, rel=0.25)
    assert result["fingerprint"] and result["num_params"] > 0
    assert "val_bpb:" in (tmp_path / "exp" / "train.log").read_text()
