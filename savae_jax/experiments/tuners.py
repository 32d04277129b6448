"""Tuners behind one study: which trials of a method's search space to run next.

Every tuner gives a method the same number N of trials, asked for in rounds
of trials the study runs at once (a round's trials that share their choices
run as one vmap: ``tuning.run_group``), and is told the round's validation
scores before it proposes the next round:

- ``random`` (:class:`RandomTuner`): N points of a scrambled Sobol sequence,
  all in one round (``tuning.sample_trials``). Nothing learnt; the baseline.
- ``optuna`` (:class:`OptunaTuner`): Optuna's TPE sampler through its
  ask/tell interface, a round of P trials asked at once (``constant_liar``, so
  a round's trials spread out); the first round is TPE's random start-up.
- ``anneal`` (:class:`AnnealTuner`): the project's own annealing step applied
  to hyperparameters. Round 0 is the first P Sobol points; each later round
  proposes P trials around the incumbent (a Gaussian step in the unit cube of
  the floats, log ranges in log, reflected at the faces, shrinking each round;
  each choice redrawn with probability 1 / dims). The round's best on the
  first half of the validation examples (selection) challenges the incumbent,
  and the library's noise-aware ``acceptance.penalty`` rule decides on the
  paired per-example differences over the other half (an independent decision
  set, so the best-of-P selection does not bias the decision), at a
  temperature that halves each round.

The study's best trial is chosen the same way whatever the tuner: the lowest
validation score of the N trials.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from savae_jax.annealing import acceptance

TUNERS = ("random", "optuna", "anneal")
DEFAULT_ROUND_SIZE = 4


def from_unit(d, u: float):
    """The value of ``d`` (a ``registry.Dist``) at ``u`` in [0, 1]: log ranges in log, choices equally often."""
    if d.kind == "log":
        return float(math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low))))
    if d.kind == "uniform":
        return float(d.low + u * (d.high - d.low))
    return d.choices[min(int(u * len(d.choices)), len(d.choices) - 1)]


def to_unit(d, value) -> float:
    """The inverse of :func:`from_unit` for a float range."""
    if d.kind == "log":
        return (math.log(value) - math.log(d.low)) / (math.log(d.high) - math.log(d.low))
    return (value - d.low) / (d.high - d.low)


def reflect(u: float) -> float:
    """``u`` folded back into [0, 1] at the faces (a symmetric move stays symmetric)."""
    u = abs(u) % 2.0
    return 2.0 - u if u > 1.0 else u


class RandomTuner:
    """N Sobol trials in one round (``tuning.sample_trials``); told nothing."""

    needs_per_example = False

    def __init__(self, space: dict, num: int, seed: int, round_size: int | None = None):
        from savae_jax.experiments.tuning import sample_trials

        self.trials, self.asked = sample_trials(space, num, seed), 0
        self.round_size = num

    def ask(self, num: int) -> list[dict]:
        out = self.trials[self.asked:self.asked + num]
        self.asked += num
        return out

    def tell(self, trials, scores, per_example=None) -> None:
        pass


class OptunaTuner:
    """Optuna's TPE sampler (ask/tell), seeded: the same results give the same trials."""

    needs_per_example = False

    def __init__(self, space: dict, num: int, seed: int, round_size: int = DEFAULT_ROUND_SIZE):
        try:
            import optuna
        except ImportError:
            raise ValueError("--tuner optuna needs Optuna: pip install optuna (or the package's [tune] extra)") from None
        import warnings

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # constant_liar is marked experimental (Optuna 4)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=round_size, constant_liar=True)
        self.study, self.space, self.pending = optuna.create_study(sampler=sampler), space, []
        self.round_size = round_size

    def _suggest(self, trial, name):
        d = self.space[name]
        if d.kind == "choice":
            return trial.suggest_categorical(name, list(d.choices))
        return float(trial.suggest_float(name, d.low, d.high, log=d.kind == "log"))

    def ask(self, num: int) -> list[dict]:
        self.pending = [self.study.ask() for _ in range(num)]
        return [{name: self._suggest(t, name) for name in sorted(self.space)} for t in self.pending]

    def tell(self, trials, scores, per_example=None) -> None:
        for trial, score in zip(self.pending, scores, strict=True):
            self.study.tell(trial, float(score))
        self.pending = []


