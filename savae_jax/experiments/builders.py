"""Builders: the model, loss, Optax optimizer and annealer (proposal, schedule, rule, decision batch) from settings.

Every builder takes a typed config of :mod:`savae_jax.experiments.settings`
(the top-level ones also a dict of its keys) and a ``prefix`` saying how errors name a key (``"--sa-"`` for train's
flags, ``"--set sa."`` for compare's), so a notebook and every subcommand
build the same objects with the same checks.
"""

from __future__ import annotations

import math

import optax

import savae_jax as sv
from savae_jax import annealing, validation
from savae_jax.experiments.settings import (ACCEPTANCES, BETA_SCHEDULES, MODELS, OPTAX_ALIASES, PROPOSALS,
                                            SCHEDULES, AnnealerConfig, ESConfig, ModelConfig, as_config, flag_name)


def make_model(config: ModelConfig | dict):
    """The VAE named by ``config.model`` (ValueError names the flag).

    The library checks the fields; its message ("hidden must be an integer
    >= 1, got 0") is reworded to name the flag ("--hidden: must be ...").
    """
    config = as_config(ModelConfig, config, "--", "model")
    if config.model not in MODELS:
        raise ValueError(f"--model: unknown model {config.model!r}; choose one of {', '.join(MODELS)}")
    cls = sv.ConvVAE if config.model == "conv" else sv.MLPVAE
    try:
        return cls(hidden=config.hidden, latents=config.latents, likelihood=config.likelihood)
    except ValueError as err:
        name, _, reason = str(err).partition(" ")
        if name not in ("hidden", "latents", "likelihood"):
            raise
        raise ValueError(f"--{name}: {reason}") from err


def make_training_loss(model, config: ModelConfig | dict):
    """The training objective: make_loss with the beta schedule and free bits of ``config``."""
    config = as_config(ModelConfig, config, "--", "model")
    beta, kind = config.beta, config.beta_schedule
    if not (isinstance(beta, (int, float)) and beta >= 0):
        raise ValueError(f"--beta: must be >= 0, got {beta!r}")
    if config.free_bits is not None and not config.free_bits >= 0:
        raise ValueError(f"--free-bits: must be >= 0, got {config.free_bits!r}")
    try:
        if kind == "warmup":
            beta = sv.beta.linear_warmup(beta, config.beta_steps)
        elif kind == "cyclical":
            beta = sv.beta.cyclical(beta, config.beta_steps, config.beta_cycles)
        elif kind != "constant":
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        return sv.make_loss(model, beta=beta, free_bits=config.free_bits)
    except ValueError as err:
        raise ValueError(f"--beta-schedule {kind}: {err}") from err


def _number_in(value, ok) -> bool:
    """Whether ``value`` is a finite real scalar with ``ok(value)``; a traced one (a vmapped sweep) passes."""
    if validation.is_traced(value):
        return True
    if isinstance(value, (bool, str, bytes)) or getattr(value, "ndim", 0) != 0:
        return False
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and ok(v)


def make_optimizer(name: str, lr: float, flag: str = "--optimizer", **kwargs) -> optax.GradientTransformation:
    """``optax.<name>(lr, **kwargs)``; ValueError naming ``flag`` for an unknown name or lr <= 0.

    ``lr`` may be traced (a vmapped sweep of trials): it is then not checked here."""
    if name not in OPTAX_ALIASES:
        raise ValueError(
            f"{flag}: unknown optimizer {name!r}; choose an optax alias such as adam, rmsprop "
            f"or sgd (all: {', '.join(OPTAX_ALIASES)})"
        )
    if not _number_in(lr, lambda v: v > 0):
        raise ValueError(f"{flag}: learning rate must be a finite number > 0, got {lr!r}")
    momentum = kwargs.get("momentum")
    if momentum is not None and not _number_in(momentum, lambda v: 0 <= v < 1):
        raise ValueError(f"{flag.rsplit('.', 1)[0]}.momentum: must be in [0, 1), got {momentum!r}")
    return getattr(optax, name)(lr, **kwargs)


def _choice(config, key: str, options, prefix: str) -> str:
    value = getattr(config, key)
    if value not in options:
        raise ValueError(f"{prefix}{key}: unknown {key} {value!r}; choose one of {', '.join(options)}")
    return value


