"""Proposal strategies behind one interface: given the incumbent, choose an edit program.

Every strategy runs through the same pipeline (applier, executor, reward), so comparisons
between them are fair. A strategy returns the program with the behaviour log-probability,
value estimate and policy version the PPO learner needs; strategies without a policy return
zeros there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from arrl.edits import Tunable, random_program


@dataclass
class Context:
    """What a strategy may look at when proposing."""

    tunables: dict[str, Tunable]  # the parent's (the incumbent's) tunables
    incumbent: dict[str, Any] | None  # hash, val_bpb, experiment_id, version
    recent: list[dict[str, Any]] = field(default_factory=list)  # last recorded experiments


@dataclass
class Choice:
    program: list[dict[str, Any]]
    logprob: float = 0.0
    value: float = 0.0
    policy_version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific, carried to the learner


class Strategy(Protocol):
    name: str

    async def propose(self, context: Context) -> Choice: ...


class RandomStrategy:
    """Uniform over the edit grammar: 1 to 3 random atomic edits of the incumbent."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    async def propose(self, context: Context) -> Choice:
        return Choice(random_program(context.tunables, self.rng))


STRATEGIES = {"random": RandomStrategy}


def make_strategy(name: str, seed: int, **options: Any) -> Strategy:
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
    return factory(seed, **options)
