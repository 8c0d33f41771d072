"""Pre-training the policy across many simulated campaigns (`arrl pretrain`).

Each campaign draws a fresh landscape (a new seed of `FACTORY(seed, space)`), so the policy
cannot memorise one optimum: what survives across campaigns is how to search, which tunables
tend to matter, and how to read the history window. The campaign loop here is a small
in-process copy of the pipeline's rules, run on the landscape directly:

- the baseline runs `baseline_repeats` times; the first ok one is the incumbent, their spread
  (`reward.noise_sigma`) the noise unit;
- each proposal edits the incumbent; a script already run is a `duplicate` (not run again);
- reward and keep follow `arrl.reward` (`compute_reward`, `beats`), exactly as the reward computer
  (`reward_fn` swaps the reward rule, to study other designs before changing the pipeline's);
- the records look like the ledger's, so `featurize` sees what it sees in a real campaign;
- proposals run `lag` experiments behind (default 1, the pipeline's queue depth): each proposal
  sees every outcome but the ones still queued or running, and edits the incumbent of its time.

PPO updates every `batch_size` recorded samples (on-policy here: one process samples and learns).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch

from arrl.edits import Tunable, knobs, parse_tunables, resolve_program, search_space
from arrl.hyper import HyperAgent
from arrl.landscape_loading import Factory, Landscape, load_landscape
from arrl.operators import proposed_by
from arrl.policy import featurize
from arrl.ppo import Learner, PPOConfig, Sample
from arrl.reward import DEFAULT_SIGMA, beats, compute_reward, noise_sigma
from arrl.strategies import Context

log = structlog.get_logger()
DEFAULT_TARGET = Path(__file__).resolve().parents[1] / "target" / "train.py"


RewardFn = Callable[[str, float | None, float | None, float], float]  # compute_reward's signature


class MiniCampaign:
    """One simulated campaign on a landscape, with the pipeline's reward and keep rules."""

    def __init__(self, landscape: Landscape, tunables: Mapping[str, Tunable], *, budget_s: float,
                 keep_margin_sigmas: float = 0.0, reward_fn: RewardFn = compute_reward) -> None:
        self.landscape = landscape
        self.reward_fn = reward_fn
        self.tunables = dict(tunables)
        self.budget_s = budget_s
        self.margin = keep_margin_sigmas
        self.records: list[dict[str, Any]] = []
        self.incumbent: dict[str, Any] | None = None
        self.sigma = DEFAULT_SIGMA
        self._scores: dict[tuple[str, ...], float | None] = {}

    def context(self) -> Context:
        return Context(dict(self.tunables), self.incumbent, self.records[-32:])

    def best(self) -> float | None:
        return self.incumbent["val_bpb"] if self.incumbent else None

    def _run(self, values: dict[str, Any]) -> dict[str, Any]:
        out = self.landscape.run(values, self.budget_s)
        status, val = str(out.get("status", "crashed")), out.get("val_bpb")
        if status == "ok" and not (isinstance(val, int | float) and math.isfinite(val)):
            status = "crashed"
        curve = out.get("curve") or []
        return {"status": status, "val_bpb": float(val) if status == "ok" else None,
                "training_seconds": float(curve[-1][0]) if curve else self.budget_s,
                "steps": out.get("steps"), "peak_memory_mb": out.get("peak_memory_mb")}

    def baselines(self, repeats: int) -> None:
        runs = [self._run(knobs(self.tunables)) for _ in range(max(1, repeats))]
        oks = [r["val_bpb"] for r in runs if r["status"] == "ok"]
        self.sigma = noise_sigma(oks) or DEFAULT_SIGMA
        for run in runs:
            self._record({**run, "program": [], "role": "baseline", "reward": 0.0, "parent_bpb": None,
                          "incumbent_bpb": self.best(), "kept": self.incumbent is None and run["status"] == "ok"})
            if self.records[-1]["kept"]:
                self.incumbent = {"val_bpb": run["val_bpb"], "experiment_id": self.records[-1]["experiment_id"]}
        self._scores[self._key(self.tunables)] = oks[0] if oks else None

    @staticmethod
    def _key(tunables: Mapping[str, Tunable]) -> tuple[str, ...]:
        return tuple(repr(t.value) for t in tunables.values())

    def parent(self) -> tuple[dict[str, Tunable], float | None]:
        """The incumbent's tunables and val_bpb: what a proposal made now edits."""
        return dict(self.tunables), self.best()

    def run(self, program: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None,
            parent: tuple[Mapping[str, Tunable], float | None] | None = None) -> dict[str, Any]:
        """Run one edit program; returns its ledger-like record (with the proposal's `extra`, as the
        ledger keeps it). `parent` is what the program was proposed on (`parent()` of its time) when
        the incumbent may have changed since; the default is the incumbent now. As in the pipeline,
        the reward is against that parent and the run is kept if it beats the incumbent now."""
        tunables, parent_bpb = parent if parent is not None else self.parent()
        changes = resolve_program(tunables, program)
        child = {**tunables, **{t.name: dataclasses.replace(t, value=v) for t, v in changes}}
        key = self._key(child)
        if key in self._scores:  # the applier refuses a script that already ran
            run = {"status": "duplicate", "val_bpb": self._scores[key], "training_seconds": 0.0,
                   "steps": None, "peak_memory_mb": None}
            kept = False
        else:
            run = self._run(knobs(child))
            self._scores[key] = run["val_bpb"]
            kept = run["status"] == "ok" and beats(run["val_bpb"], self.best(), self.sigma, self.margin)
        reward = self.reward_fn(run["status"], run["val_bpb"] if run["status"] == "ok" else None, parent_bpb,
                                self.sigma)
        record = self._record({**run, "program": [dict(e) for e in program], "role": "edit", "reward": reward,
                               "kept": kept, "parent_bpb": parent_bpb, "incumbent_bpb": self.best(),
                               "extra": dict(extra) if extra is not None else None})
        if kept:
            self.tunables = child
            self.incumbent = {"val_bpb": run["val_bpb"], "experiment_id": record["experiment_id"]}
        return record

    def _record(self, fields: dict[str, Any]) -> dict[str, Any]:
        record = {"experiment_id": f"e{len(self.records) + 1:05d}", "selfeval": None, "sigma": self.sigma, **fields}
        self.records.append(record)
        return record


