"""Equal tuning budgets: N quasi-random trials per method from its search space, scored on validation.

    savae tune --dataset digits --methods adam,sa-refine --trials 16 --budget-evals 15000 --workdir runs/tune

Every method of the registry declares a search space next to its defaults
(``registry.SEARCH_SPACES``). A study draws the same number N of trials for
every method from a scrambled Sobol sequence (``scipy.stats.qmc``; the same
seed gives the same trials), runs each trial at the same budget of loss
evaluations on the training part, and scores it by the validation negative
ELBO of the parameters the validation gate keeps (``driver.run``'s gate: the
best row, or the initial parameters). The test split is never loaded.

Trials that differ only in floating-point hyperparameters (learning rates,
scales, temperatures, momenta) share one compiled program: a trial group is
one ``jax.vmap`` over them (:func:`stacked`), with every trial seeing the
same batches and keys as a run of its own would. Trials whose choices differ
(a share, a decision size, K, the confident rule's level) change the program
and form other groups. The study is saved after every group (``study.json``)
and ``--resume`` continues with the groups left.

Outputs in --workdir: ``trials.csv`` (a row per trial: every hyperparameter,
the validation score, the kept step, evaluations and seconds),
``tuned_config.json`` (a ``savae compare --config`` file with each method's
best trial), ``summary.md`` (best against default per method) and
``tuning_<method>.png`` (validation score against each hyperparameter).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import savae_jax as sv
from savae_jax import checkpoint, distributed, driver, evaluation
from savae_jax.experiments import builders, figures, flags, registry, report, tuners
from savae_jax.experiments import workdir as workdirs
from savae_jax.experiments.settings import ModelConfig
from savae_jax.optimizer import Optimizer

tree_map = jax.tree_util.tree_map


# ------------------------------------------------------------------ sampling


def sobol(dims: int, num: int, seed: int) -> np.ndarray:
    """(num, dims) points of a scrambled Sobol sequence in [0, 1), a pure function of ``seed``."""
    import warnings

    from scipy.stats import qmc

    try:
        sampler = qmc.Sobol(dims, scramble=True, rng=np.random.default_rng(seed))
    except TypeError:  # scipy < 1.15 names it seed
        sampler = qmc.Sobol(dims, scramble=True, seed=np.random.default_rng(seed))
    with warnings.catch_warnings():  # N need not be a power of 2 (the balance warning is about that)
        warnings.simplefilter("ignore", UserWarning)
        return sampler.random(num)


def method_seed(seed: int, method: str) -> int:
    """The sampler's seed for ``method`` in a study of ``seed``: each method its own sequence."""
    return int(np.random.SeedSequence([seed, zlib.crc32(method.encode())]).generate_state(1)[0])


def sample_trials(space: dict, num: int, seed: int) -> list[dict]:
    """``num`` trials from ``space`` (``{name: registry.Dist}``): log-uniform values sampled in log,
    uniform ones linearly, choices equally often; the same ``seed`` gives the same trials."""
    names = sorted(space)
    if not names:
        return [{} for _ in range(num)]
    return [{name: tuners.from_unit(space[name], float(u)) for name, u in zip(names, row)}
            for row in sobol(len(names), num, seed)]


def group_key(trial: dict, space: dict) -> tuple:
    """What a trial shares with the others of its group: its choices (sorted by name)."""
    return tuple((name, trial[name]) for name in sorted(space) if space[name].kind == "choice")


def groups(trials: list[dict], space: dict) -> dict[tuple, list[int]]:
    """Trial indices by :func:`group_key`, in order of first appearance."""
    out: dict[tuple, list[int]] = {}
    for i, trial in enumerate(trials):
        out.setdefault(group_key(trial, space), []).append(i)
    return out


