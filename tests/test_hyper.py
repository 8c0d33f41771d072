"""The hyper-heuristic policy (arrl.hyper) and its operators (arrl.operators): the opening design and the
rules after it, the surrogate, valid programs never run before."""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from arrl.edits import Tunable, apply_program, parse_tunables, resolve_program, search_space
from arrl.policy import decode_state, from_bytes, to_bytes
from arrl.ppo import sample_from_transition
from arrl.strategies import Context, make_strategy

torch.set_num_threads(1)
SOURCE = (Path(__file__).parents[1] / "target" / "train.py").read_text()
TUNABLES = parse_tunables(SOURCE)
SPACE = search_space(TUNABLES)


def test_ppo_strategy_starts_from_the_shipped_hyper_policy_and_carries_what_the_learner_needs() -> None:
    from arrl.hyper import ACTION_LEN as HYPER_LEN
    from arrl.hyper import SIGNATURE, HyperPolicy, pretrained_weights
    from arrl.operators import RADII

    assert pretrained_weights() is not None  # shipped as package data
    strategy = make_strategy("ppo", 4, horizon=50)
    assert isinstance(strategy.policy, HyperPolicy)
    fresh = make_strategy("ppo", 4, pretrained=False)
    assert fresh.policy is None  # made fresh on the first proposal
    rng = random.Random(6)
    tunables = TUNABLES
    records: list[dict[str, Any]] = []
    designs = 0
    for i in range(16):  # a campaign's window as the proposer reads it, knobs in extra
        context = Context(tunables, {"val_bpb": 2.0, "experiment_id": "e00001"}, records)
        choice = asyncio.run(strategy.propose(context))
        apply_program(SOURCE, choice.program)  # a valid program of the real script
        extra = msgpack.unpackb(msgpack.packb(choice.extra, use_bin_type=True), raw=False)
        child = {n: t.value for n, t in tunables.items()}
        child.update({t.name: v for t, v in resolve_program(tunables, choice.program)})
        assert extra["knobs"] == child
        if extra.get("design"):  # the opening design comes first, and is no sample for the learner
            assert designs == i and "state" not in extra and "action" not in extra
            assert sample_from_transition({"extra": extra, "reward": 1.0}) is None
            designs += 1
            records.append({"experiment_id": f"e{i + 2:05d}", "status": "ok", "val_bpb": 2.1, "reward": 0.0,
                            "role": "edit", "extra": extra})
            continue
        assert extra["space"] == SIGNATURE and len(extra["action"]) == HYPER_LEN
        assert extra["radius"] == RADII[extra["action"][2]]  # no baseline in the window: the plain radius
        with torch.no_grad():
            logprob, _, value = strategy.policy.evaluate(torch.from_numpy(decode_state(extra["state"]))[None],
                                                         torch.tensor([extra["action"]]))
        assert abs(float(logprob[0]) - choice.logprob) < 1e-4 and abs(float(value[0]) - choice.value) < 1e-5
        records.append({"experiment_id": f"e{i + 2:05d}", "status": rng.choice(["ok", "ok", "crashed"]),
                        "val_bpb": 2.0 + rng.gauss(0, 0.05), "reward": 0.0, "role": "edit", "extra": extra})
    assert designs == math.ceil(sum(s["kind"] != "choice" for s in SPACE.values()) / 3)
    # Weights round trip, whatever the space (the hyper policy's features do not depend on it).
    policy, _ = from_bytes(to_bytes(strategy.policy), {"X": {"kind": "linear", "low": 0, "high": 1, "choices": None}})
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), strategy.policy.parameters(), strict=True))


