"""The harness that train.py calls: clock, batches, per-step reports, and the final evaluation.

It writes one JSON object per line to the process's original stdout; the runner parses those
lines, and everything else the script prints is kept as its log. The candidate cannot change
how val_bpb is computed: `finish` evaluates the model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from frozen_env.constants import DEFAULT_DATASET, VOCAB_SIZE, Profile, get_profile

# Divergence: the loss average rose this far above the first step's loss.
DIVERGENCE_FACTOR = 1.5
# Reports are written at most this often; the loss written is the mean since the last one.
REPORT_INTERVAL_S = 0.05

_out: Any = None
# Filled by a warm trainer before its candidate is known (frozen_env.warm): the dataset, and its
# training split already on each device, so a harness created later starts at once.
_preloaded: dict[str, Any] = {}


def preload(dataset, device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.init()  # the CUDA context is most of a GPU trainer's start-up
    _preloaded["dataset"] = dataset
    _preloaded[f"train:{device}"] = torch.from_numpy(dataset.train).to(device)


# Events only finish() may write: a candidate calling emit("summary", ...) itself is refused.
FINISH_ONLY = frozenset({"summary"})
_finishing = False
# Signs each event line for the runner, once the launcher installed the run's key (install_key).
# The candidate can see the events pipe (its number is in the environment) but not the key, so a
# line it writes there itself is refused by the runner as forged.
_sign: Callable[[bytes], str] | None = None


def install_key(key: bytes) -> None:
    """Called by the launcher, once, before the candidate's code runs."""
    global _sign
    if _sign is not None:
        return  # once: the candidate may not put a key of its own in place
    mac = hmac.new(key, digestmod=hashlib.sha256)

    def sign(body: bytes) -> str:
        copy = mac.copy()
        copy.update(body)
        return copy.hexdigest()[:32]

    _sign = sign


def machine_gflops(device, blocks: int = 8, block_s: float = 0.025) -> float:
    """The device's matrix-multiply speed now, in GFLOP/s: matrix products for `blocks` spans of
    `block_s` seconds (0.2 s in all) before every run's clock starts, after the gate, so that no
    other run trains on the device meanwhile. The median span's speed.

    Why: a run's budget is wall-clock time, so a machine that slows down (another tenant, heat)
    trains every run fewer steps and raises its val_bpb; the incumbent's score then compares with
    edits run on another machine, in effect. This number, recorded with each run, shows when that
    happened (`CampaignConfig.remeasure_on_speed` re-runs the incumbent then). The spans are long
    against a scheduler's time slices (a few ms): a 10 ms probe sometimes ran a whole slice alone
    and read full speed beside a busy loop sharing its core. The inputs are constants, not random draws,
    so the candidate's random state is untouched."""
    import torch

    n = 2048 if device.type == "cuda" else 256
    a = torch.full((n, n), 1.0 / n, device=device)
    torch.mm(a, a)  # first call: kernels and caches
    speeds = []
    for _ in range(blocks):
        _sync_device(device)
        t = now = time.perf_counter()
        reps = 0
        while now - t < block_s:
            torch.mm(a, a)
            _sync_device(device)
            reps += 1
            now = time.perf_counter()
        speeds.append(2 * n ** 3 * reps / (now - t) / 1e9)
    return round(statistics.median_low(speeds), 2)


