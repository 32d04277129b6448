"""Compare simulated annealing, hybrids and Optax baselines at equal budgets.

    savae compare                                     # digits, every method, ~2 min on 2 CPU cores
    savae compare --dataset mnist --data-dir /path/to/mnist-idx \
        --budget-evals 300000 --workdir runs/compare-mnist

Every method starts from the same parameters (same init key), sees the same
data order and keys, minimises the same loss and is scored by the same
evaluation (full test set, fixed evaluation key). Budgets are in loss
evaluations (one forward pass of one batch; a gradient step counts 3) and,
with --budget-seconds, in training seconds too.

Methods: adam, rmsprop, sgd (Optax); sa (annealing from the random init);
sa-refine (Adam for a share of the budget, then noise-aware annealing from its
optimum: a paired t-test on an independent decision batch); sa-refine-naive
(the same with the seed's rule, Metropolis on the selection batch);
langevin-sa (annealing with gradient-informed Langevin proposals, deciding on
an independent batch); es (ES recombination of all K evaluations into one Adam
move, from the random init) and es-refine (the same after the Adam half,
decided by the t-test).

With --validation F (default 0.1) a fraction F of the training set is held
out and every method returns its best-validation parameters (the driver's
validation gate); the test set is only reported. With --seeds 0,1,2 every
method runs once per seed and the summary shows mean ± sd.

Outputs in --workdir (each file written atomically): config.json,
results.json ({method: {"seeds": {seed: run}, "summary": {number: {mean, sd,
n}}}}), history_<method>_seed<s>.csv (a row every --eval-every steps, and one
at step 0: the shared initial parameters), trace_<method>_seed<s>.csv (one row
per step: the optimizer's info, e.g. the annealer's temperature, accepted, dL
and its standard errors), summary.md, report.html (the summary and every figure
in one self-contained page), test_neg_elbo_vs_seconds.png,
test_neg_elbo_vs_evals.png (--log-evals: log-scaled), sa_traces.png (per
annealing step, first seed), performance_profile.png (each method's share of
seeds that reached each validation target within tau times the fastest's
evaluations; when Adam ran with the validation gate), reconstructions_<method>.png,
samples_<method>.png (first seed); checkpoints/<method>/seed<s>/ (run state,
for --resume) and params/<method>/seed<s>/ (returned parameters).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import jax

import savae_jax as sv
from savae_jax import checkpoint, distributed, driver
from savae_jax.experiments import builders, figures, flags, report, workdir as workdirs
from savae_jax.experiments.registry import METHOD_DEFAULTS, METHODS, build_phases, first_phase_key, set_keys_help
from savae_jax.experiments.settings import ModelConfig

@dataclasses.dataclass(frozen=True)
class CompareConfig(ModelConfig):
    """Everything a comparison depends on (config.json's ``"config"``): the model's fields, then the run's.

    Build it with :meth:`from_dict` (types checked, unknown keys named) or from
    the flags with :func:`resolve_config`, which also checks the values.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    methods: str = ",".join(METHODS)       # comma-separated names of the registry
    budget_evals: int = 15000              # loss evaluations per method and seed
    budget_seconds: float | None = None    # training seconds per method and seed
    seeds: list = dataclasses.field(default_factory=lambda: [0])
    validation: float = 0.1                # fraction of the training set held out for the gate; 0: none
    batch_size: int = 128
    binarize: str = "dynamic"              # dynamic | static | none
    eval_iwae: int = 100                   # k of the final IWAE-k (0: skip)
    eval_every: int = 200                  # steps between test rows
    checkpoint_every: int | None = None    # None: every 5th row
    method_config: dict = dataclasses.field(default_factory=lambda: copy.deepcopy(METHOD_DEFAULTS))


DEFAULTS = CompareConfig.defaults()

# Settings that may differ between a run and its --resume.
NOT_COMPARED = ("resume", "quiet", "workdir", "log_evals", "overwrite")

# Everything a comparison writes into --workdir (what --overwrite may delete), as fnmatch patterns.
OUTPUTS = ("config.json", "results.json", "summary.md", "report.html", "history_*_seed*.csv",
           "trace_*_seed*.csv", "test_neg_elbo_vs_*.png", "sa_traces.png", "performance_profile.png",
           "reconstructions_*.png", "samples_*.png", "checkpoints", "params")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "savae compare", description=__doc__.split("\n")[0], epilog=set_keys_help(),
                                formatter_class=flags.HelpFormatter)
    add = p.add_argument
    add("--dataset", help=f"one of {', '.join(sv.data.DATASETS)} (default digits)")
    add("--data-dir", help="folder with MNIST IDX files or a TFDS data dir")
    add("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    add("--budget-evals", type=int, help="loss evaluations per method (default 15000)")
    add("--budget-seconds", type=float, help="training seconds per method (optional)")
    add("--seeds", help="comma-separated seeds, e.g. 0,1,2: every method runs once per seed (init, data "
                       "order, keys); the summary shows mean +- sd (default 0)")
    add("--seed", type=int, help="one seed (the same as --seeds N)")
    add("--validation", type=float, help="fraction of the training set held out for the validation gate "
                                         "(every method returns its best-validation parameters; default 0.1; "
                                         "0: no gate, the last parameters)")
    add("--batch-size", type=int, help="examples per step (default 128)")
    add("--binarize", choices=["dynamic", "static", "none"],
        help="dynamic (a fresh Bernoulli sample per batch), static (one fixed sample per image) or none "
             "(grey levels) (default dynamic)")
    add("--eval-every", type=int, help="steps between test evaluations (default 200)")
    add("--checkpoint-every", type=int, help="steps between checkpoints, a multiple of --eval-every (default 5x --eval-every)")
    add("--config", help="JSON file with any of these settings (flags win over it)")
    add("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="override one method hyperparameter, e.g. --set sa.scale=0.05 (a JSON value, a number or a "
             "bare word; repeat for more; the keys of each method are listed below; default: none)")
    flags.add_workdir_flags(p, "runs/compare")
    add("--quiet", action="store_true", help="no progress bars")
    add("--log-evals", action="store_true", help="plot test_neg_elbo_vs_evals.png on a log-scaled evaluations "
                                                 "axis (plotting only, not part of the run's config)")
    flags.add_model_flags(p)
    flags.add_scale_out_flags(p)
    flags.show_defaults(p, DEFAULTS)
    return p


def parse_set(item: str) -> tuple[str, str, object]:
    """``--set METHOD.KEY=VALUE`` as ``(method, key, value)``; the value is JSON or a bare word."""
    target, sep, raw = item.partition("=")
    method, dot, name = target.partition(".")
    if not (sep and dot and name):
        raise ValueError(f"--set: expected METHOD.KEY=VALUE, got {item!r}")
    if method not in METHODS:
        raise ValueError(f"--set: unknown method {method!r} in {item!r}; choose from {', '.join(METHODS)}")
    try:
        return method, name, json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return method, name, float(raw)  # a number JSON does not read, such as .05 or 1e-3.
    except ValueError:
        return method, name, raw  # a bare word such as gaussian


def _read_config_file(path: str, merged: dict) -> None:
    """Merge the JSON settings of ``--config path`` into ``merged`` (method settings key by key)."""
    from_file = flags.read_json_object(path, "--config")
    unknown = set(from_file) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"--config: unknown settings {sorted(unknown)}")
    method_config = from_file.pop("method_config", {})
    if not isinstance(method_config, dict):
        raise ValueError(f"--config: method_config must be an object {{method: {{key: value}}}}, got {method_config!r}")
    for method, overrides in method_config.items():
        if not isinstance(overrides, dict):
            raise ValueError(f"--config: method_config.{method} must be an object {{key: value}}, got {overrides!r}")
        merged["method_config"].setdefault(method, {}).update(overrides)
    merged.update(from_file)


def _seeds_from_flags(args):
    """The seeds --seed or --seeds give (None: neither)."""
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seed: give either --seed or --seeds")
    if args.seed is not None:
        return [args.seed]
    if args.seeds is None:
        return None
    return flags.comma_list(args.seeds, "--seeds", int, "0,1,2")


def resolve_config(args) -> CompareConfig:
    """Defaults, then --config FILE, then flags, then --set; validated. ValueError names the flag."""
    merged = CompareConfig.defaults()
    if args.config:
        _read_config_file(args.config, merged)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and key not in ("method_config", "seeds"):
            merged[key] = value
    seeds = _seeds_from_flags(args)
    if seeds is not None:
        merged["seeds"] = seeds
    for item in args.set:
        method, name, value = parse_set(item)
        merged["method_config"][method][name] = value
    return check_config_values(check_config_types(merged))


def check_config_values(config: CompareConfig) -> CompareConfig:
    """Refuse settings of the right type but out of range (an unknown method, a negative budget, ...)."""
    methods = flags.methods_list(config.methods)
    config = config.replace(methods=",".join(methods))
    seeds = config.seeds
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ValueError(f"--seeds: must be distinct integers >= 0, at least one, got {seeds!r}")
    fraction = config.validation
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"--validation: must be a fraction in [0, 1) (0: no validation gate), got {fraction!r}")
    if config.dataset not in sv.data.DATASETS:
        raise ValueError(f"--dataset: unknown dataset {config.dataset!r}; choose from "
                         f"{', '.join(sv.data.DATASETS)}")
    if config.checkpoint_every is None:
        config = config.replace(checkpoint_every=5 * config.eval_every)
    if not (isinstance(config.eval_iwae, int) and config.eval_iwae >= 0):
        raise ValueError(f"--eval-iwae: must be an integer >= 0, got {config.eval_iwae!r}")
    for key in ("budget_evals", "batch_size", "eval_every", "checkpoint_every"):
        if not getattr(config, key) > 0:
            raise ValueError(f"--{key.replace('_', '-')}: must be a positive integer, got {getattr(config, key)!r}")
    if config.checkpoint_every % config.eval_every:
        raise ValueError(f"--checkpoint-every: must be a multiple of --eval-every "
                         f"({config.eval_every}), got {config.checkpoint_every}")
    if config.budget_seconds is not None and not config.budget_seconds > 0:
        raise ValueError(f"--budget-seconds: must be > 0, got {config.budget_seconds}")
    if config.binarize not in ("dynamic", "static", "none"):
        raise ValueError(f"--binarize: must be dynamic, static or none, got {config.binarize!r}")
    return config