def test_opening_design_probes_every_numeric_tunable_once_then_hands_over() -> None:
    from arrl.hyper import HyperAgent
    from arrl.operators import DESIGN_STEP

    agent = HyperAgent(SPACE, seed=3)
    agent.featurize(TUNABLES, {"val_bpb": 2.0, "experiment_id": "e00001"}, [])
    moved: list[str] = []
    while (program := agent.scripted(TUNABLES)) is not None:
        assert 1 <= len(program) <= 3
        apply_program(SOURCE, program)
        for edit in program:
            u0, u1 = (agent.operators.enc.unit(edit["name"], v) for v in (TUNABLES[edit["name"]].value, edit["value"]))
            spec = SPACE[edit["name"]]  # an int rounds to its nearest value: half a step off at most
            tolerance = 0.5 / (spec["high"] - spec["low"]) + 1e-9 if spec["kind"] == "int" else 0.01
            assert abs(abs(u1 - u0) - DESIGN_STEP) <= tolerance, edit
            moved.append(edit["name"])
    numeric = sorted(n for n, s in SPACE.items() if s["kind"] != "choice")
    assert sorted(moved) == numeric  # each once
    # A proposer that joins a campaign under way (its memory holds runs) does not start one.
    late = HyperAgent(SPACE, seed=3)
    records = [{"experiment_id": f"e{i:05d}", "status": "ok", "val_bpb": 2.0 + i / 100, "role": "edit",
                "extra": {"knobs": {**{n: t.value for n, t in TUNABLES.items()}, "DROPOUT": i / 100}}}
               for i in range(2, 6)]
    late.featurize(TUNABLES, {"val_bpb": 2.0, "experiment_id": "e00001"}, records)
    assert late.scripted(TUNABLES) is None
    off = HyperAgent(SPACE, seed=3, design=False)  # the ppo strategy's `design=False`
    off.featurize(TUNABLES, {"val_bpb": 2.0, "experiment_id": "e00001"}, [])
    assert off.scripted(TUNABLES) is None


def test_the_radius_steps_up_when_the_opening_designs_probes_mostly_win_and_remembers_it() -> None:
    """Half or more of the design's probes beating the first baseline by a noise unit makes every
    radius choice the next larger one, once the design is over; the decision outlives the window."""
    from arrl.hyper import WIDE_WINS, HyperAgent
    from arrl.operators import RADII

    base = {n: t.value for n, t in TUNABLES.items()}
    baselines = [{"experiment_id": f"e{i:05d}", "status": "ok", "val_bpb": v, "role": "baseline", "reward": 0.0,
                  "sigma": 0.01} for i, v in ((1, 2.0), (2, 2.01))]
    incumbent = {"val_bpb": 2.0, "experiment_id": "e00001"}

    def campaign(outcomes: list[tuple[str, float | None]],
                 wide_wins: float = WIDE_WINS) -> tuple[HyperAgent, list[dict[str, Any]]]:
        agent = HyperAgent(SPACE, seed=1, wide_wins=wide_wins)
        agent.featurize(TUNABLES, incumbent, baselines)
        records = list(baselines)
        for i, (status, val) in enumerate(outcomes, start=3):
            assert agent.radius(1) == RADII[1]  # the design is not over yet
            assert agent.scripted(TUNABLES) is not None
            records.append({"experiment_id": f"e{i:05d}", "status": status, "val_bpb": val, "role": "edit",
                            "reward": 0.0, "sigma": 0.01, "extra": {"design": True, "knobs": {**base, "DROPOUT": i / 100}}})
            agent.featurize(TUNABLES, incumbent, records)
        # Every numeric tunable probed; where no probe won, the design is split (the test below).
        rest = agent.scripted(TUNABLES)
        assert rest is None or agent.design_wins() == 0.0 and agent.extra(TUNABLES, rest).get("split")
        return agent, records

    designs = math.ceil(sum(s["kind"] != "choice" for s in SPACE.values()) / 3)
    assert designs == 6  # train.py's 18 numeric tunables, three to a probe
    # A third win (1.95 < 2.0 - 0.01); 1.995 is within the noise and a crash never wins.
    thirds, _ = campaign([("ok", 1.95), ("ok", 1.995), ("crashed", None)] * 2)
    assert thirds.design_wins() == pytest.approx(1 / 3)
    assert [thirds.radius(c) for c in range(3)] == list(RADII)
    winners, _ = campaign([("ok", 1.95), ("ok", 2.05)] * 3)  # exactly half
    assert [winners.radius(c) for c in range(3)] == [RADII[1], RADII[2], RADII[2]]
    losers, records = campaign([("ok", 2.05)] * (designs - 1) + [("ok", 1.9)])
    assert [losers.radius(c) for c in range(3)] == list(RADII)
    # The threshold is the agent's (scripts/fit_radius_rule.py runs both sides): 0 steps up in every
    # campaign, above 1 in none.
    assert campaign([("ok", 1.95), ("ok", 1.995), ("crashed", None)] * 2, wide_wins=1 / 3)[0].radius(1) == RADII[2]
    assert campaign([("ok", 2.05)] * designs, wide_wins=0.0)[0].radius(1) == RADII[2]
    assert campaign([("ok", 1.95)] * designs, wide_wins=2.0)[0].radius(1) == RADII[1]
    # 40 later runs push the design out of the 32-record window: the decision stays.
    rng = random.Random(4)
    later = [{"experiment_id": f"e{i:05d}", "status": "ok", "val_bpb": 1.9 + rng.random() / 10, "role": "edit",
              "reward": 0.0, "sigma": 0.01, "extra": {"knobs": {**base, "DROPOUT": rng.random() / 2}}}
             for i in range(designs + 3, designs + 43)]
    for agent_ in (winners, losers):
        agent_.featurize(TUNABLES, incumbent, (records + later)[-32:])
    assert winners.radius(1) == RADII[2] and losers.radius(1) == RADII[1]
    # A proposer that joins late, with no design in its window: the radii its records say were used.
    late = HyperAgent(SPACE, seed=1)
    late.featurize(TUNABLES, incumbent, (records + later)[-32:])
    assert late.scripted(TUNABLES) is None and late.design_wins() is None and late.radius(1) == RADII[1]
    from arrl.hyper import SIGNATURE

    for used, expect in ((RADII[2], RADII[2]), (RADII[1], RADII[1])):
        ours = [{**r, "extra": {**r["extra"], "policy": SIGNATURE, "action": [0, 2, 1], "radius": used}}
                for r in later]
        rejoined = HyperAgent(SPACE, seed=1)
        rejoined.featurize(TUNABLES, incumbent, ours[-32:])
        assert rejoined.scripted(TUNABLES) is None and rejoined.radius(1) == expect


