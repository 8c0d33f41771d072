"""The hyper-heuristic policy: PPO chooses *how* to propose, `arrl.operators` proposes.

Action: three categorical choices, stored as `[operator, n_edits - 1, radius]` (indices into
`OPERATORS`, 1..3 edits, `RADII`). The operator turns them into an edit program of the incumbent.

State (`HyperAgent.featurize`, `N_FEATURES` numbers, the same for any search space, so shipped weights
serve any train.py): where the campaign is (experiments done against the horizon, experiments since
the last improvement, kept / crash / duplicate rates of the window, gain so far in noise units), the
last 8 rewards, how each operator, edit count and radius has paid in the window (share of uses,
mean reward, kept rate; read from the records' `extra["action"]`), what the surrogate promises
(the mean model's predicted gain of its best move at each radius, in noise units, and its fit
residual) and which operators can act (recombine needs another scored run). Values are rounded to
float16 when made, as in `arrl.policy`, so the learner's `evaluate` sees exactly what was sampled.

Before the policy acts, fixed rules propose (`HyperAgent.scripted`): the campaign's opening design,
its split into single probes where none of its experiments won, and a pattern move after a win that
moved one tunable. The radius the policy picks is read against what the opening design found
(`HyperAgent.radius`): when at least half of its far probes beat the first baseline by a noise
unit, each radius means the next larger one (0.05 -> 0.15 -> 0.35), for the rest of the campaign.

Why policy and operators are apart: a policy that picks tunables and values from scratch must
relearn, in every campaign, what a regression on the campaign's own history knows after a dozen
runs; what does transfer across landscapes is when to trust the model, how far to step and how many
tunables to move at once.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arrl.edits import Tunable, knobs, knobs_after, same_value
from arrl.operators import OPERATORS, RADII, Memory, Operators, Surrogate, config_key
from arrl.reward import CLIP, DEFAULT_SIGMA, FAILED, is_edit, noise_sigma

HYPER_VERSION = 1  # bump when features or architecture change: old blobs are refused
SIGNATURE = f"hyper-v{HYPER_VERSION}"  # space-independent: the transition filter of the learner
N_EDITS = 3
HEADS = (len(OPERATORS), N_EDITS, len(RADII))
ACTION_LEN = len(HEADS)
LAST = 8
N_FEATURES = 8 + LAST + 3 * sum(HEADS) + len(RADII) + 1 + len(OPERATORS)
MASKED = -1e9
# The newest pending proposals whose tunables `model` leaves alone (see `program`). One: with two
# pending (two workers), leaving both alone slowed long walks to a far optimum (bowl, chain at 50).
AVOID_PENDING = 1
WIDE_WINS = 0.5  # share of winning design probes from which `HyperAgent.radius` steps up (scripts/fit_radius_rule.py)
PENDING_MAX = 4  # proposals still counted as waiting for their outcome (one whose record never comes stops counting)


def _clip1(x: float) -> float:
    return min(1.0, max(-1.0, x)) if math.isfinite(x) else 0.0


def _num(record: Mapping[str, Any], key: str) -> float | None:
    v = record.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _exp_number(record: Mapping[str, Any]) -> int:
    digits = "".join(ch for ch in str(record.get("experiment_id", "")) if ch.isdigit())
    return int(digits[-6:]) if digits else 0


def _our_action(record: Mapping[str, Any]) -> bool:
    """Whether a record was proposed by this policy, with an action in range for every head."""
    extra = record.get("extra")
    if not isinstance(extra, Mapping) or extra.get("policy") != SIGNATURE:
        return False
    action = extra.get("action")
    return (isinstance(action, list) and len(action) == ACTION_LEN
            and all(isinstance(a, int) and 0 <= a < k for a, k in zip(action, HEADS, strict=True)))


class HyperAgent:
    """One campaign's side of the policy: memory, surrogate, features, and the operators."""

    def __init__(self, space: Mapping[str, Mapping[str, Any]], seed: int, horizon: int = 100,
                 design: bool = True, wide_wins: float = WIDE_WINS) -> None:
        self.operators = Operators(space)
        self.wide_wins = wide_wins  # `radius`: 0 steps up in every campaign, above 1 in none
        self.memory = Memory()
        self.horizon = max(1, horizon)
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.surrogate: Surrogate | None = None
        self.sigma = DEFAULT_SIGMA
        # Tunables the opening design has moved (None: not begun; all of them: no design).
        self.probed: set[str] | None = None if design else set(self.operators.enc.numeric)
        # This agent's proposals whose outcome is not recorded yet: (configuration, tunables moved).
        self.pending: list[tuple[tuple[str, ...], frozenset[str]]] = []
        # The opening design's outcomes by experiment, (status, val_bpb), and the first baseline's
        # val_bpb: kept here because the window of 32 records forgets them (see `radius`).
        self.design_runs: dict[str, tuple[str, float | None]] = {}
        self.first_bpb: float | None = None
        # Whether this campaign's recorded proposals used the larger radii (their `extra["radius"]`):
        # how a proposer that joins after the design has left the window keeps the decision.
        self.stepped_up: bool | None = None
        # The design's programs proposed, its baseline's knobs, and the single probes it is split into
        # (None: not decided yet; see `scripted`).
        self.design_issued = 0
        self.base_knobs: dict[str, Any] = {}
        self.split: list[list[dict[str, Any]]] | None = None
        # The incumbent as last seen (experiment id, knobs, val_bpb), and the pattern move its
        # replacement by a better run earned, waiting for the next proposal (`scripted`).
        self.last_incumbent: tuple[str, dict[str, Any], float] | None = None
        self.extension: list[dict[str, Any]] | None = None
        self._rule = "design"  # which rule made the program `scripted` returned last

    def featurize(self, tunables: Mapping[str, Tunable], incumbent: Mapping[str, Any] | None,
                  recent: Sequence[Mapping[str, Any]]) -> np.ndarray:
        recent = list(recent)[-32:]
        self.memory.observe(tunables, incumbent, recent)
        baselines = [v for r in recent if r.get("role") == "baseline" and (v := _num(r, "val_bpb")) is not None]
        sigmas = [s for r in recent if (s := _num(r, "sigma"))]
        self.sigma = sigmas[-1] if sigmas else noise_sigma(baselines) or DEFAULT_SIGMA
        self._note_design(recent, baselines)
        self._note_incumbent(tunables, incumbent)
        self.surrogate = sur = Surrogate(self.operators.enc, list(self.memory.points.values()), self.sigma)
        window = recent[::-1]  # newest first
        edits = [r for r in window if is_edit(r)]
        rewards = [_num(r, "reward") or 0.0 for r in edits]
        since = next((k for k, r in enumerate(edits) if r.get("kept")), len(edits))
        scored = [p.val for p in self.memory.scored()]
        inc_bpb = _num(incumbent or {}, "val_bpb")
        first = baselines[0] if baselines else (max(scored) if scored else None)
        gain = (first - inc_bpb) / self.sigma if first is not None and inc_bpb is not None else 0.0
        number = max([_exp_number(r) for r in window] + [len(window)])
        feats = [
            min(1.0, number / self.horizon), min(1.0, number / 100), since / 32,
            sum(bool(r.get("kept")) for r in edits) / max(len(edits), 1),
            sum(r.get("status") in FAILED for r in edits) / max(len(edits), 1),
            sum(r.get("status") == "duplicate" for r in edits) / max(len(edits), 1),
            _clip1(gain / 40), min(1.0, len(scored) / 100),
        ]
        feats += [_clip1(x / CLIP) for x in rewards[:LAST]] + [0.0] * (LAST - min(LAST, len(rewards)))
        # How each head's options paid in the window: share of uses, mean reward, kept rate.
        ours = [(r, [int(a) for a in r["extra"]["action"]]) for r in edits if _our_action(r)]
        for head, size in enumerate(HEADS):
            used, paid, kept = np.zeros(size), np.zeros(size), np.zeros(size)
            for r, action in ours:
                used[action[head]] += 1
                paid[action[head]] += _num(r, "reward") or 0.0
                kept[action[head]] += float(bool(r.get("kept")))
            n = np.maximum(used, 1)
            feats += list(used / 32) + [_clip1(x) for x in paid / n / CLIP] + list(kept / n)
        # What the surrogate's mean promises at each radius, and how well it fits.
        for radius in RADII:
            moves = sur.moves(sur.mean, {n: t.value for n, t in tunables.items()}, radius) if sur.ok else []
            feats.append(_clip1(sum(m[0] for m in moves[:N_EDITS] if m[0] > 0) / self.sigma / 20))
        feats.append(_clip1(sur.resid / self.sigma / 5) if sur.ok else 1.0)
        feats += [1.0, 1.0, float(len(scored) >= 2), 1.0]  # which operators can act
        state = np.asarray(feats, np.float32)
        assert state.shape == (N_FEATURES,)
        return state.astype(np.float16).astype(np.float32)

    def _note_design(self, recent: Sequence[Mapping[str, Any]], baselines: Sequence[float]) -> None:
        if baselines and self.first_bpb is None:
            self.first_bpb = baselines[0]
        for r in recent:
            extra = r.get("extra")
            if isinstance(extra, Mapping) and extra.get("design") and r.get("status") != "duplicate":
                self.design_runs[str(r.get("experiment_id"))] = (str(r.get("status")), _num(r, "val_bpb"))
            elif _our_action(r) and isinstance(used := r["extra"].get("radius"), float):
                self.stepped_up = used > RADII[int(r["extra"]["action"][2])]

    def _note_incumbent(self, tunables: Mapping[str, Tunable], incumbent: Mapping[str, Any] | None) -> None:
        """When a run has replaced the incumbent by a noise unit or more, queue the pattern move that
        repeats its step (`Operators.extend`); any other change of the incumbent drops a queued one."""
        exp_id, val = (incumbent or {}).get("experiment_id"), _num(incumbent or {}, "val_bpb")
        if not exp_id or val is None or (self.last_incumbent is not None and self.last_incumbent[0] == exp_id):
            return
        now = knobs(tunables)
        if self.last_incumbent is not None:
            _, before, before_val = self.last_incumbent
            self.extension = (self.operators.extend(before, now, tunables, self.memory)
                              if before_val - val >= self.sigma else None)
        self.last_incumbent = (str(exp_id), now, val)

    def design_wins(self) -> float | None:
        """The share of the opening design's probes recorded so far that beat the first baseline by
        one noise unit, or None before any (or without a baseline to compare with)."""
        if not self.design_runs or self.first_bpb is None:
            return None
        first, runs = self.first_bpb, self.design_runs.values()
        return sum(v is not None and v < first - self.sigma for _, v in runs) / len(runs)

    def radius(self, choice: int) -> float:
        """The trust radius of the policy's radius choice. One step larger once the opening design
        is over and at least half of its probes (each a move of `DESIGN_STEP`, 0.35) beat the first
        baseline by a noise unit. Why: then the optimum is far from where the campaign started, and
        steps of 0.15 walk there too slowly; where few probes win, the campaign starts near the
        optimum and big steps only waste runs. Measured outside the pipeline on 20 seeds of ten
        landscapes, 0.35 throughout did 0.03-0.05 better at 50 experiments on four and 0.05-0.06
        worse on the two fitted to real runs, where few probes win (docs/search.md). PPO, trained
        on per-proposal rewards, does not learn this switch itself (docs/search.md says why)."""
        wins = self.design_wins() if self.probed is not None and self.probed >= set(self.operators.enc.numeric) else None
        up = wins >= self.wide_wins if wins is not None else bool(self.stepped_up)
        return RADII[min(choice + 1, len(RADII) - 1)] if up else RADII[choice]

    def scripted(self, tunables: Mapping[str, Tunable]) -> list[dict[str, Any]] | None:
        """The next program a fixed rule proposes before the policy acts, or None (the policy's turn):

        - a pattern move (`Operators.extend`) after a win of a noise unit or more that moved one
          numeric tunable (`_note_incumbent`): on a nearly tuned script whose one far tunable the
          campaign has just found, the policy's radius of 0.15 walks there in many small steps;
        - the opening design (`Operators.design`), until every numeric tunable has been probed. Why:
          the surrogate needs to have seen each tunable far from the baseline before its moves mean
          anything; until then the policy's small steps around the baseline are guesses, and random
          jumps pay more;
        - once the design's outcomes are all recorded, and only if none of its experiments beat the
          first baseline by a noise unit, its least-losing experiment split into single probes (one
          experiment each). Why: three probes share an experiment, and on a nearly tuned script the
          probe that pays (a tunable far from its optimum) is masked by the two that cost, so the
          surrogate cannot tell which of the three it was; the least-losing experiment is the one
          most likely to hold it.

        A proposer that joins a campaign already under way (a restart, a second proposer) skips the
        design and its split."""
        if self.probed is None:
            fresh = len(self.memory.points) <= 1  # the baseline alone
            self.probed = set() if fresh else set(self.operators.enc.numeric)
            self.base_knobs = knobs(tunables)
        if self.extension is not None:
            program, self.extension, self._rule = self.extension, None, "extend"
            return self._track(tunables, program)
        self._rule = "design"
        program = self.operators.design(knobs(tunables), tunables, self.probed, self.memory, self.rng)
        if program is not None:
            self.design_issued += 1
            return self._track(tunables, program)
        if self.split is None and self.design_issued and len(self.design_runs) >= self.design_issued:
            self.split = self._split(tunables)
        self._rule = "split"
        while self.split:  # a probe whose value the incumbent has taken since (a recombined run won) is no edit
            program = self.split.pop(0)
            if self.memory.take(tunables, program):
                return self._track(tunables, program)
        return None

    def _split(self, tunables: Mapping[str, Tunable]) -> list[list[dict[str, Any]]]:
        """The single probes of the design's least-losing experiment (`scripted`), none where any
        design experiment won; each sets one tunable to the value the design gave it, on the
        incumbent of now (the ones the incumbent already holds are left out)."""
        if self.design_wins() != 0.0:
            return []
        runs = [p for e in self.design_runs if (p := self.memory.points.get(e)) is not None and p.val is not None]
        if not runs:
            return []
        best, now = min(runs, key=lambda p: p.val).knobs, knobs(tunables)  # type: ignore[arg-type, return-value]
        return [[{"op": "set", "name": n, "value": best[n]}] for n in self.operators.enc.numeric
                if n in best and not same_value(best[n], self.base_knobs.get(n)) and not same_value(best[n], now[n])]

    def program(self, action: Sequence[int], tunables: Mapping[str, Tunable]) -> list[dict[str, Any]]:
        """The program of an action. `model` leaves alone the tunables of the newest proposal still
        running or queued (`arrl.operators` says why); call `featurize` first, which reads what is
        recorded."""
        assert self.surrogate is not None, "featurize first"
        self.pending = [p for p in self.pending if p[0] not in self.memory.recorded][-PENDING_MAX:]
        avoid = frozenset().union(*(names for _, names in self.pending[max(0, len(self.pending) - AVOID_PENDING):]))
        program = self.operators.propose(int(action[0]), int(action[1]) + 1, self.radius(int(action[2])), tunables,
                                         self.memory, self.surrogate, self.rng, self.np_rng, avoid)
        return self._track(tunables, program)

    def extra(self, tunables: Mapping[str, Tunable], program: Sequence[Mapping[str, Any]],
              action: Sequence[int] | None = None) -> dict[str, Any]:
        """What a proposal's record carries for this policy: the knobs it leads to (so memory can be
        rebuilt from records alone) and, for the policy's own proposals, the action and the radius
        it meant (`radius`); a proposal of a rule (`scripted`) is marked with the rule's name instead:
        "design", "split" or "extend"."""
        out: dict[str, Any] = {"policy": SIGNATURE, "knobs": knobs_after(tunables, program)}
        if action is None:
            return {**out, self._rule: True}
        return {**out, "action": [int(a) for a in action], "radius": self.radius(int(action[2]))}

    def _track(self, tunables: Mapping[str, Tunable], program: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.pending.append((config_key(knobs_after(tunables, program)), frozenset(e["name"] for e in program)))
        return program


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class HyperPolicy(nn.Module):
    """Actor-critic over (operator, edit count, radius): an MLP with one head per choice."""

    kind = "hyper"

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.arch = {"hidden": hidden}
        self.signature = SIGNATURE
        g = math.sqrt(2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.trunk = nn.Sequential(_orthogonal(nn.Linear(N_FEATURES, hidden), g), nn.Tanh(),
                                       _orthogonal(nn.Linear(hidden, hidden), g), nn.Tanh())
            self.heads = nn.ModuleList(_orthogonal(nn.Linear(hidden, k), 0.01) for k in HEADS)
            self.value_head = _orthogonal(nn.Linear(hidden, 1), 1.0)

    def _logits(self, states: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h = self.trunk(states)
        ok = states[:, -len(OPERATORS):] > 0.5  # the operator mask is the state's tail
        logits = [head(h) for head in self.heads]
        logits[0] = logits[0].masked_fill(~ok, MASKED)
        return [torch.log_softmax(x, -1) for x in logits], self.value_head(h).squeeze(-1)

    def evaluate(self, states: torch.Tensor,
                 actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob, entropy, value) of stored actions (B, 3) in states (B, N_FEATURES)."""
        logps, value = self._logits(states)
        logprob = sum(lp.gather(1, actions[:, i:i + 1]).squeeze(1) for i, lp in enumerate(logps))
        entropy = sum(-(lp.exp() * lp).sum(-1) for lp in logps)
        return logprob, entropy, value  # type: ignore[return-value]

    def sample(self, state: np.ndarray, generator: torch.Generator | None = None,
               noise: Sequence[torch.Tensor] | None = None) -> tuple[list[int], float, float]:
        """(action, log-prob, value) for one state (well under a millisecond on CPU). `noise`, one
        Gumbel draw per head (`gumbel_noise`), picks each head's argmax of log-prob plus noise: an
        exact sample of the policy when the draw is fresh; held for a whole campaign, it makes the
        campaign follow one consistent reading of the policy (`arrl.pretrain`, credit "campaign")."""
        with torch.inference_mode():
            logps, value = self._logits(torch.from_numpy(np.asarray(state, np.float32))[None])
            if noise is not None:
                action = [int(torch.argmax(lp[0] + g)) for lp, g in zip(logps, noise, strict=True)]
            else:
                action = [int(torch.multinomial(lp[0].exp(), 1, generator=generator)) for lp in logps]
            logprob = sum(float(lp[0, a]) for lp, a in zip(logps, action, strict=True))
        return action, logprob, float(value[0])


def gumbel_noise(generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One Gumbel(0, 1) draw per head of `HyperPolicy`, for `HyperPolicy.sample(noise=...)`."""
    return [-torch.log(-torch.log(torch.rand(k, generator=generator).clamp(1e-12, 1 - 1e-12))) for k in HEADS]


def hyper_to_bytes(policy: HyperPolicy, meta: Mapping[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": HYPER_VERSION, "kind": "hyper", "signature": SIGNATURE, "arch": policy.arch,
                "state_dict": policy.state_dict(), "meta": dict(meta or {})}, buf)
    return buf.getvalue()


def hyper_from_data(data: Mapping[str, Any]) -> tuple[HyperPolicy, dict[str, Any]]:
    if data.get("format") != HYPER_VERSION:
        from arrl.policy import SpaceMismatch

        raise SpaceMismatch(f"hyper policy weights have format {data.get('format')!r}, this build reads {HYPER_VERSION}")
    policy = HyperPolicy(**data["arch"])
    policy.load_state_dict(data["state_dict"])
    return policy, dict(data["meta"])


PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "policy.pt"


def pretrained_weights() -> bytes | None:
    """The shipped pre-trained hyper-heuristic policy (`arrl pretrain` over the `randomized` family
    of `arrl.landscapes`), or None when this install has none."""
    return PRETRAINED.read_bytes() if PRETRAINED.is_file() else None
