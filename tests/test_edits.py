"""The edit grammar against the real training script: parsing, programs, rewriting, diffs."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from arrl.edits import (
    GrammarError,
    Tunable,
    apply_program,
    grid,
    knobs,
    parse_tunables,
    random_program,
    render_diff,
    resolve_program,
    search_space,
)
from arrl.patch import apply_unified_diff

TRAIN = Path(__file__).parents[1] / "target" / "train.py"


@pytest.fixture(scope="module")
def source() -> str:
    return TRAIN.read_text()


@pytest.fixture(scope="module")
def tunables(source: str) -> dict[str, Tunable]:
    return parse_tunables(source)


def block(body: str) -> str:
    return f"import math\n# --- hyperparameters ---\n{body}# --- end hyperparameters ---\nX = 1\n"


# ---------------------------------------------------------------- parsing


def test_parses_real_script(tunables: dict[str, Tunable]) -> None:
    assert len(tunables) >= 15
    kinds = {name: t.kind for name, t in tunables.items()}
    assert kinds["MATRIX_LR"] == "log"
    assert kinds["DEPTH"] == "int"
    assert kinds["WEIGHT_DECAY"] == "linear"
    assert kinds["ACTIVATION"] == "choice"
    assert kinds["QK_NORM"] == "choice"
    assert tunables["ACTIVATION"].choices == ("relu2", "gelu", "silu", "swiglu")
    assert tunables["QK_NORM"].choices == (True, False)
    assert tunables["N_EMBD"].choices == (64, 96, 128, 192, 256)
    assert (tunables["MATRIX_LR"].low, tunables["MATRIX_LR"].high) == (0.0001, 0.2)
    assert (tunables["DEPTH"].low, tunables["DEPTH"].high, tunables["DEPTH"].value) == (1, 8, 3)
    assert set(kinds.values()) == {"log", "linear", "int", "choice"}


def test_search_space_shape(tunables: dict[str, Tunable]) -> None:
    space = search_space(tunables)
    assert set(space) == set(tunables)
    for entry in space.values():
        assert set(entry) == {"kind", "low", "high", "choices"}
        if entry["kind"] == "choice":
            assert entry["low"] is None and entry["high"] is None and isinstance(entry["choices"], list)
        else:
            assert isinstance(entry["low"], float) and isinstance(entry["high"], float)
            assert entry["choices"] is None and entry["low"] < entry["high"]
    assert space["MATRIX_LR"] == {"kind": "log", "low": 0.0001, "high": 0.2, "choices": None}


def test_knobs(tunables: dict[str, Tunable]) -> None:
    values = knobs(tunables)
    assert values["MATRIX_LR"] == 0.02 and values["ACTIVATION"] == "relu2" and values["QK_NORM"] is True


def test_only_the_block_counts() -> None:
    src = block("A = 1  # search: int 0..3\nB = 2  # fixed, not searched\n") + "C = 2  # search: int 0..3\n"
    tunables = parse_tunables(src)
    assert list(tunables) == ["A"]


def test_hash_inside_string_is_not_a_comment() -> None:
    # The '# search:' inside the string literal must not make T a tunable (a regex would).
    src = block('T = "# search: int 0..3"\nS = "x"  # search: x|y\n')
    assert list(parse_tunables(src)) == ["S"]
    with pytest.raises(GrammarError, match="no tunables"):
        parse_tunables(block('S = "# search: int 0..3"\n'))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("A = 1  # search: int 3..1\n", "LOW < HIGH"),
        ("A = 1  # search: int 0..x\n", "not an int"),
        ("A = 1  # search: int 0-3\n", "LOW..HIGH"),
        ("A = 1.0  # search: log 0..2\n", "LOW > 0"),
        ("A = 1.0  # search: exp 1..2\n", "unknown domain"),
        ("A = 1  # search: a|a\n", "duplicate"),
        ("A = 1  # search: a||b\n", "empty"),
        ("A = 9  # search: int 0..3\n", "outside"),
        ("A = 0.5  # search: int 0..3\n", "outside"),
        ('A = "c"  # search: a|b\n', "outside"),
        ("A = 1  # search: True|False\n", "outside"),
        ("a = 1  # search: int 0..3\n", "UPPERCASE"),
        ("A = math.pi  # search: linear 0..4\n", "literal"),
        ("A = B = 1  # search: int 0..3\n", "UPPERCASE"),
        ("A = 1  # search: int 0..3\nA = 2  # search: int 0..3\n", "twice"),
        ("A: int = 1  # search: int 0..3\n", "not literal assignments"),
    ],
)
def test_malformed_domains(body: str, match: str) -> None:
    with pytest.raises(GrammarError, match=match):
        parse_tunables(block(body))


def test_missing_block() -> None:
    with pytest.raises(GrammarError, match="marker"):
        parse_tunables("A = 1  # search: int 0..3\n")
    with pytest.raises(GrammarError, match="before"):
        parse_tunables("# --- end hyperparameters ---\nA = 1\n# --- hyperparameters ---\n")
    assert issubclass(GrammarError, ValueError)


def test_negative_and_quoted_values() -> None:
    tunables = parse_tunables(block("A = -1.5  # search: linear -2..2\nB = 'x'  # search: x|y\n"))
    assert tunables["A"].value == -1.5
    new, description = apply_program(
        block("A = -1.5  # search: linear -2..2\nB = 'x'  # search: x|y\n"),
        [{"op": "set", "name": "A", "value": 1.25}, {"op": "set", "name": "B", "value": "y"}],
    )
    assert "A = 1.25  # search: linear -2..2\n" in new and "B = 'y'  # search: x|y\n" in new
    assert description == "A -1.5 -> 1.25; B x -> y"


# ---------------------------------------------------------------- grid


def test_grid(tunables: dict[str, Tunable]) -> None:
    lr = grid(tunables["MATRIX_LR"])
    assert len(lr) == 9 and lr[0] == 0.0001 and lr[-1] == 0.2 and lr == sorted(lr)
    ratios = [b / a for a, b in zip(lr, lr[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1.01  # log-spaced
    assert grid(tunables["DEPTH"]) == list(range(1, 9))
    batch = grid(tunables["BATCH_SIZE"], n=5)
    assert batch[0] == 2 and batch[-1] == 64 and all(isinstance(v, int) for v in batch) and len(batch) == 5
    assert grid(tunables["WEIGHT_DECAY"], n=4) == [0.0, 0.1, 0.2, 0.3]
    assert grid(tunables["ACTIVATION"]) == ["relu2", "gelu", "silu", "swiglu"]


# ---------------------------------------------------------------- programs


def test_apply_program_rewrites_only_the_literal(source: str) -> None:
    new, description = apply_program(
        source,
        [{"op": "set", "name": "MATRIX_LR", "value": 0.03}, {"op": "scale", "name": "DEPTH", "factor": 1.4}],
    )
    assert description == "MATRIX_LR 0.02 -> 0.03; DEPTH 3 -> 4"
    assert "MATRIX_LR = 0.03  # search: log 0.0001..0.2\n" in new
    assert "DEPTH = 4  # search: int 1..8\n" in new
    changed = [(a, b) for a, b in zip(source.split("\n"), new.split("\n"), strict=True) if a != b]
    assert len(changed) == 2


def test_scale_clips_rounds_and_formats(source: str) -> None:
    _, d = apply_program(source, [{"op": "scale", "name": "ADAM_BETA1", "factor": 2.0}])
    assert d == "ADAM_BETA1 0.8 -> 0.95"  # clipped to the top of the domain
    _, d = apply_program(source, [{"op": "scale", "name": "MATRIX_LR", "factor": 1.4}])
    assert d == "MATRIX_LR 0.02 -> 0.028"  # no 0.027999999999999997
    new, d = apply_program(source, [{"op": "scale", "name": "UNEMBED_LR", "factor": 0.003}])
    assert d == "UNEMBED_LR 0.004 -> 0.0001"
    new, d = apply_program(source, [{"op": "scale", "name": "MATRIX_LR", "factor": 0.0007}])
    assert d == "MATRIX_LR 0.02 -> 0.0001"
    new, d = apply_program(source, [{"op": "set", "name": "EMBED_LR", "value": 0.0123456}])
    assert d == "EMBED_LR 0.01 -> 0.01235" and "EMBED_LR = 0.01235  #" in new
    new, d = apply_program(source, [{"op": "scale", "name": "ROPE_BASE", "factor": 0.5}])
    assert d == "ROPE_BASE 10000.0 -> 5000.0" and "ROPE_BASE = 5000.0  #" in new


def test_set_choice_keeps_literal_style(source: str) -> None:
    new, d = apply_program(
        source,
        [
            {"op": "set", "name": "ACTIVATION", "value": "gelu"},
            {"op": "set", "name": "QK_NORM", "value": False},
            {"op": "set", "name": "N_EMBD", "value": 256},
        ],
    )
    assert 'ACTIVATION = "gelu"  # search: relu2|gelu|silu|swiglu\n' in new
    assert "QK_NORM = False  # search: True|False\n" in new
    assert "N_EMBD = 256  # search:" in new
    assert d == "ACTIVATION relu2 -> gelu; QK_NORM True -> False; N_EMBD 128 -> 256"


@pytest.mark.parametrize(
    ("program", "match"),
    [
        ([], "1 to 3"),
        (
            [
                {"op": "scale", "name": n, "factor": 2.0}
                for n in ("DEPTH", "MATRIX_LR", "EMBED_LR", "UNEMBED_LR")
            ],
            "1 to 3",
        ),
        ([{"op": "scale", "name": "NOPE", "factor": 2.0}], "unknown tunable"),
        (
            [{"op": "scale", "name": "DEPTH", "factor": 2.0}, {"op": "set", "name": "DEPTH", "value": 5}],
            "twice",
        ),
        ([{"op": "set", "name": "DEPTH", "value": 3}], "no-op"),
        ([{"op": "scale", "name": "DEPTH", "factor": 1.1}], "no-op"),  # 3.3 rounds back to 3
        ([{"op": "scale", "name": "WEIGHT_DECAY", "factor": 2.0}], "no-op"),  # 0 * 2 == 0
        ([{"op": "set", "name": "DEPTH", "value": 9}], "outside"),
        ([{"op": "set", "name": "DEPTH", "value": 2.5}], "int tunable"),
        ([{"op": "set", "name": "MATRIX_LR", "value": 0.5}], "outside"),
        ([{"op": "set", "name": "MATRIX_LR", "value": "0.01"}], "finite number"),
        ([{"op": "set", "name": "ACTIVATION", "value": "tanh"}], "not a choice"),
        ([{"op": "set", "name": "QK_NORM", "value": 1}], "not a choice"),
        ([{"op": "scale", "name": "ACTIVATION", "factor": 2.0}], "categorical"),
        ([{"op": "scale", "name": "DEPTH", "factor": -2.0}], "positive"),
        ([{"op": "scale", "name": "DEPTH", "factor": True}], "positive"),
        ([{"op": "nudge", "name": "DEPTH"}], "unknown op"),
        ([{"op": "set", "name": "DEPTH", "value": 4, "extra": 1}], "expected exactly"),
        ("DEPTH=4", "list of edits"),
    ],
)
def test_invalid_programs(source: str, program: object, match: str) -> None:
    with pytest.raises(GrammarError, match=match):
        apply_program(source, program)  # type: ignore[arg-type]


def test_random_programs_round_trip(source: str, tunables: dict[str, Tunable]) -> None:
    rng = random.Random(1234)
    hyper_lines = {t.lineno for t in tunables.values()}
    sizes, ops = set(), set()
    for _ in range(150):
        program = random_program(tunables, rng)
        assert 1 <= len(program) <= 3 and len({e["name"] for e in program}) == len(program)
        sizes.add(len(program))
        ops.update(e["op"] for e in program)
        assert resolve_program(tunables, program)  # valid by construction
        child, description = apply_program(source, program)
        assert description.count("->") == len(program)
        ast.parse(child)
        old_lines, new_lines = source.split("\n"), child.split("\n")
        assert len(old_lines) == len(new_lines)
        changed = {i + 1 for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b}
        assert changed and changed <= hyper_lines and len(changed) == len(program)
        reparsed = parse_tunables(child)
        for name, t in tunables.items():
            assert reparsed[name].domain() == t.domain()
            assert type(reparsed[name].value) is type(t.value) or t.kind in ("log", "linear")
        assert apply_unified_diff(source, render_diff(source, child)) == child
    assert sizes == {1, 2, 3} and ops == {"scale", "set"}


def test_random_program_is_seeded(tunables: dict[str, Tunable]) -> None:
    a = [random_program(tunables, random.Random(7)) for _ in range(3)]
    b = [random_program(tunables, random.Random(7)) for _ in range(3)]
    assert a == b
    assert all(len(random_program(tunables, random.Random(s), max_edits=1)) == 1 for s in range(20))


def test_random_program_on_edge_values() -> None:
    # Values sitting on their bounds, where half the scale steps are no-ops.
    src = block("A = 1  # search: int 1..2\nB = 0.0  # search: linear 0..1\nC = True  # search: True|False\n")
    tunables = parse_tunables(src)
    rng = random.Random(0)
    for _ in range(100):
        apply_program(src, random_program(tunables, rng))


# ---------------------------------------------------------------- diffs


def test_render_diff_headers(source: str) -> None:
    child, _ = apply_program(source, [{"op": "set", "name": "DEPTH", "value": 4}])
    diff = render_diff(source, child)
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n@@ ")
    assert "-DEPTH = 3  # search: int 1..8\n+DEPTH = 4  # search: int 1..8\n" in diff
    assert render_diff(source, source) == ""


def test_render_diff_without_final_newline() -> None:
    old, new = "a\nb\nc", "a\nb\nd"
    diff = render_diff(old, new)
    assert "\\ No newline at end of file" in diff
    assert apply_unified_diff(old, diff) == new
