"""Train an MLP VAE with one optimizer and write metrics, parameters and image grids.

Example:
  savae train --dataset mnist --data-dir /path/to/mnist-idx \
    --optimizer adam --lr 1e-3 --epochs 10 --batch-size 128 --seed 0 \
    --binarize dynamic --workdir runs/adam

Outputs in --workdir (each written atomically):
  config.json       the run's settings (a rerun in the same --workdir needs --resume or --overwrite)
  checkpoints/      the whole run state at every epoch (for --resume after a kill)
  metrics.json      {"config", "history": [...], "final": {"test_neg_elbo", "test_neg_iwae"
                    (with --eval-iwae K), "bits_per_dim" (logistic likelihood), "diagnostics",
                    "train_seconds", ...}}
  params/           orbax checkpoint of the final parameters (for --init-from)
  trace.csv         one row per training step: phase, step and every field of the optimizer's
                    step info (the annealer's temperature, accepted, dL and its standard errors, ...)
  reconstructions.png, samples.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

import savae_jax as sv
from savae_jax import checkpoint, distributed, driver, training
from savae_jax.experiments import builders, figures, flags, workdir as workdirs
from savae_jax.experiments.settings import (ACCEPTANCES, MODEL_DEFAULTS, PROPOSALS, SA_DEFAULTS, SCHEDULES,
                                            AnnealerConfig, ModelConfig, flag_name)

# argparse types of the --sa-* flags, by the kind of AnnealerConfig's field.
_FLAG_TYPES = {"int": int, "number": float, "str": str}

# What each --sa-* flag does (its default is shown by --help).
SA_HELP = {
    "proposals": "K, proposals evaluated per step",
    "proposal": f"how proposals are drawn: {', '.join(PROPOSALS)}",
    "scale": "per-entry noise std of gaussian, cauchy and low_rank proposals",
    "rank": "rank of the low_rank perturbation of each Dense kernel",
    "scale_by_rms": "multiply the scale of each parameter leaf by that leaf's RMS",
    "schedule": f"temperature schedule: {', '.join(SCHEDULES)}",
    "t0": "initial temperature (nats)",
    "decay": "exponential schedule: factor per step, in (0, 1)",
    "t_end": "linear schedule: final temperature",
    "schedule_steps": "linear schedule: steps from --sa-t0 to --sa-t-end",
    "target_rate": "adaptive schedule: acceptance rate it steers towards",
    "reheat": "restart the schedule after this many steps without improvement (0: never)",
    "acceptance": f"acceptance rule: {', '.join(ACCEPTANCES)}",
    "alpha": "threshold rule: accept iff exp(-dL / (T + d)) > alpha, in (0, 1)",
    "d": "threshold rule: the d of exp(-dL / (T + d)), >= 0",
    "level": "confident rule: the one-sided test's level, in (0, 0.5)",
    "margin": "confident rule: improvement required (nats)",
    "decision_size": "decide on this many other examples with fresh noise (0: on the selection batch; else >= 2)",
    "t_min": "stop once the temperature is below this (default: never)",
    "patience": "stop after this many steps without improvement (default: never)",
    "langevin_step": "langevin proposal: step size",
    "langevin_optimizer": "langevin proposal's drift: none (the plain gradient) or an optax alias",
    "langevin_lr": "learning rate of --sa-langevin-optimizer",
    "fraction": "gaussian and cauchy proposals: probability that an entry moves, in (0, 1] (1/D: one coordinate)",
    "replicas": "replica exchange: R annealers on the ladder T_k = t0 * ratio**k, each cooling on its own "
                "scaled schedule, swapping neighbours (1: a single annealer)",
    "ladder_ratio": "replica exchange: each replica's temperature over the next colder one's, > 1",
    "swap_every": "replica exchange: steps between swap rounds",
    "polish_steps": "local polish: steps of --sa-polish-optimizer on the incumbent every --sa-polish-every "
                    "steps, kept if better on the batch (0: none)",
    "polish_every": "local polish: steps between polishes",
    "polish_optimizer": "local polish: lbfgs or an optax alias",
    "polish_lr": "local polish: learning rate of an optax alias (not lbfgs)",
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "savae train", description=__doc__.split("\n")[0], formatter_class=flags.HelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(sv.data.DATASETS)}")
    p.add_argument("--data-dir", default=None, help="folder with MNIST IDX files or a TFDS data dir")
    p.add_argument("--optimizer", default="adam",
                   help="sa (simulated annealing, see --sa-*) or an optax alias: adam, rmsprop, sgd, ...")
    p.add_argument("--lr", type=flags.positive(float), default=1e-3, help="learning rate of an optax --optimizer")
    p.add_argument("--epochs", type=flags.positive(int), default=10,
                   help="epochs of --optimizer (--resume may give a finished run more: it continues exactly)")
    p.add_argument("--batch-size", type=flags.positive(int), default=128,
                   help="examples per step (the last partial batch of an epoch is dropped)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial parameters, data order and keys")
    p.add_argument("--binarize", choices=["dynamic", "static", "none"], default="dynamic",
                   help="dynamic (a fresh Bernoulli sample per batch), static (one fixed sample per image) "
                        "or none (grey levels)")
    flags.add_model_flags(p)
    flags.add_scale_out_flags(p)
    flags.add_workdir_flags(p, "runs/train")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the per-epoch log lines stay)")
    flags.add_config_flag(p)
    p.add_argument("--init-from", default=None,
                   help="start from saved parameters (e.g. W/params of an earlier run)")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="epochs of --pretrain-optimizer before --optimizer (refine its optimum)")
    p.add_argument("--pretrain-optimizer", default="adam", help="optax alias of the pretraining phase")
    p.add_argument("--pretrain-lr", type=flags.positive(float), default=1e-3, help="learning rate of the pretraining")
    sa = p.add_argument_group("simulated annealing (--optimizer sa); one step per batch")
    for key, (kind, _) in AnnealerConfig.kinds().items():
        flag, default = flag_name("--sa-", key), SA_DEFAULTS[key]
        if kind == "bool":
            sa.add_argument(flag, action="store_true", help=SA_HELP[key])
        else:
            sa.add_argument(flag, type=_FLAG_TYPES[kind], default=default, help=SA_HELP[key])
    flags.show_defaults(p, MODEL_DEFAULTS)
    return p


def unused_flags(args, parser) -> list[str]:
    """The flags given a non-default value that this run does not use (--sa-* without --optimizer sa, ...).

    ``parser`` gives the defaults: a fresh :func:`build_parser`, so settings from a --config file count too.
    """
    unused = []
    if args.optimizer != "sa":
        unused += [flag_name("--sa-", key) for key in SA_DEFAULTS
                   if getattr(args, "sa_" + key) != parser.get_default("sa_" + key)]
    elif args.lr != parser.get_default("lr"):
        unused.append("--lr")
    if not args.pretrain_epochs:
        unused += [flag_name("--", name) for name in ("pretrain_optimizer", "pretrain_lr")
                   if getattr(args, name) != parser.get_default(name)]
    return unused


def effective_settings(args) -> dict:
    """The flags as recorded in config.json/metrics.json: only those that take effect in this run."""
    settings = vars(args).copy()
    settings.pop("config")  # the file's settings are recorded one by one
    if args.optimizer != "sa":
        settings = {k: v for k, v in settings.items() if not k.startswith("sa_")}
    else:
        settings.pop("lr")
    if not args.pretrain_epochs:
        settings.pop("pretrain_optimizer")
        settings.pop("pretrain_lr")
    return settings


def sa_config(args) -> AnnealerConfig:
    """The --sa-* flags as the typed annealer config (errors name the flag)."""
    return AnnealerConfig.from_dict({key: getattr(args, "sa_" + key) for key in SA_DEFAULTS}, "--sa-", "annealing")


def make_optimizer(args, loss_fn, mesh=None) -> sv.Optimizer:
    """What --optimizer names: an annealer for "sa", else ``optax.<name>(--lr)``."""
    if args.optimizer == "sa":
        return builders.make_annealer(loss_fn, sa_config(args), prefix="--sa-", mesh=mesh,
                                    batch_size=args.batch_size)
    return sv.from_optax(loss_fn, builders.make_optimizer(args.optimizer, args.lr))


# Settings that may differ between a run and its --resume.
NOT_COMPARED = ("resume", "quiet", "workdir", "overwrite")

# Everything a run of this script writes into --workdir (what --overwrite may delete); trace.csv is
# the per-step trace of the issue-15 train subcommand.
OUTPUTS = ("config.json", "metrics.json", "checkpoints", "params", "reconstructions.png", "samples.png",
           "trace.csv")


def validate(args, mesh) -> dict:
    """Everything main needs, checked before any file is written (ValueError names the flag)."""
    model_config = ModelConfig.from_dict({k: getattr(args, k) for k in MODEL_DEFAULTS
                                          if getattr(args, k) is not None}, "--", "model")
    model = builders.make_model(model_config)
    loss_fn = builders.make_training_loss(model, model_config)
    eval_iwae = args.eval_iwae or 0
    if eval_iwae < 0:
        raise ValueError(f"--eval-iwae: must be >= 0, got {eval_iwae}")
    optimizer = make_optimizer(args, loss_fn, mesh)
    if args.pretrain_epochs < 0:
        raise ValueError(f"--pretrain-epochs: must be >= 0, got {args.pretrain_epochs}")
    pretrain = (sv.from_optax(loss_fn, builders.make_optimizer(args.pretrain_optimizer, args.pretrain_lr,
                                                             "--pretrain-optimizer"))
                if args.pretrain_epochs else None)
    train = sv.load(args.dataset, "train", args.data_dir)
    test = sv.load(args.dataset, "test", args.data_dir)
    if args.batch_size > len(train.images):
        raise ValueError(f"--batch-size: {args.batch_size} is larger than the "
                         f"{len(train.images)} training images")
    if eval_iwae:
        sv.evaluation.check_iwae_work(eval_iwae, len(test.images), "--eval-iwae")
    try:  # e.g. a decision batch larger than the training set
        driver.check_examples([driver.Phase(args.optimizer, optimizer)], len(train.images), args.batch_size)
    except ValueError as err:
        raise ValueError(f"--sa-decision-size: {err}") from err
    params = sv.models.init(jax.random.key(args.seed), model, train.images[:1])  # shapes only
    if args.init_from:
        checkpoint.load_params(args.init_from, like=params, name="--init-from")
    if args.optimizer == "sa":  # e.g. --sa-rank larger than a layer: refused before training
        try:
            builders.probe_step(optimizer, params, train.images.shape[1:], args.batch_size)
        except ValueError as err:
            raise ValueError(f"--sa-*: {err}") from err
    config = effective_settings(args) | model_config.to_dict() | {
        "eval_iwae": eval_iwae, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    return {"config": config, "model": model, "loss_fn": loss_fn, "optimizer": optimizer,
            "pretrain": pretrain, "train": train, "test": test}


def make_phases(args, run: dict, keys) -> list[driver.Phase]:
    """--optimizer for --epochs, after --pretrain-optimizer for --pretrain-epochs when asked."""
    key_pretrain, key_fit = keys
    if run["pretrain"] is None:
        return [driver.Phase(args.optimizer, run["optimizer"], epochs=args.epochs, key=key_fit)]
    return driver.refinement(run["pretrain"], run["optimizer"], epochs=(args.pretrain_epochs, args.epochs),
                             names=(args.pretrain_optimizer, args.optimizer), keys=(key_pretrain, key_fit))


def check_run(args, parser, mesh) -> dict:
    """Every flag and the workdir checked (and an earlier run cleared with --overwrite), before training."""
    workdir = Path(args.workdir)
    try:
        run = validate(args, mesh)
        workdirs.prepare(workdir, run["config"], args, OUTPUTS, NOT_COMPARED, may_grow=("epochs",))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    # against the built-in defaults (a --config file replaces the parser's own)
    for flag in unused_flags(args, build_parser()):
        print(f"{parser.prog}: warning: {flag} has no effect with --optimizer {args.optimizer}"
              + (" and --pretrain-epochs 0" if flag.startswith("--pretrain") else "")
              + "; it is not recorded in config.json", file=sys.stderr)
    return run


def main(argv=None, prog: str | None = None) -> dict:
    """``savae train``: flags -> checked run -> the phases through ``driver.run`` -> metrics, params, grids."""
    parser = build_parser(prog)
    args, mesh = flags.parse_args(parser, argv, config_file=True)
    run = check_run(args, parser, mesh)
    with flags.disk_errors(parser.prog, args.workdir):
        return train_run(args, parser, run, mesh)


def train_run(args, parser, run: dict, mesh) -> dict:
    """main's run after the checks: config.json, the phases, then metrics.json, params/ and the grids."""
    workdir, train, test = Path(args.workdir), run["train"], run["test"]
    # Across processes (--distributed) every process trains the same replicated
    # model; process 0 alone prints and writes --workdir (give all the same one).
    primary = distributed.is_primary()
    distributed.barrier("train: workdir checked")  # before process 0 writes config.json
    if primary:  # on --resume the same config, but for a grown --epochs
        checkpoint.atomic_write_json(workdir / "config.json", {"config": run["config"]})
    log = flags.make_log()
    log(flags.backend_line())
    log(f"{args.dataset}: {len(train.images)} train / {len(test.images)} test images "
        f"{train.images.shape[1:]}, {args.optimizer}"
        + ("" if args.optimizer == "sa" else f" lr={args.lr}") + f", backend {jax.default_backend()}")
    if run["pretrain"] is not None:
        log(f"pretraining: {args.pretrain_epochs} epochs of {args.pretrain_optimizer}")
    start = time.perf_counter()
    key_init, key_pretrain, key_fit, key_grid = jax.random.split(jax.random.key(args.seed), 4)
    params = sv.models.init(key_init, run["model"], train.images[:1])
    if args.init_from:
        params = checkpoint.load_params(args.init_from, like=params, name="--init-from")
    phases = make_phases(args, run, (key_pretrain, key_fit))
    try:
        params, history = train_phases(args, run, phases, params, key_fit, mesh, log)
    except driver.NonFiniteLossError as err:
        # Keep what was learnt: the last finite row's parameters and history, reported as usual.
        finish(args, run, workdir, err.params, err.history, key_grid, time.perf_counter() - start, log,
               stopped=str(err))
        sys.exit(f"{parser.prog}: stopped: {err}; wrote the kept parameters' metrics.json and params/")
    return finish(args, run, workdir, params, history, key_grid, time.perf_counter() - start, log)


