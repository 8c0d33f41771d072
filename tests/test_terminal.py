"""The live view of `arrl run` and `arrl status --watch`, rendered from real snapshots.

The snapshots come from a real campaign in a private redis-server: a short simulated campaign
(real proposer, applier and reward computer), plus one experiment left running by hand through
the same calls a worker makes (marked started, a streamed loss event), so the table has a row.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from arrl.bus import Bus
from arrl.campaign import Campaign
from arrl.sim import run_sim_campaign
from arrl.status import queue_numbers, snapshot
from arrl.terminal import LiveDisplay, bar, clock, eta_s, live_details, plain_line, render

pytestmark = pytest.mark.anyio
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RUNNING_ID = "e09999"


@pytest.fixture
async def live(redis_server, tmp_path: Path) -> dict[str, Any]:
    records = await run_sim_campaign(redis_server.url, "arrl.landscapes:cpu_fitted", "random", 1, 12,
                                     run_dir=tmp_path / "run", campaign_id="termtest")
    bus = Bus.from_url(redis_server.url, "termtest")
    campaign = await Campaign.load(bus)
    # One experiment in flight, as the applier and a worker leave it.
    await campaign.track(RUNNING_ID, {"experiment_id": RUNNING_ID, "proposal": {"description": "MATRIX_LR 0.02 -> 0.04"}})
    await campaign.mark_started(RUNNING_ID)
    await bus.publish_event(RUNNING_ID, {"event": "train.step", "step": 40, "training_seconds": 1.2, "loss": 3.2109})
    await bus.publish_event(RUNNING_ID, {"event": "selfeval.verdict", "decision": "continue"})
    s = await snapshot(campaign, queue_numbers(redis.Redis.from_url(redis_server.url)))
    s.update(await live_details(campaign))
    await bus.aclose()
    return {"snapshot": s, "records": records, "url": redis_server.url}


async def test_live_details_from_redis(live: dict[str, Any]) -> None:
    s = live["snapshot"]
    assert s["recorded"] == 12 and s["max_experiments"] == 12
    [row] = s["running_experiments"]
    assert row["id"] == RUNNING_ID and row["step"] == 40 and row["loss"] == pytest.approx(3.2109)
    assert 0 <= row["elapsed_s"] < 60 and row["description"] == "MATRIX_LR 0.02 -> 0.04"
    by_id = {r["experiment_id"]: r for r in live["records"]}
    assert len(s["recent_results"]) == 5
    for result in s["recent_results"]:
        assert result["status"] == by_id[result["id"]]["status"] and result["kept"] == by_id[result["id"]]["kept"]


async def test_terminal_block_shows_bar_best_running_and_recent(live: dict[str, Any]) -> None:
    s = live["snapshot"]
    lines = render(s, width=120)
    text = "\n".join(lines)
    assert "█" * 28 in lines[1] and " 12/12 (100%)" in lines[1]  # all 12 recorded: a full bar
    assert f"best {s['best_val_bpb']:.4f} ({s['best_experiment']}:" in lines[2]
    running = next(i for i, line in enumerate(lines) if line.strip().startswith("running"))
    assert lines[running + 1].split()[:4] == [RUNNING_ID, clock(s["running_experiments"][0]["elapsed_s"]), "40", "3.211"]
    recent_ids = [line.split()[0] for line in lines if line.startswith("  e0") and RUNNING_ID not in line]
    assert recent_ids == [r["id"] for r in reversed(s["recent_results"])]  # newest first
    assert all(len(line) <= 119 for line in render(s, width=40 + 80))
    assert all(len(line) <= 39 for line in render(s, width=40))  # cut to the terminal, never wrapped
    assert "\x1b" not in text  # escape codes belong to the display, not the rendering


async def test_plain_lines_carry_no_escape_codes(live: dict[str, Any]) -> None:
    s = live["snapshot"]
    out = io.StringIO()
    display = LiveDisplay(out, tty=False)
    display.draw(s)
    display.draw(s)
    print("a message", file=display)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert lines[0].startswith("[stopped] done 12/12") and f"now {RUNNING_ID} " in lines[0]
    assert "loss 3.211" in plain_line(s)


async def test_tty_block_is_redrawn_in_place_and_messages_print_above(live: dict[str, Any]) -> None:
    s = live["snapshot"]
    out = io.StringIO()
    display = LiveDisplay(out, tty=True, width=100)
    display.draw(s)
    height = len(render(s, 100))
    assert display.shown == height and "\x1b" not in out.getvalue()  # nothing to erase the first time
    display.draw(s)
    assert out.getvalue().count(f"\x1b[{height}F\x1b[J") == 1  # back to the block's top, clear, redraw
    print("\nstage restarted", file=display)
    assert out.getvalue().endswith(f"\x1b[{height}F\x1b[Jstage restarted\n") and display.shown == 0
    display.draw(s)
    display.release()
    print("final line", file=display)
    assert out.getvalue().endswith("\nfinal line\n")  # the last block stays, the summary goes below


def test_bar_eta_and_clock_on_a_running_campaign() -> None:
    s = {"state": "running", "recorded": 10, "max_experiments": 40, "experiments_per_hour": 60.0}
    assert eta_s(s) == pytest.approx(30 * 60)
    assert clock(eta_s(s)) == "30:00" and clock(3723) == "1:02:03" and clock(None) == "-"
    assert bar(10, 40, width=8) == "[██░░░░░░]" and bar(10, 40, width=8, fancy=False) == "[##......]"
    assert eta_s({**s, "max_experiments": 0}) is None and eta_s({**s, "recorded": 0}) is None
    assert bar(5, 0) == ""


async def test_arrl_status_watch_piped_prints_plain_lines(live: dict[str, Any]) -> None:
    proc = subprocess.Popen([str(BIN / "arrl"), "status", "--watch", "--interval", "0.3", "--redis-url", live["url"],
                             "--campaign", "termtest"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while len(lines) < 2 and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line:
                lines.append(line)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert len(lines) >= 2, proc.stderr.read()
    for line in lines:
        assert "\x1b" not in line and line.startswith("[stopped] done 12/12") and RUNNING_ID in line
