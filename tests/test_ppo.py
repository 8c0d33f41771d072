"""PPO on the edit policy: it learns, drops stale samples, stops at the target KL; the learner
stage against a real redis-server; pre-training on a toy landscape."""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import structlog.testing
import torch

from arrl.bus import Bus
from arrl.campaign import TRANSITIONS, WEIGHTS, Campaign, CampaignConfig
from arrl.edits import parse_tunables, search_space
from arrl.hyper import N_FEATURES, HyperAgent, HyperPolicy
from arrl.policy import Policy, featurize, from_bytes
from arrl.ppo import Learner, PPOConfig, Sample, sample_from_transition
from arrl.pretrain import MiniCampaign, campaign_score, group_advantages, pretrain
from arrl.reward import DUPLICATE_PENALTY, FAILURE_PENALTY, compute_reward
from arrl.strategies import Context, make_strategy
from pipeline.learner import learner_stats, run_learner

torch.set_num_threads(1)

TOY = '''import math
# --- hyperparameters ---
LR = 0.01  # search: log 0.0001..1
WIDTH = 4  # search: int 1..16
ACT = "relu"  # search: relu|gelu|silu
BAD = 1.0  # search: linear 0..2
# --- end hyperparameters ---
'''
TOY_TUNABLES = parse_tunables(TOY)
TOY_SPACE = search_space(TOY_TUNABLES)
TARGET_EDIT = {"op": "scale", "name": "LR", "factor": 2.0}


def contains_target(policy: Policy, state: np.ndarray, n: int = 300) -> float:
    generator = torch.Generator().manual_seed(123)
    return sum(TARGET_EDIT in policy.act(state, generator).program for _ in range(n)) / n


def bandit_batch(learner: Learner, state: np.ndarray, generator: torch.Generator, n: int,
                 version: int = 0) -> list[Sample]:
    """Proposals on one state; only programs holding TARGET_EDIT pay."""
    acts = [learner.policy.act(state, generator) for _ in range(n)]
    return [Sample(a.state, a.action, a.logprob, 1.0 if TARGET_EDIT in a.program else 0.0, version, f"e{i}")
            for i, a in enumerate(acts)]


def test_ppo_learns_to_prefer_the_edit_that_pays() -> None:
    # A looser target KL than the default, so that ten updates can move the policy far enough.
    learner = Learner.fresh(TOY_SPACE, seed=0, config=PPOConfig(lr=1e-3, minibatch_size=16, target_kl=0.05))
    state = featurize(TOY_SPACE, Context(TOY_TUNABLES, None, []))
    generator = torch.Generator().manual_seed(0)
    before = contains_target(learner.policy, state)
    for _ in range(10):
        stats = learner.update(bandit_batch(learner, state, generator, 48), current_version=0)
        assert stats["samples"] == 48 and stats["steps"] > 0
        assert all(math.isfinite(stats[k]) for k in ("policy_loss", "value_loss", "entropy", "approx_kl"))
    after = contains_target(learner.policy, state)
    assert before < 0.1 and after > max(3 * before, before + 0.12), (before, after)


