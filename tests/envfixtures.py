"""Fixtures for tests that need the prepared corpus or the training script."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = Path(__file__).resolve().parent / "candidates"
TRAIN_PY = ROOT / "target" / "train.py"


@pytest.fixture(scope="session")
def prepared_data():
    """The bundled corpus in the user's cache (`arrl prepare` is part of the test command)."""
    from frozen_env.data import DataNotPrepared, load_dataset

    try:
        return load_dataset()
    except DataNotPrepared:
        from frozen_env.prepare import prepare

        prepare()
        return load_dataset()
