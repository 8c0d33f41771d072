"""`arrl pretrain --workers N`: a group's campaigns played in spawned processes give the policy one
process gives, weight for weight; a worker that dies, a landscape that raises and Ctrl-C stop the
training with a clear error, keep the policy of the groups already done and leave no process behind."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import torch

from arrl.cli import main as arrl_main
from arrl.policy import from_bytes
from arrl.pretrain import pretrain
from pipeline.pretrain_pool import campaign_pool

TRAIN_PY = Path(__file__).resolve().parents[1] / "target" / "train.py"
RUNS = "ARRL_TEST_RUNS"  # a file each landscape run appends its process id to (spawned workers inherit it)
KILL_AFTER = "ARRL_TEST_KILL_AFTER"  # a run in a worker process after this many runs in all kills it


class CountedLandscape:
    """A smooth bowl over the numeric tunables that logs every run's process, and kills a worker
    process (SIGKILL, as the kernel's out-of-memory killer does) once KILL_AFTER runs were made."""

    def __init__(self, seed: int, space: dict[str, Any]) -> None:
        self.rng = random.Random(seed)
        self.numeric = [name for name, d in space.items() if d["kind"] != "choice"]
        self.optimum = {name: self.rng.random() for name in self.numeric}
        self.space = space

    def _unit(self, name: str, value: float) -> float:
        d = self.space[name]
        if d["kind"] == "log":
            return (math.log(value) - math.log(d["low"])) / (math.log(d["high"]) - math.log(d["low"]))
        return (value - d["low"]) / (d["high"] - d["low"])

    def run(self, knobs: dict[str, Any], budget_s: float) -> dict[str, Any]:
        with open(os.environ[RUNS], "a") as f:
            f.write(f"{os.getpid()}\n")
        limit = os.environ.get(KILL_AFTER)
        if limit and os.getpid() != int(os.environ["ARRL_TEST_PARENT"]) and runs_made() > int(limit):
            os.kill(os.getpid(), signal.SIGKILL)
        val = 2.0 + sum((self._unit(n, knobs[n]) - self.optimum[n]) ** 2 for n in self.numeric) / len(self.numeric)
        val += self.rng.gauss(0, 0.005)
        return {"curve": [[budget_s, val + 0.1]], "val_bpb": val, "status": "ok"}


def runs_made() -> int:
    return len(Path(os.environ[RUNS]).read_text().split())


@pytest.fixture(autouse=True)
def default_logging() -> Any:
    """`arrl pretrain` configures logging to the stdout of its test; later tests get structlog's defaults."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runs = tmp_path / "runs.txt"
    runs.write_text("")
    monkeypatch.setenv(RUNS, str(runs))
    monkeypatch.setenv("ARRL_TEST_PARENT", str(os.getpid()))
    return runs


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def test_workers_train_the_policy_one_process_trains(tmp_path: Path, counted: Path) -> None:
    options = dict(campaigns=5, experiments_per_campaign=10, seed=4, target=TRAIN_PY, budget_s=30.0, group=2)
    with structlog.testing.capture_logs() as alone_logs:
        alone = pretrain("test_pretrain_pool:CountedLandscape", out=tmp_path / "alone.pt", **options)
    assert set(counted.read_text().split()) == {str(os.getpid())}
    counted.write_text("")
    with campaign_pool(2) as pool, structlog.testing.capture_logs() as pool_logs:
        pooled = pretrain("test_pretrain_pool:CountedLandscape", out=tmp_path / "pool.pt", pool=pool, **options)
    played_in = set(counted.read_text().split())
    assert played_in and str(os.getpid()) not in played_in  # every run in a worker, none here
    # Groups of 2, 2 and 1: three updates, each on the same samples with the same credit.
    assert from_bytes(pooled.read_bytes())[1] == from_bytes(alone.read_bytes())[1]
    assert from_bytes(pooled.read_bytes())[1]["updates"] == 3
    a, b = weights(alone), weights(pooled)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def ended(logs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e["campaign"], e["best_val_bpb"], e["score"], e["kept"]) for e in logs if e["event"] == "pretrain.campaign"]

    assert ended(pool_logs) == ended(alone_logs) and len(ended(alone_logs)) == 5
    choices = [next(e for e in logs if e["event"] == "pretrain.choices") for logs in (alone_logs, pool_logs)]
    assert choices[0] == choices[1]


def test_a_worker_that_dies_stops_training_and_keeps_the_groups_done(
    tmp_path: Path, counted: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # A group of 2 campaigns makes 2 x (2 baselines + 8 experiments) = 20 runs: a worker dies in the second group.
    monkeypatch.setenv(KILL_AFTER, "24")
    out = tmp_path / "policy.pt"
    with pytest.raises(SystemExit) as stop:
        raise SystemExit(arrl_main(["pretrain", "--landscape", "test_pretrain_pool:CountedLandscape", "--campaigns",
                                    "6", "--group", "2", "--experiments", "8", "--workers", "2", "--out", str(out),
                                    "--target", str(TRAIN_PY)]))
    assert stop.value.code == 1
    printed = capsys.readouterr()
    err = printed.err
    assert "a campaign worker died after 2 of 6 campaigns" in err and str(out) in err and "--checkpoint" in err
    assert from_bytes(out.read_bytes())[1]["updates"] == 1  # the first group's update, kept
    logs = [json.loads(line) for line in printed.out.splitlines() if line.startswith("{")]
    stopped = next(e for e in logs if e["event"] == "pretrain.stopped")
    assert stopped["campaigns_done"] == 2 and "BrokenProcessPool" in stopped["error"]
    # Continuing from what was kept works, here in one process.
    monkeypatch.delenv(KILL_AFTER)
    assert arrl_main(["pretrain", "--landscape", "test_pretrain_pool:CountedLandscape", "--campaigns", "2",
                      "--group", "2", "--experiments", "8", "--checkpoint", str(out), "--out", str(tmp_path / "on.pt"),
                      "--target", str(TRAIN_PY)]) == 0
    assert from_bytes((tmp_path / "on.pt").read_bytes())[1]["updates"] == 2


def test_a_landscape_that_raises_in_a_worker_stops_training_with_its_error(tmp_path: Path, counted: Path) -> None:
    with campaign_pool(2) as pool, pytest.raises(ZeroDivisionError):
        pretrain("test_pretrain_pool:broken_landscape", campaigns=4, experiments_per_campaign=6, seed=0,
                 out=tmp_path / "p.pt", target=TRAIN_PY, budget_s=30.0, group=2, pool=pool)
    assert not (tmp_path / "p.pt").exists()  # nothing was learnt, so nothing is written over `out`


def broken_landscape(seed: int, space: dict[str, Any]) -> Any:
    return 1 / 0


def test_workers_need_campaign_credit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        arrl_main(["pretrain", "--landscape", "arrl.landscapes:cpu_fitted", "--credit", "proposal", "--workers", "2",
                   "--out", str(tmp_path / "p.pt"), "--target", str(TRAIN_PY)])
    assert stop.value.code == 2 and "--workers plays a group's campaigns side by side" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        arrl_main(["pretrain", "--landscape", "arrl.landscapes:cpu_fitted", "--workers", "0",
                   "--out", str(tmp_path / "p.pt"), "--target", str(TRAIN_PY)])
    assert stop.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs credit 'campaign'"), campaign_pool(1) as pool:
        pretrain("arrl.landscapes:cpu_fitted", campaigns=1, experiments_per_campaign=4, seed=0,
                 out=tmp_path / "p.pt", target=TRAIN_PY, credit="proposal", pool=pool)
    assert not (tmp_path / "p.pt").exists()


def test_ctrl_c_stops_workers_and_parent_with_the_policy_written(tmp_path: Path, counted: Path) -> None:
    """Ctrl-C reaches every process of the terminal's group: the workers ignore it, the parent writes
    the policy, drops the group's queued campaigns and exits 130 with one line, no traceback."""
    out = tmp_path / "policy.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-m", "arrl.cli", "pretrain", "--landscape",
                             "test_pretrain_pool:CountedLandscape", "--campaigns", "64", "--group", "16",
                             "--experiments", "30", "--workers", "2", "--out", str(out), "--target", str(TRAIN_PY)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # the first group's update is done: the second group's 16 campaigns start
        if '"pretrain.update"' in line:
            break
    deadline = time.monotonic() + 30
    while runs_made() <= 16 * 32 and time.monotonic() < deadline:  # until the workers play the second group
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted, stopped after 16 of 64 campaigns" in err and f"the policy they trained is in {out}" in err
    assert "Traceback" not in err
    assert from_bytes(out.read_bytes())[1]["updates"] == 1
    # Each campaign makes 32 runs (2 baselines, 30 experiments): the second group's queued campaigns
    # were dropped (all 32 campaigns would be 1024 runs), only those already handed to a worker ran.
    assert 16 * 32 < runs_made() < 28 * 32
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no worker left behind
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a worker of the interrupted pre-training is still running")


def test_a_pool_left_by_an_error_drops_what_is_queued() -> None:
    """As `scripts/bench_offline.py --workers` queues all its campaigns at once, Ctrl-C there must not
    wait for them all: only the work already handed to a worker runs."""
    with pytest.raises(KeyboardInterrupt), campaign_pool(1) as pool:
        futures = [pool.submit(time.sleep, 0.2) for _ in range(20)]
        futures[0].result()
        raise KeyboardInterrupt
    assert sum(f.cancelled() for f in futures) >= 15