def train_phases(args, run: dict, phases, params, key, mesh, log) -> tuple:
    """``driver.run`` with a test row per epoch of the main optimizer; writes trace.csv. ``(params, history)``."""
    train, test = run["train"], run["test"]
    # A row per epoch of the main optimizer (an annealer with a decision batch takes more examples a step).
    steps_per_epoch = sv.data.num_batches(len(train.images), driver.phase_batch_size(phases[-1], args.batch_size))
    batch_fn = sv.data.BatchFn(None if args.binarize == "none" else args.binarize)
    eval_loss = sv.make_loss(run["model"])
    primary = distributed.is_primary()
    params, history, trace = driver.run(
        key, phases, params, train.images,
        batch_size=args.batch_size, eval_every=steps_per_epoch, batch_fn=batch_fn,
        evaluate=lambda p: sv.evaluation.evaluate(eval_loss, p, test.images, binarize=batch_fn),
        checkpoint_dir=Path(args.workdir) / "checkpoints", resume=args.resume, mesh=mesh,
        progress=primary and not args.quiet, log=log,
        on_row=training.epoch_rows(phases, len(train.images), args.batch_size, log), trace=True)
    if primary:
        workdirs.write_csv(Path(args.workdir) / "trace.csv", trace)  # one row per step: the optimizer's info
    return params, history


