"""The experiment layer's settings: every knob's default and the one type check of settings by name.

Settings arrive as dicts (``--set METHOD.KEY=VALUE``, ``--config``'s
``method_config``, train's ``--sa-*`` flags, or a notebook) and become typed
configs (frozen dataclasses: :class:`ModelConfig`, :class:`AnnealerConfig`,
:class:`ESConfig`; the subcommands' own beside them) through one
``from_dict``, so a typo or a value of the wrong type is an error naming the
key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

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

# What a setting must be (by its annotation, or by its default in a plain dict of defaults).
_KIND_WORDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false"}
_TYPE_KINDS = {int: "int", float: "number", str: "str", bool: "bool"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of the typed configs: :meth:`from_dict` checks every name and type; :meth:`to_dict` is the JSON form.

    A config is a frozen dataclass whose fields carry their defaults and types
    (``float | None`` for an optional number). Settings from flags, a
    ``--config`` file or a notebook dict become a config through
    ``from_dict``, which refuses an unknown key or a value of the wrong type
    with an error naming the key as the user wrote it (``prefix``).
    """

    @classmethod
    def defaults(cls) -> dict:
        """Every field's default, as a new dict."""
        return cls().to_dict()

    @classmethod
    def kinds(cls) -> dict[str, tuple[str, bool]]:
        """``{field: (kind, optional)}``: "int", "number", "str", "bool" or "any" (not checked here)."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name])
            optional = type(None) in args
            base = next((a for a in args if a is not type(None)), hints[f.name]) if args else hints[f.name]
            out[f.name] = (_TYPE_KINDS.get(base, "any"), optional)
        return out

    @classmethod
    def from_dict(cls, values: dict, prefix: str = "", what: str = "config"):
        """The config of ``values`` (missing keys take their defaults); ValueError naming the key.

        Args:
          values: settings by field name.
          prefix: how errors name a key (``"--sa-"``: ``--sa-t-min``; ``"--set sa."``: ``--set sa.t_min``).
          what: the kind of settings in words, for the unknown-key error (``"annealing"``).
        """
        return cls(**check_settings(values, cls.defaults(), prefix, what, cls.kinds()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """The VAE and its training objective."""

    model: str = "mlp"                # mlp | conv
    hidden: int = 500                 # MLP hidden width / conv dense width
    latents: int = 20
    likelihood: str = "bernoulli"     # bernoulli | gaussian | logistic
    beta: float = 1.0                 # KL weight
    beta_schedule: str = "constant"   # constant | warmup | cyclical
    beta_steps: int = 10000
    beta_cycles: int = 4
    free_bits: float | None = None    # minimum KL per latent dimension (nats)


@dataclasses.dataclass(frozen=True)
class AnnealerConfig(Config):
    """The annealer's knobs (``annealing.simulated_annealing``). Temperatures are in nats (the loss's unit)."""

    proposals: int = 64               # K, proposals per step
    proposal: str = "low_rank"        # gaussian | cauchy | low_rank | langevin
    scale: float = 0.01               # per-entry noise std of gaussian/cauchy/low_rank
    rank: int = 1                     # low_rank only
    scale_by_rms: bool = False        # multiply the scale per leaf by the leaf's RMS
    schedule: str = "exponential"
    t0: float = 1.0                   # initial temperature (nats)
    decay: float = 0.995              # exponential
    t_end: float = 1e-3               # linear
    schedule_steps: int = 1000        # linear
    target_rate: float = 0.2          # adaptive
    reheat: int = 0                   # restart the schedule after this many steps without improvement; 0 = never
    acceptance: str = "metropolis"    # also threshold, greedy, penalty, confident (docs/annealing.md: the rules)
    alpha: float = 0.5                # threshold: accept iff exp(-dL / (T + d)) > alpha
    d: float = 0.0
    level: float = 0.05               # confident: the one-sided test's level (false-acceptance probability)
    margin: float = 0.0               # confident: the improvement required (nats)
    decision_size: int = 0            # decide on this many other examples with fresh noise; 0: the selection batch
    t_min: float | None = None        # stop below this temperature
    patience: int | None = None       # stop after this many steps without improvement
    langevin_step: float = 1e-3       # langevin: step size
    langevin_optimizer: str = "none"  # langevin drift: "none" (plain gradient) or an optax alias
    langevin_lr: float = 1e-3         # learning rate of that optimizer
    fraction: float = 1.0             # gaussian/cauchy: probability that an entry moves, in (0, 1]
    replicas: int = 1                 # replica exchange: R annealers on a ladder t0 * ratio**k; 1: none
    ladder_ratio: float = 2.0         # replica exchange: each replica's temperature over the last one's
    swap_every: int = 1               # replica exchange: steps between swap rounds
    polish_steps: int = 0             # local polish: steps of polish_optimizer every polish_every; 0: none
    polish_every: int = 100
    polish_optimizer: str = "lbfgs"   # lbfgs or an optax alias
    polish_lr: float = 1e-3           # its learning rate (not lbfgs)


@dataclasses.dataclass(frozen=True)
class ESConfig(Config):
    """The ES recombination step's knobs (``annealing.evolution_strategy``)."""

    pairs: int = 32                   # antithetic pairs: K = 2 x pairs evaluations a step
    scale: float = 0.01               # per-entry noise std
    noise: str = "low_rank"           # low_rank | gaussian
    rank: int = 1
    es_optimizer: str = "adam"        # the optax alias that turns the estimate into a move
    es_lr: float = 1e-3
    shaping: str = "centered_ranks"   # centered_ranks | z_scores | none
    acceptance: str = "greedy"        # any of ACCEPTANCES, decided at T = 0
    alpha: float = 0.5
    d: float = 0.0
    level: float = 0.05
    margin: float = 0.0
    decision_size: int = 512          # 0: decide on the selection batch


