"""The device gate: two runners on one device prepare at once but train one at a time."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import anyio
import pytest
from envfixtures import TRAIN_PY, prepared_data  # noqa: F401

from frozen_env.constants import get_profile
from frozen_env.gate import DeviceLock, device_id, device_lock_for
from frozen_env.runner import RunControl, WarmSlot, run_candidate
from frozen_env.warm import listening, warm_key

SMOKE = get_profile("smoke")


def copy_target(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TRAIN_PY, workdir / "train.py")
    return workdir / "train.py"


def test_the_lock_is_exclusive_and_let_go_on_release(tmp_path):
    async def main():
        a, b = DeviceLock(tmp_path / "d.lock"), DeviceLock(tmp_path / "d.lock")
        assert await a.acquire() < 0.5
        with anyio.move_on_after(0.2) as scope:
            await b.acquire()
        assert scope.cancelled_caught and not b.held  # cancelled while waiting: holds nothing
        a.release()
        assert await b.acquire() < 0.5
        b.release()

    anyio.run(main)


def test_device_lock_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("ARRL_HOME", str(tmp_path))
    monkeypatch.delenv("ARRL_DEVICE_LOCK", raising=False)
    assert device_lock_for("cpu") is None  # auto: CPU cores are better spent on the running one
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert device_lock_for("cuda").path.name == "cuda-1.lock" == f"{device_id('cuda')}.lock"
    monkeypatch.setenv("ARRL_DEVICE_LOCK", "off")
    assert device_lock_for("cuda") is None
    monkeypatch.setenv("ARRL_DEVICE_LOCK", "on")
    assert device_lock_for("cpu").path.parent == tmp_path / "locks"
    monkeypatch.setenv("ARRL_DEVICE_LOCK", "sometimes")
    with pytest.raises(ValueError, match="auto, on or off"):
        device_lock_for("cpu")


@pytest.mark.slow
def test_two_runs_on_one_device_train_one_at_a_time(prepared_data, tmp_path):  # noqa: F811
    """The second run prepares while the first trains, then starts its clock once the first has
    evaluated; both succeed, the wait is reported, and their timed trainings never overlap."""
    lock_path = tmp_path / "locks" / "dev.lock"
    results = []

    async def one(name: str, delay: float, warm: WarmSlot | None = None):
        await anyio.sleep(delay)
        script = copy_target(tmp_path / name)
        results.append(await run_candidate(script, SMOKE, tmp_path / name, gate=DeviceLock(lock_path), warm=warm))

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first", 0.0)
            tg.start_soon(one, "second", 0.5)

    anyio.run(main)
    assert [r["status"] for r in results] == ["ok", "ok"], results
    first, second = sorted(results, key=lambda r: r["training_started_at"])
    assert first["training_ended_at"] <= second["training_started_at"]
    assert second["gate_wait_seconds"] > 0.5  # it waited for the first one's training
    for r in results:
        # The budget is all training: the wait is not charged to the candidate.
        assert r["training_seconds"] == pytest.approx(SMOKE.budget_s, abs=0.5)


@pytest.mark.slow
def test_a_warm_trainer_passes_the_gate_too(prepared_data, tmp_path):  # noqa: F811
    slot = WarmSlot(warm_key(f"gate-{uuid.uuid4().hex}", "smoke", SMOKE.budget_s), os.getpid())
    lock = DeviceLock(tmp_path / "dev.lock")
    first = anyio.run(lambda: run_candidate(copy_target(tmp_path / "a"), SMOKE, tmp_path / "a", warm=slot, gate=lock))
    assert first["status"] == "ok" and first["trainer"] == "cold" and not lock.held

    async def held_then_released():
        other = DeviceLock(lock.path)
        await other.acquire()  # someone else trains: the warm trainer must wait at the gate
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 2.0)
            result = {}

            async def run_second():
                result.update(await run_candidate(copy_target(tmp_path / "b"), SMOKE, tmp_path / "b",
                                                  warm=WarmSlot(slot.key, slot.owner_pid, prepare_next=False),
                                                  gate=lock))

            tg.start_soon(run_second)
            await anyio.sleep(2.0)
            released_at = time.time()
            other.release()
        return result, released_at

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not listening(slot.key):
        time.sleep(0.2)
    second, released_at = anyio.run(held_then_released)
    assert second["status"] == "ok" and second["trainer"] == "warm", second
    assert second["training_started_at"] >= released_at
    assert second["gate_wait_seconds"] > 1.0


def test_an_abort_while_waiting_at_the_gate_ends_the_run(prepared_data, tmp_path):  # noqa: F811
    lock_path = tmp_path / "dev.lock"

    async def main():
        holder = DeviceLock(lock_path)
        await holder.acquire()
        control = RunControl()
        at_gate = anyio.Event()

        async def on_event(event):
            if event["event"] == "train.gate":
                at_gate.set()

        result = {}
        async with anyio.create_task_group() as tg:

            async def run():
                result.update(await run_candidate(copy_target(tmp_path / "w"), SMOKE, tmp_path / "w",
                                                  gate=DeviceLock(lock_path), control=control, on_event=on_event))

            tg.start_soon(run)
            with anyio.fail_after(60):
                await at_gate.wait()  # blocked after its warm-up step, never having trained
            control.abort("not wanted")
        holder.release()
        return result

    result = anyio.run(main)
    assert result["status"] == "aborted", result
    assert result["training_started_at"] is None and result["gate_wait_seconds"] is None
