"""What the experiment scripts share: annealer hyperparameters by name, optimizer lookup.

Scripts turn flags and config files into the dicts below and call the
library; nothing here is needed from a notebook.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

import optax

import savae_jax as sv
from savae_jax import annealing, distributed

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default (unless its help already says it or it has none); epilog kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)"


def show_defaults(parser, defaults: dict) -> None:
    """Append "(default X)" to the help of the flags whose default lives in ``defaults`` (argparse's is None)."""
    for action in parser._actions:
        value = defaults.get(action.dest)
        if action.default is None and value is not None and "default" not in (action.help or ""):
            action.help = f"{action.help} (default {value})" if action.help else f"default {value}"


def parse_args(parser, argv):
    """Parse ``argv`` and set up --distributed / --devices before any other JAX call.

    Returns ``(args, mesh)``; a bad distributed setting is a usage error (exit 2).
    """
    args = parser.parse_args(argv)
    try:
        return args, mesh_from_args(args)
    except ValueError as err:
        parser.error(str(err))


def backend_line() -> str:
    """One line saying where JAX runs: the backend, how many devices of which kind, the processes.

    On CPU it also says how to get an accelerator, so a GPU machine that
    silently runs on CPU (jaxlib without CUDA) is noticed at the first line.
    """
    import jax

    devices = jax.devices()
    line = (f"JAX {jax.__version__} backend {jax.default_backend()}: {len(devices)} device(s), "
            f"{devices[0].device_kind}")
    if jax.process_count() > 1:
        line += f", {jax.process_count()} processes ({jax.local_device_count()} local devices)"
    if jax.default_backend() == "cpu":
        line += " (no accelerator in use; on a GPU machine: pip install -e \".[cuda12]\")"
    return line


def write_csv(path, rows: list[dict]) -> None:
    """Write ``rows`` (history or trace rows) as CSV, atomically; the columns are every key in order of first use."""
    import csv
    import io

    from savae_jax import checkpoint

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(path, buf.getvalue())


def make_log():
    """``log(line)``: print (flushed) in process 0, nothing in the others (--distributed)."""
    if distributed.is_primary():
        return lambda line: print(line, flush=True)
    return lambda line: None


def check_same_workdir(workdir) -> None:
    """Across processes (--distributed), refuse a --workdir that differs between processes.

    Process 0 writes the files and Orbax's checkpoints synchronise every
    process on one folder: separate folders would hang in the first save.
    """
    import zlib

    path = str(Path(workdir).absolute())
    if not distributed.same_everywhere(zlib.crc32(path.encode())):
        raise ValueError(f"--workdir: every process of a --distributed run must pass the same folder "
                         f"(one all processes see); this process has {path}, another has a different one")


def add_scale_out_flags(parser) -> None:
    """Add the scale-out flags of the experiment scripts to an argparse parser.

    --distributed, --coordinator, --num-processes, --process-id (see
    ``distributed.initialize_distributed``) and --devices (the mesh; see ``mesh_from_args``).
    """
    group = parser.add_argument_group("scale-out (docs/distributed.md)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (multi-process/multi-host) "
                            "and run on a mesh of every process's devices")
    group.add_argument("--coordinator", default=None,
                       help="with --distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS "
                            "or auto-detected)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="with --distributed: number of processes (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="with --distributed: this process's index (default: $JAX_PROCESS_ID)")
    group.add_argument("--devices", default=None,
                       help="shard over a mesh of this many devices, or 'all' (default: one device; "
                            "with --distributed: all devices of all processes)")


def mesh_from_args(args):
    """Initialise ``jax.distributed`` if ``args.distributed``, then the mesh ``--devices`` asks for.

    Call it before any other JAX call of the script. Returns None (one
    device, the default code path) unless --devices or --distributed is given.
    """
    for flag in ("coordinator", "num_processes", "process_id"):
        if getattr(args, flag) is not None and not args.distributed:
            raise ValueError(f"--{flag.replace('_', '-')} needs --distributed")
    if args.distributed:
        try:
            distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except ValueError as err:
            raise ValueError(f"--distributed: {err}") from err
    devices = args.devices
    if devices is None and not args.distributed:
        return None
    if devices is None or devices == "all":
        return distributed.make_mesh()
    try:
        count = int(devices)
    except ValueError:
        raise ValueError(f"--devices: must be a number or 'all', got {devices!r}") from None
    try:
        return distributed.make_mesh(count)
    except ValueError as err:
        raise ValueError(f"--devices: {err}") from err


def add_model_flags(parser) -> None:
    """--model, --hidden, --latents, --likelihood and the beta/free-bits flags."""
    group = parser.add_argument_group("model and objective")
    group.add_argument("--model", choices=MODELS, default=None, help="mlp (default) or conv")
    group.add_argument("--hidden", type=int, default=None, help="MLP hidden width / conv dense width")
    group.add_argument("--latents", type=int, default=None, help="latent dimensions")
    group.add_argument("--likelihood", choices=sv.models.LIKELIHOODS, default=None,
                       help="bernoulli (default; binarised data), gaussian, logistic (8-bit data, bits/dim)")
    group.add_argument("--beta", type=float, default=None, help="KL weight (default 1)")
    group.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=None,
                       help="constant (default), warmup (0 -> beta over --beta-steps), cyclical")
    group.add_argument("--beta-steps", type=int, default=None, help="warm-up length or cyclical total steps")
    group.add_argument("--beta-cycles", type=int, default=None, help="cyclical: number of cycles")
    group.add_argument("--free-bits", type=float, default=None, help="minimum KL per latent dimension (nats)")
    group.add_argument("--eval-iwae", type=int, default=None, help="k of the final IWAE-k evaluation (0: skip)")


MODEL_DEFAULTS = {"model": "mlp", "hidden": 500, "latents": 20, "likelihood": "bernoulli", "beta": 1.0,
                  "beta_schedule": "constant", "beta_steps": 10000, "beta_cycles": 4, "free_bits": None}


def make_model(config: dict):
    """The VAE named by config["model"] (ValueError names the flag).

    The library checks the fields; its message ("hidden must be an integer
    >= 1, got 0") is reworded to name the flag ("--hidden: must be ...").
    """
    if config["model"] not in MODELS:
        raise ValueError(f"--model: unknown model {config['model']!r}; choose one of {', '.join(MODELS)}")
    cls = sv.ConvVAE if config["model"] == "conv" else sv.MLPVAE
    try:
        return cls(hidden=config["hidden"], latents=config["latents"], likelihood=config["likelihood"])
    except ValueError as err:
        name, _, reason = str(err).partition(" ")
        if name not in ("hidden", "latents", "likelihood"):
            raise
        raise ValueError(f"--{name}: {reason}") from err


def make_training_loss(model, config: dict):
    """The training objective: make_loss with the beta schedule and free bits of ``config``."""
    beta, kind = config["beta"], config["beta_schedule"]
    if not (isinstance(beta, (int, float)) and beta >= 0):
        raise ValueError(f"--beta: must be >= 0, got {beta!r}")
    if config["free_bits"] is not None and not config["free_bits"] >= 0:
        raise ValueError(f"--free-bits: must be >= 0, got {config['free_bits']!r}")
    try:
        if kind == "warmup":
            beta = sv.beta.linear_warmup(beta, config["beta_steps"])
        elif kind == "cyclical":
            beta = sv.beta.cyclical(beta, config["beta_steps"], config["beta_cycles"])
        elif kind != "constant":
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        return sv.make_loss(model, beta=beta, free_bits=config["free_bits"])
    except ValueError as err:
        raise ValueError(f"--beta-schedule {kind}: {err}") from err


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
    if name == "confident":
        level = config["level"]
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 0.5:
            # the library calls it alpha, like the threshold rule's own alpha: name the setting
            raise ValueError(f"{prefix}level: the confident rule's level must be in (0, 0.5), got {level!r}")
        return annealing.confident(level, config["margin"])
    return {"metropolis": annealing.metropolis, "greedy": annealing.greedy, "penalty": annealing.penalty}[name]()


def flag_name(prefix: str, key: str) -> str:
    """How an error names a setting: ``--sa-t-min`` for train.py's flags, ``sa.t_min`` for ``--set``."""
    return f"{prefix}{key.replace('_', '-')}" if prefix.endswith("-") else f"{prefix}{key}"


def _naming_settings(prefix: str, what: str, build):
    """``build()``; a library error that does not name the setting yet is reworded to say which settings."""
    try:
        return build()
    except (TypeError, ValueError) as err:
        if str(err).startswith(prefix):
            raise
        # The library names its own argument (num_proposals, t0, ...); say which settings too.
        raise ValueError(f"{prefix}* {what} settings: {err}") from err


def make_decision(config: dict, batch_size: int | None, prefix: str = ""):
    """The decision batch of ``config["decision_size"]`` examples (None when 0: the selection batch decides)."""
    size = config["decision_size"]
    flag = flag_name(prefix, "decision_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size == 1:
        raise ValueError(f"{flag}: must be 0 (decide on the selection batch) or an integer >= 2, "
                         f"got {size!r}")
    if size == 0:
        return None
    if batch_size is None:
        raise ValueError(f"{flag}: needs the run's batch size (the selection batch)")
    return annealing.decision_batch(batch_size, size)


def make_annealer(loss_fn, config: dict, prefix: str = "", mesh=None, batch_size: int | None = None) -> sv.Optimizer:
    """``annealing.simulated_annealing`` from a dict of ``SA_DEFAULTS`` keys.

    Args:
      loss_fn: the shared loss.
      config: hyperparameters; missing keys take ``SA_DEFAULTS``.
      prefix: how errors name a key (e.g. "--sa-" or "sa.").
      mesh: the mesh to shard the proposals over (--devices), or None.
      batch_size: the run's batch size, the selection batch of a decision
        batch (``decision_size`` > 0).
    """
    config = SA_DEFAULTS | check_settings(config, SA_DEFAULTS, prefix, "annealing")
    t0, t_min = config["t0"], config["t_min"]
    if t_min is not None and isinstance(t0, (int, float)) and isinstance(t_min, (int, float)) and t_min >= t0:
        # Every schedule here starts at t0: the annealer would be done before its first step.
        raise ValueError(f"{flag_name(prefix, 't_min')}: must be < {prefix}t0 = {t0} (every schedule starts at t0, "
                         f"so the annealer would stop before its first step), got {t_min}")
    return _naming_settings(prefix, "annealing", lambda: annealing.simulated_annealing(
        loss_fn,
        num_proposals=config["proposals"],
        proposal=make_proposal(config, prefix),
        temperature=make_temperature(config, prefix),
        acceptance=make_acceptance(config, prefix),
        t_min=config["t_min"],
        patience=config["patience"],
        mesh=mesh,
        decision=make_decision(config, batch_size, prefix),
    ))


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


def make_es(loss_fn, config: dict, prefix: str = "", batch_size: int | None = None) -> sv.Optimizer:
    """``annealing.evolution_strategy`` from a dict of ``ES_DEFAULTS`` keys (ValueError names the key)."""
    config = ES_DEFAULTS | check_settings(config, ES_DEFAULTS, prefix, "ES")
    return _naming_settings(prefix, "ES", lambda: annealing.evolution_strategy(
        loss_fn, config["pairs"], config["scale"], noise=config["noise"], rank=config["rank"],
        optimizer=make_optimizer(config["es_optimizer"], config["es_lr"], f"{prefix}es_optimizer"),
        shaping=config["shaping"], acceptance=make_acceptance(config, prefix),
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


def check_workdir(workdir: Path, config: dict, resume: bool, not_compared=("resume", "quiet", "workdir"),
                  replace_hint: str = "") -> None:
    """Refuse an unusable --workdir before any training (errors name --workdir / --resume).

    The folder must be writable (probed); one that holds a run (its
    config.json) is refused unless ``resume``, and then its saved config must
    equal ``config`` except for the keys in ``not_compared``.
    """
    import jax

    from savae_jax import checkpoint

    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir: {workdir} exists and is not a folder")
    probe = workdir / f".write-test-{jax.process_index()}"  # one per process: they may share workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_bytes(probe, b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--workdir: cannot write to {workdir}: {err}") from err
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    if not resume:
        raise ValueError(f"--workdir: {workdir} already holds a run; pass --resume to continue it{replace_hint} "
                         "or choose another --workdir (nothing was overwritten)")
    saved = read_saved_config(saved_path)
    diffs = [f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}"
             for k in sorted(set(saved) | set(config))
             if k not in not_compared and saved.get(k) != config.get(k)]
    if diffs:
        raise ValueError("--resume: the run in --workdir has a different config:\n  " + "\n  ".join(diffs))



def read_saved_config(path: Path) -> dict:
    """The ``"config"`` of a run's config.json; ValueError naming the file if it is unreadable or has none."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume: cannot read {path} ({type(err).__name__}: {err}); it may be truncated. "
                         "Restore it, or start the run again in another --workdir") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"--resume: {path} has no \"config\" object (not a config.json written by this "
                         "script?); restore it, or start the run again in another --workdir")
    return saved["config"]


def save_grids(workdir, key, params, model, test_images, binarize, label: str | None = None) -> None:
    """Write reconstructions[_label].png (16 test inputs over their reconstructions) and samples[_label].png."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from savae_jax import checkpoint

    key_bin, key_rec, key_prior = jax.random.split(key, 3)
    x = test_images[:16]
    if binarize is not None:
        x = sv.data.binarize(key_bin, x)
    rec = sv.models.reconstruct(key_rec, params, model, x)
    samples = sv.models.sample_prior(key_prior, params, model, 32, test_images.shape[1:])
    suffix = f"_{label}" if label else ""
    for kind, images, title in (
        ("reconstructions", np.concatenate([np.asarray(x), np.asarray(rec)]),
         "test inputs (top two rows) and reconstructions (bottom two)"),
        ("samples", np.asarray(samples), "samples from the prior (likelihood means)"),
    ):
        grid = sv.evaluation.image_grid(images)
        fig, ax = plt.subplots(figsize=(5, 5 * grid.shape[0] / grid.shape[1]))
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{label}: {title}" if label else title, fontsize=8)
        ax.axis("off")
        checkpoint.save_figure(fig, Path(workdir) / f"{kind}{suffix}.png")
        plt.close(fig)
