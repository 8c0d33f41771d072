"""The edit grammar: the tunables of `train.py` and the small edit programs that change them.

The proposer's action space is defined by the training script itself. Its hyperparameter block
(between `# --- hyperparameters ---` and `# --- end hyperparameters ---`) holds top-level literal
assignments, each with its search domain in a trailing comment:

    MATRIX_LR = 0.02  # search: log 0.0001..0.2
    DEPTH = 3  # search: int 1..8
    ACTIVATION = "relu2"  # search: relu2|gelu|silu|swiglu

Code is read with `ast` (which statements are assignments, where each literal sits) and comments
with `tokenize` (the only reliable way to tell a comment from a `#` inside a string); no regular
expression ever looks at the code.

An edit program is a list of 1 to 3 atomic edits on distinct tunables, as plain dicts so that it
travels as msgpack unchanged:

    {"op": "scale", "name": "MATRIX_LR", "factor": 1.4}   # multiplicative step, clipped
    {"op": "set", "name": "ACTIVATION", "value": "gelu"}  # a choice, or a value in the domain
"""

from __future__ import annotations

import ast
import difflib
import functools
import io
import math
import random
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Value = bool | int | float | str
Kind = Literal["log", "linear", "int", "choice"]
Number = int | float
Domain = tuple[Kind, Number | None, Number | None, tuple[Value, ...] | None]

BLOCK_START = "# --- hyperparameters ---"
BLOCK_END = "# --- end hyperparameters ---"
SEARCH_PREFIX = "search:"
MAX_EDITS = 3
# Steps the random proposer takes: two gentle and two bold moves, symmetric in log space.
SCALE_FACTORS: tuple[float, ...] = (0.5, 0.7, 1.4, 2.0)
# Floats written by the grammar are rounded to this many significant digits so that the script
# (and the run descriptions) stay readable: 0.028 rather than 0.027999999999999997.
SIG_DIGITS = 4


class GrammarError(ValueError):
    """The hyperparameter block is malformed, or an edit program is invalid for it."""


@dataclass(frozen=True)
class Tunable:
    """One searchable hyperparameter: its domain, its current value and where its literal sits."""

    name: str
    kind: Kind
    low: Number | None  # None for choice tunables
    high: Number | None
    choices: tuple[Value, ...] | None  # None for numeric tunables
    value: Value
    lineno: int  # 1-based line of the assignment
    col_offset: int = 0  # character span of the value literal within that line
    end_col_offset: int = 0

    @property
    def numeric(self) -> bool:
        return self.kind != "choice"

    def domain(self) -> Domain:
        """What the search may do with this tunable, independent of its current value."""
        return (self.kind, self.low, self.high, self.choices)


def same_value(a: Value, b: Value) -> bool:
    """Equality that keeps bools, strings and numbers apart (True == 1 in plain Python)."""
    return (isinstance(a, bool), isinstance(a, str)) == (isinstance(b, bool), isinstance(b, str)) and a == b


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _parse_number(text: str, integer: bool, where: str) -> Number:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise GrammarError(f"{where}: bound {text!r} is not {'an int' if integer else 'a number'}") from None


def _parse_choice(text: str, where: str) -> Value:
    token = text.strip()
    if not token or any(ch.isspace() for ch in token):
        raise GrammarError(f"{where}: empty or blank choice in {text!r}")
    try:
        value = ast.literal_eval(token)
    except (ValueError, SyntaxError):
        return token  # a bare word such as relu2 stands for the string "relu2"
    if not isinstance(value, bool | int | float | str):
        raise GrammarError(f"{where}: choice {token!r} is not a bool, number or string")
    return value


