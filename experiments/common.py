"""What the experiment scripts share: annealer hyperparameters by name, optimizer lookup.

Scripts turn flags and config files into the dicts below and call the
library; nothing here is needed from a notebook.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import optax

from savae_jax import annealing

# Every public optax callable whose first parameter is `learning_rate`
# (adam, adamw, rmsprop, sgd, lion, ...).
OPTAX_ALIASES = sorted(
    name for name, fn in vars(optax).items()
    if not name.startswith("_") and inspect.isfunction(fn)
    and list(inspect.signature(fn).parameters)[:1] == ["learning_rate"]
)

PROPOSALS = ("gaussian", "cauchy", "low_rank", "langevin")
SCHEDULES = ("exponential", "linear", "logarithmic", "fast", "adaptive", "constant")
ACCEPTANCES = ("metropolis", "threshold", "greedy")

# The annealer's knobs. Temperatures are in nats (the loss's unit).
SA_DEFAULTS: dict[str, Any] = {
    "proposals": 64,          # K, proposals per step
    "proposal": "low_rank",   # gaussian | cauchy | low_rank | langevin
    "scale": 0.01,            # per-entry noise std of gaussian/cauchy/low_rank
    "rank": 1,                # low_rank only
    "scale_by_rms": False,    # multiply the scale per leaf by the leaf's RMS
    "schedule": "exponential",
    "t0": 1.0,                # initial temperature (nats)
    "decay": 0.995,           # exponential
    "t_end": 1e-3,            # linear
    "schedule_steps": 1000,   # linear
    "target_rate": 0.2,       # adaptive
    "reheat": 0,              # restart the schedule after this many steps without improvement; 0 = never
    "acceptance": "metropolis",
    "alpha": 0.5,             # threshold: accept iff exp(-dL / (T + d)) > alpha
    "d": 0.0,
    "t_min": None,            # stop below this temperature
    "patience": None,         # stop after this many steps without improvement
    "langevin_step": 1e-3,    # langevin: step size
    "langevin_optimizer": "none",  # langevin drift: "none" (plain gradient) or an optax alias
    "langevin_lr": 1e-3,      # learning rate of that optimizer
}


def make_optimizer(name: str, lr: float, flag: str = "--optimizer") -> optax.GradientTransformation:
    """``optax.<name>(lr)``; ValueError naming ``flag`` for an unknown name or lr <= 0."""
    if name not in OPTAX_ALIASES:
        raise ValueError(
            f"{flag}: unknown optimizer {name!r}; choose an optax alias such as adam, rmsprop "
            f"or sgd (all: {', '.join(OPTAX_ALIASES)})"
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{flag}: learning rate must be a finite number > 0, got {lr!r}")
    return getattr(optax, name)(lr)


def _choice(config: dict, key: str, options, prefix: str) -> str:
    if config[key] not in options:
        raise ValueError(f"{prefix}{key}: unknown {key} {config[key]!r}; choose one of {', '.join(options)}")
    return config[key]


def make_proposal(config: dict, prefix: str = "") -> annealing.Proposal:
    """The proposal kernel named by ``config["proposal"]``."""
    name = _choice(config, "proposal", PROPOSALS, prefix)
    extra = {"scale_by_rms": config["scale_by_rms"]}
    if name == "gaussian":
        return annealing.gaussian(config["scale"], **extra)
    if name == "cauchy":
        return annealing.cauchy(config["scale"], **extra)
    if name == "low_rank":
        return annealing.low_rank(config["scale"], config["rank"], **extra)
    drift = None
    if config["langevin_optimizer"] != "none":
        drift = make_optimizer(config["langevin_optimizer"], config["langevin_lr"],
                               f"{prefix}langevin_optimizer")
    return annealing.langevin(config["langevin_step"], optimizer=drift)


def make_temperature(config: dict, prefix: str = ""):
    """The temperature schedule named by ``config["schedule"]`` (with reheating if set)."""
    name = _choice(config, "schedule", SCHEDULES, prefix)
    t0 = config["t0"]
    schedule = {
        "exponential": lambda: annealing.exponential(t0, config["decay"]),
        "linear": lambda: annealing.linear(t0, config["t_end"], config["schedule_steps"]),
        "logarithmic": lambda: annealing.logarithmic(t0),
        "fast": lambda: annealing.fast(t0),
        "adaptive": lambda: annealing.adaptive(t0, config["target_rate"]),
        "constant": lambda: annealing.constant(t0),
    }[name]()
    if config["reheat"]:
        schedule = annealing.reheat(schedule, config["reheat"])
    return schedule


def make_acceptance(config: dict, prefix: str = ""):
    """The acceptance rule named by ``config["acceptance"]``."""
    name = _choice(config, "acceptance", ACCEPTANCES, prefix)
    if name == "threshold":
        return annealing.threshold(config["alpha"], config["d"])
    return annealing.metropolis() if name == "metropolis" else annealing.greedy()


def make_annealer(loss_fn, config: dict, prefix: str = "") -> annealing.SimulatedAnnealing:
    """``annealing.simulated_annealing`` from a dict of ``SA_DEFAULTS`` keys.

    Args:
      loss_fn: the shared loss.
      config: hyperparameters; missing keys take ``SA_DEFAULTS``.
      prefix: how errors name a key (e.g. "--sa-" or "sa.").
    """
    unknown = set(config) - set(SA_DEFAULTS)
    if unknown:
        raise ValueError(f"{prefix}: unknown annealing settings {sorted(unknown)}; "
                         f"known: {', '.join(SA_DEFAULTS)}")
    config = SA_DEFAULTS | config
    try:
        return annealing.simulated_annealing(
            loss_fn,
            num_proposals=config["proposals"],
            proposal=make_proposal(config, prefix),
            temperature=make_temperature(config, prefix),
            acceptance=make_acceptance(config, prefix),
            t_min=config["t_min"],
            patience=config["patience"],
        )
    except (TypeError, ValueError) as err:
        if str(err).startswith(prefix):
            raise
        # The library names its own argument (num_proposals, t0, ...); say which settings too.
        raise ValueError(f"{prefix}* annealing settings: {err}") from err


def annealing_cost(config: dict) -> int:
    """Evaluations per annealing step: K proposals + the incumbent (+ a gradient for langevin)."""
    from savae_jax.runner import GRAD_COST

    config = SA_DEFAULTS | config
    return config["proposals"] + 1 + (GRAD_COST if config["proposal"] == "langevin" else 0)