def space_table(spaces: dict | None = None) -> str:
    """The search spaces (``{method: {name: registry.Dist}}``; the registry's by default, with each
    hyperparameter's default) as one Markdown table. docs/tuning.md holds the registry's and
    docs/quantization.md ``savae quantize``'s; tests keep each in sync."""
    def shown(d):
        if d.kind == "choice":
            return "one of " + ", ".join(map(str, d.choices))
        return f"{d.kind} [{d.low:g}, {d.high:g}]"

    if spaces is None:
        rows = ["| method | hyperparameter | default | sampled from |", "|---|---|---|---|"]
        for method in registry.METHODS:
            defaults = registry.method_keys(method)
            for name, d in sorted(registry.SEARCH_SPACES[method].items()):
                rows.append(f"| {method} | {name} | {defaults[name]:g} | {shown(d)} |")
    else:
        rows = ["| method | hyperparameter | sampled from |", "|---|---|---|"]
        rows += [f"| {method} | {name} | {shown(d)} |" for method, space in spaces.items()
                 for name, d in sorted(space.items())]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ one group as one vmap


def stacked(build, hparams, mesh=None) -> Optimizer:
    """The optimizers ``build(h)`` for every row of ``hparams`` as ONE optimizer over a trial axis.

    ``hparams``: a dict of (n,) arrays; ``build(h)`` gets one row (traced
    scalars) and returns an :class:`~savae_jax.optimizer.Optimizer` whose
    program does not depend on the values (the sweep pattern of
    ``annealing.replica_exchange``). Every trial gets the step's key and
    batch unchanged, as a run of its own would. ``init`` takes stacked
    parameters (a leading trial axis). ``mesh``: the trial axis is sharded
    over its devices (n a multiple of their number; :func:`shard_trials`).
    """
    first = build(tree_map(lambda a: a[0], hparams))
    place = (lambda tree: tree) if mesh is None else functools.partial(shard_trials, mesh=mesh, constraint=True)

    def init(params):
        return place(jax.vmap(lambda h, p: build(h).init(p))(hparams, params))

    def step(key, state, batch):
        state, info = jax.vmap(lambda h, s: build(h).step(key, s, batch))(hparams, state)
        return place(state), info

    return Optimizer(init=init, step=step, cost=first.cost, loss_fn=first.loss_fn,
                     examples_per_step=first.examples_per_step, batch_size=first.batch_size)


def shard_trials(tree, mesh, constraint: bool = False):
    """``tree``'s arrays split along their leading (trial) axis over ``mesh``'s devices.

    Each device runs its share of a group's trials and nothing else: the
    trials are independent, so a trial computes the same bits on any device
    count (tests/sharding_worker.py checks it). ``constraint``: inside a
    traced function (``jax.lax.with_sharding_constraint``), else a ``device_put``.
    """
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    if constraint:
        return tree_map(lambda a: jax.lax.with_sharding_constraint(a, sharding) if a.ndim else a, tree)
    return jax.device_put(tree, sharding)


def padded(settings: list, mesh) -> list:
    """``settings`` padded with copies of the last to a multiple of ``mesh``'s devices (unchanged if None)."""
    if mesh is None:
        return settings
    return settings + [settings[-1]] * (-len(settings) % mesh.size)


def trial_params(state):
    """Each trial's parameters from a stacked state (a replica exchange's are its coldest replica's)."""
    return jax.vmap(lambda s: s.params)(state)


@dataclasses.dataclass
class Workload:
    """What every trial of a study runs on: the model, loss, data and budget."""

    model: object
    loss_fn: object
    train: np.ndarray
    val: np.ndarray
    budget_evals: int
    batch_size: int
    eval_every: int
    batch_fn: sv.data.BatchFn
    key: jax.Array

    def validate_stacked(self, params) -> np.ndarray:
        """The validation negative ELBO of each trial's parameters (a leading trial axis)."""
        return evaluation.evaluate_stacked(sv.make_loss(self.model), params, self.val, binarize=self.batch_fn)

    def per_example_stacked(self, params) -> np.ndarray:
        """Each trial's negative ELBO on each validation example (trials, examples): the terms of
        :meth:`validate_stacked`'s means."""
        return evaluation.per_example_stacked(sv.make_loss(self.model), params, self.val, binarize=self.batch_fn)