def check_config_types(config: dict) -> CompareConfig:
    """The typed config of merged settings; refuses a setting of the wrong type (``--config {"hidden": true}``)
    or an unknown method in ``method_config``, naming the flag (the methods' own keys are checked by
    ``build_phases``)."""
    typed = CompareConfig.from_dict(config, "--", "comparison")
    unknown = set(typed.method_config) - set(METHODS)
    if unknown:
        raise ValueError(f"--config: unknown method(s) {sorted(unknown)} in method_config; "
                         f"choose from {', '.join(METHODS)}")
    return typed


def unused_overrides(args, methods) -> list[str]:
    """The methods given a ``--set`` that this run does not run (their settings would do nothing)."""
    return sorted({parse_set(item)[0] for item in args.set} - set(methods))


def validate(args, mesh) -> tuple:
    """Everything main needs, checked before any file is written (ValueError names the flag)."""
    config = resolve_config(args)
    model = builders.make_model(config)
    train_loss = builders.make_training_loss(model, config)
    methods = {m: build_phases(m, config.method_config[m], train_loss, mesh, config.batch_size)
               for m in config.methods.split(",")}
    for m in unused_overrides(args, methods):  # checked like the others, then reported as doing nothing
        build_phases(m, config.method_config[m], train_loss, mesh, config.batch_size)
        print(f"compare: warning: --set {m}.* has no effect: {m} is not in --methods", file=sys.stderr)
    train = sv.load(config.dataset, "train", config.data_dir)
    test = sv.load(config.dataset, "test", config.data_dir)
    val = None
    if config.validation:
        try:
            train, val = sv.data.split_validation(train, config.validation)
        except ValueError as err:
            raise ValueError(f"--validation: {err}") from err
    sv.data.num_batches(len(train.images), config.batch_size)
    if config.eval_iwae:
        sv.evaluation.check_iwae_work(config.eval_iwae, len(test.images), "--eval-iwae")
    probe_params = sv.models.init(jax.random.key(0), model, train.images[:1])
    for name, phases in methods.items():
        try:
            driver.phase_steps(phases, len(train.images), config.batch_size, config.budget_evals)
        except ValueError as err:
            raise ValueError(f"--budget-evals: {err}") from err
        try:  # e.g. a decision batch larger than the training set
            driver.check_examples(phases, len(train.images), config.batch_size)
        except ValueError as err:
            raise ValueError(f"--set {name}.decision_size: {err}") from err
        for phase in phases:  # e.g. a rank larger than a layer: before any file
            if phase.name in ("sa", "es"):
                try:
                    builders.probe_step(phase.optimizer, probe_params, train.images.shape[1:], config.batch_size)
                except ValueError as err:
                    raise ValueError(f"--set {name}.*: {err}") from err
    return config, model, methods, train, val, test


