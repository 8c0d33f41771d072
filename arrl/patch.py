"""The patch applier's checks: turn any proposer's unified diff into a vetted candidate script.

Proposers other than the edit grammar (an LLM, a human) hand in free-form unified diffs, so this
module trusts nothing: the diff must name only `train.py`, apply exactly (a hunk may move by up to
FUZZ_LINES lines, but its content must match byte for byte), and the result must parse, keep the
harness contract, import nothing from `frozen_env` beyond the harness and leave the search domains
of the hyperparameter block alone.

These are guards against mistakes and casual shortcuts, not a sandbox: the candidate is run in a
separate process whose results the frozen harness computes, which is what makes cheating hard.

Rejection reasons (`PatchRejected.reason`):
    too_large, empty_diff, binary_patch, malformed_diff, wrong_file, multiple_files,
    does_not_apply, no_op, syntax_error, forbidden_import, missing_harness_call,
    frozen_tunable_block
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

from arrl.edits import GrammarError, block_lines, parse_tunables, split_lines

MAX_BYTES = 256 * 1024
FUZZ_LINES = 50
HARNESS_MODULE = "frozen_env.harness"
FROZEN_PACKAGE = "frozen_env"
NO_NEWLINE = "\\ No newline at end of file"
# A hunk header is fixed-format data, not code: a regular expression is the right tool here.
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@.*$")
# Git extended headers that create, delete, rename or copy files, which a candidate may never do.
_FILE_OPS = ("new file mode", "deleted file mode", "rename from", "rename to", "copy from", "copy to")


class PatchRejected(ValueError):
    """A diff or the candidate it produces was refused; `reason` is a short machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class _Hunk:
    old_start: int
    old_lines: list[str] = field(default_factory=list)
    new_lines: list[str] = field(default_factory=list)


def _byte_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _check_path(raw: str, target_name: str) -> None:
    # diff -u appends a tab and a timestamp; git quotes names with unusual characters.
    path = raw.split("\t", 1)[0].strip()
    if len(path) >= 2 and path[0] == path[-1] == '"':
        path = path[1:-1]
    if path == "/dev/null":
        raise PatchRejected("wrong_file", "diffs may not create or delete files (/dev/null header)")
    parts = path.split("/")
    if ".." in parts:
        raise PatchRejected("wrong_file", f"path {path!r} climbs out of the target directory")
    if parts[-1] != target_name:
        raise PatchRejected("wrong_file", f"diff touches {path!r}; only {target_name} may be changed")


def _parse(diff: str, target_name: str) -> list[_Hunk]:
    lines = diff.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline of the diff text, not an empty context line
    i, n = 0, len(lines)
    # Leading text (a commit message, `diff --git`, `index`) is ignored, as `patch` does, but
    # git headers that create, delete, rename or copy files are refused.
    while i < n and not (lines[i].startswith("--- ") and i + 1 < n and lines[i + 1].startswith("+++ ")):
        if lines[i].startswith(_FILE_OPS):
            raise PatchRejected("wrong_file", f"diffs may only modify {target_name}: {lines[i]!r}")
        if lines[i].startswith("diff --git "):
            for raw in lines[i][len("diff --git ") :].split(" "):
                _check_path(raw, target_name)
        if lines[i].startswith("@@"):
            raise PatchRejected("malformed_diff", "hunk before the ---/+++ file headers")
        i += 1
    if i >= n:
        raise PatchRejected("empty_diff", "no ---/+++ file headers and no hunks")
    _check_path(lines[i][4:], target_name)
    _check_path(lines[i + 1][4:], target_name)
    i += 2
    hunks: list[_Hunk] = []
    while i < n:
        line = lines[i]
        match = _HUNK_RE.match(line)
        if match is None:
            break
        old_start = int(match.group(1))
        old_count = int(match.group(2) or "1")  # a count of 1 may be omitted
        new_count = int(match.group(4) or "1")
        if old_count == 0 and new_count == 0:
            raise PatchRejected("malformed_diff", f"empty hunk {line!r}")
        hunk = _Hunk(old_start=old_start)
        i += 1
        old_left, new_left = old_count, new_count
        while old_left > 0 or new_left > 0:
            if i >= n:
                raise PatchRejected(
                    "malformed_diff", f"hunk {line!r} ends early: its line counts do not match"
                )
            body = lines[i]
            # Some editors strip the single space of an empty context line; `patch` accepts that.
            tag, text = (body[0], body[1:]) if body else (" ", "")
            if tag == " " and old_left > 0 and new_left > 0:
                hunk.old_lines.append(text + "\n")
                hunk.new_lines.append(text + "\n")
                old_left, new_left = old_left - 1, new_left - 1
            elif tag == "-" and old_left > 0:
                hunk.old_lines.append(text + "\n")
                old_left -= 1
            elif tag == "+" and new_left > 0:
                hunk.new_lines.append(text + "\n")
                new_left -= 1
            elif body.startswith("\\"):
                _strip_newline(hunk, lines[i - 1] if i > 0 else "")
            else:
                raise PatchRejected(
                    "malformed_diff", f"line {i + 1} {body[:60]!r} does not fit hunk {line!r}"
                )
            i += 1
        if i < n and lines[i].startswith("\\"):
            _strip_newline(hunk, lines[i - 1])
            i += 1
        hunks.append(hunk)
    if not hunks:
        raise PatchRejected("empty_diff", "the diff holds no hunks")
    # After the hunks only blank lines, a `-- ` signature (git format-patch) or nothing may follow.
    for j in range(i, n):
        rest = lines[j]
        if rest == "-- ":
            break
        if rest.startswith("diff --git "):
            for raw in rest[len("diff --git ") :].split(" "):
                _check_path(raw, target_name)
        if rest.startswith(("--- ", "+++ ", "diff ")):
            _check_path(rest[4:] if rest.startswith(("--- ", "+++ ")) else target_name, target_name)
            raise PatchRejected("multiple_files", "the diff touches more than one file section")
        if rest.strip():
            raise PatchRejected(
                "malformed_diff", f"line {j + 1} {rest[:60]!r}: extra lines after a hunk (wrong counts?)"
            )
    return hunks