def group_optimizers(method: str, settings: list[dict], loss_fn, batch_size: int, mesh=None):
    """The optimizers of a trial group: ``(phases of the first trial, one optimizer per phase)``, each
    optimizer stepping every trial at once (:func:`stacked`): the trials' floating-point settings
    are swept as traced values, so the method's phases are built inside the traced step."""
    space = registry.SEARCH_SPACES[method]
    floats = [k for k in sorted(space) if space[k].kind != "choice"]
    fixed = {k: v for k, v in settings[0].items() if k not in floats}
    # The swept floats (an index alone when a space has none: the vmap needs an axis).
    hparams = {k: jnp.asarray([s[k] for s in settings], jnp.float32) for k in floats} or {
        "_trial": jnp.arange(len(settings))}

    def build_phases(h):
        h = {k: v for k, v in h.items() if k != "_trial"}
        return registry.assemble_phases(method, fixed | h, loss_fn, batch_size=batch_size)

    probe = registry.assemble_phases(method, settings[0], loss_fn, batch_size=batch_size)
    return probe, [stacked(lambda h, i=index: build_phases(h)[i].optimizer, hparams, mesh)
                   for index in range(len(probe))]


def run_group(method: str, settings: list[dict], work: Workload, params0, mesh=None) -> tuple[list[dict], object]:
    """Run the trials ``settings`` (full setting dicts of ``method`` that differ only in floats) as one vmap.

    Each trial runs the method's phases at ``work.budget_evals``, with rows
    every ``eval_every`` steps and at each phase's end, as ``driver.run``
    would, and the validation gate keeps its best row (or the initial
    parameters, step 0). Returns ``(rows, kept)``: one dict per trial,
    ``val_neg_elbo`` (of the kept parameters), ``best_step``, ``evals``,
    ``steps``, ``seconds`` (the group's, shared); and the kept parameters,
    stacked along a leading trial axis.

    ``mesh``: a one-axis ``jax.sharding.Mesh``; the trials are sharded over
    its devices (padded with copies of the last to a multiple of their
    number, the copies dropped from the result), the data replicated. Every
    trial's rows and parameters equal a one-device run's, bitwise.
    """
    wanted, settings = len(settings), padded(settings, mesh)
    num = len(settings)
    probe, optimizers = group_optimizers(method, settings, work.loss_fn, work.batch_size, mesh)
    max_steps = driver.phase_steps(probe, len(work.train), work.batch_size, work.budget_evals)
    params = tree_map(lambda p: jnp.broadcast_to(p, (num, *p.shape)), params0)
    if mesh is not None:
        params = shard_trials(params, mesh)
        work = dataclasses.replace(work, **distributed.replicate({"train": work.train, "val": work.val}, mesh))
    best, kept = work.validate_stacked(params), params
    best_step = np.zeros(num, np.int64)
    total, evals, start = 0, 0, time.perf_counter()
    for index, (steps_left, optimizer) in enumerate(zip(max_steps, optimizers)):
        state = optimizer.init(params)
        steps = driver.iterate(jax.random.fold_in(work.key, index), optimizer, state, work.train,
                               driver.phase_batch_size(probe[index], work.batch_size), batch_fn=work.batch_fn)
        for done in range(1, steps_left + 1):
            _, state, _ = next(steps)
            total += 1
            if total % work.eval_every == 0 or done == steps_left:  # driver.run's rows
                now = trial_params(state)
                values = work.validate_stacked(now)
                better = values < best  # strictly lower: on a tie the earlier parameters stay
                best, best_step = np.where(better, values, best), np.where(better, total, best_step)
                kept = tree_map(lambda n, k: jnp.where(better.reshape(-1, *[1] * (n.ndim - 1)), n, k), now, kept)
        evals += steps_left * optimizer.cost
        params = trial_params(state)
    seconds = time.perf_counter() - start
    rows = [{"val_neg_elbo": float(best[i]), "best_step": int(best_step[i]), "evals": evals, "steps": total,
             "seconds": seconds} for i in range(wanted)]
    return rows, tree_map(lambda a: a[:wanted], kept)