def main(argv=None, prog: str | None = None) -> dict:
    """``savae compare``: flags -> checked config -> every method on every seed -> the files in --workdir."""
    parser = build_parser(prog)
    args, mesh = flags.parse_args(parser, argv)
    workdir = Path(args.workdir)
    try:
        config, model, methods, train, val, test = validate(args, mesh)
        workdirs.prepare(workdir, config.to_dict(), args, OUTPUTS, NOT_COMPARED)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err).replace("batch_size", "--batch-size"))

    # Across processes (--distributed) every process runs the same computation
    # on the same --workdir; process 0 alone prints and writes the files (the
    # checkpoints and params/ are Orbax's collective saves, written by it too).
    distributed.barrier("compare: workdir checked")  # before process 0 writes config.json
    log = flags.make_log()
    log(flags.backend_line())
    if distributed.is_primary() and not (workdir / "config.json").exists():
        checkpoint.atomic_write_json(workdir / "config.json", {"config": config.to_dict(), **report.environment()})
    log(f"{config.dataset}: {len(train.images)} train / {0 if val is None else len(val.images)} validation / "
        f"{len(test.images)} test, budget {config.budget_evals} evals per method, seeds "
        f"{','.join(map(str, config.seeds))}, backend {jax.default_backend()}")
    with flags.disk_errors(parser.prog, workdir):
        try:
            results = run_all(methods, config, args, workdir, model, (train, val, test), mesh, log)
        except driver.NonFiniteLossError as err:
            sys.exit(f"{parser.prog}: stopped: {err}. Results of finished methods are in {workdir}.")
        if distributed.is_primary():
            print(write_report(workdir, results, config, args.log_evals))
    return results


