"""The learned proposer: state features, an autoregressive edit-program policy and a value head.

(The ppo strategy now ships and starts from the hyper-heuristic policy of `arrl.hyper`, which picks
proposal operators instead of edits; this edit policy stays for its checkpoints and
`arrl.pretrain(kind="edit")`, and `from_bytes` / `to_bytes` serve both.)

State (`featurize`): a fixed-size vector for a given search space, built from the proposer's
`Context` only, so the learner can train on it without seeing the campaign:

    incumbent   its tunables normalised by their domains (log/linear/int -> [0, 1], choices one-hot)
    window      the last 32 experiments, newest first: role, status, reward, improvement over parent
                and incumbent in sigma units, kept, the self-evaluator's verdict, speed and memory
                relative to the window, and per tunable whether the program touched it and how
    global      best-so-far summary and diagnostics: budget used, crash and abort rate, experiments
                since the last improvement, kept fraction, reward statistics
    per tunable what the window says about each tunable (rewards when moved up / down / set,
                recency, crashes), so one shared scorer can judge every tunable
    menu        for each tunable's menu entry: valid here (not a no-op, in range) and how far it
                moves the value; it doubles as the action mask, so `evaluate` needs no side data

Action: the number of edits (1..3), then per edit a tunable (already chosen ones masked) and an
entry of that tunable's fixed menu (numeric: every `SCALE_FACTORS` step and every `grid` point;
choices: every choice), invalid entries masked. Stored as a list of ints
`[n-1, t1, e1, t2, e2, t3, e3]`, -1 where unused, so it travels as msgpack.

The vector is rounded to float16 values when made (and shipped as base64 float16), so the
learner's `evaluate` sees exactly the numbers the proposer sampled from.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arrl.edits import MAX_EDITS, SCALE_FACTORS, GrammarError, Tunable, grid, resolve_program, same_value
from arrl.reward import CLIP, DEFAULT_SIGMA, FAILED, is_edit, noise_sigma

FEATURE_VERSION = 1  # bump when the state layout or architecture changes: old blobs are refused
WINDOW = 32
STATUSES = ("ok", "aborted", "crashed", "timed_out", "diverged", "invalid", "refused", "duplicate")
VERDICTS = ("continue", "abort", "diverged")
ROW_BASE = 22  # per-experiment features before the 2 per tunable
TUN_FEATS = 16
GLOBAL_FEATS = 12
ITEM_FEATS = 2  # valid, move (dynamic, in the state)
ITEM_STATIC = 4  # is_scale, log2 factor, grid position, is_choice (fixed by the space)
ACTION_LEN = 1 + 2 * MAX_EDITS
MASKED = -1e9  # finite, so masked entries give exp() == 0 without NaN in the entropy


class SpaceMismatch(ValueError):
    """Weights were trained for another search space (other tunables or domains)."""


def space_signature(space: Mapping[str, Mapping[str, Any]]) -> str:
    """Digest of the tunables and their domains, in order: the layout of state and action."""
    text = json.dumps([[name, dict(spec)] for name, spec in space.items()], sort_keys=True)
    return hashlib.sha256(f"v{FEATURE_VERSION}:{text}".encode()).hexdigest()[:16]


def _tunable(name: str, spec: Mapping[str, Any]) -> Tunable:
    """A value-less Tunable for `grid` (search_space stores int bounds as floats)."""
    low, high = spec["low"], spec["high"]
    if spec["kind"] == "int":
        low, high = int(low), int(high)
    choices = tuple(spec["choices"]) if spec["choices"] is not None else None
    return Tunable(name, spec["kind"], low, high, choices, low if choices is None else choices[0], 0)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _norm(spec: Mapping[str, Any], v: Any) -> float:
    """A numeric value's position in its domain, in [0, 1] (log domains in log space)."""
    if spec["kind"] == "choice" or not _is_num(v):
        return 0.0
    lo, hi = spec["low"], spec["high"]
    x = math.log(max(v, lo) / lo) / math.log(hi / lo) if spec["kind"] == "log" else (v - lo) / (hi - lo)
    return min(1.0, max(0.0, x))