def _profile_budget() -> float:
    from frozen_env.constants import get_profile

    return float(get_profile("cpu").budget_s)


@dataclasses.dataclass
class Proposal:
    """A proposal waiting to run: what it edits, and the policy's sample (none for a rule's program:
    the opening design, its split, a pattern move; `HyperAgent.scripted`)."""

    parent: tuple[dict[str, Tunable], float | None]
    program: list[dict[str, Any]]
    extra: dict[str, Any] | None = None
    state: Any = None
    action: list[int] | None = None
    logprob: float = 0.0
    version: int = 0  # of the policy that sampled it (a lagged proposal may be recorded after an update)


def pretrain(landscape_factory: str | Factory, campaigns: int,
             experiments_per_campaign: int | Sequence[int], seed: int, out: Path, *,
             target: Path = DEFAULT_TARGET, batch_size: int | None = None,
             baseline_repeats: int = 2, budget_s: float | None = None, keep_margin_sigmas: float = 0.0,
             init_weights: bytes | None = None, config: PPOConfig | None = None,
             checkpoint_every: int = 10, reward_fn: RewardFn = compute_reward, kind: str = "hyper",
             lag: int = 1) -> Path:
    """Train the policy over `campaigns` simulated campaigns; writes and returns `out`.

    `kind` "hyper" trains the hyper-heuristic policy (`arrl.hyper`, what the ppo strategy ships
    and starts from), "edit" the edit policy (`arrl.policy`). `init_weights` continues an earlier
    pre-training (of either kind). Defaults: batches of 64 samples in minibatches of 16 for the hyper
    policy (what the shipped weights were trained with), 32 and 8 for the edit policy. `lag`: how
    many proposals wait for their outcome when the next is made (the module docstring).
    `experiments_per_campaign` given as several lengths draws one per campaign, so that the
    horizon the policy sees (`HyperAgent.horizon`, in its state) varies as users' campaigns do. The
    checkpoint is what `arrl-learner --checkpoint` and the ppo strategy's `checkpoint` option load.
    """
    if lag < 0:
        raise ValueError(f"lag must be 0 or more, not {lag}")
    lengths = [experiments_per_campaign] if isinstance(experiments_per_campaign, int) else list(experiments_per_campaign)
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"experiments per campaign must be 1 or more, not {experiments_per_campaign}")
    if batch_size is None:
        batch_size = 64 if kind == "hyper" else 32
    if config is None and kind == "hyper":
        config = PPOConfig(minibatch_size=16)
    factory = load_landscape(landscape_factory)
    base = parse_tunables(Path(target).read_text())
    space = search_space(base)
    budget = _profile_budget() if budget_s is None else budget_s
    learner = (Learner.from_bytes(init_weights, space, seed, config) if init_weights is not None
               else Learner.fresh(space, seed, config, kind))
    hyper = getattr(learner.policy, "kind", "") == "hyper"
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    out = Path(out)
    version, pending = 0, []
    # What the policy chose over the last tenth of the campaigns, logged at the end: pre-trainings of
    # one command have settled on different single actions (docs/search.md), so say which.
    choices: Counter[str] = Counter()
    tail_from = campaigns - max(1, campaigns // 10)
    for c in range(campaigns):
        experiments = lengths[0] if len(lengths) == 1 else rng.choice(lengths)
        campaign = MiniCampaign(factory(rng.randrange(2**31), space), base, budget_s=budget,
                                keep_margin_sigmas=keep_margin_sigmas, reward_fn=reward_fn)
        campaign.baselines(baseline_repeats)
        start = campaign.best()
        agent = HyperAgent(space, rng.randrange(2**31), experiments) if hyper else None
        queue: deque[Proposal] = deque()
        for k in range(experiments):
            if agent is not None:
                proposal = hyper_proposal(agent, learner, campaign, generator)
            else:
                state = featurize(space, campaign.context(), horizon=experiments)
                act = learner.policy.act(state, generator)
                proposal = Proposal(campaign.parent(), act.program, None, state, act.action, act.logprob)
            proposal.version = version
            queue.append(proposal)
            while queue and (len(queue) > lag or k == experiments - 1):
                proposal = queue.popleft()
                record = campaign.run(proposal.program, proposal.extra, proposal.parent)
                if proposal.state is None:
                    continue
                if c >= tail_from:
                    choices[proposed_by(proposal.extra) or "edit policy"] += 1
                pending.append(Sample(proposal.state, proposal.action, proposal.logprob, record["reward"],
                                      proposal.version, record["experiment_id"]))
                if len(pending) >= batch_size:
                    stats = learner.update(pending, version)
                    version, pending = version + 1, []
                    log.debug("pretrain.update", version=version, **stats)
        best = campaign.best()
        gain = (start - best) / campaign.sigma if start is not None and best is not None else None
        log.info("pretrain.campaign", campaign=c, best_val_bpb=best, gain_sigmas=gain, updates=learner.updates,
                 kept=sum(bool(r["kept"]) for r in campaign.records if r["role"] == "edit"))
        if checkpoint_every and (c + 1) % checkpoint_every == 0:
            _write(out, learner.to_bytes())
    _write(out, learner.to_bytes())
    total = max(1, sum(choices.values()))
    log.info("pretrain.choices", campaigns=campaigns - tail_from, proposals=sum(choices.values()),
             shares={name: round(n / total, 3) for name, n in choices.most_common()})
    return out


def hyper_proposal(agent: HyperAgent, learner: Learner, campaign: MiniCampaign,
                   generator: torch.Generator) -> Proposal:
    """One proposal of the hyper-heuristic policy, as `PPOStrategy` makes it, on the campaign as
    recorded so far (a rule's program, `HyperAgent.scripted`, carries no state: no sample for PPO)."""
    ctx = campaign.context()
    state = agent.featurize(ctx.tunables, ctx.incumbent, ctx.recent)
    parent = campaign.parent()
    scripted = agent.scripted(ctx.tunables)
    if scripted is not None:  # a rule's program, as the strategy runs it
        return Proposal(parent, scripted, agent.extra(ctx.tunables, scripted))
    action, logprob, _ = learner.policy.sample(state, generator)
    program = agent.program(action, ctx.tunables)
    return Proposal(parent, program, agent.extra(ctx.tunables, program, action), state, action, logprob)


def _write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