def write_report(workdir: Path, results: dict, config: dict, log_evals: bool = False) -> str:
    """The figures, summary.md and report.html of a finished comparison; returns the summary's tables."""
    summary = report.summarize(results, config)
    figures.save_comparison_figures(workdir, results, log_evals)
    names = report.figure_files(workdir, results)
    checkpoint.atomic_write_text(workdir / "summary.md", summary + report.figures_markdown(names))
    checkpoint.atomic_write_text(workdir / "report.html", report.report_html(summary, workdir, names))
    return summary


def run_all(methods, config, args, workdir, model, data, mesh, log) -> dict:
    """Run every method on every seed; results.json grows after each run.

    Seed ``s`` fixes the initial parameters, the data order and every
    method's keys, so all methods of one seed start from the same point and
    see the same batches. Every method is scored by the true ELBO (beta = 1)
    whatever it trained on; the validation split (if any) chooses the kept
    parameters, the test set is only reported.
    """
    train, val, test = data
    binarize = None if config.binarize == "none" else config.binarize
    batch_fn = sv.data.BatchFn(binarize)  # one batch function for training and evaluation
    eval_loss = sv.make_loss(model)
    evaluate = lambda p: sv.evaluation.evaluate(eval_loss, p, test.images, binarize=batch_fn)  # noqa: E731
    validate = None if val is None else (
        lambda p: sv.evaluation.evaluate(eval_loss, p, val.images, binarize=batch_fn))  # noqa: E731
    results = {}
    # The first phase's end, per (first_phase_key, seed), of the first method that computed it: refinements
    # with the same Adam half start from there instead of computing it again (bitwise the same run). Not
    # under --budget-seconds, where the clock ends each phase.
    shared = {}
    for name, phases in methods.items():
        runs = {}
        first = None if config.budget_seconds else first_phase_key(name, config.method_config[name])
        for index, seed in enumerate(config.seeds):
            key_init, key_run, key_grid = jax.random.split(jax.random.key(seed), 3)
            params0 = sv.models.init(key_init, model, train.images[:1])
            tag = f"{name}/seed{seed}"
            key_shared = None if first is None else (first, seed)

            def keep(end, key_shared=key_shared):
                if end.phase == 0 and key_shared is not None:
                    shared.setdefault(key_shared, end)

            params, history, trace = driver.run(
                key_run, phases, params0, train.images, batch_size=config.batch_size,
                eval_every=config.eval_every, budget_evals=config.budget_evals,
                budget_seconds=config.budget_seconds, batch_fn=batch_fn, evaluate=evaluate, validate=validate,
                checkpoint_every=config.checkpoint_every, checkpoint_dir=workdir / "checkpoints" / tag,
                resume=args.resume, mesh=mesh, progress=not args.quiet and distributed.is_primary(), desc=tag,
                log=log, initial_row=True, trace=True, on_phase_end=keep, start=shared.get(key_shared))
            runs[str(seed)] = run = method_result(history, sv.evaluation.report(
                model, params, test.images, binarize=batch_fn, iwae_samples=config.eval_iwae))
            log(f"{tag}: test negative ELBO {run['test_neg_elbo']:.3f} nats (last parameters "
                f"{run['last_test_neg_elbo']:.3f}) after {run['evals']} evals, {run['seconds']:.1f} s")
            checkpoint.save_params(workdir / "params" / tag, params)  # collective: every process
            if distributed.is_primary():
                workdirs.write_csv(workdir / f"history_{name}_seed{seed}.csv", history)
                workdirs.write_csv(workdir / f"trace_{name}_seed{seed}.csv", trace)  # one row per step
                if index == 0:
                    figures.save_grids(workdir, key_grid, params, model, test.images, binarize, label=name)
            results[name] = report.aggregate(runs)  # results.json grows after every run
            if distributed.is_primary():
                checkpoint.atomic_write_json(workdir / "results.json", checkpoint.json_safe(results))
    return results


def method_result(history: list[dict], report: dict) -> dict:
    """One run's numbers: test scores of the returned and the last parameters, costs, diagnostics, history.

    ``test_neg_elbo`` and the IWAE are the returned parameters' (the
    best-validation ones with a validation split, else the last);
    ``last_test_neg_elbo`` is the last row's; ``phase_ends`` the test
    -ELBO at the end of each phase (e.g. the Adam half of a refinement).
    """
    last = history[-1]
    out = {
        "test_neg_elbo": report["test_neg_elbo"],
        "last_test_neg_elbo": last["test_neg_elbo"],
        **{k: report[k] for k in ("test_neg_iwae", "elbo_iwae_gap", "bits_per_dim") if k in report},
        "active_units": report["diagnostics"]["active_units"],
        "evals": last["evals"], "steps": last["step"], "seconds": last["seconds"],
        "phase_ends": {row["phase"]: row["test_neg_elbo"] for row in history},  # the last row of each phase
    }
    if "best_step" in last:
        out["best_step"] = last["best_step"]  # the step of the kept parameters (0: the initial ones)
    return out | {"diagnostics": report["diagnostics"], "history": history}

