"""Does the PPO learner slow the trainer? A CPU trainer's steps/s with the learner busy and idle.

    python scripts/bench_learner.py                    # 6 rounds of idle / busy phases of 8 s
    python scripts/bench_learner.py --phase-s 10 --rounds 2 --kind edit

Two processes run side by side for the whole measurement:

- the trainer: a small GPT-like model (train.py's `cpu` shape: 3 layers, 128 wide, 4 heads, batch 16
  x 128 bytes) trained with AdamW in a loop, with torch's default threads (every core) and
  `OMP_WAIT_POLICY=PASSIVE`, as the frozen runner starts a real trainer;
- the learner: the real `pipeline.learner.LearnerStage` against a private redis-server, at its
  production settings (`pipeline.learner.production_priority`: nice 10, one torch thread), on a
  batch of 8 real samples (states, actions, log-probabilities and rewards from a simulated campaign
  of the ppo strategy's policy on `cpu_fitted`). In a busy phase it buffers the batch and runs
  `stage.update()` (PPO, publish the weights to Redis, write the checkpoints) back to back, far more
  often than a campaign ever asks (one update per 8 experiments); in an idle phase it waits.

Phases alternate idle / busy. For each, the trainer's steps/s and its duty cycle (CPU seconds it got
over wall seconds times its threads) are printed, then each busy phase's steps/s over its idle
neighbours', their median and, as the noise, the spread of the idle phases.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def trainer(steps: Any, cpu: Any, stop: Any) -> None:
    """Train forever (until `stop`); publish the step count and the CPU seconds used so far."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    width, seq, batch = 128, 128, 16
    layer = nn.TransformerEncoderLayer(width, 4, 3 * width, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.Embedding(256, width), nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), nn.Linear(width, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (batch, seq + 1))
    mask = nn.Transformer.generate_square_subsequent_mask(seq)
    while not stop.is_set():
        x, y = data[:, :-1], data[:, 1:]
        h = model[1](model[0](x), mask=mask, is_causal=True)
        loss = nn.functional.cross_entropy(model[2](h).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with steps.get_lock():
            steps.value += 1
        cpu.value = time.process_time()  # this process's threads together


def _samples(kind: str, n: int) -> tuple[Any, list[Any]]:
    """(learner, n samples) from a short simulated campaign of the policy, as the learner sees them."""
    import torch

    from arrl.edits import parse_tunables, search_space
    from arrl.hyper import HyperAgent, pretrained_weights
    from arrl.landscapes import cpu_fitted
    from arrl.policy import featurize
    from arrl.ppo import Learner, Sample
    from arrl.pretrain import DEFAULT_TARGET, MiniCampaign, hyper_proposal

    base = parse_tunables(DEFAULT_TARGET.read_text())
    space = search_space(base)
    weights = pretrained_weights() if kind == "hyper" else None
    learner = Learner.from_bytes(weights, space) if weights else Learner.fresh(space, 0, kind=kind)
    campaign = MiniCampaign(cpu_fitted(0, space), base, budget_s=30.0)
    campaign.baselines(2)
    agent, generator, out = HyperAgent(space, 0, 100), torch.Generator().manual_seed(0), []
    while len(out) < n:
        if kind == "hyper":
            proposal = hyper_proposal(agent, learner.policy, campaign, generator)
            record = campaign.run(proposal.program, proposal.extra)
            if proposal.state is None:  # a rule's program (`HyperAgent.scripted`): no sample
                continue
            state, action, logprob = proposal.state, proposal.action, proposal.logprob
        else:
            state = featurize(space, campaign.context(), horizon=100)
            act = learner.policy.act(state, generator)
            action, logprob, record = act.action, act.logprob, campaign.run(act.program)
        out.append(Sample(state, action, logprob, record["reward"], 0, record["experiment_id"]))
    return learner, out


def learner(url: str, kind: str, busy: Any, updates: Any, ready: Any, stop: Any, checkpoints: str) -> None:
    """The real learner stage at production priority, updating back to back while `busy`."""
    import anyio
    import msgpack
    import structlog

    from pipeline.learner import LearnerStage, production_priority

    production_priority()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    learner_, samples = _samples(kind, 8)

    async def main() -> None:
        from arrl.bus import Bus
        from arrl.campaign import WEIGHTS, Campaign, CampaignConfig
        from arrl.patch import content_hash
        from arrl.pretrain import DEFAULT_TARGET

        source = DEFAULT_TARGET.read_text()
        bus = Bus.from_url(url, "benchlearner")
        campaign = await Campaign.create(bus, CampaignConfig(campaign_id="benchlearner", strategy="ppo"), source,
                                         content_hash(source))
        stage = LearnerStage(campaign, Path(checkpoints), learner_, batch_size=8)
        await stage.publish()
        ready.set()
        while not stop.is_set():
            if not busy.is_set():
                await anyio.sleep(0.05)  # a real idle learner is blocked in a stream read
                continue
            version = await bus.get_version(WEIGHTS)
            for s in samples:
                s.policy_version = version
                await bus.redis.rpush(stage.buffer_key, msgpack.packb(s.to_plain()))
            await stage.update()
            with updates.get_lock():
                updates.value += 1
        await bus.aclose()

    anyio.run(main)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase-s", type=float, default=8.0, help="seconds per phase (default %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="idle/busy pairs (default %(default)s)")
    p.add_argument("--kind", choices=("hyper", "edit"), default="hyper",
                   help="the policy the learner trains (default %(default)s, what the ppo strategy ships)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # as frozen_env.runner.trainer_env starts a trainer
    from pipeline.redis_server import RedisServer

    ctx = multiprocessing.get_context("spawn")
    steps, cpu, updates = ctx.Value("l", 0), ctx.Value("d", 0.0), ctx.Value("l", 0)
    busy, ready, stop = ctx.Event(), ctx.Event(), ctx.Event()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        server = RedisServer(Path(tmp)).start()
        procs = [ctx.Process(target=learner, args=(server.url, args.kind, busy, updates, ready, stop, tmp)),
                 ctx.Process(target=trainer, args=(steps, cpu, stop))]
        try:
            procs[0].start()
            if not ready.wait(120):
                raise TimeoutError("the learner did not start")
            procs[1].start()
            while steps.value < 5:  # imports and the first steps are not steady state
                time.sleep(0.1)
            time.sleep(2.0)
            rows: list[tuple[str, float, float, float]] = []
            for phase in ["idle", "busy"] * args.rounds + ["idle"]:
                (busy.set if phase == "busy" else busy.clear)()
                time.sleep(0.5)  # let the learner reach the phase
                t0, s0, c0, u0 = time.perf_counter(), steps.value, cpu.value, updates.value
                time.sleep(args.phase_s)
                dt = time.perf_counter() - t0
                rate, duty = (steps.value - s0) / dt, (cpu.value - c0) / (dt * threads)
                rows.append((phase, rate, duty, (updates.value - u0) / dt))
                print(f"{phase:<5} trainer {rate:7.2f} steps/s  duty cycle {duty:5.1%}  "
                      f"learner {rows[-1][3]:6.2f} updates/s", flush=True)
        finally:
            stop.set()
            busy.clear()
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.terminate()
            server.stop()
    idle = [r[1] for r in rows if r[0] == "idle"]
    # Each busy phase against the idle phases beside it: the machine's other load drifts slowly,
    # so neighbours compare better than medians over the whole run.
    paired = []
    for i, r in enumerate(rows):
        if r[0] == "busy":
            near = [rows[j][1] for j in (i - 1, i + 1) if 0 <= j < len(rows) and rows[j][0] == "idle"]
            paired.append(r[1] / statistics.mean(near))
    ratio = statistics.median(paired)
    noise = (max(idle) - min(idle)) / statistics.median(idle)
    duty_idle = statistics.median(r[2] for r in rows if r[0] == "idle")
    duty_busy = statistics.median(r[2] for r in rows if r[0] == "busy")
    print(f"\nbusy / idle steps/s per busy phase (against its idle neighbours): "
          f"{' '.join(f'{x:.3f}' for x in paired)}")
    print(f"steps/s busy / idle = {ratio:.3f} (median of those; idle phases spread {noise:.1%}); "
          f"duty cycle idle {duty_idle:.1%}, busy {duty_busy:.1%}; {threads} cores, learner kind {args.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