def _clip1(x: float) -> float:
    return min(1.0, max(-1.0, x)) if math.isfinite(x) else 0.0


class Layout:
    """Where each feature sits in the state vector, and each tunable's menu of edits."""

    def __init__(self, space: Mapping[str, Mapping[str, Any]]) -> None:
        self.space = {name: dict(spec) for name, spec in space.items()}
        self.names = tuple(self.space)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.signature = space_signature(self.space)
        self.menus: tuple[tuple[dict[str, Any], ...], ...] = tuple(
            self._menu(n, s) for n, s in self.space.items())
        self.T, self.M = len(self.names), max(len(m) for m in self.menus)
        self.inc = sum(1 if s["kind"] != "choice" else len(s["choices"]) for s in self.space.values())
        self.row = ROW_BASE + 2 * self.T
        self.sizes = (self.inc, WINDOW * self.row, GLOBAL_FEATS, self.T * TUN_FEATS, self.T * self.M * ITEM_FEATS)
        self.size = sum(self.sizes)
        self._items: dict[tuple[Any, ...], np.ndarray] = {}

    @staticmethod
    def _menu(name: str, spec: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
        sets = tuple({"op": "set", "name": name, "value": v} for v in grid(_tunable(name, spec)))
        if spec["kind"] == "choice":
            return sets
        return tuple({"op": "scale", "name": name, "factor": f} for f in SCALE_FACTORS) + sets

    def static_items(self) -> np.ndarray:
        """(T, M, ITEM_STATIC): what each menu slot is, independent of the current values."""
        out = np.zeros((self.T, self.M, ITEM_STATIC), np.float32)
        for i, menu in enumerate(self.menus):
            sets = [e for e in menu if e["op"] == "set"]
            for j, e in enumerate(menu):
                if e["op"] == "scale":
                    out[i, j, :2] = 1.0, math.log2(e["factor"])
                else:
                    out[i, j, 2] = sets.index(e) / max(1, len(sets) - 1)
                    out[i, j, 3] = float(self.space[e["name"]]["kind"] == "choice")
        return out

    def items(self, tunables: Mapping[str, Tunable]) -> np.ndarray:
        """(T, M, 2): each menu entry's validity and move on the current values (cached)."""
        key = tuple(repr(tunables[n].value) for n in self.names)
        cached = self._items.get(key)
        if cached is not None:
            return cached
        out = np.zeros((self.T, self.M, ITEM_FEATS), np.float32)
        for i, (name, menu) in enumerate(zip(self.names, self.menus, strict=True)):
            spec, current = self.space[name], tunables[name].value
            for j, edit in enumerate(menu):
                try:
                    ((_, new),) = resolve_program(tunables, [edit])
                except GrammarError:
                    continue  # a no-op here (at a bound, or already this value): masked
                out[i, j] = 1.0, _norm(spec, new) - _norm(spec, current)
        if len(self._items) > 256:
            self._items.clear()
        self._items[key] = out
        return out

    def split(self, states: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(states, list(self.sizes), dim=1))


@functools.lru_cache(maxsize=16)
def _layout(signature_text: str) -> Layout:
    return Layout(dict(json.loads(signature_text)))


def layout_for(space: Mapping[str, Mapping[str, Any]]) -> Layout:
    return _layout(json.dumps(list(space.items())))


def _move(spec: Mapping[str, Any], edit: Mapping[str, Any], current: Any) -> float:
    """Signed size of a past edit: log2 of a scale factor, or where a set went relative to the
    current incumbent (the parent's value is not in the record); a choice: +1 if it is the
    incumbent's choice now, -1 otherwise."""
    if edit.get("op") == "scale" and _is_num(edit.get("factor")) and edit["factor"] > 0:
        return _clip1(math.log2(edit["factor"]))
    if spec["kind"] == "choice":
        return 1.0 if same_value(edit.get("value"), current) else -1.0
    return _clip1(_norm(spec, edit.get("value")) - _norm(spec, current))


def _num(record: Mapping[str, Any], key: str) -> float | None:
    v = record.get(key)
    return float(v) if _is_num(v) and math.isfinite(v) else None


def _log_ratio(x: float | None, ref: float | None) -> float:
    return _clip1(math.log2(x / ref) / 2) if x and ref and x > 0 and ref > 0 else 0.0


def _rate(record: Mapping[str, Any]) -> float | None:
    """Training steps per second, when the record has both numbers."""
    steps, secs = _num(record, "steps"), _num(record, "training_seconds")
    return steps / secs if steps and secs else None


def _exp_number(record: Mapping[str, Any]) -> int:
    digits = "".join(ch for ch in str(record.get("experiment_id", "")) if ch.isdigit())
    return int(digits) if digits else 0


def featurize(space: Mapping[str, Mapping[str, Any]], context: Any, *, horizon: int = 100) -> np.ndarray:
    """The state vector (float32, float16-exact) of a proposer's `Context`; size `Layout.size`.

    `horizon` is the campaign's planned number of experiments, for the budget-used feature.
    """
    L = layout_for(space)
    tun = context.tunables
    missing = [n for n in L.names if n not in tun]
    if missing:
        raise SpaceMismatch(f"context lacks tunable(s) {', '.join(missing)} of the policy's space")
    # Incumbent: numeric values in [0, 1], choices one-hot.
    inc = []
    for name, spec in L.space.items():
        value = tun[name].value
        inc += [_norm(spec, value)] if spec["kind"] != "choice" else [float(same_value(c, value)) for c in spec["choices"]]

    window = list(context.recent or [])[-WINDOW:][::-1]  # newest first
    baselines = [v for r in window if r.get("role") == "baseline" and (v := _num(r, "val_bpb")) is not None]
    sigma_default = noise_sigma(baselines) or DEFAULT_SIGMA  # as the reward computer measures it
    rates = [x for r in window if (x := _rate(r))]
    mems = [m for r in window if (m := _num(r, "peak_memory_mb"))]
    rate_ref = statistics.median(rates) if rates else None
    mem_ref = statistics.median(mems) if mems else None

    rows = np.zeros((WINDOW, L.row), np.float32)
    # Per tunable: touched, recency, [sum, count] up / down / other, best, kept, failed, last reward.
    per = np.zeros((L.T, 12), np.float64)
    best_reward = np.full(L.T, -np.inf)
    for age, r in enumerate(window):
        row = rows[age]
        status, reward = str(r.get("status") or ""), _num(r, "reward") or 0.0
        sigma = _num(r, "sigma") or sigma_default
        val, parent, incb = _num(r, "val_bpb"), _num(r, "parent_bpb"), _num(r, "incumbent_bpb")
        verdict = r.get("selfeval") or {}
        program = [e for e in (r.get("program") or []) if isinstance(e, Mapping)]
        row[0], row[1] = 1.0, float(not is_edit(r))  # a run of an unmodified script
        row[2 + (STATUSES.index(status) if status in STATUSES else len(STATUSES))] = 1.0
        row[11] = _clip1(reward / CLIP)
        ok = status == "ok" and val is not None
        row[12] = _clip1((parent - val) / sigma / CLIP) if ok and parent is not None else 0.0
        row[13] = _clip1((incb - val) / sigma / CLIP) if ok and incb is not None else 0.0
        row[14] = float(bool(r.get("kept")))
        if verdict.get("decision") in VERDICTS:
            row[15 + VERDICTS.index(verdict["decision"])] = 1.0
        row[18] = _clip1(float(verdict.get("p_worse") or 0.0))
        row[19] = _log_ratio(_rate(r), rate_ref)
        row[20] = _log_ratio(_num(r, "peak_memory_mb"), mem_ref)
        row[21] = len(program) / MAX_EDITS
        for edit in program:
            i = L.index.get(str(edit.get("name")))
            if i is None:
                continue
            move = _move(L.space[L.names[i]], edit, tun[L.names[i]].value)
            row[ROW_BASE + 2 * i: ROW_BASE + 2 * i + 2] = 1.0, move
            p = per[i]
            p[0] += 1
            p[1] = max(p[1], 1.0 - age / WINDOW)
            slot = 2 if move > 1e-9 and L.space[L.names[i]]["kind"] != "choice" else 4 if move < -1e-9 else 6
            p[slot] += reward
            p[slot + 1] += 1
            best_reward[i] = max(best_reward[i], reward)
            p[8] += float(bool(r.get("kept")))
            p[9] += float(status in FAILED)
            if p[0] == 1:
                p[10] = reward  # newest first: the first one met is the last touch
    tun_block = np.zeros((L.T, TUN_FEATS), np.float32)
    for i, (name, spec) in enumerate(L.space.items()):
        p, value, n = per[i], tun[name].value, max(per[i][0], 1.0)
        numeric = spec["kind"] != "choice"
        tun_block[i] = [
            float(numeric), _norm(spec, value),
            float(numeric and value <= spec["low"]), float(numeric and value >= spec["high"]),
            p[0] / WINDOW, p[1],
            _clip1(p[2] / max(p[3], 1) / CLIP), p[3] / WINDOW,
            _clip1(p[4] / max(p[5], 1) / CLIP), p[5] / WINDOW,
            _clip1(p[6] / max(p[7], 1) / CLIP), p[7] / WINDOW,
            _clip1(best_reward[i] / CLIP) if p[0] else 0.0,
            p[8] / n, p[9] / n, _clip1(p[10] / CLIP),
        ]

    edits = [r for r in window if is_edit(r)]
    rewards = [_num(r, "reward") or 0.0 for r in edits]
    since = next((k for k, r in enumerate(edits) if r.get("kept")), len(edits))
    inc_bpb = _num(context.incumbent or {}, "val_bpb")
    gain = (statistics.mean(baselines) - inc_bpb) / sigma_default if baselines and inc_bpb else 0.0
    last_ok = next((r for r in window if r.get("status") == "ok" and _rate(r)), {})
    number = max([_exp_number(r) for r in window] + [len(window)])
    glob = [
        float(context.incumbent is not None), len(window) / WINDOW, min(1.0, number / max(horizon, 1)),
        sum(r.get("status") in FAILED for r in edits) / max(len(edits), 1), since / WINDOW,
        sum(bool(r.get("kept")) for r in edits) / max(len(edits), 1),
        _clip1(statistics.mean(rewards) / CLIP) if rewards else 0.0,
        _clip1(max(rewards) / CLIP) if rewards else 0.0, _clip1(gain / (2 * CLIP)),
        _log_ratio(_rate(last_ok), rate_ref), _log_ratio(_num(last_ok, "peak_memory_mb"), mem_ref),
        sum(r.get("status") == "aborted" for r in edits) / max(len(edits), 1),
    ]
    state = np.concatenate([np.asarray(inc, np.float32), rows.ravel(), np.asarray(glob, np.float32),
                            tun_block.ravel(), L.items(tun).ravel()])
    assert state.shape == (L.size,)
    return state.astype(np.float16).astype(np.float32)


def encode_state(state: np.ndarray) -> str:
    """A state as base64 float16: small, msgpack- and JSON-safe, and exact (see featurize)."""
    return base64.b64encode(np.asarray(state, np.float16).tobytes()).decode("ascii")


def decode_state(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), np.float16).astype(np.float32)


