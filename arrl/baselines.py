"""Baseline strategies the learned policy must beat: `greedy`, and Optuna's `tpe` and `cmaes`.

- `greedy` is autoresearch's loop: one random atomic edit of the incumbent per experiment; the
  pipeline's keep-if-better does the rest.
- `tpe` and `cmaes` drive an Optuna study with ask/tell. Each proposal asks a trial over the
  campaign's search space and turns the suggested values into `set` edits of the incumbent. The
  grammar allows at most 3 edits per experiment, and both samplers suggest new values for ~20 of
  train.py's 24 tunables at once, so a mapping must choose. `mapping="random"` (the default)
  takes 1 to 3 of the differing tunables at random, as the random strategy picks names, with the
  sampler's values (all of them when they fit in one program); `mapping="largest"` takes the 3 largest normalised changes (numeric changes
  measured on the domain's [0, 1] scale, in log space for log domains; a categorical flip counts
  1/3, the mean distance of two uniform points). On the built-in landscapes "largest" lost to
  random search (it keeps exactly the tunables the sampler knows least about, whose suggestions
  are widest) while "random" beat it, so the fair comparison uses "random".
  The study is told the configuration that really ran, not the one it asked for: the asked trial
  is failed and a twin trial with the evaluated values takes its place (for CMA-ES in the same
  generation), so both samplers model what was observed. Outcomes are matched from
  `Context.recent` by the trial number carried in `Choice.extra`; crashed, diverged and invalid
  runs get a bad value (the worst seen + 0.5), an aborted run its forecast, a duplicate the value
  of the run it duplicates. The incumbent (the baseline first) is added as a completed trial.
  With workers of several hardware classes, each value is told on one class's scale, less its
  class's offset (`arrl.scores.ClassOffsets`, as the ppo surrogate does), once the incumbent's
  scores on two classes show it: a sampler told raw values takes a run's class for an effect of
  its tunables. Values told before an offset is known stay as told (a trial's value is final).

Optuna is an optional extra (`pip install 'arrl[search]'`) imported on first use.
"""

from __future__ import annotations

import math
import random
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from arrl.edits import SIG_DIGITS, Tunable, random_program, same_value
from arrl.scores import ClassOffsets
from arrl.strategies import STRATEGIES, Choice, Context

CHOICE_CHANGE = 1.0 / 3.0  # normalised size of a categorical flip (see the module docstring)
BAD_MARGIN = 0.5  # a failed run is told this much worse (bpb) than the worst value seen
STALE_AFTER = 64  # proposals after which a trial with no recorded outcome is failed