def _parse_domain(spec: str, where: str) -> Domain:
    head, _, rest = spec.strip().partition(" ")
    if head in ("log", "linear", "int"):
        bounds = rest.strip().split("..")
        if len(bounds) != 2:
            raise GrammarError(f"{where}: domain {spec!r} should read '{head} LOW..HIGH'")
        low = _parse_number(bounds[0].strip(), head == "int", where)
        high = _parse_number(bounds[1].strip(), head == "int", where)
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise GrammarError(f"{where}: domain {spec!r} needs finite bounds with LOW < HIGH")
        if head == "log" and low <= 0:
            raise GrammarError(f"{where}: log domain {spec!r} needs LOW > 0")
        kind: Kind = head  # type: ignore[assignment]
        return kind, low, high, None
    if "|" not in spec:
        raise GrammarError(f"{where}: unknown domain {spec!r} (log/linear/int LOW..HIGH or a|b|c)")
    choices = tuple(_parse_choice(part, where) for part in spec.split("|"))
    for i, c in enumerate(choices):
        if any(same_value(c, other) for other in choices[:i]):
            raise GrammarError(f"{where}: duplicate choice {c!r} in {spec!r}")
    return "choice", None, None, choices


def _literal_value(node: ast.expr) -> Value | None:
    """The value of a literal assignment's right-hand side, or None when it is not a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bool | int | float | str):
        return node.value
    # A negative number is a unary minus applied to a constant in the AST.
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = node.operand
        if (
            isinstance(inner, ast.Constant)
            and isinstance(inner.value, int | float)
            and _is_number(inner.value)
        ):
            return -inner.value
    return None


def _in_domain(t: Tunable, value: Value) -> bool:
    if t.kind == "choice":
        assert t.choices is not None
        return any(same_value(value, c) for c in t.choices)
    if not _is_number(value) or (t.kind == "int" and not isinstance(value, int)):
        return False
    assert t.low is not None and t.high is not None
    return t.low <= value <= t.high  # type: ignore[operator]


def _comments(source: str) -> dict[int, str]:
    """Line number -> comment text, from the tokenizer so that '#' inside strings is ignored."""
    out: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string
    except (tokenize.TokenError, SyntaxError) as exc:
        raise GrammarError(f"cannot tokenize source: {exc}") from None
    return out


def _char_col(line: str, byte_col: int) -> int:
    """AST columns count UTF-8 bytes; string slicing counts characters."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split on '\\n' only, as Python's tokenizer and `patch` do
    (str.splitlines would also split on form feeds and other separators)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def block_lines(source: str, comments: Mapping[int, str] | None = None) -> tuple[int, int]:
    """Line numbers of the start and end markers of the hyperparameter block."""
    comments = _comments(source) if comments is None else comments
    starts = [n for n, c in comments.items() if c.strip() == BLOCK_START]
    ends = [n for n, c in comments.items() if c.strip() == BLOCK_END]
    if len(starts) != 1 or len(ends) != 1:
        found = f"found {len(starts)} and {len(ends)}"
        raise GrammarError(f"need exactly one {BLOCK_START!r} and one {BLOCK_END!r} marker, {found}")
    if not starts[0] < ends[0]:
        raise GrammarError("hyperparameter block end marker comes before its start")
    return starts[0], ends[0]


def parse_tunables(source: str) -> dict[str, Tunable]:
    """The tunables of the hyperparameter block, in source order.

    Raises GrammarError when the block is missing, a `# search:` domain is malformed, a value lies
    outside its domain, or a `# search:` comment sits on a line that is not a tunable assignment.
    """
    # Proposers apply many programs to the same parent, so parsing (ast + tokenize, a few ms) is
    # cached; Tunables are frozen and the dict is copied, so callers cannot corrupt the cache.
    return {t.name: t for t in _parse_cached(source)}


