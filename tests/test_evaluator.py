"""The self-evaluator stage against a real Redis: discovery, decisions, aborts, restarts."""

from __future__ import annotations

import math

import anyio
import pytest

from arrl.bus import Bus
from arrl.campaign import Campaign, CampaignConfig
from arrl.selfeval import SelfEvalConfig, audit_record, audited
from pipeline.evaluator import STARTED, Evaluator, run_evaluator

pytestmark = pytest.mark.anyio
BUDGET = 30.0
BARE_RULE = SelfEvalConfig(audit_first=0, audit_every=0)  # no audits: these tests are of the rule's aborts


def curve(final: float, points: int = 300, upto: float = 1.0) -> list[list[float]]:
    """A realistic loss curve ending near `final` nats, with the warmdown bend of train.py."""
    out = []
    for i in range(1, points + 1):
        t = BUDGET * i / points
        if t > upto * BUDGET:
            break
        bend = 0.15 * max(0.0, (t / BUDGET - 0.6) / 0.4)
        out.append([t, final + 0.15 + 3.2 * (t + 0.3) ** -0.8 - bend])
    return out


async def make_campaign(url: str) -> Campaign:
    bus = Bus.from_url(url, "evaltest")
    return await Campaign.create(bus, CampaignConfig(campaign_id="evaltest", profile="cpu"), "x = 1\n", "h0")


async def record_run(campaign: Campaign, exp_id: str, final_loss: float, val_bpb: float) -> None:
    """A finished run: its events in its stream, its record in the ledger, and it as incumbent."""
    for t, loss in curve(final_loss):
        await campaign.bus.publish_event(exp_id, {"event": "train.step", "training_seconds": t, "loss": loss})
    await campaign.record(exp_id, {"experiment_id": exp_id, "status": "ok", "val_bpb": val_bpb})
    incumbent = await campaign.bus.get_incumbent()
    await campaign.bus.cas_incumbent(int(incumbent["version"]) if incumbent else 0,
                                     {"hash": exp_id, "val_bpb": val_bpb, "experiment_id": exp_id})


async def stream_prefix(campaign: Campaign, exp_id: str, final_loss: float, upto: float) -> None:
    for t, loss in curve(final_loss, upto=upto):
        await campaign.bus.publish_event(exp_id, {"event": "train.step", "training_seconds": t, "loss": loss})


async def controls(campaign: Campaign, exp_id: str) -> list[dict]:
    return [m for _, m in await campaign.bus.read_control(exp_id, "0")]


async def test_hopeless_run_is_aborted_and_a_promising_one_is_not(redis_server) -> None:
    campaign = await make_campaign(redis_server.url)
    for i, (loss, bpb) in enumerate([(1.80, 2.62), (1.85, 2.70), (1.78, 2.60), (1.95, 2.85)]):
        await record_run(campaign, f"e0000{i + 1}", loss, bpb)
    evaluator = Evaluator(campaign, BARE_RULE)
    for exp in ("bad", "good"):
        await evaluator.on_started({"experiment_id": exp, "budget_s": BUDGET})
    await stream_prefix(campaign, "bad", 2.6, upto=0.5)  # far above the incumbent's curve
    await stream_prefix(campaign, "good", 1.70, upto=0.5)  # below it
    stops = await evaluator.tick()
    assert [exp for exp, _ in stops] == ["bad"]
    [abort] = await controls(campaign, "bad")
    assert abort["command"] == "abort" and "self-evaluator" in abort["reason"]
    assert await controls(campaign, "good") == []
    verdicts = [e for _, e in await campaign.bus.read_events("bad", "0") if e["event"] == "selfeval.verdict"]
    assert verdicts and verdicts[-1]["decision"] == "abort" and verdicts[-1]["forecast_val_bpb"] > 2.7
    good = [e for _, e in await campaign.bus.read_events("good", "0") if e["event"] == "selfeval.verdict"]
    assert good and good[-1]["decision"] == "continue"
    await campaign.bus.aclose()


