"""PPO for the edit policy, CleanRL-style: one readable update, top to bottom.

The problem is a contextual bandit. One proposal earns one reward and does not change what the
policy is asked next in any way the policy could plan for (the incumbent moves only when an edit
wins, which the next state shows anyway), so there is no bootstrapping and no GAE:

    advantage = r - V(s)      with V the value head *before* this update, r the normalised reward
    value target = r

Everything else is standard PPO (CleanRL ppo.py, checked against Stable-Baselines3):
clipped surrogate (0.2), value loss x 0.5, entropy bonus x 0.01, advantages normalised per
minibatch, gradients clipped to 0.5, Adam eps 1e-5, and a target KL kept on because samples
are few and each costs a GPU run.

Asynchrony. Proposals are sampled by whatever policy version a proposer held, while the learner
has moved on. The importance ratio pi_new / pi_behaviour uses the behaviour log-probability
stored with each proposal, so a sample from an older version is still a correct (clipped)
off-policy estimate. Samples more than `max_staleness` versions old are *dropped*, not
down-weighted: their ratio is then far from 1 on most actions, clipping zeroes their gradient
anyway, and keeping them would only distort the advantage normalisation. The target KL is
measured against the policy at the start of this update (not the behaviour policy), so it
limits how far one update moves the policy whatever the samples' age.

Rewards are heavy-tailed (one crash is -3 sigma, one lucky edit +5): they are divided by a
running standard deviation (like gym's NormalizeReward) and clipped, inside the learner; the
running statistics travel with the weights so a carried-over policy keeps its value scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from arrl.hyper import ACTION_LEN as HYPER_ACTION_LEN
from arrl.hyper import HyperPolicy
from arrl.policy import ACTION_LEN, Policy, decode_state, from_bytes, to_bytes


@dataclass
class PPOConfig:
    lr: float = 3e-4
    clip: float = 0.2  # clip range of the importance ratio
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    epochs: int = 4
    minibatch_size: int = 8
    max_grad_norm: float = 0.5
    adam_eps: float = 1e-5
    target_kl: float | None = 0.02  # stop an update once the policy moved this far (k3 estimate)
    max_staleness: int = 4  # drop samples from policies more than this many versions old
    reward_clip: float = 10.0  # after normalisation
    norm_adv: bool = True


@dataclass
class Sample:
    """One proposal's outcome, as the learner needs it."""

    state: np.ndarray
    action: list[int]
    logprob: float  # behaviour log-probability, stored when the proposal was made
    reward: float
    policy_version: int
    experiment_id: str = ""
    # Set by pre-training that credits whole campaigns (`arrl.pretrain`, credit "campaign"): the
    # campaign's result against its group's, used in place of r - V(s). Not carried over Redis.
    advantage: float | None = None

    def to_plain(self) -> dict[str, Any]:
        return {"state": np.asarray(self.state, np.float16).tobytes(), "action": list(self.action),
                "logprob": self.logprob, "reward": self.reward, "policy_version": self.policy_version,
                "experiment_id": self.experiment_id}

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> Sample:
        state = np.frombuffer(d["state"], np.float16).astype(np.float32)
        return cls(state, list(d["action"]), float(d["logprob"]), float(d["reward"]),
                   int(d["policy_version"]), str(d.get("experiment_id", "")))


def sample_from_transition(message: Mapping[str, Any], signature: str | None = None) -> Sample | None:
    """A transition's PPO sample, or None when it carries none (another strategy, a baseline run)
    or was made for another search space."""
    extra = message.get("extra")
    if not isinstance(extra, Mapping) or "state" not in extra or "action" not in extra:
        return None
    if signature is not None and extra.get("space") != signature:
        return None
    reward = message.get("reward")
    if not isinstance(reward, int | float) or not math.isfinite(reward):
        return None
    action = [int(a) for a in extra["action"]]
    if len(action) not in (ACTION_LEN, HYPER_ACTION_LEN):  # the edit policy's or the hyper-heuristic's
        return None
    return Sample(decode_state(extra["state"]), action, float(message.get("logprob") or 0.0), float(reward),
                  int(message.get("policy_version") or 0), str(message.get("experiment_id", "")))


@dataclass
class RewardNormalizer:
    """Running mean and variance of raw rewards (Welford, batch form); divides by the std."""

    count: float = 1e-4
    mean: float = 0.0
    var: float = 1.0

    def update(self, rewards: Sequence[float]) -> None:
        x = np.asarray(rewards, np.float64)
        if x.size == 0:
            return
        b_mean, b_var, n = float(x.mean()), float(x.var()), float(x.size)
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def __call__(self, rewards: Sequence[float], clip: float) -> np.ndarray:
        # Scale only, no centring: the value head carries the mean, as in gym's NormalizeReward.
        x = np.asarray(rewards, np.float64) / math.sqrt(self.var + 1e-8)
        return np.clip(x, -clip, clip).astype(np.float32)