def _sync_device(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(event: str, **fields: Any) -> None:
    """Write one event line on the harness's own channel, opened at the first event.

    Opened once, at the harness's start, so a candidate that later replaces sys.stdout or
    silences print() cannot swallow the harness's lines.
    """
    global _out
    if event in FINISH_ONLY and not _finishing:
        raise PermissionError(f"arrl harness: only Harness.finish() writes the {event!r} event")
    if _out is None:
        # The runner's event pipe when there is one (what the script prints is only its log);
        # a duplicate of stdout when train.py is run by hand.
        fd = int(os.environ["ARRL_EVENTS_FD"]) if os.environ.get("ARRL_EVENTS_FD") else os.dup(1)
        _out = os.fdopen(fd, "w", buffering=1)
    body = json.dumps({"event": event, **fields}, allow_nan=True)
    if _sign is not None:  # the signature goes last, over the line as it stands before it
        body = f'{body[:-1]}, "sig": "{_sign(body.encode())}"}}'
    _out.write(body + "\n")
    _out.flush()


def profile_from_env() -> Profile:
    profile = get_profile(os.environ.get("ARRL_PROFILE", "cpu"))
    if os.environ.get("ARRL_BUDGET_S"):
        profile = dataclasses.replace(profile, budget_s=float(os.environ["ARRL_BUDGET_S"]))
    return profile


class Harness:
    """One training run under a frozen profile."""

    def __init__(self, profile: Profile, dataset=None, device: str | None = None) -> None:
        import torch

        from frozen_env.data import fingerprint, load_dataset

        self.profile = profile
        self.t0 = float(os.environ.get("ARRL_T0") or time.time())
        cached = _preloaded.get("dataset")
        wanted_name = os.environ.get("ARRL_DATASET") or DEFAULT_DATASET
        # Without the validation split: the candidate's process holds it only during finish().
        self.dataset = dataset or (cached if cached is not None and cached.name == wanted_name
                                   else load_dataset(with_val=False))
        want = device or os.environ.get("ARRL_DEVICE") or profile.device
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"profile {profile.name!r} needs CUDA, but no GPU is visible")
        self.device = torch.device(want)
        self.fingerprint = fingerprint(self.dataset.data_sha256, profile)
        self.seed, self.seq_len, self.vocab_size = profile.seed, profile.seq_len, VOCAB_SIZE
        on_device = _preloaded.get(f"train:{want}") if self.dataset is cached else None
        self._train = on_device if on_device is not None else torch.from_numpy(self.dataset.train).to(self.device)
        self._steps = 0
        self._clock_start: float | None = None
        self._training_seconds = 0.0
        self._tokens = 0
        self._first_loss: float | None = None
        self._loss_ema: float | None = None
        self._pending: list[float] = []
        self._last_emit = 0.0
        emit("harness.ready", profile=profile.name, device=str(self.device), fingerprint=self.fingerprint,
             budget_s=profile.budget_s, startup_seconds=round(time.time() - self.t0, 3))

    @classmethod
    def from_env(cls) -> Harness:
        """The profile comes from $ARRL_PROFILE (default `cpu`), the data from $ARRL_DATASET.

        $ARRL_BUDGET_S shortens or lengthens the budget for benchmarks; it is part of the
        fingerprint, so such runs are never compared with the profile's own.
        """
        return cls(profile_from_env())

    # -- what train.py uses -------------------------------------------------------------
    def train_batches(self, batch_size: int):
        from frozen_env.data import train_batches

        return train_batches(self._train, batch_size, self.seq_len, self.seed, self.device)

    def autocast(self):
        """bf16 autocast on CUDA; nothing on CPU, where bf16 matmuls are slower."""
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def training_seconds(self) -> float:
        if self._clock_start is None:
            return 0.0
        return self._training_seconds + (time.perf_counter() - self._clock_start)

    def progress(self) -> float:
        """Fraction of the training budget used, for learning-rate schedules."""
        return min(self.training_seconds() / self.profile.budget_s, 1.0)

    def time_up(self) -> bool:
        return self.training_seconds() >= self.profile.budget_s

    def report(self, step: int, loss: float, tokens: int) -> None:
        """Call once after every optimiser step with that step's training loss."""
        self._steps += 1
        self._tokens += int(tokens)
        if self._steps == self.profile.warmup_steps:
            # The clock starts after the warm-up steps, where compilation and allocation happen,
            # and after the device is ours (frozen_env.gate).
            self._sync()
            self._pass_gate(step)
            speed = machine_gflops(self.device)
            self._clock_start = time.perf_counter()
            emit("train.clock_started", step=step, startup_seconds=round(time.time() - self.t0, 3),
                 machine_gflops=speed)
        if not math.isfinite(loss):
            self._diverge(step, loss, "loss is not finite")
        if self._first_loss is None:
            self._first_loss = loss
        self._loss_ema = loss if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * loss
        if self._steps > 10 and self._loss_ema > DIVERGENCE_FACTOR * self._first_loss:
            self._diverge(step, loss, f"loss average {self._loss_ema:.3f} exceeds {DIVERGENCE_FACTOR}x the first loss")
        self._pending.append(loss)
        now = time.perf_counter()
        if now - self._last_emit >= REPORT_INTERVAL_S or self._clock_start is None:
            self._last_emit = now
            emit("train.step", step=step, training_seconds=round(self.training_seconds(), 4),
                 loss=sum(self._pending) / len(self._pending), tokens=self._tokens)
            self._pending.clear()

    def finish(self, model) -> dict:
        """Evaluate val_bpb, check causality, and write the summary. Call once, at the end."""
        import torch

        from frozen_env import guard
        from frozen_env.data import load_validation
        from frozen_env.evaluate import evaluate_bpb, peeks_ahead

        self._sync()
        self._pass_gate(self._steps)  # a run shorter than its warm-up must not evaluate beside another
        training_seconds = self.training_seconds()
        self._clock_start = None
        self._training_seconds = training_seconds
        profile = self.profile
        tampered = guard.verify(self) or self._profile_changed()
        if tampered:
            emit("integrity.violation", reason=tampered)
        with guard.finishing():
            val = self.dataset.val if self.dataset.val is not None else load_validation(self.dataset.path)
            val_bpb = evaluate_bpb(model, val, profile.seq_len, profile.eval_bytes, self.device,
                                   profile.eval_batch, self.autocast)
            causal = not peeks_ahead(model, val, profile.seq_len, self.device)
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:  # ru_maxrss is in KiB on Linux
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = {
            "val_bpb": val_bpb,
            "training_seconds": round(training_seconds, 3),
            "total_seconds": round(time.time() - self.t0, 3),
            "peak_memory_mb": round(peak_mb, 1),
            "num_steps": self._steps,
            "num_params": sum(p.numel() for p in model.parameters()),
            "total_tokens": self._tokens,
            "causal": causal,
            "device": str(self.device),
            "profile": profile.name,
            "fingerprint": self.fingerprint,
        }
        global _finishing
        _finishing = True
        try:
            emit("summary", **summary)
        finally:
            _finishing = False
        # The plain block autoresearch users grep for.
        print("---", flush=True)
        print(f"val_bpb:          {val_bpb:.6f}")
        print(f"training_seconds: {training_seconds:.1f}")
        print(f"total_seconds:    {summary['total_seconds']:.1f}")
        print(f"peak_memory_mb:   {summary['peak_memory_mb']:.1f}")
        print(f"num_steps:        {self._steps}")
        print(f"num_params_M:     {summary['num_params'] / 1e6:.3f}")
        print(f"total_tokens_M:   {self._tokens / 1e6:.3f}", flush=True)
        return summary

    # -- internals ----------------------------------------------------------------------
    def _sync(self) -> None:
        _sync_device(self.device)

    def _profile_changed(self) -> str | None:
        """Under the launcher the profile is the environment's; a candidate may not swap it
        (a longer budget, a shorter evaluation)."""
        from frozen_env import guard

        if guard.installed() and self.profile != profile_from_env():
            return f"the frozen profile was changed (budget {self.profile.budget_s} s, eval {self.profile.eval_bytes} bytes)"
        return None

    def _pass_gate(self, step: int) -> None:
        """Wait until the runner has this device for us: one byte (or the pipe's end) on the gate."""
        gate = os.environ.pop("ARRL_GATE_FD", None)
        if not gate:
            return
        emit("train.gate", step=step, prepare_seconds=round(time.time() - self.t0, 3))
        fd = int(gate)
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)

    def _diverge(self, step: int, loss: float, reason: str) -> None:
        emit("train.diverged", step=step, loss=loss, reason=reason,
             training_seconds=round(self.training_seconds(), 4))
        # Exit at once: a diverged run has nothing more to learn and should free the device.
        sys.stdout.flush()
        os._exit(3)