# ------------------------------------------------------------------ the study


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """The study's settings (its flags)."""

    dataset: str = "digits"
    data_dir: str | None = None
    methods: str = "adam,sa-refine"
    trials: int = 8
    budget_evals: int = 15000
    seed: int = 0
    validation: float = 0.1
    batch_size: int = 128
    eval_every: int = 200
    hidden: int = 500
    latents: int = 20
    one_by_one: bool = False        # also run every trial alone (driver.run), to time and check the vmap against it
    tuner: str = "random"           # tuners.TUNERS
    round_size: int | None = None   # trials per round (optuna, anneal; default tuners.DEFAULT_ROUND_SIZE)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = TuneConfig()
    p = argparse.ArgumentParser(prog=prog or "savae tune", description=__doc__.split("\n")[0],
                                formatter_class=flags.HelpFormatter)
    p.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(sv.data.DATASETS)}")
    p.add_argument("--data-dir", default=d.data_dir, help="folder with MNIST IDX files or a TFDS data dir")
    p.add_argument("--methods", default=d.methods, help=f"comma-separated, from {', '.join(registry.METHODS)}")
    p.add_argument("--trials", type=flags.positive(int), default=d.trials,
                   help="quasi-random trials per method (the same for every method)")
    p.add_argument("--budget-evals", type=flags.positive(int), default=d.budget_evals,
                   help="loss evaluations per trial")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the trials, the initial parameters and keys")
    flags.add_gated_run_flags(p, d, "fraction of the training set held out to score the trials")
    p.add_argument("--tuner", choices=tuners.TUNERS, default=d.tuner,
                   help="random: N Sobol trials at once; optuna: TPE (ask/tell) in rounds; anneal: the annealing "
                        "step on hyperparameters, in rounds (docs/tuning.md)")
    p.add_argument("--round-size", type=flags.positive(int), default=d.round_size,
                   help=f"with --tuner optuna or anneal: trials per round, run together "
                        f"(default {tuners.DEFAULT_ROUND_SIZE})")
    p.add_argument("--one-by-one", action="store_true",
                   help="also run every trial alone (driver.run) and report the group's wall-clock against "
                        "the sum of the trials', and each lone run's kept step and score beside the group's "
                        "in trials.csv (doubles the work; the choice of trials does not change)")
    flags.add_devices_flag(p, "shard each trial group's trials over")
    flags.add_workdir_flags(p, "runs/tune")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    flags.add_config_flag(p)
    return p


OUTPUTS = ("config.json", "study.json", "trials.csv", "tuned_config.json", "summary.md", "tuning_*.png",
           "per_example")
# --devices may change on --resume: a trial's kept step is the same on any device count (its
# parameters differ in the last float32 bits where its device runs another number of trials).
NOT_COMPARED = ("resume", "overwrite", "workdir", "quiet", "devices")


def check(config: TuneConfig) -> list[str]:
    """The methods of the study (ValueError naming the flag)."""
    methods = flags.methods_list(config.methods)
    if config.seed < 0:
        raise ValueError(f"--seed: must be an integer >= 0, got {config.seed}")
    if not 0 < config.validation < 1:
        raise ValueError(f"--validation: the trials are scored on it: must be in (0, 1), got {config.validation}")
    if config.round_size is not None and config.tuner == "random":
        raise ValueError("--round-size: the random tuner draws all --trials at once; "
                         "give --tuner optuna or anneal to tune in rounds")
    if config.dataset not in sv.data.DATASETS:
        raise ValueError(f"--dataset: unknown dataset {config.dataset!r}; choose from {', '.join(sv.data.DATASETS)}")
    return methods


def checked_settings(method: str) -> list[dict]:
    """The settings of ``method`` at its defaults with every combination of its choices: what a
    study checks (budget, batch size) before anything runs, whatever its tuner proposes later."""
    import itertools

    space = registry.SEARCH_SPACES[method]
    default = {k: registry.method_keys(method)[k] for k in space}
    choices = [name for name in sorted(space) if space[name].kind == "choice"]
    return [registry.check_method_settings(method, default | dict(zip(choices, combo)))
            for combo in itertools.product(*(space[name].choices for name in choices))]


