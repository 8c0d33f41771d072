"""evaluate_bpb: the one metric, computed by the harness from the model's logits."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from frozen_env.constants import VOCAB_SIZE


@torch.no_grad()
def evaluate_bpb(model, val: np.ndarray, seq_len: int, eval_bytes: int, device, batch: int = 64,
                 autocast=None) -> float:
    """Mean cross-entropy per byte of the first `eval_bytes` validation bytes, in bits.

    Non-overlapping windows of `seq_len`: every byte in them is predicted exactly once. The
    loss is accumulated in float64 so a uniform predictor scores exactly 8.0.
    """
    windows = min(eval_bytes, len(val) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"validation split too small for seq_len {seq_len}")
    data = torch.from_numpy(np.asarray(val[: windows * seq_len + 1], dtype=np.int64)).to(device)
    was_training = model.training
    model.eval()
    total_nats = 0.0
    try:
        for start in range(0, windows, batch):
            rows = torch.arange(start, min(start + batch, windows), device=device)
            index = rows[:, None] * seq_len + torch.arange(seq_len + 1, device=device)
            window = data[index]
            x, y = window[:, :-1], window[:, 1:]
            if autocast is not None:
                with autocast():
                    logits = model(x)
            else:
                logits = model(x)
            if logits.shape != (x.size(0), seq_len, VOCAB_SIZE):
                raise ValueError(f"model must return logits of shape (B, T, {VOCAB_SIZE}), got {tuple(logits.shape)}")
            nats = F.cross_entropy(logits.double().reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum")
            total_nats += nats.item()
    finally:
        model.train(was_training)
    return total_nats / (windows * seq_len) / math.log(2)


@torch.no_grad()
def peeks_ahead(model, val: np.ndarray, seq_len: int, device, tolerance: float = 1e-3) -> bool:
    """True when the logits at some position change if only later tokens change.

    A causal language model's prediction for position t depends on tokens up to t alone; a
    model that reads future bytes would score an unearned val_bpb.
    """
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.asarray(val[: 2 * seq_len], dtype=np.int64)).view(2, seq_len).to(device)
        cut = seq_len // 2
        altered = x.clone()
        altered[:, cut:] = (altered[:, cut:] + 97) % VOCAB_SIZE
        before, after = model(x).float(), model(altered).float()
        scale = before[:, :cut].abs().max().clamp_min(1.0)
        return bool(((before[:, :cut] - after[:, :cut]).abs().max() / scale) > tolerance)
    finally:
        model.train(was_training)
