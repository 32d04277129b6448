"""The seed's claim, measured: does annealing refine a gradient optimum better than more gradient steps?

    savae plateau --dataset mnist --data-dir /path/to/mnist-idx \
        --seeds 0,1,2 --workdir runs/plateau-mnist

Per seed:

1. Adam (lr 1e-3) trains until the validation loss stops improving: the
   validation -ELBO (a held-out 10 % of the training set, fixed noise) is
   measured every epoch, and training stops after ``--patience`` epochs
   without improvement or at ``--max-epochs``. The plateau point x* is the
   best-validation Adam state (parameters and Adam's moments).
2. From x*, each arm spends the same ``--extra-evals`` further loss
   evaluations (a gradient step counts 3, an annealing step K + 1 plus its
   decision evaluations):
   (a) ``adam``: more Adam, continuing x*'s optimizer state;
   (b) ``adam-decayed``: Adam with the learning rate divided by 10 (fresh moments);
   (c) ``sa-naive``: annealing refinement with the seed's rule (Metropolis
       on the batch the best of K was selected on);
   (d) ``sa-noise-aware``: annealing refinement deciding by a paired t-test on
       512 other examples (``savae compare``'s ``sa-refine``);
   (e) ``langevin-sa``: annealing with Adam-drift Langevin proposals.
   Every arm has the validation gate (returns its best-validation
   parameters, x* itself if nothing beats it); the test set is only reported.

Outputs in --workdir: results.json (every seed and arm), summary.md (mean ±
sd over seeds of the test -ELBO and -IWAE-k at the kept parameters and the
test -ELBO at the last ones, all relative to x* too), plateau.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import optax

import savae_jax as sv
from savae_jax import checkpoint, driver
from savae_jax.experiments import builders, figures, flags, report
from savae_jax.experiments import workdir as workdirs
from savae_jax.experiments.registry import METHOD_DEFAULTS
from savae_jax.experiments.settings import Config

# Settings that may differ between a run and its --resume; what --overwrite may delete.
NOT_COMPARED = ("resume", "overwrite", "workdir")
OUTPUTS = ("config.json", "results.json", "summary.md", "plateau.png")

ARMS = ("adam", "adam-decayed", "sa-naive", "sa-noise-aware", "langevin-sa")
# The annealers of the comparison's refinement methods and langevin-sa, unchanged.
ANNEALERS = {"sa-naive": "sa-refine-naive", "sa-noise-aware": "sa-refine", "langevin-sa": "langevin-sa"}


@dataclasses.dataclass(frozen=True)
class PlateauConfig(Config):
    """The plateau experiment's settings (its flags, one field each)."""

    dataset: str = "digits"
    data_dir: str | None = None
    seeds: str = "0,1,2"            # comma-separated
    lr: float = 1e-3                # Adam's learning rate (phase 1 and arm a)
    max_epochs: int = 30            # cap of phase 1
    patience: int = 3               # epochs without validation improvement that end phase 1
    extra_evals: int = 15000        # each arm's budget from x*
    arms: str = ",".join(ARMS)      # comma-separated
    batch_size: int = 128
    hidden: int = 500
    latents: int = 20
    validation: float = 0.1
    train_size: int | None = None   # the first N examples left after the validation split (None: all)
    eval_every: int = 100           # arm steps between validation checks
    eval_iwae: int = 100
    workdir: str = "runs/plateau"
    resume: bool = False
    overwrite: bool = False


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = PlateauConfig()
    p = argparse.ArgumentParser(prog=prog or "savae plateau", description=__doc__.split("\n")[0],
                                formatter_class=flags.HelpFormatter)
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--seeds", default=d.seeds, help="comma-separated seeds")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate (phase 1 and arm a)")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs, help="cap of phase 1")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without validation improvement that end phase 1")
    p.add_argument("--extra-evals", type=int, default=d.extra_evals, help="each arm's budget from x*")
    p.add_argument("--arms", default=d.arms, help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--latents", type=int, default=d.latents)
    p.add_argument("--validation", type=float, default=d.validation)
    p.add_argument("--train-size", type=int, default=d.train_size,
                   help="train on the first N examples left after the validation split (a real plateau "
                        "comes sooner on fewer examples; default: all)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="arm steps between validation checks")
    p.add_argument("--eval-iwae", type=int, default=d.eval_iwae)
    flags.add_workdir_flags(p, d.workdir)
    flags.add_config_flag(p)
    return p


def check(args) -> tuple[list[int], list[str]]:
    """The seeds and arms; ValueError names the flag."""
    seeds = flags.comma_list(args.seeds, "--seeds", int, "0,1,2")
    arms = flags.comma_list(args.arms, "--arms", example="adam,sa-noise-aware")
    if any(a not in ARMS for a in arms):
        raise ValueError(f"--arms: choose from {', '.join(ARMS)}, got {args.arms!r}")
    for flag in ("max_epochs", "patience", "extra_evals", "batch_size", "eval_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if min(seeds) < 0:
        raise ValueError(f"--seeds: must be integers >= 0, got {args.seeds!r}")
    return seeds, arms


def train_to_plateau(key, adam, params, train, validate, args, batch_fn, log):
    """Adam until the validation -ELBO has not improved for ``patience`` epochs: ``(best state, info)``."""
    steps_per_epoch = sv.data.num_batches(len(train), args.batch_size)
    steps = driver.iterate(key, adam, adam.init(params), train, args.batch_size, batch_fn=batch_fn)
    best_state, best_val, best_epoch, curve = None, float("inf"), 0, []
    for epoch in range(1, args.max_epochs + 1):
        for _ in range(steps_per_epoch):
            _, state, _ = next(steps)
        value = validate(state.params)
        curve.append(value)
        if value < best_val:
            best_state, best_val, best_epoch = state, value, epoch
        log(f"  adam epoch {epoch}: validation -ELBO {value:.3f} (best {best_val:.3f} at epoch {best_epoch})")
        if epoch - best_epoch >= args.patience:
            break
    plateaued = epoch - best_epoch >= args.patience
    return best_state, {"best_epoch": best_epoch, "epochs": epoch, "plateaued": plateaued,
                        "val_curve": curve, "evals": adam.cost * steps_per_epoch * epoch}


def arm_phase(arm: str, loss_fn, adam_state, args) -> driver.Phase:
    if arm == "adam":
        # More Adam from x*, continuing its moments: an optimizer whose init returns x*'s state.
        adam = sv.from_optax(loss_fn, optax.adam(args.lr))
        return driver.Phase(arm, adam._replace(init=lambda params: adam_state))
    if arm == "adam-decayed":
        return driver.Phase(arm, sv.from_optax(loss_fn, optax.adam(args.lr / 10)))
    settings = dict(METHOD_DEFAULTS[ANNEALERS[arm]])
    settings = {k: v for k, v in settings.items() if k not in ("adam_share", "adam_lr")}
    return driver.Phase(arm, builders.make_annealer(loss_fn, settings, f"{arm}.", batch_size=args.batch_size))


def run_seed(seed, arms, args, model, data, batch_fn, log) -> dict:
    train, val, test = data
    loss_fn = sv.make_loss(model)
    validate = lambda p: sv.evaluate(loss_fn, p, val.images, binarize=batch_fn)  # noqa: E731
    evaluate = lambda p: sv.evaluate(loss_fn, p, test.images, binarize=batch_fn)  # noqa: E731
    key_init, key_adam, key_arms = jax.random.split(jax.random.key(seed), 3)
    params0 = sv.models.init(key_init, model, train.images[:1])
    adam = sv.from_optax(loss_fn, optax.adam(args.lr))
    state, plateau = train_to_plateau(key_adam, adam, params0, train.images, validate, args, batch_fn, log)
    x_star = state.params
    out = {"plateau": plateau, "x_star": {"val_neg_elbo": validate(x_star), "test_neg_elbo": evaluate(x_star)},
           "arms": {}}
    log(f"seed {seed}: x* at epoch {plateau['best_epoch']} of {plateau['epochs']} "
        f"({'plateaued' if plateau['plateaued'] else 'cap reached'}), test -ELBO {out['x_star']['test_neg_elbo']:.3f}")
    for arm in arms:
        # Every arm sees the same data order and keys (one key for all arms).
        kept, history, _ = driver.run(key_arms, [arm_phase(arm, loss_fn, state, args)], x_star, train.images,
                                   batch_size=args.batch_size, eval_every=args.eval_every,
                                   budget_evals=args.extra_evals, batch_fn=batch_fn, evaluate=evaluate,
                                   validate=validate)
        report = sv.evaluation.report(model, kept, test.images, binarize=batch_fn, iwae_samples=args.eval_iwae)
        out["arms"][arm] = {"test_neg_elbo": report["test_neg_elbo"], "test_neg_iwae": report.get("test_neg_iwae"),
                            "last_test_neg_elbo": history[-1]["test_neg_elbo"], "best_step": history[-1]["best_step"],
                            "evals": history[-1]["evals"], "seconds": history[-1]["seconds"], "history": history}
        log(f"seed {seed} {arm}: test -ELBO {report['test_neg_elbo']:.3f} (last {history[-1]['test_neg_elbo']:.3f}), "
            f"kept step {history[-1]['best_step']}, {history[-1]['seconds']:.1f} s")
    return out


def summarize(results: dict, arms, args) -> str:
    seeds = list(results)
    lines = [f"# Refining the plateau point x* with {args.extra_evals} further evaluations "
             f"(seeds {','.join(seeds)}; mean ± sd)", "",
             "| seed | x* epoch | epochs run | plateaued | x* test -ELBO |", "|---|---|---|---|---|"]
    for seed, r in results.items():
        p = r["plateau"]
        lines.append(f"| {seed} | {p['best_epoch']} | {p['epochs']} | {'yes' if p['plateaued'] else 'no (cap)'} "
                     f"| {r['x_star']['test_neg_elbo']:.2f} |")
    lines += ["", f"| arm | test -ELBO (kept) | change vs x* | last test -ELBO | test -IWAE-{args.eval_iwae} "
              "| kept x* itself | seconds |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        runs = [r["arms"][arm] for r in results.values()]
        change = [a["test_neg_elbo"] - r["x_star"]["test_neg_elbo"] for a, r in zip(runs, results.values())]
        stat = lambda values, fmt=".2f": report.format_mean_sd(report.mean_sd(values), fmt)  # noqa: E731
        iwae = [a["test_neg_iwae"] for a in runs if a["test_neg_iwae"] is not None]
        lines.append(f"| {arm} | {stat([a['test_neg_elbo'] for a in runs])} | {stat(change, '+.2f')} "
                     f"| {stat([a['last_test_neg_elbo'] for a in runs])} | {stat(iwae) if iwae else '-'} "
                     f"| {sum(a['best_step'] == 0 for a in runs)} of {len(runs)} | {stat([a['seconds'] for a in runs], '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None, prog: str | None = None) -> dict:
    """``savae plateau``: flags -> PlateauConfig -> Adam to the plateau, then every arm, per seed."""
    parser = build_parser(prog)
    try:
        given = vars(flags.parse_with_config(parser, argv))
        args = PlateauConfig.from_dict({k: v for k, v in given.items() if k != "config"}, "--", "plateau")
        seeds, arms = check(args)
        model = sv.MLPVAE(hidden=args.hidden, latents=args.latents)
        train = sv.load(args.dataset, "train", args.data_dir)
        test = sv.load(args.dataset, "test", args.data_dir)
        train, val = sv.data.split_validation(train, args.validation)
        if args.train_size is not None:
            if not 1 <= args.train_size <= len(train.images):
                raise ValueError(f"--train-size: must be in [1, {len(train.images)}], got {args.train_size}")
            train = sv.data.Dataset(train.images[: args.train_size], train.labels[: args.train_size], train.name)
        if args.eval_iwae:
            sv.evaluation.check_iwae_work(args.eval_iwae, len(test.images), "--eval-iwae")
        workdirs.prepare(Path(args.workdir), args.to_dict(), args, OUTPUTS, NOT_COMPARED)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    log = lambda line: print(line, flush=True)  # noqa: E731
    batch_fn = sv.data.BatchFn("dynamic")
    workdir = Path(args.workdir)
    results = {}
    if args.resume and (workdir / "results.json").is_file():  # the seeds already done are kept as they are
        results = json.loads((workdir / "results.json").read_text())
        log(f"resuming: seeds {', '.join(results) or 'none'} done")
    with flags.disk_errors(parser.prog, workdir):
        checkpoint.atomic_write_json(workdir / "config.json", {"config": args.to_dict()})
        for seed in seeds:
            if str(seed) in results:
                continue
            results[str(seed)] = run_seed(seed, arms, args, model, (train, val, test), batch_fn, log)
            checkpoint.atomic_write_json(workdir / "results.json", results)
        summary = summarize(results, arms, args)
        checkpoint.atomic_write_text(workdir / "summary.md", summary)
        figures.save_plateau_figure(workdir, results, arms)
    print(summary)
    return results