def _design_campaign(outcomes: list[float], seed: int = 5) -> tuple[Any, list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """A HyperAgent run through its opening design on train.py, each design run recorded with the
    given val_bpb (the first baseline 2.0, noise 0.01) before the next is proposed."""
    from arrl.hyper import HyperAgent

    records: list[dict[str, Any]] = [{"experiment_id": f"e{i:05d}", "status": "ok", "val_bpb": v, "role": "baseline",
                                      "reward": 0.0, "sigma": 0.01} for i, v in ((1, 2.0), (2, 2.01))]
    incumbent = {"val_bpb": 2.0, "experiment_id": "e00001"}
    agent = HyperAgent(SPACE, seed=seed)
    agent.featurize(TUNABLES, incumbent, records)
    programs = []
    for i, val in enumerate(outcomes, start=3):
        program = agent.scripted(TUNABLES)
        assert program is not None and agent.extra(TUNABLES, program).get("design")
        programs.append(program)
        records.append({"experiment_id": f"e{i:05d}", "status": "ok", "val_bpb": val, "role": "edit", "reward": 0.0,
                        "sigma": 0.01, "extra": agent.extra(TUNABLES, program)})
        agent.featurize(TUNABLES, incumbent, records)
    return agent, programs, records


def test_a_design_that_never_won_is_split_into_the_single_probes_of_its_least_losing_experiment() -> None:
    """On a nearly tuned script every design experiment loses; the one that loses least most likely
    holds a probe that pays (a tunable far from its optimum) masked by two that cost, so its probes
    are run one by one before the policy acts. A design with a win is not split."""
    agent, programs, _ = _design_campaign([2.3, 2.2, 2.05, 2.4, 2.3, 2.3])
    split = []
    while (program := agent.scripted(TUNABLES)) is not None:
        assert len(program) == 1 and agent.extra(TUNABLES, program).get("split") is True
        split.append(program[0])
    assert sorted(split, key=lambda e: e["name"]) == sorted(programs[2], key=lambda e: e["name"])
    # Where the incumbent has taken one probe's value since (a run that recombined it won), that
    # probe is no edit any more and is left out, not proposed as a no-op.
    again, programs, _ = _design_campaign([2.3, 2.2, 2.05, 2.4, 2.3, 2.3])
    first = again.scripted(TUNABLES)
    assert first is not None
    taken = next(e for e in programs[2] if e["name"] != first[0]["name"])
    moved = {n: Tunable(**{**t.__dict__, "value": taken["value"] if n == taken["name"] else t.value})
             for n, t in TUNABLES.items()}
    rest = []
    while (program := again.scripted(moved)) is not None:
        rest.append(program[0])
    assert sorted(e["name"] for e in first + rest) == sorted(e["name"] for e in programs[2] if e is not taken)
    winner, _, _ = _design_campaign([2.3, 2.2, 2.05, 2.4, 1.95, 2.3])  # 1.95 beats 2.0 by a noise unit
    assert winner.scripted(TUNABLES) is None
    # Not before every design run is recorded: the split waits for the last outcome.
    waiting, _, records = _design_campaign([2.3, 2.2, 2.05, 2.4, 2.3])
    assert waiting.extra(TUNABLES, waiting.scripted(TUNABLES)).get("design")  # the sixth design run
    assert waiting.scripted(TUNABLES) is None


def test_a_win_that_moved_one_tunable_is_followed_by_the_same_step_twice_as_long() -> None:
    """A pattern move: after a run that moved one numeric tunable replaced the incumbent by a noise
    unit or more, the next proposal moves it on the same way, `EXTEND_GROWTH` times as far; a win
    within the noise, or one that moved several tunables, earns none."""
    from arrl.edits import knobs
    from arrl.operators import EXTEND_GROWTH, Memory, Operators

    assert EXTEND_GROWTH == 2.0
    base = knobs(TUNABLES)
    ops = Operators(SPACE)
    moved = {**base, "GRAD_CLIP": 1.5}  # 1.0 -> 1.5 of 0..5: 0.1 of the domain, from 0.2
    won = {n: Tunable(**{**t.__dict__, "value": moved[n]}) for n, t in TUNABLES.items()}
    assert ops.extend(base, moved, won, Memory()) == [{"op": "set", "name": "GRAD_CLIP", "value": 2.5}]
    assert ops.extend(base, {**moved, "DROPOUT": 0.1}, won, Memory()) is None  # two tunables moved
    assert ops.extend(base, {**base, "ACTIVATION": "gelu"}, TUNABLES, Memory()) is None  # no numeric one
    edge = {**base, "GRAD_CLIP": 5.0}
    assert ops.extend({**base, "GRAD_CLIP": 4.0}, edge, {n: Tunable(**{**t.__dict__, "value": edge[n]})
                                                         for n, t in TUNABLES.items()}, Memory()) is None
    ran = Memory()
    assert ops.extend(base, moved, won, ran) is not None
    assert ops.extend(base, moved, won, ran) is None  # proposed once: never again

    # In the agent: the design is over (one of its runs won), then a run that moved GRAD_CLIP wins.
    def after_win(gain: float) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
        agent, _, records = _design_campaign([2.3, 1.95, 2.3, 2.3, 2.3, 2.3])
        assert agent.scripted(TUNABLES) is None
        rec = {"experiment_id": "e00009", "status": "ok", "val_bpb": 2.0 - gain, "role": "edit", "reward": 1.0,
               "sigma": 0.01, "kept": True, "extra": {"knobs": moved}}
        agent.featurize(won, {"val_bpb": 2.0 - gain, "experiment_id": "e00009"}, records + [rec])
        program = agent.scripted(won)
        return program, agent.extra(won, program) if program is not None else None

    program, extra = after_win(0.05)
    assert program == [{"op": "set", "name": "GRAD_CLIP", "value": 2.5}] and extra and extra.get("extend") is True
    assert after_win(0.005) == (None, None)  # within the noise: the policy's turn


def test_model_leaves_the_pending_proposals_tunables_alone_until_its_outcome_is_recorded() -> None:
    """The pipeline proposes one experiment ahead: the next proposal asks about other tunables than
    the one still running, and the running one's tunables are free again once it is recorded."""
    from arrl.hyper import HyperAgent
    from arrl.operators import Encoder

    enc, rng = Encoder(SPACE), random.Random(2)
    base = {n: t.value for n, t in TUNABLES.items()}

    def val(knobs: dict[str, Any]) -> float:  # MATRIX_LR matters far more than anything else
        return 2.0 + 2.0 * (enc.unit("MATRIX_LR", knobs["MATRIX_LR"]) - 0.95) ** 2 + rng.gauss(0, 0.002)

    records = []
    for i in range(40):  # runs around the baseline, each tunable moved now and then
        knobs = dict(base)
        for name in rng.sample(enc.numeric, 3):
            knobs[name] = enc.value(name, enc.unit(name, base[name]) + rng.uniform(-0.2, 0.2))
        for name in rng.sample(enc.choice, 2):
            knobs[name] = rng.choice(SPACE[name]["choices"])
        records.append({"experiment_id": f"e{i + 2:05d}", "status": "ok", "val_bpb": val(knobs), "role": "edit",
                        "reward": 0.0, "extra": {"knobs": knobs}})
    incumbent = {"val_bpb": val(base), "experiment_id": "e00001"}
    agent = HyperAgent(SPACE, seed=5, design=False)
    model_far = [0, 1, 2]  # operator model, two edits, the largest radius
    agent.featurize(TUNABLES, incumbent, records)
    first = agent.program(model_far, TUNABLES)
    assert "MATRIX_LR" in {e["name"] for e in first}
    for _ in range(3):  # its outcome still pending: other tunables, whatever the surrogate's draw
        agent.featurize(TUNABLES, incumbent, records)
        pending = agent.program(model_far, TUNABLES)
        assert "MATRIX_LR" not in {e["name"] for e in pending}
        agent.pending.pop()  # forget it, so `first` stays the newest pending proposal
    knobs = {n: t.value for n, t in TUNABLES.items()}
    knobs.update({t.name: v for t, v in resolve_program(TUNABLES, first)})
    records.append({"experiment_id": "e00042", "status": "aborted", "val_bpb": None, "role": "edit",
                    "reward": -1.0, "extra": {"knobs": knobs}})  # any status: its outcome is known
    agent.featurize(TUNABLES, incumbent, records)
    agent.program(model_far, TUNABLES)
    assert not any("MATRIX_LR" in names for _, names in agent.pending[:-1])  # only the newest may move it


def test_operators_propose_valid_programs_never_run_before() -> None:
    from arrl.operators import OPERATORS, RADII, Memory, Operators, Surrogate, config_key

    ops, memory, rng = Operators(SPACE), Memory(), random.Random(0)
    np_rng = np.random.default_rng(0)
    tunables = TUNABLES
    memory.observe(tunables, {"experiment_id": "e1", "val_bpb": 2.5}, [])
    for i in range(60):
        surrogate = Surrogate(ops.enc, list(memory.points.values()), 0.01)
        op, n, radius = i % len(OPERATORS), 1 + i % 3, RADII[i % len(RADII)]
        program = ops.propose(op, n, radius, tunables, memory, surrogate, rng, np_rng)
        changes = resolve_program(tunables, program)  # raises on an invalid or no-op edit
        child = {name: t.value for name, t in tunables.items()} | {t.name: v for t, v in changes}
        val = None if i % 7 == 0 else 2.5 + rng.gauss(0, 0.05)
        memory._add(f"x{i}", child, val)
        assert len(memory.points) == i + 2  # a configuration not seen before
        assert config_key(child) in memory.keys


def test_the_surrogate_finds_the_bowl_of_a_quadratic() -> None:
    from arrl.operators import Encoder, Point, Surrogate

    space = {"A": {"kind": "linear", "low": 0.0, "high": 1.0, "choices": None},
             "B": {"kind": "log", "low": 1e-4, "high": 1.0, "choices": None},
             "C": {"kind": "choice", "low": None, "high": None, "choices": ["x", "y"]}}
    enc, rng = Encoder(space), np.random.default_rng(1)
    points = []
    for _ in range(30):
        knobs = {"A": float(rng.uniform()), "B": float(10 ** rng.uniform(-4, 0)), "C": str(rng.choice(["x", "y"]))}
        val = 2.0 + (enc.unit("A", knobs["A"]) - 0.7) ** 2 + 0.1 * (knobs["C"] == "x") + rng.normal(0, 0.005)
        points.append(Point(knobs, float(val)))
    moves = Surrogate(enc, points, 0.005).moves(Surrogate(enc, points, 0.005).mean,
                                                {"A": 0.2, "B": 0.01, "C": "x"}, radius=0.35)
    best = {name: (gain, value) for gain, name, value in moves}
    assert best["A"][0] > 0.1 and 0.45 < best["A"][1] < 0.6  # towards 0.7, as far as the radius allows
    assert best["C"] == (pytest.approx(0.1, abs=0.03), "y")
    assert best.get("B", (0.0,))[0] < 0.02  # B does not matter


def test_the_surrogate_sees_a_step_between_neighbouring_ints() -> None:
    """An int whose odd values cost 0.1 bpb on top of a smooth bowl centred between two values: the
    quadratic alone would call the odd value at the bottom as good as its even neighbour; the level
    offsets see the step and move off it. A wide int's offsets go by the power of two dividing it."""
    from arrl.operators import LEVELS_MAX, POW2_CLASSES, Encoder, Point, Surrogate

    space = {"D": {"kind": "int", "low": 1, "high": 8, "choices": None},
             "B": {"kind": "int", "low": 2, "high": 64, "choices": None}}
    enc, rng = Encoder(space), np.random.default_rng(3)
    assert 8 <= LEVELS_MAX and enc.n_features == 2 * 2 + 8 + POW2_CLASSES
    assert [enc.level("B", v) for v in (7, 6, 12, 24, 16, 64)] == [0, 1, 2, 3, 4, 4]
    assert [enc.level("D", v) for v in (1, 5, 8)] == [0, 4, 7]
    points = []
    for _ in range(3):
        for d in range(1, 9):
            b = int(rng.integers(2, 65))
            val = 2.0 + (enc.unit("D", d) - 0.6) ** 2 + 0.1 * (d % 2) + 0.08 * (b % 8 != 0) + rng.normal(0, 0.005)
            points.append(Point({"D": d, "B": b}, float(val)))
    sur = Surrogate(enc, points, 0.005)
    best = {name: (gain, value) for gain, name, value in sur.moves(sur.mean, {"D": 5, "B": 20}, radius=0.15)}
    assert best["D"][1] == 6 and best["D"][0] > 0.06
    assert best["B"][1] in (16, 24) and best["B"][0] > 0.04  # the multiples of 8 within the radius


def test_crashes_bound_the_models_moves_instead_of_bending_its_fit() -> None:
    """A learning rate best just below where runs crash: a crash counted as the worst run bent the
    fit back to the incumbent. Crashes stay out of the fit; a crash near the incumbent stops a move
    halfway to it (so the search closes in on the edge), a crash far from it does not, and a choice
    that crashed nearby is not proposed."""
    from arrl.operators import CRASH_NEAR, Encoder, Point, Surrogate

    space = {n: {"kind": "linear", "low": 0.0, "high": 1.0, "choices": None} for n in "ABCDE"}
    space["F"] = {"kind": "choice", "low": None, "high": None, "choices": ["x", "y"]}
    enc, rng = Encoder(space), np.random.default_rng(4)
    incumbent = {"A": 0.5, "B": 0.5, "C": 0.5, "D": 0.5, "E": 0.5, "F": "x"}
    points = []
    for _ in range(30):
        knobs = {**incumbent, "A": float(rng.uniform(0.0, 0.55)), "B": float(rng.uniform()), "F": str(rng.choice(["x", "y"]))}
        points.append(Point(knobs, float(2.0 + (knobs["A"] - 0.8) ** 2 + 0.1 * (knobs["F"] == "x") + rng.normal(0, 0.003))))

    def best_moves(crashes: list[dict]) -> dict:
        sur = Surrogate(enc, points + [Point(c, None) for c in crashes], 0.003)
        assert len(sur.y) == len(points)  # crashes are not in the fit
        return {name: value for _, name, value in sur.moves(sur.mean, incumbent, radius=0.35)}

    assert best_moves([])["A"] > 0.75  # the fit's own optimum, 0.8, inside the radius
    near = {**incumbent, "A": 0.7}
    assert best_moves([near])["A"] <= 0.6 + 1e-9  # halfway to the crash
    far = {**incumbent, "A": 0.7, **{n: 0.9 for n in "BCDE"[:CRASH_NEAR]}}
    assert best_moves([far])["A"] > 0.75  # too many tunables apart to say what crashed
    # ... unless A crashed again, at that value or nearer, in other company: then it points at A.
    elsewhere = {**incumbent, "A": 0.65, **{n: 0.1 for n in "BCDE"[:CRASH_NEAR]}}
    assert best_moves([far, elsewhere])["A"] <= 0.6 + 1e-9  # halfway to 0.7, which two crashes reach
    beyond = {**far, "A": 0.95}
    assert best_moves([far, beyond])["A"] == pytest.approx(0.725)  # 0.7 and 0.95 crashed: halfway to 0.95
    below = {**far, "A": 0.2}
    assert best_moves([far, below])["A"] > 0.75  # one crash on each side: neither repeats
    assert best_moves([])["F"] == "y"
    assert "F" not in best_moves([{**incumbent, "F": "y"}])  # the choice that crashed here


def test_the_surrogate_keeps_the_spread_of_a_landscape_whose_runs_differ_by_whole_bpb() -> None:
    """The winsor cap is relative to the runs' spread: on a steep bowl the runs far from the optimum
    still tell the model how steep it is (a fixed cap of 0.3 bpb made them one plateau), while one
    hopeless run among close ones is still capped."""
    from arrl.operators import WINSOR_MIN, Encoder, Point, Surrogate

    enc = Encoder({"A": {"kind": "linear", "low": 0.0, "high": 1.0, "choices": None}})
    steep = [Point({"A": u}, 2.2 + 4.0 * (u - 0.85) ** 2) for u in np.linspace(0.0, 1.0, 11)]
    y = Surrogate(enc, steep, 0.01).y
    assert y.max() - y.min() > 1.0 and sorted(y)[:8] == pytest.approx(sorted(p.val for p in steep)[:8])
    close = [Point({"A": u}, 2.5 + 0.01 * u) for u in np.linspace(0.0, 0.9, 10)] + [Point({"A": 1.0}, 7.5)]
    y = Surrogate(enc, close, 0.01).y
    assert y.max() == pytest.approx(2.5 + WINSOR_MIN)  # the saturated run no longer bends the fit


def test_the_surrogate_draws_from_near_repeats_with_little_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of runs a hair apart, scored with almost no noise, make the ridge's precision matrix
    ill-conditioned; its inverse can come out slightly indefinite (3 of these 200 histories on the
    machines this was written on). The surrogate must still fit and draw (the proposer would
    otherwise fail on `LinAlgError`), and its fallback must draw with the posterior's covariance."""
    from arrl.operators import Encoder, Point, Surrogate

    enc, base = Encoder(SPACE), {n: t.value for n, t in TUNABLES.items()}
    histories = []
    for trial in range(200):
        rng = random.Random(trial)
        points = []
        for _ in range(rng.choice([20, 60, 150, 300])):
            knobs = dict(base)
            for name in rng.sample(enc.numeric, 3):
                step = rng.uniform(-0.001, 0.001) * rng.choice([1, 100])
                knobs[name] = enc.value(name, enc.unit(name, base[name]) + step)
            points.append(Point(knobs, 2.0 + rng.gauss(0, 1e-4)))
        histories.append(points)
        draws = np.stack([Surrogate(enc, points, 1e-4).sample(np.random.default_rng(k)) for k in range(3)])
        assert np.all(np.isfinite(draws))
    # The fallback itself, forced: the first Cholesky (of the inverse) fails, the precision's is used.
    real = np.linalg.cholesky
    calls = []

    def first_fails(m: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return real(m)

    points = histories[0]
    monkeypatch.setattr(np.linalg, "cholesky", first_fails)
    sur = Surrogate(enc, points, 1e-4)
    monkeypatch.undo()
    assert len(calls) == 3  # the smooth stage's two, then the level offsets' (which succeeds)
    b = enc.n_base
    x = np.stack([enc.features(p.knobs) for p in points])[:, :b]
    a = x.T @ x / 1e-3 ** 2 + np.diag(enc.precision[:b])  # noise floored at 1e-3 bpb
    chol = sur.cov_chol[:b, :b]
    assert chol @ chol.T == pytest.approx(np.linalg.inv(a), rel=1e-4, abs=1e-10)
