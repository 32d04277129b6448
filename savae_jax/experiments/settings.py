"""The experiment layer's settings: every knob's default and the one type check of settings by name.

Method settings arrive as dicts (``--set METHOD.KEY=VALUE``, ``--config``'s
``method_config``, train's ``--sa-*`` flags, or a notebook); each key is
checked against the defaults here, so a typo or a value of the wrong type is
an error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import inspect
from typing import Any

import optax

# Every public optax callable whose first parameter is `learning_rate`
# (adam, adamw, rmsprop, sgd, lion, ...).
OPTAX_ALIASES = sorted(
    name for name, fn in vars(optax).items()
    if not name.startswith("_") and inspect.isfunction(fn)
    and list(inspect.signature(fn).parameters)[:1] == ["learning_rate"]
)

MODELS = ("mlp", "conv")
BETA_SCHEDULES = ("constant", "warmup", "cyclical")
PROPOSALS = ("gaussian", "cauchy", "low_rank", "langevin")
SCHEDULES = ("exponential", "linear", "logarithmic", "fast", "adaptive", "constant")
ACCEPTANCES = ("metropolis", "threshold", "greedy", "penalty", "confident")

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
    "acceptance": "metropolis",  # also threshold, greedy, penalty, confident (README: the rules)
    "alpha": 0.5,             # threshold: accept iff exp(-dL / (T + d)) > alpha
    "d": 0.0,
    "level": 0.05,            # confident: the one-sided test's level (false-acceptance probability)
    "margin": 0.0,            # confident: the improvement required (nats)
    "decision_size": 0,       # decide on this many other examples with fresh noise; 0: on the selection batch
    "t_min": None,            # stop below this temperature
    "patience": None,         # stop after this many steps without improvement
    "langevin_step": 1e-3,    # langevin: step size
    "langevin_optimizer": "none",  # langevin drift: "none" (plain gradient) or an optax alias
    "langevin_lr": 1e-3,      # learning rate of that optimizer
}


# What a setting must be, by the type of its default (None defaults are listed in NONE_KINDS).
_KIND_WORDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false"}
# The kinds of settings whose default is None (so their type cannot be read off the default).
NONE_KINDS = {"t_min": "number", "patience": "int", "free_bits": "number", "data_dir": "str",
              "budget_seconds": "number", "checkpoint_every": "int"}



MODEL_DEFAULTS = {"model": "mlp", "hidden": 500, "latents": 20, "likelihood": "bernoulli", "beta": 1.0,
                  "beta_schedule": "constant", "beta_steps": 10000, "beta_cycles": 4, "free_bits": None}


# The ES recombination step's knobs (annealing.evolution_strategy).
ES_DEFAULTS: dict[str, Any] = {
    "pairs": 32,                  # antithetic pairs: K = 2 x pairs evaluations a step
    "scale": 0.01,                # per-entry noise std
    "noise": "low_rank",          # low_rank | gaussian
    "rank": 1,
    "es_optimizer": "adam",       # the optax alias that turns the estimate into a move
    "es_lr": 1e-3,
    "shaping": "centered_ranks",  # centered_ranks | z_scores | none
    "acceptance": "greedy",       # any of ACCEPTANCES, decided at T = 0
    "alpha": 0.5,
    "d": 0.0,
    "level": 0.05,
    "margin": 0.0,
    "decision_size": 512,         # 0: decide on the selection batch
}


def kind_of(key: str, default) -> str:
    """The kind ("int", "number", "str", "bool") a setting must have, from its default."""
    if default is None:
        return NONE_KINDS.get(key, "any")
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "str"
    return "any"


def checked_value(flag: str, value, kind: str, optional: bool = False):
    """``value`` if it is of ``kind`` (an integral float becomes an int); ValueError naming ``flag`` otherwise.

    Booleans are never numbers (``true`` would train with 1.0), strings never
    numbers (``'.05'``), and a non-integral float never an integer.
    """
    if value is None and optional or kind == "any":
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool)}[kind]
    if not ok:
        alternative = " or null" if optional else ""
        raise ValueError(f"{flag}: must be {_KIND_WORDS[kind]}{alternative}, got {value!r}")
    return value


def check_settings(config: dict, defaults: dict, prefix: str, what: str) -> dict:
    """``config`` with every key known in ``defaults`` and of its default's kind (ValueError naming the key).

    The one check of method settings (``--set``, ``--config``, ``--sa-*``):
    an unknown key (a typo such as ``lrr``) or a value of the wrong type is
    refused instead of silently ignored or used.

    Args:
      config: the settings given.
      defaults: the known settings and their defaults.
      prefix: how errors name a key (``"--set adam."``, ``"--sa-"``).
      what: the kind of settings in words (``"annealing"``, ``"adam"``).
    """
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"{prefix}*: unknown {what} settings {sorted(unknown)}; known: {', '.join(defaults)}")
    return {key: checked_value(flag_name(prefix, key), value, kind_of(key, defaults[key]),
                               optional=defaults[key] is None)
            for key, value in config.items()}


def flag_name(prefix: str, key: str) -> str:
    """How an error names a setting: ``--sa-t-min`` for train.py's flags, ``sa.t_min`` for ``--set``."""
    return f"{prefix}{key.replace('_', '-')}" if prefix.endswith("-") else f"{prefix}{key}"