def _strip_newline(hunk: _Hunk, previous: str) -> None:
    """`\\ No newline at end of file` applies to the line before it, on the side(s) it belongs to."""
    if not previous or previous[0] not in " -+" or previous.startswith("\\"):
        raise PatchRejected("malformed_diff", f"misplaced {NO_NEWLINE!r}")
    sides = {" ": (hunk.old_lines, hunk.new_lines), "-": (hunk.old_lines,), "+": (hunk.new_lines,)}[
        previous[0]
    ]
    for side in sides:
        if not side or not side[-1].endswith("\n"):
            raise PatchRejected("malformed_diff", f"misplaced {NO_NEWLINE!r}")
        side[-1] = side[-1][:-1]


def _find(original: list[str], hunk: _Hunk, expected: int, floor: int) -> int | None:
    """Closest position within FUZZ_LINES of `expected` where the hunk's old lines match exactly."""
    size = len(hunk.old_lines)
    for delta in range(FUZZ_LINES + 1):
        for pos in (expected - delta, expected + delta) if delta else (expected,):
            if floor <= pos <= len(original) - size and original[pos : pos + size] == hunk.old_lines:
                return pos
        if size == 0:
            break  # a pure insertion has nothing to match, so only its stated position is trusted
    return None


def apply_unified_diff(original: str, diff: str, target_name: str = "train.py") -> str:
    """Apply a single-file unified diff strictly; raise PatchRejected when anything is off."""
    if _byte_len(diff) > MAX_BYTES:
        raise PatchRejected("too_large", f"diff is {_byte_len(diff)} bytes, limit {MAX_BYTES}")
    if not diff.strip():
        raise PatchRejected("empty_diff", "the diff is empty")
    if (
        "\0" in diff
        or "GIT binary patch" in diff
        or any(line.startswith("Binary files ") for line in diff.split("\n"))
    ):
        raise PatchRejected("binary_patch", "binary patches are not accepted")
    hunks = _parse(diff, target_name)
    source = split_lines(original)
    out: list[str] = []
    cursor = 0  # lines of the original consumed so far; hunks must come in order
    offset = 0  # how far the previous hunk moved, which later hunks most likely share
    for number, hunk in enumerate(hunks, start=1):
        # A hunk that removes/keeps nothing names the line *after which* it inserts.
        expected = (hunk.old_start if not hunk.old_lines else hunk.old_start - 1) + offset
        pos = _find(source, hunk, expected, cursor)
        if pos is None:
            raise PatchRejected(
                "does_not_apply",
                f"hunk {number} (@@ -{hunk.old_start}) does not match the file within {FUZZ_LINES} lines",
            )
        out.extend(source[cursor:pos])
        out.extend(hunk.new_lines)
        cursor = pos + len(hunk.old_lines)
        offset = pos - (expected - offset)
    out.extend(source[cursor:])
    # A line without newline may only end the file; a hunk cannot glue two lines together.
    if any(not line.endswith("\n") for line in out[:-1]):
        raise PatchRejected("does_not_apply", "a line without final newline would end up mid-file")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Candidate checks


