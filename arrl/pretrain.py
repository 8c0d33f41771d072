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

PPO updates every `batch_size` recorded samples (on-policy here: one process samples and learns),
each proposal credited with its own reward; or, with `credit="campaign"`, once per group of
campaigns on one landscape, each proposal credited with how its campaign ended against the group's
(`_Pretraining.by_campaign` says why).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor
from pathlib import Path
from typing import Any

import structlog
import torch

from arrl.edits import Tunable, knobs, parse_tunables, resolve_program, search_space
from arrl.hyper import HyperAgent, gumbel_noise
from arrl.landscape_loading import Factory, Landscape, load_landscape
from arrl.operators import proposed_by
from arrl.policy import featurize, from_bytes
from arrl.ppo import Learner, PPOConfig, Sample
from arrl.reward import DEFAULT_SIGMA, beats, compute_reward, noise_sigma
from arrl.strategies import Context

log = structlog.get_logger()
DEFAULT_TARGET = Path(__file__).resolve().parents[1] / "target" / "train.py"


RewardFn = Callable[[str, float | None, float | None, float], float]  # compute_reward's signature


class WorkerDied(RuntimeError):
    """A process of `pretrain`'s pool died mid-group (killed, out of memory); the policy of the groups
    finished before it is in the output file."""


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
             lag: int = 1, credit: str | None = None, group: int = 8, pool: Executor | None = None) -> Path:
    """Train the policy over `campaigns` simulated campaigns; writes and returns `out`.

    `kind` "hyper" trains the hyper-heuristic policy (`arrl.hyper`, what the ppo strategy ships
    and starts from), "edit" the edit policy (`arrl.policy`). `init_weights` continues an earlier
    pre-training (of either kind). `lag`: how many proposals wait for their outcome when the next is
    made (the module docstring). `experiments_per_campaign` given as several lengths draws one per
    campaign, so that the horizon the policy sees (`HyperAgent.horizon`, in its state) varies as
    users' campaigns do. The checkpoint is what `arrl-learner --checkpoint` and the ppo strategy's
    `checkpoint` option load.

    `credit` "campaign" (the default for the hyper policy) credits every proposal of a campaign with
    how that campaign ended against the others of its `group`, one PPO update per group in
    minibatches of 64: see `_Pretraining.by_campaign`. "proposal" (the default for the edit policy, and
    what the pipeline's learner does) credits each proposal with its own reward, updating every
    `batch_size` samples (default 64 in minibatches of 16 for the hyper policy, 32 and 8 for the
    edit policy).

    `pool` (a `concurrent.futures.Executor`, credit "campaign" only) plays each group's campaigns side by
    side in its workers: they all read the policy of their group, so the result is the same, weight for
    weight, as without one. If training stops on an error or an interrupt (a worker that died, a
    landscape that raised, Ctrl-C) after an update, the policy so far is written to `out` before the
    error goes on.
    """
    if lag < 0:
        raise ValueError(f"lag must be 0 or more, not {lag}")
    lengths = [experiments_per_campaign] if isinstance(experiments_per_campaign, int) else list(experiments_per_campaign)
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"experiments per campaign must be 1 or more, not {experiments_per_campaign}")
    if credit not in (None, "proposal", "campaign"):
        raise ValueError(f"credit must be 'proposal' or 'campaign', not {credit!r}")
    if credit == "campaign" and (kind != "hyper" or group < 2):
        raise ValueError(f"credit 'campaign' trains the hyper policy in groups of 2 or more, not {kind!r} in {group}")
    if batch_size is None:
        batch_size = 64 if kind == "hyper" else 32
    default_config = config is None
    if config is None and kind == "hyper":
        config = PPOConfig(minibatch_size=16)
    factory = load_landscape(landscape_factory)  # fails here, before any campaign, if it cannot load
    base = parse_tunables(Path(target).read_text())
    space = search_space(base)
    budget = _profile_budget() if budget_s is None else budget_s
    learner = (Learner.from_bytes(init_weights, space, seed, config) if init_weights is not None
               else Learner.fresh(space, seed, config, kind))
    hyper = getattr(learner.policy, "kind", "") == "hyper"
    if credit == "campaign" and not hyper:
        raise ValueError("credit 'campaign' trains the hyper policy; these weights are the edit policy's")
    credit = credit or ("campaign" if hyper else "proposal")
    if pool is not None and credit != "campaign":
        raise ValueError("a pool of workers plays the campaigns of a group side by side: it needs credit 'campaign'")
    if credit == "campaign" and default_config:  # a group's ~8 x 90 samples: bigger minibatches
        learner.config = dataclasses.replace(learner.config, minibatch_size=64)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    out = Path(out)
    setting = Setting(landscape_factory if isinstance(landscape_factory, str) else factory, base, budget,
                      baseline_repeats, keep_margin_sigmas, reward_fn, lag)
    # What the policy chose over the last tenth of the campaigns, logged at the end: pre-trainings of
    # one command have settled on different single actions (docs/search.md), so say which.
    run = _Pretraining(learner, setting, space, lengths, rng, generator,
                       lambda: _write(out, learner.to_bytes()), checkpoint_every,
                       tail_from=campaigns - max(1, campaigns // 10))
    try:
        if credit == "campaign":
            run.by_campaign(campaigns, group, pool)
        else:
            run.by_proposal(campaigns, batch_size)
    except BaseException as exc:  # keep what the finished groups taught, then let the error go on
        if run.version:  # an update since the start: else `out` (perhaps an earlier policy) is left alone
            _write(out, learner.to_bytes())
        log.error("pretrain.stopped", campaigns_done=run.done, updates=learner.updates,
                  out=str(out) if run.version else None, error=f"{type(exc).__name__}: {exc}")
        kept = (f"the policy they trained is in {out} (continue from it with --checkpoint)" if run.version
                else f"nothing was learnt, {out} is left as it was")
        if isinstance(exc, BrokenExecutor):
            raise WorkerDied(f"a campaign worker died after {run.done} of {campaigns} campaigns; {kept}") from exc
        exc.add_note(f"stopped after {run.done} of {campaigns} campaigns; {kept}")
        raise
    choices = run.choices
    _write(out, learner.to_bytes())
    total = max(1, sum(choices.values()))
    log.info("pretrain.choices", campaigns=campaigns - run.tail_from, proposals=sum(choices.values()),
             shares={name: round(n / total, 3) for name, n in choices.most_common()})
    return out


def _play(campaign: MiniCampaign, experiments: int, propose: Callable[[], Proposal],
          lag: int) -> Iterator[tuple[Proposal, dict[str, Any]]]:
    """Run a campaign's `experiments` proposals, each made `lag` outcomes ahead; yields each
    proposal with its record, in the order they ran. `propose` is called when the next is due."""
    queue: deque[Proposal] = deque()
    for k in range(experiments):
        queue.append(propose())
        while queue and (len(queue) > lag or k == experiments - 1):
            proposal = queue.popleft()
            yield proposal, campaign.run(proposal.program, proposal.extra, proposal.parent)


def campaign_score(bests: Sequence[float | None]) -> float:
    """How well a campaign went, from its best val_bpb after each proposal: the mean of the best at a
    quarter, half and all of its length (the benchmark's 25 / 50 / 100), negated (higher is better)."""
    n = len(bests)
    marks = [bests[max(0, math.ceil(n * q) - 1)] for q in (0.25, 0.5, 1.0)] if n else []
    values = [b for b in marks if b is not None]
    return -sum(values) / len(values) if values else -math.inf


def group_advantages(scores: Sequence[float]) -> list[float]:
    """Each campaign's score against its group's: centred on the group's mean, in units of its
    standard deviation (0 for all when the group ended level, or when a score is not finite)."""
    if not scores or not all(math.isfinite(s) for s in scores):
        return [0.0] * len(scores)
    mean = sum(scores) / len(scores)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / sd if sd > 1e-12 else 0.0 for s in scores]


@dataclasses.dataclass(frozen=True)
class Setting:
    """How every campaign of a pre-training starts and runs: all a worker process needs to play one
    (`landscape` as given, a "MODULE:FACTORY" string or the factory itself, loaded where it runs)."""

    landscape: str | Factory
    base: dict[str, Tunable]
    budget_s: float
    baseline_repeats: int
    keep_margin_sigmas: float
    reward_fn: RewardFn
    lag: int

    def new_campaign(self, landscape_seed: int) -> MiniCampaign:
        """A campaign on the landscape of this seed, its baselines run."""
        space = search_space(self.base)
        campaign = MiniCampaign(load_landscape(self.landscape)(landscape_seed, space), self.base,
                                budget_s=self.budget_s, keep_margin_sigmas=self.keep_margin_sigmas,
                                reward_fn=self.reward_fn)
        campaign.baselines(self.baseline_repeats)
        return campaign


@dataclasses.dataclass(frozen=True)
class Member:
    """One campaign of a group (credit "campaign"): what it is dealt, all drawn before the group plays."""

    landscape_seed: int
    agent_seed: int
    experiments: int
    noise: list[torch.Tensor]  # the campaign's held Gumbel draw (`gumbel_noise`)
    version: int  # of the policy the group reads


@dataclasses.dataclass
class Played:
    """A campaign played: its policy's samples (with what proposed each), its score, what is logged."""

    samples: list[Sample]
    proposers: list[str]
    score: float
    summary: dict[str, Any]


def play_member(setting: Setting, policy: Any, member: Member) -> Played:
    """Play one campaign of a group with `policy` (`by_campaign`'s unit of work, in a worker or here)."""
    campaign = setting.new_campaign(member.landscape_seed)
    start = campaign.best()
    agent = HyperAgent(search_space(setting.base), member.agent_seed, member.experiments)

    def propose() -> Proposal:
        proposal = hyper_proposal(agent, policy, campaign, None, member.noise)
        proposal.version = member.version
        return proposal

    samples, proposers, bests = [], [], []
    for proposal, record in _play(campaign, member.experiments, propose, setting.lag):
        bests.append(campaign.best())
        if proposal.state is not None:
            samples.append(_sample(proposal, record))
            proposers.append(proposed_by(proposal.extra) or "edit policy")
    return Played(samples, proposers, campaign_score(bests), _summary(campaign, start))


@functools.lru_cache(maxsize=2)
def _policy_of(weights: bytes) -> Any:
    return from_bytes(weights)[0]


def play_member_from_weights(setting: Setting, weights: bytes, member: Member) -> Played:
    """`play_member` in a worker process: the group's policy travels as its checkpoint bytes."""
    torch.set_num_threads(1)  # one campaign per process: threads would only contend with the others
    return play_member(setting, _policy_of(weights), member)


def _sample(proposal: Proposal, record: Mapping[str, Any]) -> Sample:
    return Sample(proposal.state, proposal.action, proposal.logprob, record["reward"], proposal.version,
                  record["experiment_id"])


def _summary(campaign: MiniCampaign, start: float | None) -> dict[str, Any]:
    best = campaign.best()
    gain = (start - best) / campaign.sigma if start is not None and best is not None else None
    return {"best_val_bpb": best, "gain_sigmas": gain,
            "kept": sum(bool(r["kept"]) for r in campaign.records if r["role"] == "edit")}


@dataclasses.dataclass
class _Pretraining:
    """What both credit schemes share: the learner, how a campaign starts, the draws, the log."""

    learner: Learner
    setting: Setting
    space: Mapping[str, Any]
    lengths: Sequence[int]
    rng: random.Random
    generator: torch.Generator
    save: Callable[[], None]
    checkpoint_every: int
    tail_from: int  # the campaigns from which `choices` counts what the policy proposed
    choices: Counter[str] = dataclasses.field(default_factory=Counter)
    version: int = 0  # of the policy: one more per update
    done: int = 0  # campaigns finished, their samples in an update or waiting for one

    def length(self) -> int:
        return self.lengths[0] if len(self.lengths) == 1 else self.rng.choice(self.lengths)

    def ended(self, summary: Mapping[str, Any], proposers: Sequence[str], **fields: Any) -> None:
        c = self.done
        if c >= self.tail_from:
            self.choices.update(proposers)
        log.info("pretrain.campaign", campaign=c, **summary, updates=self.learner.updates, **fields)
        self.done += 1
        if self.checkpoint_every and self.done % self.checkpoint_every == 0:
            self.save()

    def update(self, samples: Sequence[Sample]) -> None:
        stats = self.learner.update(samples, self.version)
        self.version += 1
        log.info("pretrain.update", version=self.version, **stats)

    def propose(self, agent: HyperAgent | None, campaign: MiniCampaign, experiments: int) -> Proposal:
        if agent is not None:
            proposal = hyper_proposal(agent, self.learner.policy, campaign, self.generator)
        else:
            state = featurize(self.space, campaign.context(), horizon=experiments)
            act = self.learner.policy.act(state, self.generator)
            proposal = Proposal(campaign.parent(), act.program, None, state, act.action, act.logprob)
        proposal.version = self.version  # when proposed: an update may come before its outcome
        return proposal

    def by_proposal(self, campaigns: int, batch_size: int) -> None:
        """Each proposal earns its own reward; PPO updates every `batch_size` samples, mid-campaign too."""
        hyper = getattr(self.learner.policy, "kind", "") == "hyper"
        pending: list[Sample] = []
        for _ in range(campaigns):
            experiments = self.length()
            campaign = self.setting.new_campaign(self.rng.randrange(2**31))
            start = campaign.best()
            agent = HyperAgent(self.space, self.rng.randrange(2**31), experiments) if hyper else None
            propose = functools.partial(self.propose, agent, campaign, experiments)
            proposers = []
            for proposal, record in _play(campaign, experiments, propose, self.setting.lag):
                if proposal.state is None:
                    continue
                pending.append(_sample(proposal, record))
                proposers.append(proposed_by(proposal.extra) or "edit policy")
                if len(pending) >= batch_size:
                    self.update(pending)
                    pending = []
            self.ended(_summary(campaign, start), proposers)

    def by_campaign(self, campaigns: int, group: int, pool: Executor | None = None) -> None:
        """Credit by the campaign's result (a group-relative policy gradient, clipped as PPO's).

        Why: a proposal's own reward does not tell apart the actions that decide how a campaign
        ends (docs/search.md, "Pre-training again at this code"), so PPO on it settles on an action
        by chance. Here the campaigns of a group share one landscape instance, its noise, the
        agent's seed and the length; they differ only in the policy's choices, so the spread of their
        results is what the choices did, and each campaign's proposals share its score against the
        group's (`group_advantages` of `campaign_score`). Each campaign reads the policy through one
        Gumbel draw held for the whole campaign (`HyperPolicy.sample(noise=...)`): a campaign
        commits to what the policy leans to, so its result says something about that lean, while
        every step's action is still distributed as the policy. One PPO update per group, on all
        its proposals. Everything random about a campaign is drawn before its group plays, so the
        campaigns are independent: `pool` plays them side by side, with the same result.
        """
        while self.done < campaigns:
            experiments = self.length()
            landscape_seed, agent_seed = self.rng.randrange(2**31), self.rng.randrange(2**31)
            members = [Member(landscape_seed, agent_seed, experiments, gumbel_noise(self.generator), self.version)
                       for _ in range(min(group, campaigns - self.done))]  # the last group may be smaller
            if pool is None:
                played = [play_member(self.setting, self.learner.policy, m) for m in members]
            else:
                play = functools.partial(play_member_from_weights, self.setting, self.learner.to_bytes())
                played = list(pool.map(play, members))
            for p in played:
                self.ended(p.summary, p.proposers, score=p.score)
            advantages = group_advantages([p.score for p in played])
            self.update([dataclasses.replace(s, advantage=a)
                         for p, a in zip(played, advantages, strict=True) for s in p.samples])


def hyper_proposal(agent: HyperAgent, policy: Any, campaign: MiniCampaign,
                   generator: torch.Generator | None, noise: Sequence[torch.Tensor] | None = None) -> Proposal:
    """One proposal of the hyper-heuristic policy, as `PPOStrategy` makes it, on the campaign as
    recorded so far (a rule's program, `HyperAgent.scripted`, carries no state: no sample for PPO)."""
    ctx = campaign.context()
    state = agent.featurize(ctx.tunables, ctx.incumbent, ctx.recent)
    parent = campaign.parent()
    scripted = agent.scripted(ctx.tunables)
    if scripted is not None:  # a rule's program, as the strategy runs it
        return Proposal(parent, scripted, agent.extra(ctx.tunables, scripted))
    action, logprob, _ = policy.sample(state, generator, noise)
    program = agent.program(action, ctx.tunables)
    return Proposal(parent, program, agent.extra(ctx.tunables, program, action), state, action, logprob)


def _write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
