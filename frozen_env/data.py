"""Prepared data on disk, its fingerprint, and the training-batch loader."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from frozen_env.constants import HARNESS_VERSION, VOCAB_SIZE, Profile, dataset_dir

TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"


class DataNotPrepared(RuntimeError):
    """The dataset has not been prepared in the cache directory."""


@dataclass(frozen=True)
class Dataset:
    name: str
    path: Path
    train: np.ndarray  # uint8 bytes of the training works
    val: np.ndarray | None  # uint8 bytes of the held-out works (None until evaluation, in a trainer)
    meta: dict

    @property
    def data_sha256(self) -> str:
        return str(self.meta["data_sha256"])


def data_digest(train: bytes, val: bytes) -> str:
    """Hash of the prepared bytes; the split boundary is part of it."""
    h = hashlib.sha256()
    for part in (train, val):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def fingerprint(data_sha256: str, profile: Profile) -> str:
    """Hash over the prepared bytes and the frozen constants of one profile.

    Two results are comparable exactly when their fingerprints match.
    """
    constants = {
        "vocab_size": VOCAB_SIZE,
        "harness_version": HARNESS_VERSION,
        "profile": profile.constants(),
    }
    blob = json.dumps({"data": data_sha256, "constants": constants}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_dataset(path: Path, train: bytes, val: bytes, meta: dict) -> dict:
    """Store a prepared split atomically enough: data first, meta (which marks it ready) last."""
    path.mkdir(parents=True, exist_ok=True)
    (path / TRAIN_FILE).write_bytes(train)
    (path / VAL_FILE).write_bytes(val)
    meta = dict(meta, train_bytes=len(train), val_bytes=len(val), data_sha256=data_digest(train, val))
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(path / META_FILE)
    return meta


def load_dataset(name: str | None = None, with_val: bool = True) -> Dataset:
    """The prepared split; the harness loads it `with_val=False` and reads validation at the end."""
    path = dataset_dir(name)
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise DataNotPrepared(
            f"no prepared data in {path}; run `arrl prepare` first "
            "(or `arrl prepare --text PATH --name NAME` for your own corpus)"
        )
    meta = json.loads(meta_path.read_text())
    train = np.fromfile(path / TRAIN_FILE, dtype=np.uint8)
    val = load_validation(path) if with_val else None
    return Dataset(path.name, path, train, val, meta)


def load_validation(path: Path) -> np.ndarray:
    return np.fromfile(path / VAL_FILE, dtype=np.uint8)


def train_batches(train, batch_size: int, seq_len: int, seed: int, device) -> Iterator[tuple]:
    """Endless random windows of the training split, in an order fixed by the profile's seed.

    `train` is a 1-D uint8 tensor already on `device`; each window is gathered in one indexing
    operation so the loader costs next to nothing beside the model.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    high = train.numel() - seq_len - 1
    while True:
        starts = torch.randint(high, (batch_size,), generator=generator)
        window = train[(starts[:, None] + offsets).to(train.device)].long()
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()