@dataclass
class _Encoded:
    units: torch.Tensor  # (B, T, U) per-tunable embeddings
    item_logits: torch.Tensor  # (B, T, M), invalid entries masked
    tunable_ok: torch.Tensor  # (B, T) has at least one valid edit
    n_logits: torch.Tensor  # (B, MAX_EDITS)
    value: torch.Tensor  # (B,)


@dataclass
class Act:
    program: list[dict[str, Any]]
    action: list[int]
    logprob: float
    value: float
    state: np.ndarray


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class Policy(nn.Module):
    """Actor-critic over edit programs; see the module docstring for state and action."""

    def __init__(self, space: Mapping[str, Mapping[str, Any]], *, hidden: int = 128, unit: int = 64,
                 row_dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.layout = L = Layout(space)
        self.arch = {"hidden": hidden, "unit": unit, "row_dim": row_dim}
        g = math.sqrt(2)
        with torch.random.fork_rng():  # a seeded init that leaves the global generator alone
            torch.manual_seed(seed)
            # One encoder shared by all 32 window rows: an experiment means the same at any age.
            self.row_enc = _orthogonal(nn.Linear(L.row, row_dim), g)
            self.trunk = nn.Sequential(_orthogonal(nn.Linear(L.inc + GLOBAL_FEATS + WINDOW * row_dim, hidden), g),
                                       nn.Tanh(), _orthogonal(nn.Linear(hidden, hidden), g), nn.Tanh())
            # Tunables are scored by one shared network from their own statistics (what transfers
            # across landscapes) plus a small identity embedding (what is specific to a tunable).
            self.identity = nn.Parameter(0.1 * torch.randn(L.T, 8))
            self.tun_enc = nn.Sequential(_orthogonal(nn.Linear(TUN_FEATS + 8 + hidden, unit), g), nn.Tanh())
            self.n_head = _orthogonal(nn.Linear(hidden, MAX_EDITS), 0.01)
            self.value_head = _orthogonal(nn.Linear(hidden, 1), 1.0)
            self.select = nn.Sequential(_orthogonal(nn.Linear(2 * unit + 1 + MAX_EDITS, unit), g), nn.Tanh(),
                                        _orthogonal(nn.Linear(unit, 1), 0.01))
            self.item = nn.Sequential(_orthogonal(nn.Linear(unit + ITEM_STATIC + ITEM_FEATS, unit), g), nn.Tanh(),
                                      _orthogonal(nn.Linear(unit, 1), 0.01))
            self.item_bias = nn.Parameter(torch.zeros(L.T, L.M))
        self.register_buffer("item_static", torch.from_numpy(L.static_items()), persistent=False)

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return self.layout.space

    @property
    def signature(self) -> str:
        """What transitions made for this policy carry in `extra["space"]` (the learner's filter)."""
        return self.layout.signature

    def encode(self, states: torch.Tensor) -> _Encoded:
        L, B = self.layout, states.shape[0]
        inc, rows, glob, tun, items = L.split(states)
        rows = torch.tanh(self.row_enc(rows.view(B, WINDOW, L.row))).flatten(1)
        h = self.trunk(torch.cat([inc, glob, rows], 1))
        units = self.tun_enc(torch.cat([tun.view(B, L.T, TUN_FEATS), self.identity.expand(B, -1, -1),
                                        h[:, None, :].expand(-1, L.T, -1)], 2))
        items = items.view(B, L.T, L.M, ITEM_FEATS)
        valid = items[..., 0] > 0.5
        item_in = torch.cat([units[:, :, None, :].expand(-1, -1, L.M, -1),
                             self.item_static.expand(B, -1, -1, -1), items], 3)
        item_logits = (self.item(item_in).squeeze(-1) + self.item_bias).masked_fill(~valid, MASKED)
        tunable_ok = valid.any(2)
        n_ok = torch.arange(1, MAX_EDITS + 1)[None, :] <= tunable_ok.sum(1, keepdim=True)
        n_logits = self.n_head(h).masked_fill(~n_ok, MASKED)
        return _Encoded(units, item_logits, tunable_ok, n_logits, self.value_head(h).squeeze(-1))

    def _select_logits(self, enc: _Encoded, chosen: torch.Tensor, step: int) -> torch.Tensor:
        """Which tunable to edit next, given those already chosen (autoregressive)."""
        B, T, _ = enc.units.shape
        pooled = (chosen[..., None] * enc.units).sum(1) / chosen.sum(1, keepdim=True).clamp(min=1)
        onehot = F.one_hot(torch.full((B,), step), MAX_EDITS).float()
        x = torch.cat([enc.units, chosen[..., None], onehot[:, None, :].expand(-1, T, -1),
                       pooled[:, None, :].expand(-1, T, -1)], 2)
        return self.select(x).squeeze(-1).masked_fill((chosen > 0) | ~enc.tunable_ok, MASKED)

    def _walk(self, enc: _Encoded, actions: torch.Tensor | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (actions None) or score stored actions: (actions, log-prob, entropy).

        The entropy is that of the count plus, along the taken path, of each tunable and edit
        choice: an unbiased one-sample estimate of the program distribution's entropy.
        """
        B, T = enc.value.shape[0], self.layout.T
        sampling = actions is None
        acts = torch.full((B, ACTION_LEN), -1, dtype=torch.long) if actions is None else actions

        def pick(logits: torch.Tensor, col: int, active: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logp = torch.log_softmax(logits, -1)
            if sampling:
                drawn = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
                acts[:, col] = torch.where(active, drawn, torch.full_like(drawn, -1))
            idx = acts[:, col].clamp(min=0)
            return idx, logp.gather(1, idx[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)

        always = torch.ones(B, dtype=torch.bool)
        n_idx, logprob, entropy = pick(enc.n_logits, 0, always)
        chosen = torch.zeros(B, T)
        for k in range(MAX_EDITS):
            active = n_idx >= k
            t, lp_t, h_t = pick(self._select_logits(enc, chosen, k), 1 + 2 * k, active)
            _, lp_e, h_e = pick(enc.item_logits[torch.arange(B), t], 2 + 2 * k, active)
            a = active.float()
            logprob = logprob + a * (lp_t + lp_e)
            entropy = entropy + a * (h_t + h_e)
            chosen = chosen + F.one_hot(t, T).float() * a[:, None]
        return acts, logprob, entropy

    def evaluate(self, states: torch.Tensor,
                 actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob, entropy, value) of stored actions (B, ACTION_LEN) in states (B, size)."""
        enc = self.encode(states)
        _, logprob, entropy = self._walk(enc, actions, None)
        return logprob, entropy, enc.value

    def program(self, action: Sequence[int]) -> list[dict[str, Any]]:
        """The edit program an action's indices stand for."""
        n = int(action[0]) + 1
        return [dict(self.layout.menus[action[1 + 2 * k]][action[2 + 2 * k]]) for k in range(n)]

    def act(self, state: np.ndarray, generator: torch.Generator | None = None) -> Act:
        """Sample one program for one state (milliseconds on CPU)."""
        with torch.inference_mode():
            enc = self.encode(torch.from_numpy(np.asarray(state, np.float32))[None])
            acts, logprob, _ = self._walk(enc, None, generator)
        action = [int(a) for a in acts[0]]
        return Act(self.program(action), action, float(logprob[0]), float(enc.value[0]), state)


def to_bytes(policy: Any, meta: Mapping[str, Any] | None = None) -> bytes:
    """Weights plus the space they were trained for (torch.save of plain data and tensors)."""
    if getattr(policy, "kind", "") == "hyper":
        from arrl.hyper import hyper_to_bytes

        return hyper_to_bytes(policy, meta)
    buf = io.BytesIO()
    torch.save({"format": FEATURE_VERSION, "signature": policy.layout.signature, "space": policy.space,
                "arch": policy.arch, "state_dict": policy.state_dict(), "meta": dict(meta or {})}, buf)
    return buf.getvalue()


def _describe_mismatch(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    parts = []
    if extra := [n for n in theirs if n not in ours]:
        parts.append(f"only in the weights: {', '.join(extra)}")
    if extra := [n for n in ours if n not in theirs]:
        parts.append(f"only in this space: {', '.join(extra)}")
    if changed := [n for n in ours if n in theirs and dict(theirs[n]) != dict(ours[n])]:
        parts.append(f"other domains: {', '.join(changed)}")
    if not parts and list(theirs) != list(ours):
        parts.append("same tunables in another order")
    return "; ".join(parts) or "feature version differs"


def from_bytes(blob: bytes, space: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """(policy, meta) from `to_bytes`; SpaceMismatch when `space` is given and differs. A
    hyper-heuristic policy (`arrl.hyper`) fits any space, so `space` is not checked for it."""
    data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and data.get("kind") == "hyper":
        from arrl.hyper import hyper_from_data

        return hyper_from_data(data)
    if not isinstance(data, dict) or data.get("format") != FEATURE_VERSION:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SpaceMismatch(f"policy weights have format {found!r}, this build reads {FEATURE_VERSION}")
    if space is not None and space_signature(space) != data["signature"]:
        raise SpaceMismatch("policy weights were trained for another search space ("
                            f"{_describe_mismatch(data['space'], space)}); start a fresh policy instead")
    policy = Policy(data["space"], **data["arch"])
    policy.load_state_dict(data["state_dict"])
    return policy, dict(data["meta"])