async def test_a_rerun_of_the_incumbent_or_a_baseline_is_never_aborted(redis_server) -> None:
    """A measurement run is wanted whatever it scores: a re-run on a machine that slowed down
    looks hopeless against the incumbent's older curve, and is exactly what must finish."""
    campaign = await make_campaign(redis_server.url)
    for i, (loss, bpb) in enumerate([(1.80, 2.62), (1.85, 2.70), (1.78, 2.60), (1.95, 2.85)]):
        await record_run(campaign, f"e0000{i + 1}", loss, bpb)
    evaluator = Evaluator(campaign, BARE_RULE)
    for exp, role in (("rerun", "remeasure"), ("repeat", "baseline"), ("edit", "edit")):
        await evaluator.on_started({"experiment_id": exp, "budget_s": BUDGET, "role": role})
        await stream_prefix(campaign, exp, 2.6, upto=0.5)  # all three far above the incumbent's curve
    stops = await evaluator.tick()
    assert [exp for exp, _ in stops] == ["edit"]
    assert await controls(campaign, "rerun") == [] and await controls(campaign, "repeat") == []
    await campaign.bus.aclose()


async def test_diverging_run_is_stopped_as_diverged(redis_server) -> None:
    campaign = await make_campaign(redis_server.url)
    evaluator = Evaluator(campaign)  # with audits: a diverged run is never one
    await evaluator.on_started({"experiment_id": "nan", "budget_s": BUDGET})
    for t, loss in [[0.1, 5.5], [0.2, 5.4], [0.3, math.nan]]:
        await campaign.bus.publish_event("nan", {"event": "train.step", "training_seconds": t, "loss": loss})
    stops = await evaluator.tick()
    assert stops and stops[0][0] == "nan"
    [stop] = await controls(campaign, "nan")
    assert stop["command"] == "diverged"
    await campaign.bus.aclose()


async def test_no_abort_before_the_minimum_fraction_or_without_an_incumbent(redis_server) -> None:
    campaign = await make_campaign(redis_server.url)
    evaluator = Evaluator(campaign, BARE_RULE)
    await evaluator.on_started({"experiment_id": "early", "budget_s": BUDGET})
    await stream_prefix(campaign, "early", 3.0, upto=0.5)
    assert await evaluator.tick() == []  # no incumbent yet: nothing to compare with
    await record_run(campaign, "e00001", 1.8, 2.62)
    await evaluator.on_started({"experiment_id": "young", "budget_s": BUDGET})
    await stream_prefix(campaign, "young", 3.0, upto=0.1)
    stops = await evaluator.tick()
    assert "young" not in [exp for exp, _ in stops]
    await campaign.bus.aclose()


async def test_a_restarted_evaluator_misses_no_experiment(redis_server) -> None:
    """Killed mid-campaign: what it watched and what started while it was down are both judged."""
    campaign = await make_campaign(redis_server.url)
    for i, (loss, bpb) in enumerate([(1.80, 2.62), (1.85, 2.70), (1.95, 2.85)]):
        await record_run(campaign, f"e0000{i + 1}", loss, bpb)
    bus = campaign.bus

    # First evaluator: learns about "watched-before" through the started stream, then dies.
    await bus.publish(STARTED, "started", {"experiment_id": "watched-before", "budget_s": BUDGET})
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_evaluator(campaign, "first", BARE_RULE, stop=stop, cadence_s=0.05))
        with anyio.fail_after(10):
            while not await bus.redis.hexists(bus.key("evaluator", "watching"), "watched-before"):
                await anyio.sleep(0.02)
        stop.set()
    # While no evaluator runs: one experiment starts, and both stream hopeless curves.
    await bus.publish(STARTED, "started", {"experiment_id": "started-while-down", "budget_s": BUDGET})
    for exp in ("watched-before", "started-while-down"):
        await stream_prefix(campaign, exp, 2.6, upto=0.5)

    # A new evaluator process (new consumer name) picks up both.
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_evaluator(campaign, "second", BARE_RULE, stop=stop, cadence_s=0.05))
        with anyio.fail_after(20):
            while not (await controls(campaign, "watched-before") and await controls(campaign, "started-while-down")):
                await anyio.sleep(0.05)
        stop.set()
    assert (await controls(campaign, "watched-before"))[0]["command"] == "abort"
    assert (await controls(campaign, "started-while-down"))[0]["command"] == "abort"
    await bus.aclose()