def make_proposal(config: AnnealerConfig, prefix: str = "") -> annealing.Proposal:
    """The proposal kernel named by ``config.proposal``."""
    name = _choice(config, "proposal", PROPOSALS, prefix)
    extra = {"scale_by_rms": config.scale_by_rms}
    if config.fraction != 1.0 and name not in ("gaussian", "cauchy"):
        raise ValueError(f"{prefix}fraction: moves a fraction of the entries of gaussian and cauchy proposals "
                         f"only, not {name}; leave it at 1")
    if name == "gaussian":
        return annealing.gaussian(config.scale, fraction=config.fraction, **extra)
    if name == "cauchy":
        return annealing.cauchy(config.scale, fraction=config.fraction, **extra)
    if name == "low_rank":
        return annealing.low_rank(config.scale, config.rank, **extra)
    drift = None
    if config.langevin_optimizer != "none":
        drift = make_optimizer(config.langevin_optimizer, config.langevin_lr, f"{prefix}langevin_optimizer")
    return annealing.langevin(config.langevin_step, optimizer=drift)


def make_temperature(config: AnnealerConfig, prefix: str = ""):
    """The temperature schedule named by ``config.schedule`` (with reheating if set)."""
    name = _choice(config, "schedule", SCHEDULES, prefix)
    t0 = config.t0
    schedule = {
        "exponential": lambda: annealing.exponential(t0, config.decay),
        "linear": lambda: annealing.linear(t0, config.t_end, config.schedule_steps),
        "logarithmic": lambda: annealing.logarithmic(t0),
        "fast": lambda: annealing.fast(t0),
        "adaptive": lambda: annealing.adaptive(t0, config.target_rate),
        "constant": lambda: annealing.constant(t0),
    }[name]()
    if config.reheat:
        schedule = annealing.reheat(schedule, config.reheat)
    return schedule


def make_acceptance(config: AnnealerConfig | ESConfig, prefix: str = ""):
    """The acceptance rule named by ``config.acceptance``."""
    name = _choice(config, "acceptance", ACCEPTANCES, prefix)
    if name == "threshold":
        return annealing.threshold(config.alpha, config.d)
    if name == "confident":
        level = config.level
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 0.5:
            # the library calls it alpha, like the threshold rule's own alpha: name the setting
            raise ValueError(f"{prefix}level: the confident rule's level must be in (0, 0.5), got {level!r}")
        return annealing.confident(level, config.margin)
    return {"metropolis": annealing.metropolis, "greedy": annealing.greedy, "penalty": annealing.penalty}[name]()


def _naming_settings(prefix: str, what: str, build):
    """``build()``; a library error that does not name the setting yet is reworded to say which settings."""
    try:
        return build()
    except (TypeError, ValueError) as err:
        if str(err).startswith(prefix):
            raise
        # The library names its own argument (num_proposals, t0, ...); say which settings too.
        raise ValueError(f"{prefix}* {what} settings: {err}") from err


