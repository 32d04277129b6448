"""The method registry: every method of ``savae compare`` by name, its default settings and its phases.

A method is a list of :class:`savae_jax.driver.Phase` built from a dict of
settings; ``METHOD_DEFAULTS`` holds each method's defaults, ``method_keys``
every key it accepts, and :func:`build_phases` builds it (the plateau
experiment's annealing arms reuse these entries unchanged).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import savae_jax as sv
from savae_jax import driver
from savae_jax.validation import is_traced
from savae_jax.experiments import builders
from savae_jax.experiments.settings import ES_DEFAULTS, SA_DEFAULTS, AnnealerConfig, ESConfig, check_settings

METHODS = ("adam", "rmsprop", "sgd", "sa", "sa-refine", "sa-refine-naive", "sa-pt", "langevin-sa", "es",
           "es-refine")

# Per-method hyperparameters; --config FILE and --set METHOD.KEY=VALUE override them.
METHOD_DEFAULTS = {
    "adam": {"lr": 1e-3},
    "rmsprop": {"lr": 1e-3},
    "sgd": {"lr": 1e-2, "momentum": 0.0},
    "sa": {"proposal": "low_rank", "proposals": 64, "scale": 0.01, "t0": 0.01, "decay": 0.995},
    # Noise-aware refinement: select the best of K on the step's batch, accept it only if a paired
    # t-test on 512 other examples (fresh noise) says it is better at level 0.05.
    "sa-refine": {"adam_share": 0.5, "adam_lr": 1e-3, "proposal": "low_rank", "proposals": 64,
                  "scale": 0.001, "t0": 0.005, "decay": 0.995, "acceptance": "confident", "level": 0.05,
                  "decision_size": 512},
    # The seed's rule, for comparison: Metropolis on the batch the winner was selected on.
    "sa-refine-naive": {"adam_share": 0.5, "adam_lr": 1e-3, "proposal": "low_rank", "proposals": 64,
                        "scale": 0.001, "t0": 0.005, "decay": 0.995},
    # Replica exchange after the Adam half: 4 annealers on the ladder t0 * 2**k (each cooling on its
    # own scaled schedule) swap neighbours every step; the coldest replica's parameters are the run's.
    "sa-pt": {"adam_share": 0.5, "adam_lr": 1e-3, "proposal": "low_rank", "proposals": 16,
              "scale": 0.001, "t0": 0.005, "decay": 0.995, "replicas": 4, "ladder_ratio": 2.0},
    "langevin-sa": {"proposal": "langevin", "proposals": 16, "langevin_step": 1e-3,
                    "langevin_optimizer": "adam", "langevin_lr": 1e-3, "t0": 0.01, "decay": 0.995,
                    "decision_size": 512},
    # ES recombination of all K = 64 evaluations into one Adam move, decided on 512 other examples:
    # greedily from the random init, by the t-test after the Adam half.
    "es": {"pairs": 32, "scale": 0.01, "es_lr": 1e-3, "acceptance": "greedy", "decision_size": 512},
    "es-refine": {"adam_share": 0.5, "adam_lr": 1e-3, "pairs": 32, "scale": 0.001, "es_lr": 1e-4,
                  "acceptance": "confident", "level": 0.05, "decision_size": 512},
}
REFINEMENTS = ("sa-refine", "sa-refine-naive", "sa-pt", "es-refine")


class Dist(NamedTuple):
    """How a tuning study samples one hyperparameter (``experiments.tuning``).

    ``kind`` "log": log-uniform on [low, high]; "uniform": uniform on [low, high]; "choice": one of
    ``choices``, equally likely. Log and uniform values are floats that trials of one group share
    one compiled program for (a vmap); a choice changes the program (a shape, a table built in
    Python, a phase's length), so trials are grouped by their choices.
    """

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()


def log(low: float, high: float) -> Dist:
    return Dist("log", low, high)


def uniform(low: float, high: float) -> Dist:
    return Dist("uniform", low, high)


def choice(*choices) -> Dist:
    return Dist("choice", choices=tuple(choices))


# Each method's search space: the hyperparameters a tuning study samples (the others keep their
# defaults), with the same kind of range for the same kind of knob across methods. Learning rates,
# scales and temperatures log-uniform over two decades around the default; shares, the confident
# rule's level, decision sizes, K and the ladder's ratio are choices (they change the program).
_REFINE = {"adam_share": choice(0.25, 0.5, 0.75), "adam_lr": log(1e-4, 1e-2)}
SEARCH_SPACES = {
    "adam": {"lr": log(1e-4, 1e-2)},
    "rmsprop": {"lr": log(1e-4, 1e-2)},
    "sgd": {"lr": log(1e-3, 1e-1), "momentum": uniform(0.0, 0.99)},
    "sa": {"scale": log(1e-3, 1e-1), "t0": log(1e-3, 1e-1), "decay": uniform(0.98, 0.999)},
    "sa-refine": _REFINE | {"scale": log(1e-4, 1e-2), "t0": log(5e-4, 5e-2), "decay": uniform(0.98, 0.999),
                            "level": choice(0.01, 0.05, 0.1), "decision_size": choice(128, 256, 512)},
    "sa-refine-naive": _REFINE | {"scale": log(1e-4, 1e-2), "t0": log(5e-4, 5e-2), "decay": uniform(0.98, 0.999)},
    "sa-pt": _REFINE | {"scale": log(1e-4, 1e-2), "t0": log(5e-4, 5e-2), "decay": uniform(0.98, 0.999),
                        "ladder_ratio": choice(1.5, 2.0, 3.0)},
    "langevin-sa": {"langevin_step": log(1e-4, 1e-2), "langevin_lr": log(1e-4, 1e-2), "t0": log(1e-3, 1e-1)},
    "es": {"scale": log(1e-3, 1e-1), "es_lr": log(1e-4, 1e-2), "pairs": choice(16, 32, 64)},
    "es-refine": _REFINE | {"scale": log(1e-4, 1e-2), "es_lr": log(1e-5, 1e-3), "pairs": choice(16, 32, 64)},
}


def set_keys_help() -> str:
    """The --help epilog: the keys --set accepts for each method, with their defaults."""
    lines = ["keys of --set METHOD.KEY=VALUE (and of --config's method_config), per method, with defaults",
             "(each method has its own keys: --set adam.lr changes the adam method only; the Adam half of a",
             "refinement (sa-refine, sa-refine-naive, sa-pt, es-refine) has its own adam_lr and adam_share):"]
    for method in METHODS:
        keys = ", ".join(f"{k}={json.dumps(v)}" for k, v in method_keys(method).items())
        lines.append(f"  {method}: {keys}")
    return "\n".join(lines)


def method_keys(method: str) -> dict:
    """The settings ``--set METHOD.KEY=VALUE`` accepts for ``method``, with their defaults."""
    if method in ("adam", "rmsprop", "sgd"):
        return dict(METHOD_DEFAULTS[method])
    own = {k: v for k, v in METHOD_DEFAULTS[method].items() if k in ("adam_share", "adam_lr")}
    base = ES_DEFAULTS if method in ("es", "es-refine") else SA_DEFAULTS
    return own | base | {k: v for k, v in METHOD_DEFAULTS[method].items() if k in base}


def build_phases(method: str, settings: dict, loss_fn, mesh=None, batch_size: int = 128) -> list[driver.Phase]:
    """A method's phases from its settings (ValueError names the offending --set key)."""
    return assemble_phases(method, check_method_settings(method, settings), loss_fn, mesh, batch_size)


def check_method_settings(method: str, settings: dict) -> dict:
    """Every key of ``method`` (:func:`method_keys`) with ``settings`` applied, each known and of its kind
    (ValueError naming ``--set METHOD.KEY``)."""
    prefix = f"--set {method}."
    what = method if method in ("adam", "rmsprop", "sgd") else "ES" if method in ("es", "es-refine") else "annealing"
    checked = check_settings(settings, method_keys(method), prefix, what)
    full = method_keys(method) | checked
    if method in REFINEMENTS and not 0 < full["adam_share"] < 1:
        raise ValueError(f"{prefix}adam_share: must be in (0, 1), got {full['adam_share']}")
    return full


def first_phase_key(method: str, settings: dict):
    """What decides ``method``'s first phase when it is shared with other methods, or None.

    A refinement's Adam half depends only on its ``adam_lr`` and ``adam_share`` (and on the run's
    data, keys and budgets, the same for every method of one ``savae compare``), so refinements
    with equal values compute the same phase: ``compare`` computes it once per seed
    (``driver.run(start=...)``). Other methods have one phase: None.
    """
    if method not in REFINEMENTS:
        return None
    full = check_method_settings(method, settings)
    return ("adam", float(full["adam_lr"]), float(full["adam_share"]))


def assemble_phases(method: str, settings: dict, loss_fn, mesh=None, batch_size: int = 128) -> list[driver.Phase]:
    """A method's phases from a full, checked settings dict (:func:`check_method_settings`).

    Its floating-point values may be traced (``jax.vmap`` over trials of a
    tuning study: ``experiments.tuning``), so nothing here inspects them in Python.
    """
    prefix = f"--set {method}."
    if method in ("adam", "rmsprop", "sgd"):
        momentum = settings.get("momentum", 0.0)
        # optax.sgd without momentum keeps no trace state (momentum=None); a traced one is kept.
        extra = {"momentum": momentum} if method == "sgd" and (is_traced(momentum) or momentum) else {}
        optimizer = builders.make_optimizer(method, settings["lr"], f"{prefix}lr", **extra)
        return [driver.Phase(method, sv.from_optax(loss_fn, optimizer))]
    inner = {k: v for k, v in settings.items() if k not in ("adam_share", "adam_lr")}
    if method in ("es", "es-refine"):
        annealer = builders.make_es(loss_fn, ESConfig(**inner), prefix, batch_size=batch_size)
    else:
        annealer = builders.make_annealer(loss_fn, AnnealerConfig(**inner), prefix, mesh=mesh, batch_size=batch_size)
    if method not in REFINEMENTS:
        return [driver.Phase("es" if method == "es" else "sa", annealer)]
    adam = builders.make_optimizer("adam", settings["adam_lr"], f"{prefix}adam_lr")
    return driver.refinement(sv.from_optax(loss_fn, adam), annealer, share=settings["adam_share"],
                             names=("adam", "es" if method == "es-refine" else "sa"))