@functools.lru_cache(maxsize=64)
def _parse_cached(source: str) -> tuple[Tunable, ...]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        raise GrammarError(f"source does not parse: {exc}") from None
    comments = _comments(source)
    start, end = block_lines(source, comments)
    lines = split_lines(source)
    search_lines = {
        n: c.lstrip("#").strip()[len(SEARCH_PREFIX) :]
        for n, c in comments.items()
        if start < n < end and c.lstrip("#").strip().startswith(SEARCH_PREFIX)
    }
    tunables: dict[str, Tunable] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or not start < node.lineno < end:
            continue
        if node.lineno not in search_lines:
            continue  # a fixed constant inside the block: not searchable, and that is allowed
        where = f"line {node.lineno}"
        target = node.targets[0] if len(node.targets) == 1 else None
        if not isinstance(target, ast.Name) or not target.id.isupper():
            raise GrammarError(f"{where}: a tunable must assign one UPPERCASE name")
        value = _literal_value(node.value)
        if value is None:
            raise GrammarError(f"{where}: {target.id} must be assigned a bool, number or string literal")
        # The rewriter replaces the literal in place, so it must sit on the comment's line.
        if node.end_lineno != node.lineno:
            raise GrammarError(f"{where}: {target.id} must fit on one line")
        if target.id in tunables:
            raise GrammarError(f"{where}: {target.id} is defined twice in the block")
        kind, low, high, choices = _parse_domain(search_lines.pop(node.lineno), f"{where} ({target.id})")
        line = lines[node.lineno - 1]
        cols = _char_col(line, node.value.col_offset), _char_col(line, node.value.end_col_offset or 0)
        t = Tunable(target.id, kind, low, high, choices, value, node.lineno, *cols)
        if not _in_domain(t, value):
            raise GrammarError(f"{where}: {t.name} = {value!r} lies outside its domain {_describe_domain(t)}")
        tunables[t.name] = t
    if search_lines:
        stray = ", ".join(str(n) for n in sorted(search_lines))
        raise GrammarError(f"'# search:' comment on line(s) {stray} that are not literal assignments")
    if not tunables:
        raise GrammarError("the hyperparameter block holds no tunables")
    return tuple(tunables.values())


def _describe_domain(t: Tunable) -> str:
    if t.kind == "choice":
        assert t.choices is not None
        return "|".join(_fmt(c) for c in t.choices)
    return f"{t.kind} {t.low}..{t.high}"


def search_space(tunables: Mapping[str, Tunable]) -> dict[str, dict[str, Any]]:
    """The domains as plain data, for components that must not depend on this module's types."""
    return {
        name: {
            "kind": t.kind,
            "low": None if t.low is None else float(t.low),
            "high": None if t.high is None else float(t.high),
            "choices": None if t.choices is None else list(t.choices),
        }
        for name, t in tunables.items()
    }


def knobs(tunables: Mapping[str, Tunable]) -> dict[str, Value]:
    """Current value of every tunable."""
    return {name: t.value for name, t in tunables.items()}


def knobs_after(tunables: Mapping[str, Tunable], program: Sequence[Mapping[str, Any]]) -> dict[str, Value]:
    """The value of every tunable once `program` is applied (raises GrammarError as resolve_program does)."""
    out = knobs(tunables)
    out.update({t.name: v for t, v in resolve_program(tunables, program)})
    return out


def _round_sig(x: float) -> float:
    return float(f"{x:.{SIG_DIGITS}g}")


def _clip(t: Tunable, x: float) -> Number:
    assert t.low is not None and t.high is not None
    return min(max(x, t.low), t.high)


def _fmt(v: Value) -> str:
    """Compact human form: strings bare, floats as their shortest repr."""
    return v if isinstance(v, str) else repr(v)


def _literal(v: Value, old_literal: str) -> str:
    """Python source for a value; strings keep the quote style of the literal they replace."""
    quote = "'" if old_literal.startswith("'") else '"'
    if isinstance(v, str) and quote not in v and "\\" not in v and v.isprintable():
        return f"{quote}{v}{quote}"
    return repr(v)