def main(argv=None, prog: str | None = None) -> dict:
    """``savae tune``: flags -> the study's trials -> one vmap per group -> trials.csv, tuned_config.json."""
    parser = build_parser(prog)
    args, mesh = flags.parse_args(parser, argv, config_file=True)
    try:
        given = vars(args)
        config = TuneConfig(**{k: given[k] for k in TuneConfig.__dataclass_fields__})
        methods = check(config)
        model_config = ModelConfig(hidden=config.hidden, latents=config.latents)
        model = builders.make_model(model_config)
        loss_fn = builders.make_training_loss(model, model_config)
        train = sv.load(config.dataset, "train", config.data_dir)  # the test split is never loaded
        train, val = sv.data.split_validation(train, config.validation)
        for method in methods:  # every program a trial may need, checked before anything runs
            for settings in checked_settings(method):
                phases = registry.assemble_phases(method, settings, loss_fn, batch_size=config.batch_size)
                driver.check_examples(phases, len(train.images), config.batch_size)
                driver.phase_steps(phases, len(train.images), config.batch_size, config.budget_evals)
            tuners.make_tuner(config.tuner, registry.SEARCH_SPACES[method], 1, 0, config.round_size)
        workdir = Path(given["workdir"])
        workdirs.prepare(workdir, dataclasses.asdict(config), argparse.Namespace(**given), OUTPUTS, NOT_COMPARED)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    log = (lambda line: None) if given["quiet"] else (lambda line: print(line, flush=True))  # noqa: E731
    if mesh is not None:
        log(f"{flags.backend_line()}; each trial group sharded over {mesh.size} of them")
    with flags.disk_errors(parser.prog, workdir):
        study, results = run_study(methods, config, model, (train, val), workdir, log, mesh, loss_fn)
        write_outputs(workdir, study, results, methods, config)
    print((workdir / "summary.md").read_text())
    return results


def run_study(methods, config: TuneConfig, model, data, workdir: Path, log, mesh=None,
              loss_fn=None) -> tuple[list[dict], dict]:
    """Tune every method of ``methods`` with ``config.tuner``, saving ``workdir/study.json`` after each
    trial group; ``(study, results)``: an entry per trial (method, trial, group, tuned values, settings)
    and ``{trial id: result}``. Groups already in study.json are not run again (``--resume``).

    ``mesh``: each group's trials sharded over its devices (:func:`run_group`).
    """
    train, val = data
    checkpoint.atomic_write_json(workdir / "config.json", {"config": dataclasses.asdict(config)})
    saved = workdir / "study.json"
    results = json.loads(saved.read_text())["results"] if saved.is_file() else {}
    key_init, key_run = jax.random.split(jax.random.key(config.seed))
    params0 = sv.models.init(key_init, model, train.images[:1])
    loss_fn = loss_fn if loss_fn is not None else sv.make_loss(model)
    work = Workload(model=model, loss_fn=loss_fn, train=jnp.asarray(train.images), val=jnp.asarray(val.images),
                    budget_evals=config.budget_evals, batch_size=config.batch_size, eval_every=config.eval_every,
                    batch_fn=sv.data.BatchFn("dynamic"), key=key_run)
    study = []
    for method in methods:
        tuner = tuners.make_tuner(config.tuner, registry.SEARCH_SPACES[method], config.trials,
                                  method_seed(config.seed, method), config.round_size)
        study += tune_method(method, tuner, config, work, params0, results, workdir, log, mesh)
    return study, results


def round_entries(method: str, round_index: int, batch: list[tuple]) -> list[dict]:
    """A round's trials ``[(index, tuned values)]`` as study entries, grouped by their choices (in order of
    first appearance; round 0's groups are named ``method/g``, later rounds' ``method/r.g``)."""
    space = registry.SEARCH_SPACES[method]
    by_group: dict[tuple, list] = {}
    for index, trial in batch:
        by_group.setdefault(group_key(trial, space), []).append((index, trial))
    entries = []
    for g, members in enumerate(by_group.values()):
        name = f"{method}/{g}" if round_index == 0 else f"{method}/{round_index}.{g}"
        entries += [{"method": method, "trial": index, "group": name, "tuned": trial,
                     "settings": registry.check_method_settings(method, trial)} for index, trial in members]
    return entries


