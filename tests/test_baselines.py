"""The baseline strategies: greedy, and Optuna's TPE and CMA-ES through ask/tell.

Unit tests drive a strategy directly with synthetic contexts; the learning test runs whole
simulated campaigns (real proposer, applier and reward computer, real redis-server).
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from arrl.baselines import CHOICE_CHANGE, suggested_program
from arrl.edits import apply_program, knobs, parse_tunables, resolve_program
from arrl.sim import run_sim_campaign
from arrl.strategies import STRATEGIES, Context, make_strategy

pytestmark = pytest.mark.anyio
pytest.importorskip("optuna")
pytest.importorskip("cmaes")

TRAIN_PY = Path(__file__).resolve().parents[1] / "target" / "train.py"
TOY = '''"""A toy script for the search tests: two numeric tunables and nothing else."""

from frozen_env.harness import Harness

# --- hyperparameters ---
LR = 0.01  # search: log 0.0001..1.0
MOMENTUM = 0.5  # search: linear 0..0.99
# --- end hyperparameters ---

harness = Harness.from_env()
harness.finish(None)
'''


class Bowl:
    """A simple quadratic: 1 + 4 |u - opt|^2 in normalised coordinates, no noise, never crashes."""

    def __init__(self, seed: int, space: dict[str, Any]) -> None:
        rng = random.Random(seed)
        self.space = space
        self.opt = {n: rng.uniform(0.25, 0.75) for n, s in space.items() if s["kind"] != "choice"}

    def unit(self, name: str, x: float) -> float:
        s = self.space[name]
        if s["kind"] == "log":
            return math.log(x / s["low"]) / math.log(s["high"] / s["low"])
        return (x - s["low"]) / (s["high"] - s["low"])

    def run(self, knobs: dict[str, Any], budget_s: float) -> dict[str, Any]:
        val = 1.0 + 4.0 * sum((self.unit(n, knobs[n]) - o) ** 2 for n, o in self.opt.items())
        final = val * math.log(2)
        curve = [[float(t), final + (math.log(256) - final) / (1.0 + t)] for t in range(int(budget_s) + 1)]
        return {"curve": curve, "val_bpb": val, "status": "ok"}


def bowl(seed: int, space: dict[str, Any]) -> Bowl:
    return Bowl(seed, space)


def test_baselines_are_registered() -> None:
    assert {"random", "greedy", "tpe", "cmaes"} <= set(STRATEGIES)
    with pytest.raises(ValueError, match="mapping"):
        make_strategy("tpe", 0, mapping="nearest")


async def test_greedy_proposes_one_valid_atomic_edit() -> None:
    tunables = parse_tunables(TRAIN_PY.read_text())
    strategy = make_strategy("greedy", 3)
    for _ in range(30):
        choice = await strategy.propose(Context(tunables, None, []))
        assert len(choice.program) == 1
        resolve_program(tunables, choice.program)  # raises when invalid


def test_suggested_program_maps_a_full_suggestion_onto_at_most_three_edits() -> None:
    tunables = parse_tunables(TRAIN_PY.read_text())
    current = knobs(tunables)
    suggested = {**current, "MATRIX_LR": 0.19, "DEPTH": 4, "WARMDOWN_FRAC": 0.9, "ACTIVATION": "gelu",
                 "DROPOUT": 0.012345678, "BATCH_SIZE": 16.4}
    program, evaluated = suggested_program(tunables, suggested)
    # Largest normalised changes: WARMDOWN 0.4 -> 0.9 (0.56), ACTIVATION (1/3), MATRIX_LR (0.30 in log).
    assert [e["name"] for e in program] == ["WARMDOWN_FRAC", "ACTIVATION", "MATRIX_LR"]
    assert all(e["op"] == "set" for e in program) and CHOICE_CHANGE == pytest.approx(1 / 3)
    assert evaluated == {**current, "WARMDOWN_FRAC": 0.9, "ACTIVATION": "gelu", "MATRIX_LR": 0.19}
    assert knobs(parse_tunables(apply_program(TRAIN_PY.read_text(), program)[0])) == evaluated
    _, snapped = suggested_program(tunables, {**current, "DROPOUT": 0.012345678, "BATCH_SIZE": 16.4})
    assert snapped["DROPOUT"] == 0.01235 and snapped["BATCH_SIZE"] == 16  # the grammar's rounding; 16 is no change
    rng = random.Random(0)
    for _ in range(20):
        program, evaluated = suggested_program(tunables, suggested, rng=rng)
        assert 1 <= len(program) <= 3
        assert {e["name"] for e in program} <= {"MATRIX_LR", "DEPTH", "WARMDOWN_FRAC", "ACTIVATION", "DROPOUT"}


@pytest.mark.parametrize("name", ["tpe", "cmaes"])
async def test_optuna_strategies_propose_valid_programs_and_are_told_the_outcomes(name: str) -> None:
    tunables = parse_tunables(TRAIN_PY.read_text())
    strategy: Any = make_strategy(name, 1)
    incumbent = {"experiment_id": "e00001", "val_bpb": 2.65, "hash": "x"}
    recent: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    for i in range(2, 26):
        choice = await strategy.propose(Context(tunables, incumbent, recent[-32:]))
        changes = resolve_program(tunables, choice.program)  # valid: raises otherwise
        assert 1 <= len(changes) <= 3
        exp_id = f"e{i:05d}"
        pending[exp_id] = choice
        # Outcomes arrive one proposal late, as in the pipeline; every fifth run crashes.
        for done in [e for e in pending if e < exp_id]:
            c = pending.pop(done)
            crashed = int(done[1:]) % 5 == 0
            recent.append({"experiment_id": done, "extra": c.extra, "status": "crashed" if crashed else "ok",
                           "val_bpb": None if crashed else 2.6 + 0.001 * int(done[1:])})
    trials = strategy.study.trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 1 + 22  # the incumbent and every outcome it has seen (e00002..e00023)
    values = sorted(t.value for t in complete)
    assert values[-4:] == [pytest.approx(2.65 + 0.5)] * 4  # the 4 crashes: worst seen (the baseline) + 0.5
    assert values[-5] <= 2.65
    # Each completed trial holds the configuration that really ran: the incumbent with <= 3 changes.
    base = knobs(tunables)
    for t in complete:
        assert sum(1 for n, v in t.params.items() if v != base[n]) <= 3


async def test_tpe_and_cmaes_learn_a_simple_quadratic_better_than_random(redis_server, tmp_path: Path) -> None:
    target = tmp_path / "train.py"
    target.write_text(TOY)
    best: dict[str, list[float]] = {}
    for name in ("random", "tpe", "cmaes"):
        best[name] = []
        for seed in range(4):
            records = await run_sim_campaign(redis_server.url, "test_baselines:bowl", name, seed, 40,
                                             selfeval=False, target=target)
            best[name].append(min(r["val_bpb"] for r in records if r["status"] == "ok"))
    medians = {name: statistics.median(v) for name, v in best.items()}
    assert medians["tpe"] < medians["random"], medians
    assert medians["cmaes"] < medians["random"], medians


def test_optuna_is_optional_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_optuna(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "optuna":
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(RuntimeError, match=r"pip install 'arrl\[search\]'"):
        make_strategy("tpe", 0)
    assert make_strategy("greedy", 0).name == "greedy"  # the rest works without it
