"""Baseline training script: a small nanochat-style GPT trained for a fixed wall-clock budget.

This file is the mutable target of the search. Everything around it (data, tokenisation, the
time budget, evaluation) lives in `frozen_env` and cannot be changed from here: the harness owns
the clock, feeds the batches and computes val_bpb from the model's logits.

The proposer edits only the hyperparameter block below. Each tunable is a top-level literal with
its search domain in a trailing comment: `log LOW..HIGH`, `linear LOW..HIGH`, `int LOW..HIGH`,
or a list of choices `a|b|c`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from frozen_env.harness import Harness

# --- hyperparameters ---
# model shape
DEPTH = 3  # search: int 1..8
N_EMBD = 128  # search: 64|96|128|192|256
N_HEAD = 4  # search: 1|2|4|8
MLP_RATIO = 3  # search: int 1..6
ACTIVATION = "relu2"  # search: relu2|gelu|silu|swiglu
QK_NORM = True  # search: True|False
TIE_EMBEDDINGS = False  # search: True|False
ROPE_BASE = 10000.0  # search: log 100..100000
LOGIT_SOFTCAP = 15.0  # search: linear 0..50
# optimisation
BATCH_SIZE = 16  # search: int 2..64
MATRIX_OPTIMIZER = "muon"  # search: muon|adamw
MATRIX_LR = 0.02  # search: log 0.0001..0.2
EMBED_LR = 0.01  # search: log 0.0001..0.3
UNEMBED_LR = 0.004  # search: log 0.0001..0.1
MUON_MOMENTUM = 0.95  # search: linear 0.8..0.99
ADAM_BETA1 = 0.8  # search: linear 0.5..0.95
ADAM_BETA2 = 0.95  # search: linear 0.9..0.999
WEIGHT_DECAY = 0.0  # search: linear 0..0.3
GRAD_CLIP = 1.0  # search: linear 0..5
# schedule
WARMUP_FRAC = 0.02  # search: linear 0..0.3
WARMDOWN_FRAC = 0.4  # search: linear 0..0.9
FINAL_LR_FRAC = 0.0  # search: linear 0..0.5
# regularisation
DROPOUT = 0.0  # search: linear 0..0.3
INIT_SCALE = 1.0  # search: log 0.25..4
# --- end hyperparameters ---


class RMSNorm(nn.Module):
    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base, device):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos()[None, None], angles.sin()[None, None]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = N_EMBD // N_HEAD
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.norm = RMSNorm()

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, N_HEAD, self.head_dim).permute(2, 0, 3, 1, 4)
        if QK_NORM:  # keeps attention logits bounded, which tolerates higher learning rates
            q, k = self.norm(q), self.norm(k)
        q, k = apply_rotary(q, cos[:, :, :T], sin[:, :, :T]), apply_rotary(k, cos[:, :, :T], sin[:, :, :T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=DROPOUT if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        hidden = MLP_RATIO * N_EMBD
        self.fc = nn.Linear(N_EMBD, 2 * hidden if ACTIVATION == "swiglu" else hidden, bias=False)
        self.proj = nn.Linear(hidden, N_EMBD, bias=False)

    def forward(self, x):
        h = self.fc(x)
        if ACTIVATION == "relu2":
            h = F.relu(h).square()
        elif ACTIVATION == "gelu":
            h = F.gelu(h)
        elif ACTIVATION == "silu":
            h = F.silu(h)
        else:  # swiglu
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.proj(h)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = RMSNorm(), Attention()
        self.norm2, self.mlp = RMSNorm(), MLP()
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, vocab_size, seq_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = RMSNorm()
        self.unembed = nn.Linear(N_EMBD, vocab_size, bias=False)
        if TIE_EMBEDDINGS:
            self.unembed.weight = self.embed.weight
        cos, sin = rotary_tables(seq_len, N_EMBD // N_HEAD, ROPE_BASE, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = INIT_SCALE / math.sqrt(N_EMBD)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections start at zero, as in nanochat
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, std=std)
        if not TIE_EMBEDDINGS:
            nn.init.normal_(self.embed.weight, std=INIT_SCALE)
            nn.init.zeros_(self.unembed.weight)

    def forward(self, idx):
        x = self.norm(self.embed(idx))
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.unembed(self.norm(x)).float()
        if LOGIT_SOFTCAP > 0:  # tanh soft-capping keeps early logits from blowing up
            logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        return logits


def zeropower_via_newtonschulz(G, steps=5):
    """Orthogonalise a matrix update (Muon): quintic Newton-Schulz iteration from modded-nanogpt."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalised updates, for the 2-D weight matrices of the blocks."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                update = zeropower_via_newtonschulz(update)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def build_optimizers(model):
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    embed = [model.embed.weight]
    unembed = [] if TIE_EMBEDDINGS else [model.unembed.weight]
    betas = (ADAM_BETA1, ADAM_BETA2)
    adam_groups = [dict(params=embed, lr=EMBED_LR)]
    if unembed:
        adam_groups.append(dict(params=unembed, lr=UNEMBED_LR))
    if MATRIX_OPTIMIZER == "muon":
        optimizers = [
            torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=0.0),
            Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, weight_decay=WEIGHT_DECAY),
        ]
    else:
        adam_groups.append(dict(params=matrices, lr=MATRIX_LR, weight_decay=WEIGHT_DECAY))
        optimizers = [torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=0.0)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress):
    """Linear warmup, constant, then linear warmdown to FINAL_LR_FRAC, over the time budget."""
    if progress < WARMUP_FRAC:
        return (progress + 1e-3) / (WARMUP_FRAC + 1e-3)
    if progress > 1.0 - WARMDOWN_FRAC:
        remaining = (1.0 - progress) / WARMDOWN_FRAC
        return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * max(remaining, 0.0)
    return 1.0


def main():
    harness = Harness.from_env()
    torch.manual_seed(harness.seed)
    model = GPT(harness.vocab_size, harness.seq_len).to(harness.device)
    optimizers = build_optimizers(model)
    # Compilation happens during the first steps, which the harness's clock does not count.
    train_model = torch.compile(model) if harness.device.type == "cuda" else model
    batches = harness.train_batches(BATCH_SIZE)
    step = 0
    while not harness.time_up():
        x, y = next(batches)
        with harness.autocast():
            logits = train_model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        if GRAD_CLIP > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        multiplier = lr_multiplier(harness.progress())
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
            opt.step()
        model.zero_grad(set_to_none=True)
        harness.report(step, loss.item(), tokens=x.numel())
        step += 1
    harness.finish(model)


if __name__ == "__main__":
    main()