def tune_method(method, tuner, config: TuneConfig, work: Workload, params0, results: dict, workdir: Path, log,
                mesh=None) -> list[dict]:
    """``config.trials`` trials of ``method``, asked from ``tuner`` round by round; the study's entries.

    Round 0 also scores the method's default settings (never told to the tuner,
    never chosen: every method gets the same N trials). A resumed study asks
    the tuner again from the start and tells it the saved results, so it
    proposes the same rounds as the uninterrupted study did.
    """
    space = registry.SEARCH_SPACES[method]
    entries, done, round_index = [], 0, 0
    while done < config.trials:
        asked = tuner.ask(min(tuner.round_size, config.trials - done))
        batch = [(done + i, trial) for i, trial in enumerate(asked)]
        if round_index == 0:
            batch.append(("default", {k: registry.method_keys(method)[k] for k in space}))
        this_round = round_entries(method, round_index, batch)
        for group in dict.fromkeys(e["group"] for e in this_round):
            members = [e for e in this_round if e["group"] == group]
            if all(is_saved(results, e) for e in members):
                continue
            out, kept = run_group(method, [e["settings"] for e in members], work, params0, mesh)
            if tuner.needs_per_example:  # saved before study.json names the group done
                for entry, losses in zip(members, work.per_example_stacked(kept)):
                    save_per_example(workdir, entry, losses)
            if config.one_by_one:
                for entry, result in zip(members, out):
                    result.update(run_alone(entry, work, params0))
            for entry, result in zip(members, out):
                results[trial_id(entry)] = result | {"tuned": entry["tuned"]}
            checkpoint.atomic_write_json(workdir / "study.json", {"results": results})
            log(f"{group}: {len(members)} trials in {out[0]['seconds']:.1f} s, best validation -ELBO "
                f"{min(r['val_neg_elbo'] for r in out):.3f}")
        sampled = [e for e in this_round if e["trial"] != "default"]
        per_example = (np.stack([load_per_example(workdir, e) for e in sampled]) if tuner.needs_per_example
                       else None)
        tuner.tell([e["tuned"] for e in sampled], [results[trial_id(e)]["val_neg_elbo"] for e in sampled],
                   per_example)
        decided = getattr(tuner, "decisions", [])
        if decided and decided[-1]["round"] == round_index:
            d = decided[-1]
            log(f"{method} round {round_index}: the round's best {'replaces' if d['accepted'] else 'does not replace'} "
                f"the incumbent (paired difference {d['delta']:+.4f} +- {d['stderr']:.4f} nats, T {d['temperature']:.3g})")
        entries += this_round
        done, round_index = done + len(asked), round_index + 1
    return entries


def is_saved(results: dict, entry: dict) -> bool:
    """Whether ``entry``'s result is in study.json (ValueError if the saved trial is another one)."""
    saved = results.get(trial_id(entry))
    if saved is None:
        return False
    if "tuned" in saved and saved["tuned"] != entry["tuned"]:
        raise ValueError(f"--resume: study.json holds another trial {trial_id(entry)} ({saved['tuned']}) than "
                         f"this study proposes ({entry['tuned']}); it was written by another study")
    return True


def per_example_path(workdir: Path, entry: dict) -> Path:
    return workdir / "per_example" / f"{entry['method']}_{entry['trial']}.npy"


def save_per_example(workdir: Path, entry: dict, losses) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(losses, np.float32))
    checkpoint.atomic_write_bytes(per_example_path(workdir, entry), buf.getvalue())


def load_per_example(workdir: Path, entry: dict) -> np.ndarray:
    return np.load(per_example_path(workdir, entry))


def run_alone(entry: dict, work: Workload, params0) -> dict:
    """One trial run by itself through ``driver.run``, with the same data, keys and gate as its group:
    ``seconds_alone`` (wall-clock, compile included, as a group's seconds include its one compile),
    and ``best_step_alone`` and ``val_neg_elbo_alone``, the step its gate kept and that step's
    validation score, which should be the group's ``best_step`` and, to a few float32 ulps of a
    vmapped evaluation, its ``val_neg_elbo``."""
    loss = sv.make_loss(work.model)
    start = time.perf_counter()
    run = driver.run(work.key, registry.build_phases(entry["method"], entry["settings"], work.loss_fn,
                                                     batch_size=work.batch_size),
                     params0, work.train, batch_size=work.batch_size, eval_every=work.eval_every,
                     budget_evals=work.budget_evals, batch_fn=work.batch_fn,
                     validate=lambda p: sv.evaluate(loss, p, work.val, binarize=work.batch_fn))
    seconds = time.perf_counter() - start
    last = run.history[-1]
    kept = next(row for row in run.history if row["step"] == last["best_step"])
    return {"seconds_alone": seconds, "best_step_alone": last["best_step"], "val_neg_elbo_alone": kept["val_neg_elbo"]}


