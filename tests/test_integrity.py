"""Metric integrity and hostile candidates: no credit that was not earned, a clear reason each time."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest
from envfixtures import CANDIDATES, prepared_data  # noqa: F401

from frozen_env.constants import get_profile
from frozen_env.runner import run_candidate

SMOKE = get_profile("smoke")


def run(name: str, tmp_path: Path) -> dict:
    """`name` is a candidate's file, or `FILE:CHEAT` for a candidate that cheats as $ARRL_TEST_CHEAT says."""
    name, _, cheat = name.partition(":")
    workdir = tmp_path / "exp"
    workdir.mkdir()
    shutil.copy(CANDIDATES / name, workdir / "train.py")
    env = {"ARRL_TEST_CHEAT": cheat} if cheat else None
    return anyio.run(lambda: run_candidate(workdir / "train.py", SMOKE, workdir, env=env))


@pytest.mark.parametrize(("candidate", "status", "reason"), [
    ("fake_result.py", "invalid", "fake result: printed a line posing as the harness's summary"),
    ("fake_only.py", "invalid", "fake result"),
    ("reads_validation.py", "invalid", "integrity: read the validation split while training"),
    ("patches_evaluation.py", "invalid", "integrity: the evaluation code, the harness or its clock was patched"),
    ("cheats_the_clock.py:extends_budget", "invalid", "integrity: the frozen profile was changed (budget 9.0 s"),
    ("cheats_the_clock.py:slows_clock", "invalid", "integrity: the evaluation code, the harness or its clock was patched"),
    ("cheats_the_clock.py:shadows_clock", "invalid", "integrity: the harness was replaced (training_seconds)"),
    ("ignores_time_up.py", "invalid", "over the budget of 3 s"),
    ("runs_shell.py", "invalid", "integrity: started a forbidden program: sh"),
    ("forges_summary.py", "invalid", "fake result: wrote unsigned lines on the harness's channel (summary)"),
    ("emits_summary.py", "crashed", "only Harness.finish() writes the 'summary' event"),
    ("peeks_ahead.py", "invalid", "future tokens"),
    ("writes_outside.py", "invalid", "integrity: wrote outside its working directory"),
    ("opens_network.py", "invalid", "integrity: opened a network connection"),
])
def test_hostile_candidate_gets_no_credit(prepared_data, tmp_path, candidate, status, reason):  # noqa: F811
    result = run(candidate, tmp_path)
    assert result["status"] == status, result
    assert reason in result["reason"]
    assert result["val_bpb"] is None  # nothing to rank, nothing to keep


def test_the_guard_stopped_the_write_before_it_happened(prepared_data, tmp_path):  # noqa: F811
    escaped = Path.home() / "arrl-candidate-was-here.txt"
    escaped.unlink(missing_ok=True)
    run("writes_outside.py", tmp_path)
    assert not escaped.exists()


def test_an_honest_run_is_untouched_by_the_guard(prepared_data, tmp_path):  # noqa: F811
    result = run("uniform.py", tmp_path)
    assert result["status"] == "ok" and result["val_bpb"] == pytest.approx(8.0)