class GreedyStrategy:
    """One random atomic edit of the incumbent (autoresearch's loop)."""

    name = "greedy"

    def __init__(self, seed: int, **_: Any) -> None:
        self.rng = random.Random(seed)

    async def propose(self, context: Context) -> Choice:
        return Choice(random_program(context.tunables, self.rng, max_edits=1))


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RuntimeError("the tpe and cmaes strategies need Optuna: pip install 'arrl[search]' "
                           "(or pip install optuna cmaes)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _unit(t: Tunable, x: float) -> float:
    assert t.low is not None and t.high is not None
    if t.kind == "log":
        return (math.log(x) - math.log(t.low)) / (math.log(t.high) - math.log(t.low))
    return (x - t.low) / (t.high - t.low)


def _snap(t: Tunable, x: Any) -> Any:
    """The value the grammar would write: ints rounded, floats to SIG_DIGITS digits, clipped."""
    if t.kind == "choice":
        return x
    assert t.low is not None and t.high is not None
    if t.kind == "int":
        return int(min(max(round(x), t.low), t.high))
    return float(min(max(float(f"{float(x):.{SIG_DIGITS}g}"), t.low), t.high))


def suggested_program(tunables: Mapping[str, Tunable], suggested: Mapping[str, Any], max_edits: int = 3,
                      rng: random.Random | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(set-edit program, evaluated values): the `max_edits` largest normalised changes, or with
    `rng`, 1 to `max_edits` of the changes drawn at random (the `random` mapping) when they do not
    all fit in one program."""
    changes: list[tuple[float, str, Any]] = []
    for name, t in tunables.items():
        if name not in suggested:
            continue
        new = _snap(t, suggested[name])
        if same_value(new, t.value):
            continue
        size = CHOICE_CHANGE if t.kind == "choice" else abs(_unit(t, float(new)) - _unit(t, float(t.value)))  # type: ignore[arg-type]
        changes.append((size, name, new))
    changes.sort(key=lambda c: -c[0])
    if rng is not None and len(changes) > max_edits:  # what fits in one program runs as suggested
        changes = rng.sample(changes, rng.randint(1, max_edits))
    chosen = changes[:max_edits]
    evaluated = {name: t.value for name, t in tunables.items()}
    evaluated.update({name: new for _, name, new in chosen})
    return [{"op": "set", "name": name, "value": new} for _, name, new in chosen], evaluated


class OptunaStrategy:
    """Ask/tell over an Optuna study; subclasses choose the sampler."""

    name = "optuna"

    def __init__(self, seed: int, *, mapping: str = "random", **sampler_options: Any) -> None:
        if mapping not in ("largest", "random"):
            raise ValueError(f"mapping must be 'largest' or 'random', got {mapping!r}")
        self.mapping = mapping
        self.optuna = _optuna()
        self.seed = seed
        self.rng = random.Random(seed)
        self.sampler_options = sampler_options
        self.token = f"{self.name}-{seed}-{uuid.uuid4().hex[:8]}"  # tells our trials from others'
        self.study: Any = None
        self.distributions: dict[str, Any] = {}
        self.pending: dict[int, int] = {}  # trial number -> proposal count when asked
        self.proposals = 0
        self.worst: float | None = None
        self.seeded: set[str] = set()  # experiments the study already holds (ours, added incumbents)
        self.classes = ClassOffsets()  # each hardware class's offset, taken off what the study is told

    def make_sampler(self, tunables: Mapping[str, Tunable]) -> Any:
        raise NotImplementedError

    def _distribution(self, t: Tunable) -> Any:
        d = self.optuna.distributions
        if t.kind == "choice":
            assert t.choices is not None
            return d.CategoricalDistribution(list(t.choices))
        if t.kind == "int":
            return d.IntDistribution(int(t.low), int(t.high))  # type: ignore[arg-type]
        return d.FloatDistribution(float(t.low), float(t.high), log=t.kind == "log")  # type: ignore[arg-type]

    def _start(self, tunables: Mapping[str, Tunable]) -> None:
        self.distributions = {name: self._distribution(t) for name, t in tunables.items()}
        self.study = self.optuna.create_study(direction="minimize", sampler=self.make_sampler(tunables))

    def _suggest_all(self, trial: Any) -> None:
        # Touching relative_params first makes a relative sampler (CMA-ES) record the trial in its
        # generation even though every value is fixed by enqueue_trial.
        _ = trial.relative_params
        d = self.optuna.distributions
        for name, dist in self.distributions.items():
            if isinstance(dist, d.CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            elif isinstance(dist, d.IntDistribution):
                trial.suggest_int(name, dist.low, dist.high)
            else:
                trial.suggest_float(name, dist.low, dist.high, log=dist.log)

    def _value(self, record: Mapping[str, Any]) -> float:
        """What the study is told: the outcome, the forecast of an aborted run, or a bad value."""
        status = record.get("status")
        val = record.get("val_bpb") if status in ("ok", "duplicate") else record.get("forecast_val_bpb")
        if status in ("ok", "duplicate", "aborted") and isinstance(val, int | float) and math.isfinite(val):
            val = float(val) - self.classes.of(str(record.get("hardware_class") or ""))
            self.worst = max(self.worst or val, val)
            return val
        return (self.worst if self.worst is not None else 5.0) + BAD_MARGIN

    def _tell_outcomes(self, recent: list[dict[str, Any]]) -> None:
        TrialState = self.optuna.trial.TrialState
        for record in recent:
            extra = record.get("extra") or {}
            number = extra.get("trial")
            if extra.get("optuna") != self.token or number not in self.pending:
                continue
            del self.pending[number]
            self.study.tell(number, self._value(record))
            self.seeded.add(record["experiment_id"])  # the study has it, should it become the incumbent
        for number, asked_at in list(self.pending.items()):
            if self.proposals - asked_at > STALE_AFTER:  # its record left the window unseen
                del self.pending[number]
                self.study.tell(number, state=TrialState.FAIL)

    def _learn_class_offsets(self, incumbent: Mapping[str, Any]) -> None:
        if self.classes.reference is None and incumbent.get("hardware_class"):
            # The baseline's class is the scale: the values told before any offset is known (and
            # which stay as told) are mostly its runs, the baseline's first of all.
            self.classes.reference = str(incumbent["hardware_class"])
        self.classes.learn(incumbent)

    def _seed_incumbent(self, context: Context) -> None:
        """Add the incumbent (the baseline at first) as a completed trial: free information."""
        inc = context.incumbent or {}
        # A re-run of the incumbent (`measured_by`) is one more trial at the same tunables.
        exp_id, val = inc.get("measured_by") or inc.get("experiment_id"), inc.get("val_bpb")
        if not exp_id or exp_id in self.seeded or not isinstance(val, int | float):
            return
        self.seeded.add(exp_id)
        val = float(val) - self.classes.of(str(inc.get("hardware_class") or ""))
        params = {name: t.value for name, t in context.tunables.items()}
        self.worst = max(self.worst or val, val)
        self.study.add_trial(self.optuna.trial.create_trial(params=params, distributions=self.distributions,
                                                            value=float(val)))

    async def propose(self, context: Context) -> Choice:
        if self.study is None:
            self._start(context.tunables)
        self.proposals += 1
        self._learn_class_offsets(context.incumbent or {})
        self._tell_outcomes(context.recent)
        self._seed_incumbent(context)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature and independent-sampling notices
            trial = self.study.ask(self.distributions)
            program, evaluated = suggested_program(context.tunables, trial.params,
                                                   rng=self.rng if self.mapping == "random" else None)
            if not program:  # it asked for the incumbent itself: one random edit instead
                program = random_program(context.tunables, self.rng, max_edits=1)
                evaluated = None
            if evaluated is None or any(not same_value(evaluated[n], trial.params[n]) for n in evaluated):
                # Tell the study what will really run: a twin trial with the evaluated values.
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                if evaluated is None:
                    return Choice(program, extra={"optuna": self.token, "trial": None})
                self.study.enqueue_trial(evaluated)
                trial = self.study.ask()
                self._suggest_all(trial)
        self.pending[trial.number] = self.proposals
        return Choice(program, extra={"optuna": self.token, "trial": trial.number})


class TPEStrategy(OptunaStrategy):
    """Optuna's TPE, univariate (independent per tunable), 10 random start-up trials; options go to
    `TPESampler`. Optuna 5 defaults to multivariate TPE, which lost to random search on the fitted
    landscapes where the univariate one beat it (8 seeds x 100 experiments, mapping "random")."""

    name = "tpe"

    def make_sampler(self, tunables: Mapping[str, Tunable]) -> Any:
        options = {"multivariate": False, "n_startup_trials": 10, **self.sampler_options}
        return self.optuna.samplers.TPESampler(seed=self.seed, **options)


class CMAESStrategy(OptunaStrategy):
    """Optuna's CMA-ES on the numeric tunables, started at the incumbent with sigma0 = 0.1 of each
    normalised domain (0.05, 0.1 and 0.2 were tried; Optuna's 1/6 jumps too far for edits that
    start from a good script); categorical ones go to the independent (random) sampler, as Optuna
    does. Options go to `CmaEsSampler`."""

    name = "cmaes"

    def make_sampler(self, tunables: Mapping[str, Tunable]) -> Any:
        x0 = {name: t.value for name, t in tunables.items() if t.kind != "choice"}
        options = {"x0": x0, "sigma0": 0.1, "n_startup_trials": 1, "warn_independent_sampling": False,
                   **self.sampler_options}
        samplers = self.optuna.samplers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # x0, sigma0: deprecated in Optuna 4.9+, still work
            try:
                return samplers.CmaEsSampler(seed=self.seed, **options)
            except TypeError:  # an Optuna without them: Optuna's own start (the domain's centre)
                options.pop("x0")
                options.pop("sigma0")
                return samplers.CmaEsSampler(seed=self.seed, **options)


STRATEGIES.update(greedy=GreedyStrategy, tpe=TPEStrategy, cmaes=CMAESStrategy)