def ppo_update(policy: Policy | HyperPolicy, optimizer: torch.optim.Optimizer, samples: Sequence[Sample],
               normalizer: RewardNormalizer, config: PPOConfig, current_version: int,
               generator: torch.Generator | None = None) -> dict[str, Any]:
    """One PPO update on a batch of bandit samples; returns its statistics."""
    fresh = [s for s in samples if current_version - s.policy_version <= config.max_staleness]
    stats: dict[str, Any] = {"samples": len(fresh), "dropped_stale": len(samples) - len(fresh), "epochs": 0,
                             "steps": 0, "stopped_early": False, "policy_loss": 0.0, "value_loss": 0.0,
                             "entropy": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0}
    if not fresh:
        return stats

    raw = [s.reward for s in fresh]
    normalizer.update(raw)
    states = torch.from_numpy(np.stack([s.state for s in fresh]))
    actions = torch.tensor([s.action for s in fresh], dtype=torch.long)
    behaviour_logprob = torch.tensor([s.logprob for s in fresh], dtype=torch.float32)
    returns = torch.from_numpy(normalizer(raw, config.reward_clip))
    with torch.no_grad():
        start_logprob, _, start_value = policy.evaluate(states, actions)
    if all(s.advantage is not None for s in fresh):  # credited by their campaign's result
        advantages = torch.tensor([s.advantage for s in fresh], dtype=torch.float32)
    else:
        advantages = returns - start_value  # contextual bandit: no bootstrapping, no GAE
    stats.update(reward_mean=float(np.mean(raw)), reward_std=float(np.std(raw)),
                 value_mean=float(start_value.mean()), staleness_max=max(current_version - s.policy_version
                                                                            for s in fresh))

    n, mb = len(fresh), max(1, min(config.minibatch_size, len(fresh)))
    last: dict[str, float] = {}
    clip_fracs: list[float] = []
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, mb):
            idx = order[start:start + mb]
            logprob, entropy, value = policy.evaluate(states[idx], actions[idx])

            # How far this update has moved the policy so far (k3 estimator, always >= 0).
            with torch.no_grad():
                log_drift = logprob - start_logprob[idx]
                approx_kl = float(((log_drift.exp() - 1) - log_drift).mean())
            if config.target_kl is not None and approx_kl > config.target_kl:
                stats["stopped_early"] = True
                break

            # The importance ratio is against the behaviour policy that sampled the action.
            ratio = (logprob - behaviour_logprob[idx]).exp()
            mb_adv = advantages[idx]
            if config.norm_adv and len(idx) > 1:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - config.clip, 1 + config.clip)).mean()
            v_loss = 0.5 * ((value - returns[idx]) ** 2).mean()
            entropy_mean = entropy.mean()
            loss = pg_loss - config.ent_coef * entropy_mean + config.vf_coef * v_loss

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()

            stats["steps"] += 1
            stats["epochs"] = epoch + 1  # epochs in which at least one gradient step was taken
            clip_fracs.append(float(((ratio - 1).abs() > config.clip).float().mean()))
            last = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(),
                    "entropy": entropy_mean.item(), "approx_kl": approx_kl}
        if stats["stopped_early"]:
            break
    stats.update(last, clip_fraction=float(np.mean(clip_fracs)) if clip_fracs else 0.0)
    return stats


@dataclass
class Learner:
    """A policy with its optimizer and reward statistics: what the learner stage keeps between
    updates, and what `to_bytes` publishes (weights plus reward statistics)."""

    policy: Policy | HyperPolicy
    config: PPOConfig = field(default_factory=PPOConfig)
    normalizer: RewardNormalizer = field(default_factory=RewardNormalizer)
    seed: int = 0
    updates: int = 0

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.config.lr, eps=self.config.adam_eps)
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def fresh(cls, space: Mapping[str, Mapping[str, Any]], seed: int = 0,
              config: PPOConfig | None = None, kind: str = "edit") -> Learner:
        """A fresh policy: `kind` "edit" (`arrl.policy`) or "hyper" (`arrl.hyper`)."""
        policy = HyperPolicy(seed=seed) if kind == "hyper" else Policy(space, seed=seed)
        return cls(policy, config or PPOConfig(), seed=seed)

    @classmethod
    def from_bytes(cls, blob: bytes, space: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
                   config: PPOConfig | None = None) -> Learner:
        policy, meta = from_bytes(blob, space)
        normalizer = RewardNormalizer(**meta.get("reward_stats", {}))
        return cls(policy, config or PPOConfig(), normalizer, seed, int(meta.get("updates", 0)))

    def to_bytes(self) -> bytes:
        return to_bytes(self.policy, {"reward_stats": asdict(self.normalizer), "updates": self.updates})

    def update(self, samples: Sequence[Sample], current_version: int) -> dict[str, Any]:
        stats = ppo_update(self.policy, self.optimizer, samples, self.normalizer, self.config,
                           current_version, self.generator)
        if stats["steps"]:
            self.updates += 1
        return stats