def _normalise_numeric(t: Tunable, x: float) -> Number:
    """Snap a proposed number onto the tunable's representation: ints round, floats keep 4 digits."""
    if not math.isfinite(x):
        raise GrammarError(f"{t.name}: value {x!r} is not finite")
    if t.kind == "int":
        return int(_clip(t, round(x)))
    return float(_clip(t, _round_sig(x)))


def grid(tunable: Tunable, n: int = 9) -> list[Value]:
    """Values a `set` edit may pick: log-spaced, linear or integer points including both bounds.

    For a choice tunable this is simply its list of choices.
    """
    t = tunable
    if t.kind == "choice":
        assert t.choices is not None
        return list(t.choices)
    if n < 2:
        raise GrammarError("a grid needs at least 2 points")
    assert t.low is not None and t.high is not None
    lo, hi = t.low, t.high
    if t.kind == "int" and hi - lo + 1 <= n:
        return list(range(int(lo), int(hi) + 1))
    fracs = [i / (n - 1) for i in range(1, n - 1)]
    inner = [lo * (hi / lo) ** f if t.kind == "log" else lo + (hi - lo) * f for f in fracs]
    # Interior points are rounded for readability; the bounds stay exact so that the grid always
    # holds at least two distinct values, whatever the bounds' precision.
    ends = (lo, hi) if t.kind == "int" else (float(lo), float(hi))
    return sorted({ends[0], *(_normalise_numeric(t, p) for p in inner), ends[1]})


def _check_keys(edit: Mapping[str, Any], required: set[str], index: int) -> None:
    if set(edit) != required:
        raise GrammarError(f"edit {index}: keys {sorted(edit)}, expected exactly {sorted(required)}")


def _resolve_edit(t: Tunable, edit: Mapping[str, Any], index: int) -> Value:
    """The tunable's new value under one atomic edit, or GrammarError when the edit is invalid."""
    op = edit.get("op")
    if op == "scale":
        _check_keys(edit, {"op", "name", "factor"}, index)
        factor = edit["factor"]
        if not t.numeric:
            raise GrammarError(f"edit {index}: cannot scale categorical tunable {t.name}")
        if not _is_number(factor) or not math.isfinite(factor) or factor <= 0:
            raise GrammarError(f"edit {index}: scale factor must be a positive finite number, got {factor!r}")
        assert _is_number(t.value)  # numeric tunables hold numbers, checked when parsing
        new: Value = _normalise_numeric(t, float(t.value) * factor)
    elif op == "set":
        _check_keys(edit, {"op", "name", "value"}, index)
        value = edit["value"]
        if t.numeric:
            if not _is_number(value) or not math.isfinite(value):
                raise GrammarError(f"edit {index}: {t.name} needs a finite number, got {value!r}")
            if t.kind == "int" and not float(value).is_integer():
                raise GrammarError(f"edit {index}: {t.name} is an int tunable, got {value!r}")
            assert t.low is not None and t.high is not None
            # Checked before normalising, which would otherwise clip it silently into range.
            if not t.low <= value <= t.high:
                raise GrammarError(f"edit {index}: {t.name} = {value!r} outside {_describe_domain(t)}")
            new = _normalise_numeric(t, float(value))
        else:
            assert t.choices is not None
            match = [c for c in t.choices if same_value(c, value)]
            if not match:
                raise GrammarError(
                    f"edit {index}: {value!r} is not a choice of {t.name}: {_describe_domain(t)}"
                )
            new = match[0]
    else:
        raise GrammarError(f"edit {index}: unknown op {op!r} (expected 'scale' or 'set')")
    if same_value(new, t.value):
        raise GrammarError(f"edit {index}: {t.name} stays {_fmt(t.value)} (no-op edit)")
    return new


