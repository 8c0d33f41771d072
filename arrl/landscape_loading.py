"""The landscape interface of the simulator executor and of pre-training.

A landscape is `FACTORY(seed, space) -> obj` with `obj.run(knobs, budget_s) -> {"curve": [[t, loss],
...], "val_bpb": float, "status": "ok" | "crashed"}` (built-ins: `arrl.landscapes`), named
`package.module:FACTORY` or `path/to/file.py:FACTORY`. Here: loading a factory by that name, and
checking what its `run` returned, with a `LandscapeError` that says what is wrong. Light on imports,
so `arrl pretrain` and the command line load landscapes without the simulator's Redis machinery.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol


class Landscape(Protocol):
    def run(self, knobs: dict[str, Any], budget_s: float) -> Mapping[str, Any]: ...


Factory = Callable[[int, dict[str, Any]], Landscape]


class LandscapeError(ValueError):
    """A landscape cannot be loaded, or returned something outside the interface."""


def load_landscape(spec: str | Factory) -> Factory:
    """`package.module:FACTORY` or `path/to/file.py:FACTORY` (or a factory itself)."""
    if callable(spec):
        return spec
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise LandscapeError(f"landscape {spec!r} should read MODULE:FACTORY")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(f"arrl_landscape_{path.stem}", path)
            if loader is None or loader.loader is None:
                raise LandscapeError(f"cannot load {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise LandscapeError(f"cannot import landscape module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LandscapeError(f"{spec}: {attr!r} is not a callable in {module_name}")
    return factory


def landscape_error(exc: BaseException) -> LandscapeError | None:
    """The LandscapeError in `exc`, however deep in exception groups, or None."""
    if isinstance(exc, LandscapeError):
        return exc
    for inner in exc.exceptions if isinstance(exc, BaseExceptionGroup) else ():
        if (found := landscape_error(inner)) is not None:
            return found
    return None


def check_outcome(out: Any, budget_s: float) -> dict[str, Any]:
    """Validate a landscape's answer: (status, val_bpb, curve sorted by t within the budget, ...)."""
    if not isinstance(out, Mapping) or "status" not in out or "curve" not in out:
        raise LandscapeError(f"landscape.run must return a dict with curve, val_bpb and status, got {out!r:.200}")
    status = str(out["status"])
    if status not in ("ok", "crashed"):
        raise LandscapeError(f"landscape status must be 'ok' or 'crashed', got {status!r}")
    curve = sorted([float(t), float(y)] for t, y in out["curve"] if 0.0 <= float(t) <= budget_s + 1e-9)
    val = out.get("val_bpb")
    if status == "ok" and not (isinstance(val, int | float) and math.isfinite(val)):
        status, val = "crashed", None  # as the reward computer would judge it
    return {"status": status, "val_bpb": float(val) if status == "ok" else None, "curve": curve,
            "reason": str(out.get("reason") or ("" if status == "ok" else "simulated crash")),
            "true_val_bpb": out.get("true_val_bpb"),
            # A landscape may simulate workers of several hardware classes too (`arrl.scores`).
            "hardware_class": str(out["hardware_class"]) if isinstance(out.get("hardware_class"), str) else None,
            "machine_gflops": float(speed) if isinstance(speed := out.get("machine_gflops"), int | float)
            and math.isfinite(speed) and speed > 0 else None}
