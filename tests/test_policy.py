"""The learned policy: state features, valid programs, exact log-probabilities, weights on disk."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from arrl.edits import GrammarError, Tunable, apply_program, parse_tunables, resolve_program, search_space
from arrl.policy import (
    ACTION_LEN,
    Policy,
    SpaceMismatch,
    decode_state,
    encode_state,
    featurize,
    from_bytes,
    layout_for,
    to_bytes,
)
from arrl.strategies import Context, make_strategy

torch.set_num_threads(1)
TRAIN = Path(__file__).parents[1] / "target" / "train.py"
SOURCE = TRAIN.read_text()
TUNABLES = parse_tunables(SOURCE)
SPACE = search_space(TUNABLES)
STATUSES = ["ok", "ok", "ok", "crashed", "aborted", "timed_out", "duplicate", "invalid", "weird"]


def history(n: int, rng: random.Random, tunables: dict[str, Tunable] = TUNABLES) -> list[dict[str, Any]]:
    """Ledger-like records with every kind of status, verdict and missing field."""
    records: list[dict[str, Any]] = []
    for i in range(n):
        status = rng.choice(STATUSES)
        program = [] if i < 2 else _random_program(tunables, rng)
        records.append({
            "experiment_id": f"e{i + 1:05d}", "program": program, "status": status,
            "val_bpb": rng.choice([None, 2.0 + rng.gauss(0, 0.05), float("nan")]),
            "reward": rng.choice([rng.gauss(0, 3), -3.0, 5.0, None]), "kept": rng.random() < 0.2,
            "selfeval": rng.choice([None, {"decision": "abort", "p_worse": 0.97},
                                    {"decision": "continue", "p_worse": 0.2}]),
            "training_seconds": rng.choice([None, 0.0, 30.0]), "steps": rng.choice([None, 0, 120, 900]),
            "peak_memory_mb": rng.choice([None, 300.0, 2000.0]), "role": "baseline" if i < 2 else "edit",
            "parent_bpb": rng.choice([None, 2.01]), "incumbent_bpb": rng.choice([None, 2.0]),
        })
    return records


def _random_program(tunables: dict[str, Tunable], rng: random.Random) -> list[dict[str, Any]]:
    from arrl.edits import random_program

    return random_program(tunables, rng)


def bounded_source(rng: random.Random) -> str:
    """The real script with some tunables pushed to their bounds, where some edits are no-ops."""
    program = []
    for name in rng.sample(sorted(TUNABLES), 3):
        t = TUNABLES[name]
        value = (t.choices[-1] if t.choices else rng.choice([t.low, t.high]))
        try:
            resolve_program(TUNABLES, [{"op": "set", "name": name, "value": value}])
        except GrammarError:
            continue  # already there
        program.append({"op": "set", "name": name, "value": value})
    return apply_program(SOURCE, program)[0]


def at_bounds(rng: random.Random) -> dict[str, Tunable]:
    return parse_tunables(bounded_source(rng))


def test_featurize_has_a_fixed_size_and_bounded_values() -> None:
    rng = random.Random(0)
    size = layout_for(SPACE).size
    contexts = [Context(TUNABLES, None, []), Context(TUNABLES, {"val_bpb": 2.0}, history(5, rng)),
                Context(at_bounds(rng), {"val_bpb": 1.9}, history(80, rng))]
    for context in contexts:
        state = featurize(SPACE, context, horizon=40)
        assert state.shape == (size,) and state.dtype == np.float32
        assert np.isfinite(state).all() and np.abs(state).max() <= 1.0
        # float16-exact, so the learner recomputes exactly what the proposer sampled from.
        assert np.array_equal(decode_state(encode_state(state)), state)
    # The history changes the state; an empty one is all zeros in the window block.
    assert not np.array_equal(featurize(SPACE, contexts[0]), featurize(SPACE, contexts[1]))


def test_sampled_programs_are_always_valid_on_the_real_script() -> None:
    rng = random.Random(1)
    policy = Policy(SPACE, seed=3)
    generator = torch.Generator().manual_seed(0)
    lengths = set()
    for round_ in range(6):
        source = SOURCE if round_ == 0 else bounded_source(rng)
        tunables = parse_tunables(source)
        state = featurize(SPACE, Context(tunables, None, history(10, rng, tunables)))
        for i in range(50):
            act = policy.act(state, generator)
            assert 1 <= len(act.program) <= 3 and len(act.action) == ACTION_LEN
            assert len({e["name"] for e in act.program}) == len(act.program)
            resolve_program(tunables, act.program)  # raises GrammarError on a no-op or invalid edit
            if i < 10:  # the full rewrite re-parses the script (~13 ms): a sample of them suffices
                apply_program(source, act.program)
            lengths.add(len(act.program))
    assert lengths == {1, 2, 3}


def test_logprob_of_a_sample_equals_evaluate_on_the_same_action() -> None:
    rng = random.Random(2)
    policy = Policy(SPACE, seed=5)
    generator = torch.Generator().manual_seed(1)
    acts = []
    for _ in range(4):
        state = featurize(SPACE, Context(at_bounds(rng), {"val_bpb": 2.0}, history(20, rng)))
        acts += [policy.act(state, generator) for _ in range(25)]
    # Through the wire format, as the learner receives them.
    states = torch.from_numpy(np.stack([decode_state(encode_state(a.state)) for a in acts]))
    logprob, entropy, value = policy.evaluate(states, torch.tensor([a.action for a in acts]))
    assert torch.allclose(logprob, torch.tensor([a.logprob for a in acts]), atol=1e-4)
    assert torch.allclose(value, torch.tensor([a.value for a in acts]), atol=1e-5)
    assert (entropy > 0).all()
    # A different action has a different log-probability: evaluate really looks at the action.
    other = torch.tensor([acts[1].action] * len(acts))
    assert not torch.allclose(policy.evaluate(states, other)[0], logprob)


def test_weights_round_trip_and_a_different_space_is_refused() -> None:
    policy = Policy(SPACE, seed=7)
    state = torch.from_numpy(featurize(SPACE, Context(TUNABLES, None, history(12, random.Random(3)))))[None]
    action = torch.tensor([policy.act(state[0].numpy(), torch.Generator().manual_seed(2)).action])
    blob = to_bytes(policy, {"note": "x"})
    loaded, meta = from_bytes(blob, SPACE)
    assert meta == {"note": "x"}
    for a, b in zip(policy.evaluate(state, action), loaded.evaluate(state, action), strict=True):
        assert torch.equal(a, b)

    narrower = dict(SPACE, MATRIX_LR={**SPACE["MATRIX_LR"], "high": 0.1})
    with pytest.raises(SpaceMismatch, match="MATRIX_LR"):
        from_bytes(blob, narrower)
    fewer = {k: v for k, v in SPACE.items() if k != "DROPOUT"}
    with pytest.raises(SpaceMismatch, match="DROPOUT"):
        from_bytes(blob, fewer)
    # The ppo strategy with those weights refuses a script whose tunables differ.
    other = parse_tunables(SOURCE.replace("# search: log 0.0001..0.2", "# search: log 0.0001..0.1"))
    strategy = make_strategy("ppo", 0, weights=blob)
    with pytest.raises(SpaceMismatch):
        asyncio.run(strategy.propose(Context(other, None, [])))


def test_ppo_strategy_choice_carries_what_the_learner_needs(tmp_path: Path) -> None:
    checkpoint = tmp_path / "policy.pt"
    checkpoint.write_bytes(to_bytes(Policy(SPACE, seed=11)))
    strategy = make_strategy("ppo", 4, checkpoint=checkpoint, horizon=50)
    context = Context(TUNABLES, {"val_bpb": 2.0}, history(6, random.Random(4)))
    choice = asyncio.run(strategy.propose(context))
    apply_program(SOURCE, choice.program)
    assert choice.policy_version == 0  # not from a learner yet
    # Plain msgpack, as proposals and transitions travel.
    extra = msgpack.unpackb(msgpack.packb(choice.extra, use_bin_type=True), raw=False)
    assert extra["space"] == layout_for(SPACE).signature
    assert all(type(a) is int for a in extra["action"]) and len(extra["action"]) == ACTION_LEN
    state = decode_state(extra["state"])
    assert np.array_equal(state, featurize(SPACE, context, horizon=50))
    policy, _ = from_bytes(checkpoint.read_bytes())
    with torch.no_grad():
        logprob, _, value = policy.evaluate(torch.from_numpy(state)[None], torch.tensor([extra["action"]]))
    assert abs(float(logprob[0]) - choice.logprob) < 1e-4 and abs(float(value[0]) - choice.value) < 1e-5