@pytest.mark.parametrize("gaps_known", [False, True])
async def test_a_campaign_whose_gap_to_val_bpb_varies_aborts_less_readily(redis_server, gaps_known: bool) -> None:
    # Five finished runs whose val_bpb sits 0.04 below to 0.23 above their final training loss
    # (in bpb): the tunables move the gap, so a run that trains a little worse than the incumbent
    # may still validate better. Records carry `final_loss` (the rewarder writes it); records
    # without it leave the forecast the default 0.01 of gap spread.
    bus = Bus.from_url(redis_server.url, f"gaps{gaps_known}")
    campaign = await Campaign.create(bus, CampaignConfig(campaign_id=f"gaps{gaps_known}", profile="cpu"), "x = 1\n", "h0")
    for i, (loss, bpb) in enumerate([(1.80, 2.62), (1.83, 2.79), (1.86, 2.64), (1.90, 2.97), (1.84, 2.74)]):
        exp_id = f"e0000{i + 1}"
        for t, y in curve(loss):
            await bus.publish_event(exp_id, {"event": "train.step", "training_seconds": t, "loss": y})
        await campaign.record(exp_id, {"experiment_id": exp_id, "status": "ok", "val_bpb": bpb,
                                       **({"final_loss": loss} if gaps_known else {})})
        if i == 0:
            await bus.cas_incumbent(0, {"hash": exp_id, "val_bpb": bpb, "experiment_id": exp_id})
    evaluator = Evaluator(campaign, BARE_RULE)
    reference, _ = await evaluator.reference()
    assert reference is not None
    assert reference.gap_spread == (pytest.approx(0.0955, abs=0.002) if gaps_known else 0.0)
    await evaluator.on_started({"experiment_id": "close", "budget_s": BUDGET})
    await stream_prefix(campaign, "close", 1.93, upto=0.8)  # 0.13 nats above the incumbent's curve
    stops = await evaluator.tick()
    assert [exp for exp, _ in stops] == ([] if gaps_known else ["close"])
    await bus.aclose()


async def test_the_rule_audits_its_first_would_be_aborts_and_a_caught_miss_widens_its_forecasts(redis_server) -> None:
    campaign = await make_campaign(redis_server.url)
    for i, (loss, bpb) in enumerate([(1.80, 2.62), (1.85, 2.70), (1.78, 2.60), (1.95, 2.85)]):
        await record_run(campaign, f"e0000{i + 1}", loss, bpb)
    evaluator = Evaluator(campaign)  # the defaults: every would-be abort is audited until two confirm the rule

    async def hopeless(exp_id: str) -> list[dict]:
        await evaluator.on_started({"experiment_id": exp_id, "budget_s": BUDGET})
        await stream_prefix(campaign, exp_id, 2.6, upto=0.5)
        await evaluator.tick()
        return [e for _, e in await campaign.bus.read_events(exp_id, "0") if e["event"] == "selfeval.verdict"]

    async def finish(exp_id: str, verdicts: list[dict], val_bpb: float) -> None:
        await campaign.record(exp_id, {"experiment_id": exp_id, "status": "ok", "val_bpb": val_bpb,
                                       "audit": audit_record(verdicts)})

    # Two hopeless runs: audited, not aborted; both end as badly as forecast, which confirms the rule.
    for exp_id in ("a1", "a2"):
        verdicts = await hopeless(exp_id)
        assert await controls(campaign, exp_id) == []
        assert verdicts[-1]["audit"] is True and verdicts[-1]["reason"].startswith("audit: would abort")
        await finish(exp_id, verdicts, 3.4)
    await evaluator.reference()
    assert evaluator.audits.confirmed == 2 and evaluator.audits.miss == 0.0
    # The next is aborted, unless it is the one in 20 audited after that.
    exp_id = next(f"a{i}" for i in range(3, 100) if not audited(campaign.bus.campaign_id, f"a{i}", evaluator.config, 2))
    await hopeless(exp_id)
    assert [c["command"] for c in await controls(campaign, exp_id)] == ["abort"]
    # An audit once begun runs to the end: the first two, still watched in that tick, were not aborted.
    assert await controls(campaign, "a1") == [] and await controls(campaign, "a2") == []
    # An audited run that ends better than its tau was a false abort caught: every later forecast widens.
    fresh = Evaluator(campaign, SelfEvalConfig(audit_first=3))
    verdicts = [e for _, e in await campaign.bus.read_events("a1", "0") if e["event"] == "selfeval.verdict"]
    await finish("late", verdicts, 2.55)
    reference, _ = await fresh.reference()
    assert reference is not None
    assert reference.audit_miss == pytest.approx(verdicts[-1]["forecast_val_bpb"] - 2.55)
    assert fresh.audits.confirmed == 2
    await campaign.bus.aclose()
