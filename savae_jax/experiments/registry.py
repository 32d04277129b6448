"""The method registry: every method of ``savae compare`` by name, its default settings and its phases.

A method is a list of :class:`savae_jax.driver.Phase` built from a dict of
settings; ``METHOD_DEFAULTS`` holds each method's defaults, ``method_keys``
every key it accepts, and :func:`build_phases` builds it (the plateau
experiment's annealing arms reuse these entries unchanged).
"""

from __future__ import annotations

import json

import savae_jax as sv
from savae_jax import driver
from savae_jax.experiments import builders
from savae_jax.experiments.settings import ES_DEFAULTS, SA_DEFAULTS, check_settings

METHODS = ("adam", "rmsprop", "sgd", "sa", "sa-refine", "sa-refine-naive", "sa-pt", "langevin-sa", "es",
           "es-refine")

# Per-method hyperparameters; --config FILE and --set METHOD.KEY=VALUE override them.
METHOD_DEFAULTS = {
    "adam": {"lr": 1e-3},
    "rmsprop": {"lr": 1e-3},
    "sgd": {"lr": 1e-2},
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
    prefix = f"--set {method}."
    if method in ("adam", "rmsprop", "sgd"):
        settings = check_settings(settings, METHOD_DEFAULTS[method], prefix, method)
        optimizer = builders.make_optimizer(method, settings["lr"], f"{prefix}lr")
        return [driver.Phase(method, sv.from_optax(loss_fn, optimizer))]
    sa_settings = {k: v for k, v in settings.items() if k not in ("adam_share", "adam_lr")}
    if method in ("es", "es-refine"):
        annealer = builders.make_es(loss_fn, sa_settings, prefix, batch_size=batch_size)
    else:
        annealer = builders.make_annealer(loss_fn, sa_settings, prefix, mesh=mesh, batch_size=batch_size)
    if method not in REFINEMENTS:
        return [driver.Phase("es" if method == "es" else "sa", annealer)]
    own = {k: v for k, v in METHOD_DEFAULTS[method].items() if k in ("adam_share", "adam_lr")}
    settings = settings | check_settings(
        {k: v for k, v in settings.items() if k in own}, own, prefix, method)
    share = settings["adam_share"]
    if not 0 < share < 1:
        raise ValueError(f"{prefix}adam_share: must be in (0, 1), got {share}")
    adam = builders.make_optimizer("adam", settings["adam_lr"], f"{prefix}adam_lr")
    return driver.refinement(sv.from_optax(loss_fn, adam), annealer, share=share,
                             names=("adam", "es" if method == "es-refine" else "sa"))