def as_config(cls, config, prefix: str = "", what: str = "config"):
    """``config`` if it is a ``cls`` already, else ``cls.from_dict(config, prefix, what)``."""
    return config if isinstance(config, cls) else cls.from_dict(config, prefix, what)


# The defaults as plain dicts (the keys --set and --sa-* accept, with their defaults).
MODEL_DEFAULTS = ModelConfig.defaults()
SA_DEFAULTS = AnnealerConfig.defaults()
ES_DEFAULTS = ESConfig.defaults()


def kind_of(key: str, default) -> str:
    """The kind ("int", "number", "str", "bool"; "any" for None) a setting must have, from its default."""
    if default is None:
        return "any"
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


def check_settings(config: dict, defaults: dict, prefix: str, what: str, kinds: dict | None = None) -> dict:
    """``config`` with every key known in ``defaults`` and of its kind (ValueError naming the key).

    The one check of settings by name (``--set``, ``--config``, ``--sa-*``, :meth:`Config.from_dict`):
    an unknown key (a typo such as ``lrr``) or a value of the wrong type is
    refused instead of silently ignored or used.

    Args:
      config: the settings given.
      defaults: the known settings and their defaults.
      prefix: how errors name a key (``"--set adam."``, ``"--sa-"``).
      what: the kind of settings in words (``"annealing"``, ``"adam"``).
      kinds: ``{key: (kind, optional)}`` (a config's annotations); None: read off the defaults.
    """
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"{prefix}*: unknown {what} settings {sorted(unknown)}; known: {', '.join(defaults)}")
    if kinds is None:
        kinds = {key: (kind_of(key, default), default is None) for key, default in defaults.items()}
    return {key: checked_value(flag_name(prefix, key), value, *kinds[key]) for key, value in config.items()}


def flag_name(prefix: str, key: str) -> str:
    """How an error names a setting: ``--sa-t-min`` for train's flags, ``sa.t_min`` for ``--set``."""
    return f"{prefix}{key.replace('_', '-')}" if prefix.endswith("-") else f"{prefix}{key}"