def make_decision(config: AnnealerConfig | ESConfig, batch_size: int | None, prefix: str = ""):
    """The decision batch of ``config.decision_size`` examples (None when 0: the selection batch decides)."""
    size = config.decision_size
    flag = flag_name(prefix, "decision_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size == 1:
        raise ValueError(f"{flag}: must be 0 (decide on the selection batch) or an integer >= 2, "
                         f"got {size!r}")
    if size == 0:
        return None
    if batch_size is None:
        raise ValueError(f"{flag}: needs the run's batch size (the selection batch)")
    return annealing.decision_batch(batch_size, size)


def make_annealer(loss_fn, config: AnnealerConfig | dict, prefix: str = "", mesh=None,
                  batch_size: int | None = None) -> sv.Optimizer:
    """``annealing.simulated_annealing`` from an :class:`AnnealerConfig` (or a dict of its keys).

    Args:
      loss_fn: the shared loss.
      config: hyperparameters; a dict's missing keys take the defaults.
      prefix: how errors name a key (e.g. "--sa-" or "sa.").
      mesh: the mesh to shard the proposals over (--devices), or None.
      batch_size: the run's batch size, the selection batch of a decision
        batch (``decision_size`` > 0).
    """
    config = as_config(AnnealerConfig, config, prefix, "annealing")
    t0, t_min = config.t0, config.t_min
    if t_min is not None and isinstance(t0, (int, float)) and isinstance(t_min, (int, float)) and t_min >= t0:
        # Every schedule here starts at t0: the annealer would be done before its first step.
        raise ValueError(f"{flag_name(prefix, 't_min')}: must be < {prefix}t0 = {t0} (every schedule starts at t0, "
                         f"so the annealer would stop before its first step), got {t_min}")
    proposal, acceptance = make_proposal(config, prefix), make_acceptance(config, prefix)
    decision, schedule = make_decision(config, batch_size, prefix), make_temperature(config, prefix)

    def single(temperature, mesh=mesh):
        sa = annealing.simulated_annealing(loss_fn, num_proposals=config.proposals, proposal=proposal,
                                           temperature=temperature, acceptance=acceptance, t_min=config.t_min,
                                           patience=config.patience, mesh=mesh, decision=decision)
        return _polished(sa, loss_fn, config, prefix)

    if config.replicas == 1:
        return _naming_settings(prefix, "annealing", lambda: single(schedule))
    return _naming_settings(prefix, "annealing", lambda: _replicas(single, schedule, loss_fn, config, prefix, mesh))


def _polished(optimizer, loss_fn, config: AnnealerConfig, prefix: str):
    """``optimizer`` with a local polish every ``polish_every`` steps when ``polish_steps`` > 0."""
    if config.polish_steps == 0:
        return optimizer
    if config.polish_optimizer == "lbfgs":
        local = optax.lbfgs()
    else:
        local = make_optimizer(config.polish_optimizer, config.polish_lr, f"{prefix}polish_optimizer")
    return annealing.local_polish(optimizer, loss_fn, local, config.polish_steps, config.polish_every)


def _replicas(single, schedule, loss_fn, config: AnnealerConfig, prefix: str, mesh):
    """Replica exchange of ``single`` annealers: replica k cools on ``schedule`` scaled by ratio**k."""
    if config.schedule == "adaptive" or config.reheat:
        raise ValueError(f"{prefix}replicas: replica exchange scales each replica's schedule by its rung of the "
                         "ladder, which a stateful schedule (adaptive, reheat) cannot be; use another schedule")
    if isinstance(config.replicas, bool) or not isinstance(config.replicas, int) or config.replicas < 2:
        raise ValueError(f"{prefix}replicas: must be 1 (one annealer) or an integer >= 2, got {config.replicas!r}")
    ladder = annealing.geometric_ladder(1.0, config.ladder_ratio, config.replicas)  # rung multipliers

    def build(rung):  # the mesh, if any, shards the replicas, not each one's proposals
        return single(lambda count: rung * schedule(count), mesh=None)

    if mesh is not None and config.replicas % mesh.devices.size:
        mesh = None  # replicas that do not split evenly over the devices: the driver runs them data parallel
    return annealing.replica_exchange(build, ladder, loss_fn, swap_every=config.swap_every, mesh=mesh)


def make_es(loss_fn, config: ESConfig | dict, prefix: str = "", batch_size: int | None = None) -> sv.Optimizer:
    """``annealing.evolution_strategy`` from an :class:`ESConfig` (or a dict of its keys; ValueError names the key)."""
    config = as_config(ESConfig, config, prefix, "ES")
    return _naming_settings(prefix, "ES", lambda: annealing.evolution_strategy(
        loss_fn, config.pairs, config.scale, noise=config.noise, rank=config.rank,
        optimizer=make_optimizer(config.es_optimizer, config.es_lr, f"{prefix}es_optimizer"),
        shaping=config.shaping, acceptance=make_acceptance(config, prefix),
        decision=make_decision(config, batch_size, prefix)))


def probe_step(algorithm, params, image_shape, batch_size: int) -> None:
    """Trace one training step abstractly (``jax.eval_shape``: no FLOPs, nothing written).

    Errors that only a trace can find (a low-rank proposal's rank larger
    than a layer, a loss that is not a float scalar) then surface while the
    scripts still refuse bad flags, before any file is written.
    """
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((algorithm.examples_per_step or batch_size, *image_shape), jnp.float32)
    jax.eval_shape(algorithm.step, jax.random.key(0), algorithm.init(params), x)