def _docstring_nodes(tree: ast.Module) -> set[int]:
    """ids of docstring constants, which may talk about frozen_env without importing it."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _harness_aliases(tree: ast.Module) -> set[str]:
    """Check every import and return the local names bound to the Harness class."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == FROZEN_PACKAGE or alias.name.startswith(FROZEN_PACKAGE + "."):
                    raise PatchRejected(
                        "forbidden_import",
                        f"'import {alias.name}': only 'from {HARNESS_MODULE} import Harness' is allowed",
                    )
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                # train.py runs as a script, so relative imports can only be an attempt at a detour.
                raise PatchRejected(
                    "forbidden_import", f"relative import 'from {'.' * node.level}{module} import ...'"
                )
            if module == FROZEN_PACKAGE or module.startswith(FROZEN_PACKAGE + "."):
                names = [a.name for a in node.names]
                if module != HARNESS_MODULE or names != ["Harness"]:
                    raise PatchRejected(
                        "forbidden_import",
                        f"'from {module} import {', '.join(names)}': only 'from {HARNESS_MODULE} import Harness' is allowed",
                    )
                aliases.add(node.names[0].asname or "Harness")
    return aliases


def check_candidate(source: str) -> None:
    """Raise PatchRejected unless the candidate parses, keeps the harness contract and stays away
    from the frozen environment's internals."""
    if _byte_len(source) > MAX_BYTES:
        raise PatchRejected("too_large", f"candidate is {_byte_len(source)} bytes, limit {MAX_BYTES}")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
        raise PatchRejected("syntax_error", f"candidate does not parse: {exc}") from None
    aliases = _harness_aliases(tree)
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        # __import__("frozen_env.data"), importlib.import_module(...), sys.modules[...]: any
        # string naming a frozen_env module other than the harness, outside docstrings.
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str | bytes)
            and id(node) not in docstrings
        ):
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if FROZEN_PACKAGE in text.replace(HARNESS_MODULE, ""):
                raise PatchRejected(
                    "forbidden_import", f"string {text[:60]!r} refers to {FROZEN_PACKAGE} internals"
                )
    if not aliases:
        raise PatchRejected("missing_harness_call", f"candidate must import Harness from {HARNESS_MODULE}")
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    if not any(
        f.attr == "from_env" and isinstance(f.value, ast.Name) and f.value.id in aliases for f in calls
    ):
        raise PatchRejected("missing_harness_call", "candidate must call Harness.from_env()")
    if not any(f.attr == "finish" for f in calls):
        raise PatchRejected("missing_harness_call", "candidate must call harness.finish(...)")


def check_tunable_block(parent_source: str, candidate_source: str) -> None:
    """The hyperparameter block's names and domains are the policy's action space: a diff may
    change values (within their domains) but not the domains, and may not reassign a tunable
    elsewhere, which would silently override the value the search believes it set."""
    try:
        parent = parse_tunables(parent_source)
    except GrammarError:
        return  # a parent without a grammar block has nothing to protect
    try:
        child = parse_tunables(candidate_source)
        start, end = block_lines(candidate_source)
    except GrammarError as exc:
        raise PatchRejected("frozen_tunable_block", f"hyperparameter block no longer valid: {exc}") from None
    if set(child) != set(parent):
        changed = sorted(set(child) ^ set(parent))
        raise PatchRejected("frozen_tunable_block", f"tunables added or removed: {', '.join(changed)}")
    for name, t in parent.items():
        if child[name].domain() != t.domain():
            raise PatchRejected("frozen_tunable_block", f"search domain of {name} changed")
    for node in ast.walk(ast.parse(candidate_source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del) and node.id in child:
            if not start < node.lineno < end:
                raise PatchRejected(
                    "frozen_tunable_block", f"{node.id} reassigned on line {node.lineno}, outside the block"
                )
        if isinstance(node, ast.arg) and node.arg in child:
            raise PatchRejected(
                "frozen_tunable_block", f"parameter {node.arg} shadows a tunable on line {node.lineno}"
            )
        if isinstance(node, ast.Global | ast.Nonlocal) and set(node.names) & set(child):
            raise PatchRejected("frozen_tunable_block", f"'global' on tunable(s) on line {node.lineno}")


def _normalise(source: str) -> str:
    lines = [line.rstrip(" \t\r\f\v") for line in source.split("\n")]
    return "\n".join(lines).rstrip("\n") + "\n"


def content_hash(source: str) -> str:
    """sha256 of the source with trailing whitespace and trailing newlines normalised, so that
    invisible edits do not count as a new candidate; every other byte does."""
    return hashlib.sha256(_normalise(source).encode("utf-8", errors="surrogatepass")).hexdigest()


def prepare_candidate(parent_source: str, diff: str, target_name: str = "train.py") -> tuple[str, str]:
    """Apply and vet a proposer's diff; returns (candidate_source, content_hash)."""
    candidate = apply_unified_diff(parent_source, diff, target_name)
    digest = content_hash(candidate)
    if digest == content_hash(parent_source):
        raise PatchRejected("no_op", "the diff changes nothing but whitespace")
    check_candidate(candidate)
    check_tunable_block(parent_source, candidate)
    return candidate, digest
