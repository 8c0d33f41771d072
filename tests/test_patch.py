"""The patch applier: strict application of arbitrary unified diffs and the candidate checks."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from arrl.edits import apply_program, render_diff
from arrl.patch import (
    MAX_BYTES,
    PatchRejected,
    apply_unified_diff,
    check_candidate,
    check_tunable_block,
    content_hash,
    prepare_candidate,
)

TRAIN = Path(__file__).parents[1] / "target" / "train.py"


@pytest.fixture(scope="module")
def source() -> str:
    return TRAIN.read_text()


def diff_of(old: str, new: str, a: str = "a/train.py", b: str = "b/train.py", n: int = 3) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), a, b, n=n))


def rejected(reason: str, fn, *args) -> PatchRejected:  # type: ignore[no-untyped-def]
    with pytest.raises(PatchRejected) as info:
        fn(*args)
    assert info.value.reason == reason, str(info.value)
    return info.value


def edit(source: str, old: str, new: str) -> str:
    assert old in source
    return source.replace(old, new, 1)


# ---------------------------------------------------------------- applying


def test_applies_code_change(source: str) -> None:
    child = edit(source, "        h = F.gelu(h)\n", "        h = F.gelu(h, approximate='tanh')\n")
    child = edit(child, "    step = 0\n", "    step = 0  # counts optimizer steps\n")
    assert apply_unified_diff(source, diff_of(source, child)) == child
    candidate, digest = prepare_candidate(source, diff_of(source, child))
    assert candidate == child and digest == content_hash(child) and len(digest) == 64


def test_header_path_styles(source: str) -> None:
    child = edit(source, "DEPTH = 3  #", "DEPTH = 5  #")
    for a, b in [
        ("train.py", "train.py"),
        ("target/train.py", "target/train.py"),
        ("a/target/train.py\t2024-01-01 00:00:00", "b/target/train.py\t2024-01-01 00:00:01"),
    ]:
        assert apply_unified_diff(source, diff_of(source, child, a, b)) == child
    git = "diff --git a/train.py b/train.py\nindex 83db48f..bf269f4 100644\n" + diff_of(source, child)
    assert apply_unified_diff(source, git) == child


def test_offset_search_but_no_fuzzy_content(source: str) -> None:
    child = edit(source, "        step += 1\n", "        step += 2\n")
    diff = diff_of(source, child)
    shifted = "# one\n# two\n# three\n" + source
    assert apply_unified_diff(shifted, diff) == "# one\n# two\n# three\n" + child
    far = "#\n" * 60 + source  # beyond the +-50 line search
    rejected("does_not_apply", apply_unified_diff, far, diff)
    # One changed context character is enough to refuse: content is never matched fuzzily.
    rejected(
        "does_not_apply",
        apply_unified_diff,
        edit(source, "    batches = harness", "    batches  = harness"),
        diff_of(source, edit(source, "    step = 0\n", "    step = 1\n")),
    )


def test_multi_hunk_and_pure_insertion(source: str) -> None:
    child = edit(source, "import math\n", "import math\nimport os\n")
    child = edit(child, "        step += 1\n", "        step += 1\n        pass\n")
    assert apply_unified_diff(source, diff_of(source, child)) == child
    zero_context = diff_of(source, child, n=0)
    assert ",0 " in zero_context  # exercises the insert-after form of hunk headers
    assert apply_unified_diff(source, zero_context) == child
    assert apply_unified_diff("a\n", "--- a/train.py\n+++ b/train.py\n@@ -0,0 +1 @@\n+top\n") == "top\na\n"


def test_no_newline_at_end_of_file() -> None:
    old, new = "x = 1\ny = 2\n", "x = 1\ny = 3"
    diff = diff_of(old, new).replace("+y = 3", "+y = 3\n\\ No newline at end of file")
    assert apply_unified_diff(old, diff) == new
    back = render_diff(new, old)
    assert apply_unified_diff(new, back) == old
    # Without the marker the old side ("y = 3" with newline) does not match the file's last line.
    rejected("does_not_apply", apply_unified_diff, new, back.replace("\\ No newline at end of file\n", ""))
    # A newline-less line may only end the file, never glue two lines together mid-file.
    glued = "--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,2 @@\n-x = 1\n+x = 2\n\\ No newline at end of file\n y = 2\n"
    rejected("does_not_apply", apply_unified_diff, old, glued)


def test_empty_context_line_without_space(source: str) -> None:
    child = edit(source, "import math\n\nimport torch\n", "import math\n\nimport torch  # noqa\n")
    diff = diff_of(source, child).replace("\n \n", "\n\n")
    assert apply_unified_diff(source, diff) == child


# ---------------------------------------------------------------- refusing diffs


@pytest.mark.parametrize(
    ("diff", "reason"),
    [
        ("", "empty_diff"),
        ("   \n\n", "empty_diff"),
        ("this is not a diff\nat all\n", "empty_diff"),
        ("--- a/train.py\n+++ b/train.py\n", "empty_diff"),
        ("@@ -1 +1 @@\n-a\n+b\n", "malformed_diff"),
        ("--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,2 @@\n-import math\n+import os\n", "malformed_diff"),
        ("--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-x\n+y\n+z\n", "malformed_diff"),
        ("--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n*x\n+y\n", "malformed_diff"),
        ("--- a/train.py\n+++ b/train.py\n@@ -0,0 +0,0 @@\n", "malformed_diff"),
        (
            "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n\\ No newline at end of file\n-x\n+y\n",
            "malformed_diff",
        ),
        ("--- /dev/null\n+++ b/train.py\n@@ -0,0 +1 @@\n+x\n", "wrong_file"),
        ("--- a/train.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n", "wrong_file"),
        ("--- a/evil.py\n+++ b/evil.py\n@@ -1 +1 @@\n-x\n+y\n", "wrong_file"),
        ("--- a/../train.py\n+++ b/../train.py\n@@ -1 +1 @@\n-x\n+y\n", "wrong_file"),
        ("--- a/frozen_env/evaluate.py\n+++ b/frozen_env/evaluate.py\n@@ -1 +1 @@\n-x\n+y\n", "wrong_file"),
        ("--- a/train.py.orig\n+++ b/train.py\n@@ -1 +1 @@\n-x\n+y\n", "wrong_file"),
        ("diff --git a/x.py b/train.py\nrename from x.py\nrename to train.py\n", "wrong_file"),
        (
            "diff --git a/train.py b/train.py\nnew file mode 100644\n--- /dev/null\n+++ b/train.py\n",
            "wrong_file",
        ),
        ("diff --git a/train.py b/train.py\nGIT binary patch\nliteral 0\n", "binary_patch"),
        ("Binary files a/train.py and b/train.py differ\n", "binary_patch"),
        ("--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-x\0\n+y\n", "binary_patch"),
    ],
)
def test_refuses_bad_diffs(source: str, diff: str, reason: str) -> None:
    rejected(reason, apply_unified_diff, source, diff)


def test_refuses_second_file(source: str) -> None:
    child = edit(source, "DEPTH = 3  #", "DEPTH = 5  #")
    diff = diff_of(source, child)
    other = "--- a/frozen_env/constants.py\n+++ b/frozen_env/constants.py\n@@ -1 +1 @@\n-a\n+b\n"
    rejected("wrong_file", apply_unified_diff, source, diff + other)
    rejected(
        "wrong_file",
        apply_unified_diff,
        source,
        diff + "diff --git a/frozen_env/x.py b/frozen_env/x.py\n" + other,
    )
    rejected("multiple_files", apply_unified_diff, source, diff + diff)


def test_refuses_diff_that_does_not_apply(source: str) -> None:
    diff = "--- a/train.py\n+++ b/train.py\n@@ -30,1 +30,1 @@\n-LOGIT_SOFTCAP = 99.0\n+LOGIT_SOFTCAP = 1.0\n"
    rejected("does_not_apply", apply_unified_diff, source, diff)
    child = edit(source, "DEPTH = 3  #", "DEPTH = 5  #")
    diff = diff_of(source, child)
    assert prepare_candidate(source, diff)[0] == child
    rejected("does_not_apply", prepare_candidate, child, diff)  # already applied


def test_refuses_huge_diff(source: str) -> None:
    filler = "".join(f"+# {'x' * 70}\n" for _ in range(4000))
    diff = f"--- a/train.py\n+++ b/train.py\n@@ -1,0 +2,4000 @@\n{filler}"
    assert len(diff) > MAX_BYTES
    rejected("too_large", apply_unified_diff, source, diff)
    rejected("too_large", check_candidate, source + "#" * MAX_BYTES)


def test_patch_rejected_carries_reason() -> None:
    err = PatchRejected("wrong_file", "diff touches x.py")
    assert isinstance(err, ValueError) and err.reason == "wrong_file" and "x.py" in str(err)


# ---------------------------------------------------------------- checking candidates


def test_baseline_passes_checks(source: str) -> None:
    check_candidate(source)
    check_tunable_block(source, source)


def test_refuses_syntax_errors(source: str) -> None:
    child = edit(source, "    step = 0\n", "    step = = 0\n")
    rejected("syntax_error", prepare_candidate, source, diff_of(source, child))
    rejected("syntax_error", check_candidate, "x = (\n")


@pytest.mark.parametrize(
    "line",
    [
        "from frozen_env.data import load\n",
        "from frozen_env.evaluate import evaluate_bpb\n",
        "from frozen_env import constants\n",
        "from frozen_env.constants import VOCAB_SIZE\n",
        "import frozen_env.data\n",
        "import frozen_env\n",
        "import frozen_env.harness\n",
        "from frozen_env.harness import *\n",
        "from frozen_env.harness import Harness, _evaluate\n",
        "from .frozen_env import data\n",
        "ev = __import__('frozen_env.evaluate')\n",
        "import importlib\nev = importlib.import_module('frozen_env' + '.evaluate')\n",
        "import sys\nev = sys.modules['frozen_env.constants']\n",
        "def f():\n    from frozen_env.data import load\n",
    ],
)
def test_refuses_forbidden_imports(source: str, line: str) -> None:
    child = edit(source, "import math\n", "import math\n" + line)
    rejected("forbidden_import", prepare_candidate, source, diff_of(source, child))


def test_allowed_harness_references(source: str) -> None:
    child = edit(
        source,
        "import math\n",
        "import math\nimport importlib\n_h = importlib.import_module('frozen_env.harness')\n",
    )
    check_candidate(child)
    check_candidate(
        source.replace("import Harness\n", "import Harness as H\n").replace("Harness.from_env", "H.from_env")
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("    harness = Harness.from_env()\n", "    harness = object()\n"),
        ("    harness.finish(model)\n", "    pass\n"),
        ("from frozen_env.harness import Harness\n", "\n"),
    ],
)
def test_requires_harness_contract(source: str, old: str, new: str) -> None:
    rejected("missing_harness_call", check_candidate, edit(source, old, new))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("MATRIX_LR = 0.02  # search: log 0.0001..0.2", "MATRIX_LR = 0.02  # search: log 0.0001..2"),
        ("MATRIX_LR = 0.02  # search: log 0.0001..0.2", "MATRIX_LR = 0.02"),
        ("MATRIX_LR = 0.02  #", "MATRIX_LR = 0.5  #"),  # outside its domain
        ("DEPTH = 3  # search: int 1..8\n", ""),
        (
            "# --- end hyperparameters ---\n",
            "NEW_KNOB = 1  # search: int 0..2\n# --- end hyperparameters ---\n",
        ),
        ("# --- end hyperparameters ---\n", ""),
        ("\n\nclass RMSNorm", "\nMATRIX_LR = 0.5\n\nclass RMSNorm"),
        ("    step = 0\n", "    step = 0\n    DROPOUT = 0.5\n"),
        ("def lr_multiplier(progress):\n", "def lr_multiplier(progress, WARMUP_FRAC=0.5):\n"),
    ],
)
def test_tunable_block_is_frozen(source: str, old: str, new: str) -> None:
    child = edit(source, old, new)
    rejected("frozen_tunable_block", prepare_candidate, source, diff_of(source, child))


def test_grammar_programs_pass_prepare(source: str) -> None:
    child, _ = apply_program(
        source,
        [
            {"op": "set", "name": "ACTIVATION", "value": "swiglu"},
            {"op": "scale", "name": "MATRIX_LR", "factor": 2.0},
        ],
    )
    assert prepare_candidate(source, render_diff(source, child)) == (child, content_hash(child))


# ---------------------------------------------------------------- hashing


def test_content_hash_normalises_only_trailing_whitespace(source: str) -> None:
    base = content_hash(source)
    assert content_hash(source.replace("\n", "  \n")) == base
    assert content_hash(source.replace("\n", "\r\n")) == base
    assert content_hash(source.rstrip("\n")) == base
    assert content_hash(source + "\n\n") == base
    assert content_hash(source.replace("    step = 0", "    step  = 0")) != base
    assert content_hash(source.replace("\n\n", "\n\n\n", 1)) != base
    assert content_hash("\t" + source) != base
    whitespace_only = diff_of(source, source.replace("    step = 0\n", "    step = 0   \n"))
    rejected("no_op", prepare_candidate, source, whitespace_only)