def finish(args, run, workdir, params, history, key_grid, wall_seconds, log, stopped: str | None = None) -> dict:
    """The final report: metrics.json, params/ and the image grids (``stopped``: why the run stopped early)."""
    model, test = run["model"], run["test"]
    binarize = None if args.binarize == "none" else args.binarize
    eval_iwae = run["config"]["eval_iwae"]
    final = sv.evaluation.report(model, params, test.images, binarize=sv.data.BatchFn(binarize),
                                 iwae_samples=eval_iwae)
    metrics = {"config": run["config"], "history": history,
               "final": final | {"train_seconds": history[-1]["seconds"] if history else 0.0,
                                 "wall_seconds": wall_seconds}}
    if stopped is not None:
        metrics["stopped"] = stopped
    if eval_iwae:
        log(f"test negative IWAE-{eval_iwae} bound {final['test_neg_iwae']:.3f} nats "
            f"(ELBO gap {final['elbo_iwae_gap']:.3f})")
    log(f"active units {final['diagnostics']['active_units']}/{model.latents}, "
        f"KL {final['diagnostics']['kl']:.3f}, MI {final['diagnostics']['mutual_info']:.3f} nats")
    checkpoint.save_params(workdir / "params", params)  # collective across processes
    if distributed.is_primary():
        figures.save_grids(workdir, key_grid, params, model, test.images, binarize)
        checkpoint.atomic_write_json(workdir / "metrics.json", checkpoint.json_safe(metrics))
    log(f"final test negative ELBO {metrics['final']['test_neg_elbo']:.3f} nats; "
        f"wrote {workdir / 'metrics.json'}")
    return metrics