class AnnealTuner:
    """Rounds of P trials around an incumbent, which the round's best replaces by the penalty rule.

    Args:
      space: ``{name: registry.Dist}``.
      num: trials in all (N).
      seed: the proposals' and decisions' seed.
      round_size: trials per round (P).
      step: the Gaussian step's sd in the unit cube at round 1; times ``shrink`` each round.
      temperature: the penalty rule's temperature (nats) at round 1; times ``cooling`` each round.
    """

    needs_per_example = True

    def __init__(self, space: dict, num: int, seed: int, round_size: int = DEFAULT_ROUND_SIZE, *,
                 step: float = 0.25, shrink: float = 0.7, temperature: float = 0.2, cooling: float = 0.5):
        from savae_jax.experiments.tuning import sample_trials

        self.space, self.names = space, sorted(space)
        self.first = sample_trials(space, round_size, seed)
        self.rng = np.random.default_rng(seed)
        self.key = jax.random.key(seed)
        self.step, self.shrink, self.temperature, self.cooling = step, shrink, temperature, cooling
        self.round_size, self.round = round_size, 0
        self.incumbent = None       # (trial, per-example validation losses)
        self.decisions: list[dict] = []  # one per round after the first: what was decided and why
        self.rule = acceptance.penalty()

    def ask(self, num: int) -> list[dict]:
        if self.incumbent is None:
            return self.first[:num]
        centre, _ = self.incumbent
        sd = self.step * self.shrink ** (self.round - 1)
        out = []
        for _ in range(num):
            trial = {}
            for name in self.names:
                d = self.space[name]
                if d.kind == "choice":
                    redraw = self.rng.random() < 1.0 / len(self.names)
                    trial[name] = d.choices[self.rng.integers(len(d.choices))] if redraw else centre[name]
                else:
                    trial[name] = from_unit(d, reflect(to_unit(d, centre[name]) + sd * self.rng.standard_normal()))
            out.append(trial)
        return out

    def tell(self, trials, scores, per_example) -> None:
        per_example = np.asarray(per_example, np.float64)
        half = per_example.shape[1] // 2
        best = int(np.argmin(per_example[:, :half].mean(axis=1)))  # selected on the first half
        if self.incumbent is None:
            self.incumbent = (trials[best], per_example[best])
        else:
            diffs = per_example[best, half:] - self.incumbent[1][half:]  # decided on the other half
            num = diffs.size
            delta, stderr = float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(num))
            temperature = self.temperature * self.cooling ** (self.round - 1)
            accepted = bool(self.rule(jax.random.fold_in(self.key, self.round), np.float32(delta),
                                      np.float32(temperature), stderr=np.float32(stderr), num=num))
            self.decisions.append({"round": self.round, "delta": delta, "stderr": stderr,
                                   "temperature": temperature, "accepted": accepted})
            if accepted:
                self.incumbent = (trials[best], per_example[best])
        self.round += 1


def make_tuner(name: str, space: dict, num: int, seed: int, round_size: int | None):
    """The tuner ``name`` for a method's ``space`` (ValueError naming --tuner for an unknown one)."""
    if name not in TUNERS:
        raise ValueError(f"--tuner: unknown tuner {name!r}; choose from {', '.join(TUNERS)}")
    cls = {"random": RandomTuner, "optuna": OptunaTuner, "anneal": AnnealTuner}[name]
    return cls(space, num, seed, round_size or DEFAULT_ROUND_SIZE)