def trial_id(entry: dict) -> str:
    return f"{entry['method']}/{entry['trial']}"


def best_trials(study, results) -> dict:
    """Each method's best sampled trial (lowest validation score; the first on a tie)."""
    best = {}
    for entry in study:
        if entry["trial"] == "default":
            continue
        value = results[trial_id(entry)]["val_neg_elbo"]
        method = entry["method"]
        if method not in best or value < results[trial_id(best[method])]["val_neg_elbo"]:
            best[method] = entry
    return best


def write_outputs(workdir: Path, study, results, methods, config: TuneConfig) -> None:
    """trials.csv, tuned_config.json, summary.md and the per-method plots."""
    rows = [{"method": e["method"], "trial": e["trial"], "group": e["group"], **e["tuned"],
             **{k: v for k, v in results[trial_id(e)].items() if k != "tuned"}} for e in study]
    workdirs.write_csv(workdir / "trials.csv", rows)
    best = best_trials(study, results)
    tuned = {"dataset": config.dataset, "methods": ",".join(methods), "budget_evals": config.budget_evals,
             "batch_size": config.batch_size, "hidden": config.hidden, "latents": config.latents,
             "validation": config.validation,
             "method_config": {m: {k: v for k, v in best[m]["settings"].items()
                                   if k in registry.SEARCH_SPACES[m] or k in registry.METHOD_DEFAULTS[m]}
                               for m in methods}}
    checkpoint.atomic_write_json(workdir / "tuned_config.json", tuned)
    checkpoint.atomic_write_text(workdir / "summary.md", summarize(study, results, methods, config))
    for method in methods:
        figures.save_tuning_figure(workdir, method, [r for r in rows if r["method"] == method],
                                   sorted(registry.SEARCH_SPACES[method]))


def summarize(study, results, methods, config: TuneConfig) -> str:
    best = best_trials(study, results)
    how = ("quasi-random trials" if config.tuner == "random" else
           f"trials of the {config.tuner} tuner in rounds of {config.round_size or tuners.DEFAULT_ROUND_SIZE}")
    lines = [f"# Tuning on {config.dataset}: {config.trials} {how} per method, "
             f"{config.budget_evals} evaluations each (seed {config.seed})", "",
             "Validation negative ELBO (nats) of the parameters each trial's gate kept; the test set was not read.",
             "", "| method | default | best of the trials | gain | best trial's settings |", "|---|---|---|---|---|"]
    for method in methods:
        default = results[f"{method}/default"]["val_neg_elbo"]
        top = results[trial_id(best[method])]["val_neg_elbo"]
        settings = report.format_settings(best[method]["tuned"])
        lines.append(f"| {method} | {default:.3f} | {top:.3f} | {default - top:+.3f} | {settings} |")
    if config.one_by_one:
        lines += ["", "Wall-clock of the study (compiles included): each trial group as one vmap against its "
                  "trials run one by one.", "", "| method | groups | trials | one vmap per group (s) | "
                  "one by one (s) | speed-up |", "|---|---|---|---|---|---|"]
        for method in methods:
            entries = [e for e in study if e["method"] == method]
            group_seconds = {e["group"]: results[trial_id(e)]["seconds"] for e in entries}
            alone = sum(results[trial_id(e)]["seconds_alone"] for e in entries)
            together = sum(group_seconds.values())
            lines.append(f"| {method} | {len(group_seconds)} | {len(entries)} | {together:.1f} | {alone:.1f} "
                         f"| {alone / together:.2f}x |")
    return "\n".join(lines) + "\n"
