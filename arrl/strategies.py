"""Proposal strategies behind one interface: given the incumbent, choose an edit program.

Every strategy runs through the same pipeline (applier, executor, reward), so comparisons
between them are fair. A strategy returns the program with the behaviour log-probability,
value estimate and policy version the PPO learner needs; strategies without a policy return
zeros there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from arrl.edits import Tunable, random_program, search_space


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


class PPOStrategy:
    """The learned policy (`arrl.hyper`, or `arrl.policy`), sampled on the proposer's context.

    Options: `bus`: before every proposal, one cheap version check of the learner's published
    weights, reloaded when the version changed (proposers never wait for the learner);
    `weights` (bytes) or `checkpoint` (a path): start from a pre-trained policy; `horizon`: the
    campaign's planned number of experiments (the budget-used feature). Without weights it
    starts from the shipped pre-trained hyper-heuristic policy (`arrl.hyper`; `pretrained=False`:
    a fresh one seeded by `seed`). Weights of the older edit policy (`arrl.policy`) still work.
    `design=False` skips the opening design and its split (`HyperAgent.scripted`): the policy
    proposes from the first experiment.
    torch is imported only when this is built. The state and the action indices go into
    `Choice.extra`, so the transition carries them to the learner.
    """

    name = "ppo"

    def __init__(self, seed: int, *, bus: Any = None, weights: bytes | None = None,
                 checkpoint: str | Path | None = None, horizon: int = 100, pretrained: bool = True,
                 design: bool = True) -> None:
        import torch

        from arrl import hyper, policy

        self._p, self._h = policy, hyper
        self.seed, self.bus, self.horizon, self.design = seed, bus, horizon, design
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0  # the bus version of the weights in use; 0: not from the learner
        if weights is None and checkpoint is not None:
            weights = Path(checkpoint).read_bytes()
        if weights is None and pretrained:  # the shipped policy, as the learner stage starts from it
            weights = hyper.pretrained_weights()
        self.policy = policy.from_bytes(weights)[0] if weights is not None else None
        self.agent: Any = None  # the hyper-heuristic's campaign memory, made on the first proposal

    async def _reload(self, space: dict[str, Any]) -> None:
        from arrl.campaign import WEIGHTS

        version = await self.bus.get_version(WEIGHTS)
        if version and version != self.version:
            current = await self.bus.get_versioned(WEIGHTS)
            if current is not None:
                self.policy, _ = self._p.from_bytes(current[1], space)
                self.version = current[0]

    async def propose(self, context: Context) -> Choice:
        space = search_space(context.tunables)
        if self.bus is not None:
            await self._reload(space)
        if self.policy is None:
            self.policy = self._h.HyperPolicy(seed=self.seed)
        if getattr(self.policy, "kind", "") == "hyper":
            return self._propose_hyper(context, space)
        signature = self._p.space_signature(space)
        if self.policy.layout.signature != signature:
            raise self._p.SpaceMismatch("the ppo strategy's weights were trained for another search space")
        state = self._p.featurize(space, context, horizon=self.horizon)
        act = self.policy.act(state, self.generator)
        extra = {"state": self._p.encode_state(state), "action": act.action, "space": signature}
        return Choice(act.program, act.logprob, act.value, self.version, extra)

    def _propose_hyper(self, context: Context, space: dict[str, Any]) -> Choice:
        """The policy picks operator, edit count and radius; the operator writes the program. The
        knobs that will run go into `extra`, so this strategy's memory (here or after a restart)
        knows every run's configuration from the records alone."""
        if self.agent is None:
            self.agent = self._h.HyperAgent(space, self.seed, self.horizon, design=self.design)
        state = self.agent.featurize(context.tunables, context.incumbent, context.recent)
        scripted = self.agent.scripted(context.tunables)
        if scripted is not None:  # a rule's program: no state and action in `extra`, the learner leaves it out
            return Choice(scripted, 0.0, 0.0, self.version, self.agent.extra(context.tunables, scripted))
        action, logprob, value = self.policy.sample(state, self.generator)
        program = self.agent.program(action, context.tunables)
        extra = {"state": self._p.encode_state(state), "space": self._h.SIGNATURE,
                 **self.agent.extra(context.tunables, program, action)}
        return Choice(program, logprob, value, self.version, extra)


STRATEGIES: dict[str, Callable[..., Strategy]] = {"random": RandomStrategy, "ppo": PPOStrategy}
import arrl.baselines  # noqa: E402,F401  (registers greedy, tpe and cmaes into STRATEGIES)


def make_strategy(name: str, seed: int, **options: Any) -> Strategy:
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
    return factory(seed, **options)