def test_stale_samples_are_dropped() -> None:
    learner = Learner.fresh(TOY_SPACE, seed=1, config=PPOConfig(max_staleness=2))
    state = featurize(TOY_SPACE, Context(TOY_TUNABLES, None, []))
    generator = torch.Generator().manual_seed(1)
    weights = [p.detach().clone() for p in learner.policy.parameters()]
    stale = bandit_batch(learner, state, generator, 8, version=3)
    stats = learner.update(stale, current_version=6)  # 3 versions behind, 2 allowed
    assert stats["dropped_stale"] == 8 and stats["samples"] == 0 and stats["steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, learner.policy.parameters(), strict=True))
    fresh = bandit_batch(learner, state, generator, 8, version=4)
    stats = learner.update(stale + fresh, current_version=6)
    assert stats["dropped_stale"] == 8 and stats["samples"] == 8 and stats["steps"] > 0


def test_target_kl_stops_the_epochs_early() -> None:
    state = featurize(TOY_SPACE, Context(TOY_TUNABLES, None, []))

    def run(target_kl: float | None) -> dict[str, Any]:
        config = PPOConfig(lr=0.05, epochs=10, minibatch_size=8, target_kl=target_kl)
        learner = Learner.fresh(TOY_SPACE, seed=2, config=config)
        samples = bandit_batch(learner, state, torch.Generator().manual_seed(2), 32)
        return learner.update(samples, current_version=0)

    unlimited = run(None)
    assert unlimited["epochs"] == 10 and unlimited["steps"] == 40 and not unlimited["stopped_early"]
    limited = run(1e-4)
    assert limited["stopped_early"] and limited["epochs"] < 10 and 1 <= limited["steps"] < 40


def test_rewards_are_normalised_inside_the_learner() -> None:
    learner = Learner.fresh(TOY_SPACE, seed=3)
    state = featurize(TOY_SPACE, Context(TOY_TUNABLES, None, []))
    samples = bandit_batch(learner, state, torch.Generator().manual_seed(3), 16)
    rewards = [[-3.0, 0.2, -0.1, 0.4, 5.0, -0.3, 0.1, 0.0][i % 8] for i in range(len(samples))]
    for s, r in zip(samples, rewards, strict=True):
        s.reward = r
    learner.update(samples, current_version=0)
    assert learner.normalizer.var == pytest.approx(np.var(rewards), rel=1e-3)
    normed = learner.normalizer(rewards, learner.config.reward_clip)
    assert np.std(normed) == pytest.approx(1.0, rel=1e-3)  # scaled, not centred (V carries the mean)
    assert learner.normalizer([1e6], learner.config.reward_clip)[0] == learner.config.reward_clip
    # The statistics travel with the weights.
    again = Learner.from_bytes(learner.to_bytes(), TOY_SPACE)
    assert again.normalizer == learner.normalizer


def test_transitions_without_ppo_data_are_ignored() -> None:
    made = asyncio.run(make_strategy("ppo", 0, design=False).propose(Context(TOY_TUNABLES, None, [])))
    message = {"experiment_id": "e1", "reward": 1.5, "logprob": made.logprob, "policy_version": 0, "extra": made.extra}
    sample = sample_from_transition(message, made.extra["space"])
    assert sample is not None and sample.reward == 1.5 and sample.action == made.extra["action"]
    assert sample_from_transition({**message, "extra": None}) is None  # random strategy, baseline
    assert sample_from_transition(message, "another-space") is None
    assert sample_from_transition({**message, "reward": float("nan")}) is None


# -- the learner stage against a real redis-server ------------------------------------------------

def transition(exp_id: str, choice: Any, reward: float) -> dict[str, Any]:
    return {"experiment_id": exp_id, "reward": reward, "status": "ok", "program": choice.program,
            "logprob": choice.logprob, "value": choice.value, "policy_version": choice.policy_version,
            "extra": choice.extra, "strategy": "ppo", "val_bpb": 2.0 - reward / 100}


@pytest.mark.anyio
async def test_learner_consumes_transitions_publishes_weights_and_ignores_duplicates(redis_server, tmp_path) -> None:
    bus = Bus.from_url(redis_server.url, "learn1")
    campaign = await Campaign.create(bus, CampaignConfig(campaign_id="learn1", strategy="ppo"), TOY, "toyhash")
    proposer = make_strategy("ppo", 5, design=False)  # policy samples from the first proposal
    choices = [await proposer.propose(Context(TOY_TUNABLES, None, [])) for _ in range(4)]
    messages = [transition(f"e{i + 1:05d}", c, reward=float(i)) for i, c in enumerate(choices)]
    for message in (messages[0], messages[1], messages[0], messages[2],
                    {"experiment_id": "e00009", "reward": -3.0, "status": "crashed", "extra": None},
                    messages[3]):
        await bus.publish(TRANSITIONS, "transition", message)

    checkpoints = tmp_path / "checkpoints"
    stop = anyio.Event()
    stages = []

    async def learner() -> None:
        stages.append(await run_learner(campaign, checkpoints, "l1", stop=stop, batch_size=4))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(learner)
            while not (checkpoints / "policy-v2.pt").exists():
                await anyio.sleep(0.05)
            stop.set()

    # v1: the initial policy, published at start; v2: one update on the 4 distinct samples.
    assert await bus.get_version(WEIGHTS) == 2
    version, blob = await bus.get_versioned(WEIGHTS)
    assert (checkpoints / "policy-latest.pt").read_bytes() == (checkpoints / "policy-v2.pt").read_bytes() == blob
    assert (checkpoints / "policy-v1.pt").read_bytes() != blob
    stats = await learner_stats(campaign)
    assert len(stats) == 1 and stats[0]["samples"] == 4 and stats[0]["version"] == 2
    assert {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "epochs"} <= set(stats[0])
    # The duplicate did not count: had it, e00004 would still wait in the buffer.
    assert await bus.redis.llen(bus.key("learner", "buffer")) == 0
    assert await bus.redis.scard(bus.key("learner", "seen")) == 4
    await stages[0].handle(messages[1])  # redelivered after the update: still ignored
    assert await bus.redis.llen(bus.key("learner", "buffer")) == 0

    # A proposer with the bus picks the new weights up before its next proposal.
    follower = make_strategy("ppo", 6, bus=bus, design=False)
    choice = await follower.propose(Context(TOY_TUNABLES, None, []))
    assert choice.policy_version == 2
    published, _ = from_bytes(blob, TOY_SPACE)
    assert all(torch.equal(a, b) for a, b in zip(published.parameters(), follower.policy.parameters(), strict=True))
    await bus.aclose()


# -- pre-training on a toy landscape -----------------------------------------------------------------

class ToyLandscape:
    """Touching BAD crashes the run; LR has an optimum that moves with the seed."""

    def __init__(self, seed: int, space: dict[str, Any]) -> None:
        assert set(space) == set(TOY_SPACE)
        self.rng = random.Random(seed)
        self.optimum = self.rng.uniform(-3.5, -1.0)

    def run(self, knobs: dict[str, Any], budget_s: float) -> dict[str, Any]:
        if knobs["BAD"] != 1.0:
            return {"curve": [[0.5, 4.0]], "val_bpb": float("nan"), "status": "crashed"}
        val = 1.0 + 0.01 * (math.log10(knobs["LR"]) - self.optimum) ** 2 + self.rng.gauss(0, 0.01)
        return {"curve": [[budget_s / 2, val + 0.2], [budget_s, val + 0.1]], "val_bpb": val, "status": "ok"}


def crash_rate(policy: Policy) -> float:
    """How often the policy touches BAD over three unseen campaigns."""
    generator = torch.Generator().manual_seed(9)
    touched = total = 0
    for seed in (1001, 1002, 1003):
        campaign = MiniCampaign(ToyLandscape(seed, TOY_SPACE), TOY_TUNABLES, budget_s=1.0)
        campaign.baselines(2)
        for _ in range(20):
            act = policy.act(featurize(TOY_SPACE, campaign.context(), horizon=24), generator)
            campaign.run(act.program)
            touched += any(e["name"] == "BAD" for e in act.program)
            total += 1
    return touched / total


def test_pretrain_across_campaigns_learns_what_generalises(tmp_path: Path) -> None:
    target = tmp_path / "train.py"
    target.write_text(TOY)
    before = crash_rate(Learner.fresh(TOY_SPACE, seed=0).policy)
    out = pretrain(ToyLandscape, campaigns=20, experiments_per_campaign=24, seed=0, out=tmp_path / "p.pt",
                   target=target, batch_size=16, budget_s=1.0, config=PPOConfig(lr=1e-3), kind="edit")
    policy, meta = from_bytes(out.read_bytes(), TOY_SPACE)
    assert meta["updates"] == 20 * 24 // 16
    after = crash_rate(policy)
    assert after < 0.6 * before, (before, after)
    # Pre-training can continue from its own checkpoint.
    again = pretrain(ToyLandscape, campaigns=1, experiments_per_campaign=16, seed=1, out=tmp_path / "q.pt",
                     target=target, batch_size=16, budget_s=1.0, init_weights=out.read_bytes())
    assert from_bytes(again.read_bytes())[1]["updates"] == meta["updates"] + 1


def test_ppo_on_the_hyper_policy_learns_which_operator_pays() -> None:
    learner = Learner.fresh(TOY_SPACE, seed=0, config=PPOConfig(lr=1e-3, minibatch_size=16, target_kl=0.05),
                            kind="hyper")
    campaign = MiniCampaign(ToyLandscape(5, TOY_SPACE), TOY_TUNABLES, budget_s=1.0)
    campaign.baselines(2)
    agent = HyperAgent(TOY_SPACE, 0, 24)
    ctx = campaign.context()
    state = agent.featurize(ctx.tunables, ctx.incumbent, ctx.recent)
    before, after = operator_share_before_and_after(
        learner, state, 1, lambda a, lp, version, i: Sample(state, a, lp, float(a[0] == 1), version, f"e{i}"))
    assert after > before + 0.2, (before, after)


def operator_share_before_and_after(learner: Learner, state: np.ndarray, operator: int,
                                    sample: Callable[[list[int], float, int, int], Sample]) -> tuple[float, float]:
    """How often the policy proposes `operator` on `state`, before and after 10 PPO updates on 32 of
    its proposals there each, `sample(action, logprob, version, i)` making each proposal's sample."""
    generator = torch.Generator().manual_seed(0)

    def share() -> float:
        g = torch.Generator().manual_seed(3)
        return sum(learner.policy.sample(state, g)[0][0] == operator for _ in range(300)) / 300

    before = share()
    for version in range(10):
        acts = [learner.policy.sample(state, generator) for _ in range(32)]
        learner.update([sample(a, lp, version, i) for i, (a, lp, _) in enumerate(acts)], version)
    return before, share()


def test_pretrain_trains_the_hyper_policy_by_default(tmp_path: Path) -> None:
    target = tmp_path / "train.py"
    target.write_text(TOY)
    # Each campaign opens with one design experiment (3 numeric tunables), which is no PPO sample.
    with structlog.testing.capture_logs() as logs:
        out = pretrain(ToyLandscape, campaigns=2, experiments_per_campaign=17, seed=0, out=tmp_path / "h.pt",
                       target=target, batch_size=16, budget_s=1.0, credit="proposal")
    policy, meta = from_bytes(out.read_bytes(), TOY_SPACE)
    assert isinstance(policy, HyperPolicy) and meta["updates"] == 2
    # It ends by saying what the policy chose over the last tenth of the campaigns (at least one):
    # the last campaign's 16 policy proposals, by operator, edit count and radius.
    choices = next(e for e in logs if e["event"] == "pretrain.choices")
    assert choices["campaigns"] == 1 and choices["proposals"] == 16
    assert sum(choices["shares"].values()) == pytest.approx(1.0, abs=0.01)
    assert all(re.fullmatch(r"(model|mutate|recombine|random) x[123] r0\.(05|15|35)", k) for k in choices["shares"])


def test_a_lagged_proposal_edits_the_incumbent_of_its_time_and_must_beat_the_incumbent_now() -> None:
    """Pre-training runs proposals one experiment behind, as the pipeline does: a proposal made
    before a better run was recorded edits the old incumbent, is rewarded against it, and is
    kept only if it beats the new one."""
    campaign = MiniCampaign(ToyLandscape(7, TOY_SPACE), TOY_TUNABLES, budget_s=1.0)
    campaign.baselines(2)
    ran: list[dict[str, Any]] = []
    run = campaign.landscape.run
    campaign.landscape.run = lambda knobs, budget_s: (ran.append(dict(knobs)), run(knobs, budget_s))[1]
    old = campaign.parent()
    better = campaign.run([{"op": "set", "name": "LR", "value": 10 ** campaign.landscape.optimum}])
    assert better["kept"]
    late = campaign.run([{"op": "set", "name": "ACT", "value": "gelu"}], parent=old)
    assert ran[-1]["LR"] == old[0]["LR"].value != ran[-2]["LR"] and ran[-1]["ACT"] == "gelu"
    assert late["parent_bpb"] == old[1] and late["incumbent_bpb"] == better["val_bpb"]
    assert late["kept"] == (late["status"] == "ok" and late["val_bpb"] < better["val_bpb"])
    assert late["reward"] == compute_reward(late["status"], late["val_bpb"], old[1], campaign.sigma)


def test_pretrain_proposes_one_experiment_ahead_of_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import arrl.pretrain as pretrain_module

    target = tmp_path / "train.py"
    target.write_text(TOY)
    seen: list[int] = []  # records when each proposal is made
    propose = pretrain_module.hyper_proposal

    def spy(agent: Any, policy: Any, campaign: MiniCampaign, generator: Any, noise: Any = None) -> Any:
        seen.append(len(campaign.records))
        return propose(agent, policy, campaign, generator, noise)

    monkeypatch.setattr(pretrain_module, "hyper_proposal", spy)
    pretrain(ToyLandscape, campaigns=1, experiments_per_campaign=6, seed=0, out=tmp_path / "h.pt", target=target,
             budget_s=1.0)
    # Two baselines; proposal k (from 0) sees the outcomes of proposals before k - 1, not k - 1's.
    assert seen == [2, 2, 3, 4, 5, 6]


def test_pretrain_draws_each_campaigns_length_from_those_given(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`arrl pretrain --experiments 25,50,100`: each campaign runs one of the lengths, and its agent
    sees that length as its horizon (a feature of its state); a length below 1 is refused."""
    import arrl.pretrain as pretrain_module

    target = tmp_path / "train.py"
    target.write_text(TOY)
    horizons: list[int] = []
    agent_class = pretrain_module.HyperAgent

    def spy(space: Any, seed: int, horizon: int = 100, **options: Any) -> Any:
        horizons.append(horizon)
        return agent_class(space, seed, horizon, **options)

    runs: list[int] = []
    propose = pretrain_module.hyper_proposal

    def count(agent: Any, policy: Any, campaign: MiniCampaign, generator: Any, noise: Any = None) -> Any:
        runs.append(agent.horizon)
        return propose(agent, policy, campaign, generator, noise)

    monkeypatch.setattr(pretrain_module, "HyperAgent", spy)
    monkeypatch.setattr(pretrain_module, "hyper_proposal", count)
    pretrain(ToyLandscape, campaigns=8, experiments_per_campaign=[4, 7], seed=0, out=tmp_path / "h.pt",
             target=target, budget_s=1.0, credit="proposal")
    assert len(horizons) == 8 and set(horizons) == {4, 7}
    assert runs == [h for h in horizons for _ in range(h)]  # each campaign proposed exactly its length
    with pytest.raises(ValueError, match="1 or more"):
        pretrain(ToyLandscape, campaigns=1, experiments_per_campaign=[4, 0], seed=0, out=tmp_path / "h.pt",
                 target=target, budget_s=1.0)


def test_mini_campaign_follows_the_pipeline_rules() -> None:
    campaign = MiniCampaign(ToyLandscape(7, TOY_SPACE), TOY_TUNABLES, budget_s=1.0)
    campaign.baselines(3)
    assert [r["role"] for r in campaign.records] == ["baseline"] * 3
    assert campaign.incumbent is not None and campaign.sigma >= 1e-3
    crash = campaign.run([{"op": "set", "name": "BAD", "value": 0.0}])
    assert crash["status"] == "crashed" and crash["reward"] == FAILURE_PENALTY and not crash["kept"]
    first = campaign.run([{"op": "set", "name": "ACT", "value": "gelu"}])
    if not first["kept"]:  # the same script again is a duplicate, not a new run
        again = campaign.run([{"op": "set", "name": "ACT", "value": "gelu"}])
        assert again["status"] == "duplicate" and again["reward"] == DUPLICATE_PENALTY
    better = campaign.run([{"op": "set", "name": "LR", "value": 10 ** campaign.landscape.optimum}])
    assert better["status"] == "ok" and better["kept"] == (better["val_bpb"] < better["parent_bpb"])


def test_campaign_score_and_group_advantages() -> None:
    # The best after each of 8 proposals; the score averages it at 2, 4 and 8 (a quarter, half, all).
    assert campaign_score([5.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 2.0]) == pytest.approx(-(4.0 + 3.0 + 2.0) / 3)
    assert campaign_score([None, 4.0, 4.0, 3.0]) == pytest.approx(-(4.0 + 3.0) / 2)  # no incumbent yet: left out
    assert campaign_score([]) == -math.inf
    adv = group_advantages([-3.0, -2.0, -1.0])
    assert adv == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert group_advantages([-2.0, -2.0]) == [0.0, 0.0]  # a group that ended level teaches nothing
    assert group_advantages([-2.0, -math.inf]) == [0.0, 0.0]


def test_ppo_follows_given_advantages_not_the_reward() -> None:
    """Samples credited by their campaign (`Sample.advantage`) move the policy by that credit, even
    where their own reward says the opposite."""
    learner = Learner.fresh(TOY_SPACE, seed=0, config=PPOConfig(lr=1e-3, minibatch_size=16, target_kl=0.05),
                            kind="hyper")
    state = np.zeros(N_FEATURES, np.float32)
    state[-4:] = 1.0  # every operator allowed
    before, after = operator_share_before_and_after(
        learner, state, 2, lambda a, lp, version, i: Sample(state, a, lp, -float(a[0] == 2), version, f"e{i}",
                                                           advantage=1.0 if a[0] == 2 else -0.1))
    assert after > before + 0.2, (before, after)


def test_pretrain_by_campaign_credits_each_campaign_against_its_group(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`arrl pretrain --credit campaign`: the campaigns of a group meet one landscape instance (its
    baselines alike), each commits to one reading of the policy, and one update per group credits
    every proposal of a campaign with its score against the group's."""
    target = tmp_path / "train.py"
    target.write_text(TOY)
    batches: list[list[Sample]] = []
    update = Learner.update
    monkeypatch.setattr(Learner, "update", lambda self, samples, version: (batches.append(list(samples)),
                                                                           update(self, samples, version))[1])
    seeds: list[int] = []

    def landscape(seed: int, space: dict[str, Any]) -> ToyLandscape:
        seeds.append(seed)
        return ToyLandscape(seed, space)

    with structlog.testing.capture_logs() as logs:  # campaign credit is the hyper policy's default
        out = pretrain(landscape, campaigns=7, experiments_per_campaign=9, seed=0, out=tmp_path / "c.pt",
                       target=target, budget_s=1.0, group=3)
    # Groups of 3, 3 and the 1 left: each group on one landscape seed, a new one for each group.
    assert seeds[0] == seeds[1] == seeds[2] != seeds[3] == seeds[4] == seeds[5] != seeds[6] and len(seeds) == 7
    assert from_bytes(out.read_bytes(), TOY_SPACE)[1]["updates"] == len(batches) == 3
    assert [s.advantage for s in batches[2]] == [0.0] * 8  # a group of one has nothing to be measured against
    campaigns = [e for e in logs if e["event"] == "pretrain.campaign"]
    assert len(campaigns) == 7
    for g, batch in enumerate(batches[:2]):
        members = campaigns[3 * g:3 * g + 3]
        # 9 proposals each, the first the opening design's (no sample): 8 samples per campaign.
        assert len(batch) == 24 and all(s.policy_version == g for s in batch)
        credit = [[s.advantage for s in batch[8 * i:8 * i + 8]] for i in range(3)]
        assert all(len(set(c)) == 1 for c in credit)  # one credit per campaign
        scores = [m["score"] for m in members]
        assert [c[0] for c in credit] == pytest.approx(group_advantages(scores))
    # Each campaign read the policy through one draw of noise: with the fresh policy of the first
    # group, whose choice hardly depends on the state, that is one action for the whole campaign.
    assert all(len({tuple(s.action) for s in batches[0][8 * i:8 * i + 8]}) == 1 for i in range(3))
    assert len({tuple(s.action) for s in batches[0]}) > 1
    with pytest.raises(ValueError, match="groups of 2 or more"):
        pretrain(ToyLandscape, campaigns=2, experiments_per_campaign=9, seed=0, out=tmp_path / "d.pt",
                 target=target, budget_s=1.0, credit="campaign", group=1)
    with pytest.raises(ValueError, match="groups of 2 or more"):
        pretrain(ToyLandscape, campaigns=2, experiments_per_campaign=9, seed=0, out=tmp_path / "d.pt",
                 target=target, budget_s=1.0, credit="campaign", kind="edit")
    with pytest.raises(ValueError, match="'proposal' or 'campaign'"):
        pretrain(ToyLandscape, campaigns=2, experiments_per_campaign=9, seed=0, out=tmp_path / "d.pt",
                 target=target, budget_s=1.0, credit="experiment")
    assert not (tmp_path / "d.pt").exists()
