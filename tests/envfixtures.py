"""Fixtures for tests that need the prepared corpus or the training script."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from waiting import reap, wait_until

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = Path(__file__).resolve().parent / "candidates"
TRAIN_PY = ROOT / "target" / "train.py"
BIN = Path(sys.executable).parent
SMOKE_EXPERIMENTS = 3
SMOKE_TIMEOUT_S = 240.0


@pytest.fixture(scope="session")
def prepared_data():
    """The bundled corpus in the user's cache (`arrl prepare` is part of the test command)."""
    from frozen_env.data import DataNotPrepared, load_dataset

    try:
        return load_dataset()
    except DataNotPrepared:
        from frozen_env.prepare import prepare

        prepare()
        return load_dataset()


def redis_url(run_dir: Path) -> str | None:
    """The Redis URL a running `arrl run` wrote into its run directory's campaign.json, or None yet."""
    try:
        return json.loads((run_dir / "campaign.json").read_text()).get("redis_url")
    except (OSError, ValueError):
        return None


@dataclass
class SmokeCampaign:
    """What one real `arrl run --profile smoke --max-experiments 3` left behind, and what was seen meanwhile."""

    run_dir: Path
    returncode: int | None
    stdout: str
    redis_url: Any  # campaign.json's redis_url (a str), or True when `arrl run` exited before writing it
    status_during_run: subprocess.CompletedProcess | None  # `arrl status D` once the URL was there
    live: list[dict[str, Any]] = field(default_factory=list)  # reports made while the campaign ran


@pytest.fixture(scope="session")
def smoke_campaign(tmp_path_factory: pytest.TempPathFactory, prepared_data) -> SmokeCampaign:
    """One real smoke campaign (real rq worker and training runs, ~30 s) for the whole session.

    tests/test_campaign_e2e.py (`arrl run`, `arrl status` on the live campaign) and
    tests/test_report.py (reports of the live and the finished run) used to start the very same
    command each; it runs once and both watch it: `arrl status` once the Redis URL is written, then
    a report into a folder beside the run directory whenever the ledger grows. Registered in
    conftest.py (not imported by the test modules) so that pytest keeps one instance. The run
    directory is read-only for the tests: whoever writes into it works on a copy.
    """
    from arrl.report import read_jsonl, write_report

    base = tmp_path_factory.mktemp("smoke-campaign")
    run_dir = base / "run"
    out_path = base / "arrl-run.out"
    live: list[dict[str, Any]] = []
    status = None
    with out_path.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "arrl"), "run", "--profile", "smoke", "--max-experiments",
                                 str(SMOKE_EXPERIMENTS), "--run-dir", str(run_dir)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # `arrl status D` on the live campaign, once the supervisor has written its Redis URL.
        url = wait_until(lambda: redis_url(run_dir) or proc.poll() is not None, 60, "campaign.json with redis_url")
        if isinstance(url, str):
            status = subprocess.run([str(BIN / "arrl"), "status", str(run_dir)], cwd=ROOT, capture_output=True,
                                    text=True, timeout=60)
        # While it runs: report whenever the ledger has grown (the reward stage appends meanwhile).
        wait_until(lambda: (run_dir / "ledger.jsonl").exists() or proc.poll() is not None, 60, "ledger.jsonl")
        deadline = time.monotonic() + SMOKE_TIMEOUT_S
        seen = -1
        while proc.poll() is None and time.monotonic() < deadline:
            n = len(read_jsonl(run_dir / "ledger.jsonl"))
            if n != seen:
                seen = n
                path = write_report(run_dir, base / f"live-{n}")
                live.append({"recorded": n, "summary": json.loads((path.parent / "summary.json").read_text())})
            time.sleep(0.5)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:  # Ctrl-C twice: stop everything now
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            reap([proc])
    return SmokeCampaign(run_dir, proc.returncode, out_path.read_text(), url, status, live)