def resolve_program(
    tunables: Mapping[str, Tunable], program: Sequence[Mapping[str, Any]]
) -> list[tuple[Tunable, Value]]:
    """Validate an edit program and return each edited tunable with its new value, in order."""
    if not isinstance(program, list | tuple):
        raise GrammarError(f"an edit program is a list of edits, got {type(program).__name__}")
    if not 1 <= len(program) <= MAX_EDITS:
        raise GrammarError(f"an edit program holds 1 to {MAX_EDITS} edits, got {len(program)}")
    seen: set[str] = set()
    out: list[tuple[Tunable, Value]] = []
    for i, edit in enumerate(program):
        if not isinstance(edit, Mapping):
            raise GrammarError(f"edit {i}: expected a dict, got {type(edit).__name__}")
        name = edit.get("name")
        if not isinstance(name, str) or name not in tunables:
            raise GrammarError(f"edit {i}: unknown tunable {name!r}")
        if name in seen:
            raise GrammarError(f"edit {i}: {name} edited twice in one program")
        seen.add(name)
        out.append((tunables[name], _resolve_edit(tunables[name], edit, i)))
    return out


def apply_program(source: str, program: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """Rewrite the edited literals in place; returns (new_source, "NAME old -> new; ...")."""
    tunables = parse_tunables(source)
    changes = resolve_program(tunables, program)
    lines = split_lines(source)
    for t, new in changes:
        line = lines[t.lineno - 1]
        old_literal = line[t.col_offset : t.end_col_offset]
        lines[t.lineno - 1] = line[: t.col_offset] + _literal(new, old_literal) + line[t.end_col_offset :]
    new_source = "".join(lines)
    # Re-reading the result guarantees that what we hand on parses and says what we meant.
    reparsed = parse_tunables(new_source)
    for t, new in changes:
        if not same_value(reparsed[t.name].value, new):
            raise RuntimeError(f"rewriting {t.name} produced {reparsed[t.name].value!r}, expected {new!r}")
    description = "; ".join(f"{t.name} {_fmt(t.value)} -> {_fmt(new)}" for t, new in changes)
    return new_source, description


def render_diff(old_source: str, new_source: str, path: str = "train.py") -> str:
    """Unified diff with a/ and b/ headers; empty when the sources are equal."""
    out: list[str] = []
    for line in difflib.unified_diff(
        split_lines(old_source), split_lines(new_source), fromfile=f"a/{path}", tofile=f"b/{path}"
    ):
        out.append(line)
        # difflib leaves a last line without newline unterminated; `patch` needs the marker.
        if not line.endswith("\n"):
            out.append("\n\\ No newline at end of file\n")
    return "".join(out)


def _candidate_edits(t: Tunable) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Valid (scale, set) edits for one tunable; at least one set always exists."""
    sets = [{"op": "set", "name": t.name, "value": v} for v in grid(t)]
    scales = [{"op": "scale", "name": t.name, "factor": f} for f in SCALE_FACTORS] if t.numeric else []
    return [e for e in scales if _valid(t, e)], [e for e in sets if _valid(t, e)]


def _valid(t: Tunable, edit: Mapping[str, Any]) -> bool:
    try:
        _resolve_edit(t, edit, 0)
    except GrammarError:
        return False
    return True


def random_program(
    tunables: Mapping[str, Tunable], rng: random.Random, max_edits: int = MAX_EDITS
) -> list[dict[str, Any]]:
    """A uniformly random valid program: 1..max_edits edits on distinct tunables."""
    upper = min(max_edits, MAX_EDITS, len(tunables))
    if upper < 1:
        raise GrammarError("no tunables to edit, or max_edits < 1")
    names = rng.sample(sorted(tunables), rng.randint(1, upper))
    program: list[dict[str, Any]] = []
    for name in names:
        scales, sets = _candidate_edits(tunables[name])
        # Half the numeric edits are local steps, half jumps to a grid point.
        pool = scales if scales and (not sets or rng.random() < 0.5) else sets
        if not pool:
            raise GrammarError(f"{name} has no valid edit")  # impossible for a well-formed domain
        program.append(dict(rng.choice(pool)))
    return program
