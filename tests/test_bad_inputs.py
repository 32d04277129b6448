"""The bad-input catalogue (issue 7): every bad input gives a clear error naming the argument.

``CASES`` is the catalogue: one row per bad input, tried by one parametrized
test, and rendered as the table of docs/bad_inputs.md (a test keeps the two
in sync; regenerate the table with ``python tests/test_bad_inputs.py``).

API cases call the library and expect an exception whose message contains
the excerpt; CLI cases call ``experiments/{train,compare}.py``'s ``main(argv)``
and expect argparse's exit (status 2) with the excerpt on stderr and nothing
written to the (fresh) workdir.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import quantize
import savae_jax.annealing as an
from savae_jax import checkpoint
from conftest import small_vae

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_inputs.md"


from savae_jax.experiments import compare as compare_script  # noqa: E402
from savae_jax.experiments import plateau as plateau_script  # noqa: E402
from savae_jax.experiments import train as train_script  # noqa: E402

TINY = ["--hidden", "32", "--latents", "4", "--quiet"]


@functools.cache
def digits():
    return sv.load("digits", "train")


@functools.cache
def tiny():
    """(model, loss_fn, params, batch) of a small MLP VAE on digits."""
    model, loss_fn = small_vae(32, 4)
    params = sv.models.init(jax.random.key(0), model, digits().images[:1])
    return model, loss_fn, params, jnp.asarray(digits().images[:16])


def anneal(proposal=None, temperature=1.0, acceptance=None, num_proposals=4, loss_fn=None, **kw):
    """simulated_annealing on the tiny VAE with defaults for everything not under test."""
    return an.simulated_annealing(loss_fn or tiny()[1], num_proposals, proposal or an.gaussian(0.01),
                                  temperature, acceptance or an.metropolis(), **kw)


def first_step(sa):
    """Run one jitted step of ``sa`` from the tiny VAE's params (errors found by tracing surface here)."""
    _, _, params, x = tiny()
    return jax.jit(sa.step)(jax.random.key(1), sa.init(params), x)


def vector_loss(params, key, x):
    return jnp.stack([tiny()[1](params, key, x)] * 3)


def int_loss(params, key, x):
    return tiny()[1](params, key, x).astype(jnp.int32)


def fit(train=None, epochs=1, batch_size=100, loss_fn=None, optimizer=None):
    _, loss, params, _ = tiny()
    return sv.fit(jax.random.key(0), params, loss_fn or loss, optimizer or optax.adam(1e-3),
                  digits() if train is None else train, epochs, batch_size)


def images_with(value):
    images = np.array(digits().images[:8])
    images[0, 0, 0, 0] = value
    return images


def saved_params(tmp_path, hidden):
    """An orbax params checkpoint of an MLP VAE of another width; returns its path."""
    model = sv.MLPVAE(hidden=hidden, latents=4)
    path = tmp_path / f"params_h{hidden}"
    checkpoint.save_params(path, sv.models.init(jax.random.key(0), model, digits().images[:1]))
    return path


def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def run_with_other_config(tmp_path):
    """compare.py --resume in a workdir whose config.json was written by another config."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    saved = compare_script.DEFAULTS | {"methods": "adam", "hidden": 16, "latents": 4,
                                      "checkpoint_every": 1000}
    checkpoint.atomic_write_json(workdir / "config.json", {"config": saved})
    return ["--workdir", str(workdir), "--methods", "adam", "--resume", *TINY]


def workdir_with_a_run(tmp_path):
    """train.py into a workdir that holds an earlier run (its config.json), without --resume."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    checkpoint.atomic_write_json(workdir / "config.json", {"config": {"epochs": 3}})
    return ["--workdir", str(workdir), "--epochs", "1", *TINY]


def annealer_on_another_loss(tmp_path):
    """fit(loss_fn=A) with an annealer built on loss B (beta 0.5): it would train on B, report A."""
    other = sv.make_loss(tiny()[0], beta=0.5)
    return fit(optimizer=anneal(loss_fn=other))


def budget_below_one_step(tmp_path):
    """driver.run with 4 evaluations for an annealer whose step costs K + 1 = 5."""
    params = tiny()[2]
    return sv.driver.run(jax.random.key(0), [sv.Phase("sa", anneal())], params, digits().images,
                         batch_size=100, eval_every=1, budget_evals=4)


# ---- issue 16: helpers of the cases below


def thesis_folder(tmp_path):
    """A folder holding a user's file (save_params must not empty it)."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    return folder


def fit_sa(temperature=1.0, radius=None, acceptance=None, loss_fn=None):
    """fit for one epoch with a small annealer (a bad schedule or rule under test)."""
    loss = loss_fn or tiny()[1]
    sa = an.simulated_annealing(loss, 4, an.gaussian(0.01), temperature, acceptance or an.metropolis(),
                                radius=radius)
    return fit(loss_fn=loss, optimizer=sa)


def tuple_loss(params, key, x):
    return tiny()[1](params, key, x), {"aux": 0.0}


def mnist_shaped_params():
    """Parameters of the tiny model initialised for 28x28 images (used on 8x8 digits below)."""
    return sv.models.init(jax.random.key(0), tiny()[0], np.zeros((1, 28, 28, 1), np.float32))


def fit_params(params, test=None):
    _, loss, _, _ = tiny()
    return sv.fit(jax.random.key(0), params, loss, optax.adam(1e-3), digits(), 1, 100, test=test)


def saved_config(tmp_path, text, script="compare"):
    """A workdir whose config.json holds ``text`` (truncated, or without its "config" key), resumed."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(text)
    flags = ["--methods", "adam"] if script == "compare" else ["--epochs", "1"]
    return ["--workdir", str(workdir), *flags, "--resume", *TINY]


def run_and_thesis(tmp_path, *flags):
    """train.py --overwrite into a workdir holding a run (its config.json) and a user's thesis.tex."""
    argv = workdir_with_a_run(tmp_path)
    (tmp_path / "w" / "thesis.tex").write_text("chapter 1")
    return [*argv, "--overwrite", *flags]


def config_file(tmp_path, config):
    """compare.py --config FILE holding ``config`` (no --hidden flag, so the file's value counts)."""
    path = tmp_path / "config_in.json"
    path.write_text(__import__("json").dumps(config))
    return ["--workdir", str(tmp_path / "w"), "--config", str(path), "--methods", "adam", "--latents", "4",
            "--quiet"]


# ---- issue 23: helpers of the cases below

PLATEAU_TINY = ["--hidden", "16", "--latents", "4", "--max-epochs", "1", "--extra-evals", "40",
                "--eval-every", "5", "--eval-iwae", "0", "--seeds", "0", "--arms", "adam"]


def adam_phase(share=None):
    return sv.Phase("adam", sv.from_optax(tiny()[1], optax.adam(1e-3)), share)


def run_tiny(phases, params=None, images=None, **kw):
    """driver.run on the digits with the tiny VAE (an argument under test in ``kw``)."""
    options = dict(batch_size=None, eval_every=5, budget_evals=60) | kw
    return sv.driver.run(jax.random.key(0), phases, tiny()[2] if params is None else params,
                         digits().images if images is None else images, **options)


def es(num_pairs=2, **kw):
    return an.evolution_strategy(tiny()[1], num_pairs, 0.01, noise="gaussian", **kw)


def fit_es(**kw):
    return fit(optimizer=es(**kw), batch_size=None)


def with_per_example(fn):
    """The tiny loss whose ``per_example`` is ``fn(per_example) -> per_example`` (a wrong shape under test)."""
    loss = tiny()[1]

    def wrapped(params, key, x):
        return loss(params, key, x)

    wrapped.per_example = fn(loss.per_example)
    return wrapped


def sized_decision(size):
    """fit with an annealer deciding on a decision batch whose size schedule returns ``size``."""
    decision = an.decision_batch(16, lambda count: jnp.float32(size), max_size=32)
    return fit(optimizer=anneal(acceptance=an.confident(0.05), decision=decision), batch_size=None)


def other_params():
    """Parameters of a VAE of another width (hidden 24) than the tiny one (32)."""
    return sv.models.init(jax.random.key(0), small_vae(24, 4)[0], digits().images[:1])


def step_with(optimizer, params=None, batch=None):
    """One jitted step of ``optimizer`` (state from ``params``, on ``batch``)."""
    _, _, own, x = tiny()
    state = optimizer.init(own if params is None else params)
    return jax.jit(optimizer.step)(jax.random.key(1), state, x if batch is None else batch)


def replicas(build=None, ladder=(1.0, 2.0)):
    loss = tiny()[1]
    build = build or (lambda t: an.simulated_annealing(loss, 2, an.gaussian(0.01), t, an.metropolis()))
    return an.replica_exchange(build, jnp.asarray(ladder), loss)


def plateau_cli(*flags):
    return lambda tmp: [*flags, "--workdir", str(tmp / "w"), *PLATEAU_TINY]


def plateau_workdir_with_a_run(tmp_path, *flags):
    workdir = tmp_path / "w"
    workdir.mkdir()
    checkpoint.atomic_write_json(workdir / "config.json", {"config": {"seeds": "0"}})
    (workdir / "results.json").write_text("{}")
    return ["--workdir", str(workdir), *PLATEAU_TINY, *flags]


class Case(NamedTuple):
    """One bad input.

    Attributes:
      id: short name (the pytest id and the table's first column).
      input: what is wrong, in words.
      where: the function or script that refuses it.
      error: the exception raised (CLI: argparse's exit, status 2).
      excerpt: a fragment of the message (which names the argument).
      run: ``tmp_path -> None`` (API: raises) or ``tmp_path -> argv`` (CLI).
    """

    id: str
    input: str
    where: str
    error: type
    excerpt: str
    run: Callable

    @property
    def cli(self) -> bool:
        return self.where.endswith(".py")


def train_cli(*flags):
    return lambda tmp: [*flags, "--workdir", str(tmp / "w"), "--epochs", "1", *TINY]


def compare_cli(*flags):
    return lambda tmp: [*flags, "--workdir", str(tmp / "w"), *TINY]


E = SystemExit
CASES = [
    # ---- annealing: schedules, acceptance, kernel, proposals
    Case("temperature-negative", "constant temperature -1", "annealing.simulated_annealing", ValueError,
         "temperature must be a finite number >= 0", lambda tmp: anneal(temperature=-1.0)),
    Case("t0-zero", "exponential schedule with t0 = 0", "annealing.exponential", ValueError,
         "t0 must be > 0", lambda tmp: an.exponential(0.0, 0.99)),
    Case("t0-negative", "logarithmic schedule with t0 = -1", "annealing.logarithmic", ValueError,
         "t0 must be > 0", lambda tmp: an.logarithmic(-1.0)),
    Case("decay-one", "exponential decay = 1 (never cools)", "annealing.exponential", ValueError,
         "decay must be in (0, 1)", lambda tmp: an.exponential(1.0, 1.0)),
    Case("t-min-zero", "t_min = 0", "annealing.simulated_annealing", ValueError,
         "t_min must be a finite number > 0", lambda tmp: anneal(t_min=0.0)),
    Case("alpha-one", "threshold alpha = 1", "annealing.threshold", ValueError,
         "alpha must be in (0, 1)", lambda tmp: an.threshold(alpha=1.0)),
    Case("alpha-zero", "threshold alpha = 0", "annealing.threshold", ValueError,
         "alpha must be in (0, 1)", lambda tmp: an.threshold(alpha=0.0)),
    Case("d-negative", "threshold d = -0.1", "annealing.threshold", ValueError,
         "d must be >= 0", lambda tmp: an.threshold(alpha=0.5, d=-0.1)),
    Case("k-zero", "num_proposals K = 0", "annealing.simulated_annealing", ValueError,
         "num_proposals must be an integer >= 1", lambda tmp: anneal(num_proposals=0)),
    Case("rank-zero", "low_rank rank = 0", "annealing.low_rank", ValueError,
         "rank must be an integer >= 1", lambda tmp: an.low_rank(0.01, rank=0)),
    Case("rank-above-layer", "low_rank rank 9 > min(m, n) = 4 of a 32x4 Dense kernel",
         "annealing step (first trace)", ValueError, "rank=9 is larger than the Dense layer",
         lambda tmp: first_step(anneal(proposal=an.low_rank(0.01, rank=9)))),
    Case("radius-zero", "constant radius 0", "annealing.simulated_annealing", ValueError,
         "radius must be a finite number > 0", lambda tmp: anneal(radius=0.0)),
    Case("radius-negative", "constant radius -1", "annealing.simulated_annealing", ValueError,
         "radius must be a finite number > 0", lambda tmp: anneal(radius=-1.0)),
    Case("scale-zero", "proposal scale 0", "annealing.gaussian", ValueError,
         "scale must be > 0", lambda tmp: an.gaussian(0.0)),
    Case("params-nan", "NaN in the params given to init", "annealing init", ValueError,
         "params must be finite", lambda tmp: anneal().init({"w": jnp.array([1.0, jnp.nan])})),
    Case("params-inf", "inf in the params given to init", "annealing init", ValueError,
         "params must be finite", lambda tmp: anneal().init(jnp.array([jnp.inf]))),
    Case("loss-vector-sa", "loss_fn returns a (3,) vector (annealing)", "annealing step (first trace)",
         ValueError, "loss_fn must return a floating-point scalar",
         lambda tmp: first_step(anneal(loss_fn=vector_loss))),
    Case("loss-int-sa", "loss_fn returns an int32 scalar (annealing, low_rank)", "annealing step (first trace)",
         ValueError, "loss_fn must return a floating-point scalar",
         lambda tmp: first_step(anneal(proposal=an.low_rank(0.01), loss_fn=int_loss))),
    Case("loss-vector-optax", "loss_fn returns a (3,) vector (Optax)", "fit (first trace)",
         ValueError, "loss_fn must return a floating-point scalar",
         lambda tmp: fit(loss_fn=vector_loss)),
    Case("loss-int-optax", "loss_fn returns an int32 scalar (Optax)", "fit (first trace)",
         ValueError, "loss_fn must return a floating-point scalar", lambda tmp: fit(loss_fn=int_loss)),
    # ---- data
    Case("images-nan", "an image pixel is NaN", "data.make_dataset", ValueError,
         "images contains NaN", lambda tmp: sv.data.make_dataset(images_with(np.nan), np.zeros(8, int))),
    Case("images-above-one", "an image pixel is 1.5 (outside [0, 1])", "data.make_dataset", ValueError,
         "images must have values in [0, 1]",
         lambda tmp: sv.data.make_dataset(images_with(1.5), np.zeros(8, int))),
    Case("images-negative-fit", "fit on an array with a pixel -0.5", "fit", ValueError,
         "train must have values in [0, 1]", lambda tmp: fit(train=images_with(-0.5))),
    Case("labels-count", "8 images but 7 labels", "data.make_dataset", ValueError,
         "labels", lambda tmp: sv.data.make_dataset(images_with(0.0), np.zeros(7, int))),
    Case("dataset-empty", "0 images", "data.make_dataset", ValueError, "images is empty",
         lambda tmp: sv.data.make_dataset(np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, int))),
    Case("batch-above-dataset", "batch_size 5000 > 1437 training images", "fit", ValueError,
         "batch_size", lambda tmp: fit(batch_size=5000)),
    Case("epochs-zero", "epochs = 0", "fit", ValueError, "epochs must be a positive integer",
         lambda tmp: fit(epochs=0)),
    Case("optimizer-unknown", "optimizer given as the string 'adam'", "fit", ValueError,
         "optimizer must be an optax.GradientTransformation", lambda tmp: fit(optimizer="adam")),
    Case("dataset-unknown", "dataset 'svhn'", "data.load", ValueError, "Unknown dataset name 'svhn'",
         lambda tmp: sv.load("svhn")),
    Case("split-unknown", "split 'validation' of digits", "data.load", ValueError, "Unknown split",
         lambda tmp: sv.load("digits", "validation")),
    # ---- objective and evaluation
    Case("beta-negative", "beta = -1", "make_loss", ValueError, "beta must be >= 0",
         lambda tmp: sv.make_loss(tiny()[0], beta=-1.0)),
    Case("free-bits-negative", "free_bits = -1", "make_loss", ValueError, "free_bits must be >= 0",
         lambda tmp: sv.make_loss(tiny()[0], free_bits=-1.0)),
    Case("iwae-k-zero", "IWAE with k = 0 samples", "iwae_bound", ValueError, "num_samples must be >= 1",
         lambda tmp: sv.iwae_bound(jax.random.key(0), tiny()[2], tiny()[3], tiny()[0], 0)),
    Case("checkpoint-other-shape", "params saved by a hidden=16 model, loaded as hidden=32",
         "checkpoint.load_params", ValueError, "another model shape",
         lambda tmp: checkpoint.load_params(saved_params(tmp, 16), like=tiny()[2])),
    # ---- experiments/train.py
    Case("cli-train-t0-zero", "--sa-t0 0", "train.py", E, "t0 must be > 0",
         train_cli("--optimizer", "sa", "--sa-t0", "0")),
    Case("cli-train-t-min-above-t0", "--sa-t-min 2 with --sa-t0 1", "train.py", E,
         "--sa-t-min: must be < --sa-t0", train_cli("--optimizer", "sa", "--sa-t0", "1", "--sa-t-min", "2")),
    Case("cli-train-alpha", "--sa-alpha 1.5 (threshold)", "train.py", E, "alpha must be in (0, 1)",
         train_cli("--optimizer", "sa", "--sa-acceptance", "threshold", "--sa-alpha", "1.5")),
    Case("cli-train-d", "--sa-d -1 (threshold)", "train.py", E, "d must be >= 0",
         train_cli("--optimizer", "sa", "--sa-acceptance", "threshold", "--sa-d", "-1")),
    Case("cli-train-k", "--sa-proposals 0", "train.py", E, "num_proposals",
         train_cli("--optimizer", "sa", "--sa-proposals", "0")),
    Case("cli-train-rank-above-layer", "--sa-rank 9 with --latents 4", "train.py", E,
         "--sa-*: rank=9 is larger than the Dense layer",
         train_cli("--optimizer", "sa", "--sa-proposals", "4", "--sa-rank", "9")),
    Case("cli-train-schedule", "--sa-schedule warp", "train.py", E, "--sa-schedule: unknown schedule",
         train_cli("--optimizer", "sa", "--sa-schedule", "warp")),
    Case("cli-train-proposal", "--sa-proposal quantum", "train.py", E, "--sa-proposal: unknown proposal",
         train_cli("--optimizer", "sa", "--sa-proposal", "quantum")),
    Case("cli-train-acceptance", "--sa-acceptance coinflip", "train.py", E,
         "--sa-acceptance: unknown acceptance", train_cli("--optimizer", "sa", "--sa-acceptance", "coinflip")),
    Case("cli-train-optimizer", "--optimizer newton", "train.py", E, "--optimizer: unknown optimizer",
         train_cli("--optimizer", "newton")),
    Case("cli-train-lr", "--lr 0", "train.py", E, "--lr", train_cli("--lr", "0")),
    Case("cli-train-epochs", "--epochs -2", "train.py", E, "--epochs",
         lambda tmp: ["--workdir", str(tmp / "w"), *TINY, "--epochs", "-2"]),
    Case("cli-train-dataset", "--dataset svhn", "train.py", E, "Unknown dataset name 'svhn'",
         train_cli("--dataset", "svhn")),
    Case("cli-train-workdir-file", "--workdir is a file", "train.py", E, "--workdir",
         lambda tmp: ["--workdir", str(a_file(tmp)), "--epochs", "1", *TINY]),
    Case("cli-train-init-from-shape", "--init-from params of a hidden=16 model", "train.py", E,
         "--init-from: checkpoint", lambda tmp: train_cli("--init-from", str(saved_params(tmp, 16)))(tmp)),
    Case("cli-train-iwae", "--eval-iwae -1", "train.py", E, "--eval-iwae", train_cli("--eval-iwae", "-1")),
    Case("cli-train-beta", "--beta -1", "train.py", E, "--beta", train_cli("--beta", "-1")),
    Case("cli-train-free-bits", "--free-bits -1", "train.py", E, "--free-bits", train_cli("--free-bits", "-1")),
    Case("cli-train-batch", "--batch-size 5000 (> 1437 images)", "train.py", E, "--batch-size",
         train_cli("--batch-size", "5000")),
    # ---- experiments/compare.py
    Case("cli-compare-set-syntax", "--set sa.scale (no =VALUE)", "compare.py", E,
         "--set: expected METHOD.KEY=VALUE", compare_cli("--set", "sa.scale")),
    Case("cli-compare-set-method", "--set scale=1 (no METHOD.)", "compare.py", E,
         "--set: expected METHOD.KEY=VALUE", compare_cli("--set", "scale=1")),
    Case("cli-compare-set-unknown-key", "--set sa.temprature=1 (typo)", "compare.py", E,
         "unknown annealing settings", compare_cli("--set", "sa.temprature=1")),
    Case("cli-compare-schedule", "--set sa.schedule=warp", "compare.py", E, "sa.schedule: unknown schedule",
         compare_cli("--set", "sa.schedule=warp")),
    Case("cli-compare-acceptance", "--set sa.acceptance=coinflip", "compare.py", E,
         "sa.acceptance: unknown acceptance", compare_cli("--set", "sa.acceptance=coinflip")),
    Case("cli-compare-t-min-above-t0", "--set sa.t_min=0.5 (sa.t0 is 0.01)", "compare.py", E,
         "sa.t_min: must be < --set sa.t0", compare_cli("--set", "sa.t_min=0.5")),
    Case("cli-compare-rank-above-layer", "--set sa.rank=9 with --latents 4", "compare.py", E,
         "--set sa.*: rank=9 is larger than the Dense layer",
         compare_cli("--methods", "sa", "--set", "sa.rank=9")),
    Case("cli-compare-lr", "--set adam.lr=0", "compare.py", E, "adam.lr", compare_cli("--set", "adam.lr=0")),
    Case("cli-compare-adam-share", "--set sa-refine.adam_share=1.5", "compare.py", E, "adam_share",
         compare_cli("--set", "sa-refine.adam_share=1.5")),
    Case("cli-compare-methods", "--methods adam,newton", "compare.py", E, "--methods",
         compare_cli("--methods", "adam,newton")),
    Case("cli-compare-dataset", "--dataset svhn", "compare.py", E, "--dataset", compare_cli("--dataset", "svhn")),
    Case("cli-compare-budget", "--budget-evals 0", "compare.py", E, "--budget-evals",
         compare_cli("--budget-evals", "0")),
    Case("cli-compare-iwae", "--eval-iwae -1", "compare.py", E, "--eval-iwae", compare_cli("--eval-iwae", "-1")),
    Case("cli-compare-batch", "--batch-size 100000", "compare.py", E, "--batch-size",
         compare_cli("--batch-size", "100000")),
    Case("cli-compare-workdir-file", "--workdir is a file", "compare.py", E, "--workdir",
         lambda tmp: ["--workdir", str(a_file(tmp)), "--methods", "adam", *TINY]),
    Case("cli-compare-resume-other-config", "--resume in a workdir run with --hidden 16", "compare.py", E,
         "--resume: the run in --workdir has a different config", run_with_other_config),
    # ---- the one protocol and driver (issue 11)
    Case("fit-annealer-other-loss", "fit(loss_fn=A) with an annealer built on loss B", "fit", ValueError,
         "optimizer was built on a different loss_fn", annealer_on_another_loss),
    Case("run-budget-below-one-step", "budget_evals 4 < one annealing step (K + 1 = 5)", "driver.run",
         ValueError, "does not pay for one step of phase 'sa'", budget_below_one_step),
    Case("cli-compare-budget-below-step", "--methods sa --budget-evals 10 (one step costs 65)", "compare.py", E,
         "--budget-evals: budget_evals=10 does not pay for one step", compare_cli("--methods", "sa",
                                                                                  "--budget-evals", "10")),
    Case("cli-train-workdir-holds-run", "--workdir holding an earlier run, without --resume", "train.py", E,
         "already holds a run; pass --resume", workdir_with_a_run),
    # Noise-aware decisions and the validation gate (issue 12).
    Case("rule-needs-per-example", "penalty() with a loss that returns only a scalar (no per_example)",
         "annealing.simulated_annealing", ValueError, "acceptance rule",
         lambda tmp: anneal(acceptance=an.penalty(), loss_fn=lambda p, k, x: tiny()[1](p, k, x))),
    Case("decision-size-one", "decision_batch(100, size=1)", "annealing.decision_batch", ValueError,
         "size must be an integer >= 2", lambda tmp: an.decision_batch(100, 1)),
    Case("confident-alpha", "confident(alpha=0.7)", "annealing.confident", ValueError, "alpha",
         lambda tmp: an.confident(0.7)),
    Case("validation-size", "split_validation(train, 1.0) (nothing left to train on)", "data.split_validation",
         ValueError, "validation size must be", lambda tmp: sv.data.split_validation(digits(), 1.0)),
    Case("cli-compare-seeds", "--seeds 0,x", "compare.py", E, "--seeds", compare_cli("--seeds", "0,x")),
    Case("cli-compare-seeds-repeated", "--seeds 1,1", "compare.py", E, "--seeds", compare_cli("--seeds", "1,1")),
    Case("cli-compare-validation", "--validation 1.5", "compare.py", E, "--validation",
         compare_cli("--validation", "1.5")),
    Case("cli-compare-decision-size", "--set sa-refine.decision_size=1", "compare.py", E,
         "sa-refine.decision_size", compare_cli("--set", "sa-refine.decision_size=1")),
    Case("cli-compare-level", "--set sa-refine.level=0.7", "compare.py", E, "sa-refine.level",
         compare_cli("--set", "sa-refine.level=0.7")),
    Case("cli-train-decision-size", "--optimizer sa --sa-decision-size 1", "train.py", E, "--sa-decision-size",
         train_cli("--optimizer", "sa", "--sa-decision-size", "1")),
    # ---- issue 16: data loss and hangs
    Case("save-params-onto-file", "save_params(path) where path is an ordinary file", "checkpoint.save_params",
         ValueError, "is an ordinary file, not a checkpoint folder",
         lambda tmp: checkpoint.save_params(a_file(tmp), tiny()[2])),
    Case("save-params-onto-folder", "save_params(path) where path is a folder holding a thesis.tex",
         "checkpoint.save_params", ValueError, "is a folder that holds other files, not a checkpoint",
         lambda tmp: checkpoint.save_params(thesis_folder(tmp), tiny()[2])),
    Case("save-params-under-file", "save_params('a_file/sub') where a_file is an ordinary file",
         "checkpoint.save_params", ValueError, "is a file, not a folder",
         lambda tmp: checkpoint.save_params(a_file(tmp) / "sub", tiny()[2])),
    Case("run-checkpoint-dir-under-file", "driver.run(checkpoint_dir='a_file/sub'), a_file an ordinary file",
         "driver.run", ValueError, "checkpoint_dir: cannot save a checkpoint",
         lambda tmp: sv.driver.run(jax.random.key(0), [sv.Phase("adam", sv.from_optax(tiny()[1], optax.adam(1e-3)))], tiny()[2],
                                   digits().images, eval_every=5, budget_evals=30, checkpoint_dir=a_file(tmp) / "sub")),
    Case("cli-train-workdir-under-file", "--workdir a_file/sub (a_file is an ordinary file)", "train.py", E,
         "--workdir: cannot write", lambda tmp: ["--workdir", str(a_file(tmp) / "sub"), "--epochs", "1", *TINY]),
    Case("cli-compare-budget-below-adam-step", "--methods adam --budget-evals 2 (one step costs 3)", "compare.py",
         E, "does not pay for one step of phase 'adam'", compare_cli("--methods", "adam", "--budget-evals", "2")),
    # ---- issue 16: silent wrong results
    Case("schedule-negative", "temperature optax.linear_schedule(-1, -1, 10) (negative T accepts every move)",
         "fit (first row)", sv.driver.InvalidScheduleError, "the temperature schedule returned -1.0",
         lambda tmp: fit_sa(temperature=optax.linear_schedule(-1.0, -1.0, 10))),
    Case("schedule-nan", "a temperature schedule returning NaN (would act greedy, t_min never fires)",
         "fit (first row)", sv.driver.InvalidScheduleError, "the temperature schedule returned nan",
         lambda tmp: fit_sa(temperature=lambda count: jnp.nan)),
    Case("radius-schedule-nan", "a radius schedule returning NaN (would reject everything)", "fit (first row)",
         sv.driver.InvalidScheduleError, "the radius schedule returned nan",
         lambda tmp: fit_sa(radius=lambda count: jnp.nan)),
    Case("evaluate-uint8", "evaluate on uint8 images (0-255)", "evaluate", ValueError,
         "images must be a float array with values in [0, 1], got dtype uint8",
         lambda tmp: sv.evaluate(tiny()[1], tiny()[2], (digits().images[:50] * 255).astype(np.uint8))),
    Case("diagnostics-scaled-16", "diagnostics on images scaled 0-16", "diagnostics", ValueError,
         "images must have values in [0, 1]",
         lambda tmp: sv.diagnostics(tiny()[0], tiny()[2], digits().images[:50] * 16)),
    Case("iwae-nan-pixel", "evaluate_iwae on images with a NaN pixel", "evaluate_iwae", ValueError,
         "images contains NaN", lambda tmp: sv.evaluate_iwae(tiny()[0], tiny()[2], images_with(np.nan), 5)),
    Case("fit-diverges", "fit with sgd(1e6): the loss becomes NaN", "fit (first row)", sv.driver.NonFiniteLossError,
         "(phase fit, first at step", lambda tmp: fit(optimizer=optax.sgd(1e6))),
    Case("fit-batch-bool", "fit(..., batch_size=True)", "fit", ValueError,
         "batch_size must be an integer >= 1, got True", lambda tmp: fit(batch_size=True)),
    Case("iwae-k-float", "evaluate_iwae(..., 1.9) (would use k = 1)", "evaluate_iwae", ValueError,
         "num_samples must be an integer >= 1, got 1.9",
         lambda tmp: sv.evaluate_iwae(tiny()[0], tiny()[2], digits().images[:50], 1.9)),
    Case("cli-compare-set-unknown-key-adam", "--set adam.lrr=0.5 (typo)", "compare.py", E,
         "--set adam.*: unknown adam settings ['lrr']", compare_cli("--set", "adam.lrr=0.5")),
    Case("cli-compare-set-string", "--set sa.scale=x (a string for a number)", "compare.py", E,
         "--set sa.scale: must be a number, got 'x'", compare_cli("--set", "sa.scale=x")),
    Case("cli-compare-set-bool", "--set adam.lr=true", "compare.py", E, "--set adam.lr: must be a number, got True",
         compare_cli("--set", "adam.lr=true")),
    Case("cli-compare-set-non-integral", "--set sa.proposals=8.5", "compare.py", E,
         "--set sa.proposals: must be an integer, got 8.5", compare_cli("--set", "sa.proposals=8.5")),
    Case("cli-compare-config-bool", '--config FILE with {"hidden": true}', "compare.py", E,
         "--hidden: must be an integer, got True", lambda tmp: config_file(tmp, {"hidden": True})),
    Case("cli-compare-config-method", '--config FILE with method_config for an unknown method', "compare.py", E,
         "--config: unknown method(s) ['newton']",
         lambda tmp: config_file(tmp, {"method_config": {"newton": {"lr": 1}}})),
    # ---- issue 16: deep tracebacks
    Case("loss-tuple-optax", "loss_fn returns (loss, aux) (Optax)", "fit (first trace)", ValueError,
         "got a tuple of 2; return the loss alone", lambda tmp: fit(loss_fn=tuple_loss)),
    Case("loss-tuple-sa", "loss_fn returns (loss, aux) (annealing)", "annealing step (first trace)", ValueError,
         "got a tuple of 2; return the loss alone", lambda tmp: first_step(anneal(loss_fn=tuple_loss))),
    Case("fit-batch-float", "fit(..., batch_size=64.0)", "fit", ValueError,
         "batch_size must be an integer >= 1, got 64.0", lambda tmp: fit(batch_size=64.0)),
    Case("evaluate-batch-float", "evaluate(..., batch_size=100.5)", "evaluate", ValueError,
         "batch_size must be an integer >= 1, got 100.5",
         lambda tmp: sv.evaluate(tiny()[1], tiny()[2], digits().images[:50], batch_size=100.5)),
    Case("params-empty", "fit(params={})", "fit", ValueError, "params do not fit train of shape (8, 8, 1)",
         lambda tmp: fit_params({})),
    Case("params-other-image-shape", "params initialised on 28x28 images, trained on 8x8 digits", "fit", ValueError,
         "params do not fit train of shape (8, 8, 1)", lambda tmp: fit_params(mnist_shaped_params())),
    Case("fit-test-other-shape", "fit(test=...) with 28x28 test images (was found after an epoch)", "fit",
         ValueError, "params do not fit test of shape (28, 28, 1)",
         lambda tmp: fit_params(tiny()[2], test=np.zeros((10, 28, 28, 1), np.float32))),
    Case("evaluate-params-other-shape", "evaluate_iwae with params of 28x28 images on 8x8 ones", "evaluate_iwae",
         ValueError, "params do not fit images of shape (8, 8, 1)",
         lambda tmp: sv.evaluate_iwae(tiny()[0], mnist_shaped_params(), digits().images[:50], 5)),
    Case("acceptance-factory", "acceptance=an.metropolis (the factory, not called)", "annealing.simulated_annealing",
         ValueError, "acceptance must be a rule taking 3 arguments, such as metropolis()",
         lambda tmp: anneal(acceptance=an.metropolis)),
    Case("schedule-vector", "a temperature schedule returning a (3,) vector", "annealing step (first trace)",
         ValueError, "temperature schedule must return a scalar",
         lambda tmp: first_step(anneal(temperature=lambda count: jnp.ones(3)))),
    # ~300 GiB: every member's low-rank noise is drawn before the evaluation (3 GiB per 10**6 members here)
    Case("step-memory", "num_proposals=10**9 with low_rank on the tiny VAE (noise of ~1.6 TB drawn at once)",
         "annealing step (first trace)", ValueError, "num_proposals: the noise of 1000000001 members, drawn at "
         "once, needs about", lambda tmp: fit(optimizer=anneal(proposal=an.low_rank(0.01), num_proposals=10**9))),
    Case("jit-step-memory", "jax.jit(sa.step) at num_proposals=10**9 with low_rank, outside the driver (issue 23)",
         "annealing step (first trace)", ValueError, "needs about",
         lambda tmp: first_step(anneal(proposal=an.low_rank(0.01), num_proposals=10**9))),
    Case("es-step-memory", "an ES step with num_pairs=10**9", "ES step (first trace)", ValueError,
         "num_pairs: the noise of 2000000000 members", lambda tmp: step_with(es(num_pairs=10**9))),
    Case("cli-compare-resume-truncated", "--resume with a truncated config.json", "compare.py", E,
         "--resume: cannot read", lambda tmp: saved_config(tmp, '{"config": {"hidd')),
    Case("cli-compare-resume-keyless", '--resume with a config.json without its "config" key', "compare.py", E,
         'has no "config" object', lambda tmp: saved_config(tmp, '{"methods": "adam"}')),
    Case("cli-train-overwrite-foreign", "--overwrite into a workdir holding a run and a thesis.tex", "train.py", E,
         "--overwrite: ", lambda tmp: run_and_thesis(tmp)),
    Case("cli-train-overwrite-resume", "--overwrite with --resume", "train.py", E,
         "give either --resume (continue the run) or --overwrite", lambda tmp: run_and_thesis(tmp, "--resume")),
    Case("cli-train-resume-truncated", "--resume with a truncated config.json", "train.py", E,
         "--resume: cannot read", lambda tmp: saved_config(tmp, '{"conf', script="train")),
    # ---- issue 23: silent wrong results
    Case("run-shares-above-one", "driver.run with phases of shares 0.6 and 0.6 (would spend 1.2x the budget)",
         "driver.run", ValueError, "the shares sum to 1.2 (adam 0.6, sa 0.6), above 1",
         lambda tmp: run_tiny([adam_phase(0.6), sv.Phase("sa", anneal(), 0.6)])),
    Case("run-start-not-a-phase-end", "driver.run(start={...}), a dict instead of a PhaseEnd", "driver.run",
         ValueError, "start must be a driver.PhaseEnd (from on_phase_end), got dict",
         lambda tmp: run_tiny([adam_phase(0.5), sv.Phase("sa", anneal(), 0.5)], start={"phase": 0})),
    Case("run-shares-none-left", "a phase of share 1.0 and one without a share", "driver.run", ValueError,
         "leaving nothing for 'sa'", lambda tmp: run_tiny([adam_phase(1.0), sv.Phase("sa", anneal())])),
    Case("validate-nan-initial", "validate returning NaN for the initial parameters (the gate would keep them)",
         "driver.run", ValueError, "validate returned nan for the parameters of step 0",
         lambda tmp: run_tiny([adam_phase()], validate=lambda p: float("nan"))),
    Case("validate-vector", "validate returning a vector", "driver.run", ValueError,
         "validate must return one number", lambda tmp: run_tiny([adam_phase()], validate=lambda p: np.ones(3))),
    Case("es-negative-temperature", "evolution_strategy(..., temperature=-1.0) (accepted every move)",
         "annealing.evolution_strategy", ValueError, "temperature must be a finite number >= 0 or a schedule",
         lambda tmp: es(temperature=-1.0)),
    Case("es-nan-schedule", "evolution_strategy with a temperature schedule returning NaN", "fit (first row)",
         sv.driver.InvalidScheduleError, "the temperature schedule returned nan",
         lambda tmp: fit_es(temperature=lambda count: jnp.nan)),
    Case("es-acceptance-factory", "evolution_strategy(acceptance=metropolis) (the factory, uncalled)",
         "annealing.evolution_strategy", ValueError, "acceptance must be a rule taking 3 arguments",
         lambda tmp: es(acceptance=an.metropolis)),
    Case("per-example-scalar", "loss_fn.per_example returning a scalar (stderr 0: every move certain)",
         "annealing step (first trace)", ValueError, "loss_fn.per_example must return one floating-point loss "
         "per example, shape (16,)", lambda tmp: first_step(anneal(
             loss_fn=with_per_example(lambda f: lambda p, k, x: f(p, k, x).mean()), acceptance=an.confident()))),
    Case("per-example-column", "loss_fn.per_example returning (n, 1) (broadcast to (n, n))",
         "annealing step (first trace)", ValueError, "got shape (16, 1)", lambda tmp: first_step(anneal(
             loss_fn=with_per_example(lambda f: lambda p, k, x: f(p, k, x)[:, None]), acceptance=an.penalty()))),
    Case("fit-batch-size-vs-selection", "fit(annealer with decision_batch(selection=16), batch_size=100)", "fit",
         ValueError, "batch_size=100, but phase 'fit''s optimizer was built for batches of 16",
         lambda tmp: fit(optimizer=anneal(acceptance=an.confident(), decision=an.decision_batch(16, 32)))),
    Case("run-batch-size-vs-selection", "driver.run(batch_size=32) with decision_batch(selection=16)",
         "driver.run", ValueError, "pass batch_size=16",
         lambda tmp: run_tiny([sv.Phase("sa", anneal(decision=an.decision_batch(16, 32)))], batch_size=32)),
    Case("decision-size-schedule-nan", "a decision-size schedule returning NaN (became 2 examples)",
         "fit (first row)", sv.driver.InvalidScheduleError, "the decision_size schedule returned nan",
         lambda tmp: sized_decision(np.nan)),
    Case("decision-size-schedule-negative", "a decision-size schedule returning -3", "fit (first row)",
         sv.driver.InvalidScheduleError, "the decision_size schedule returned -3.0", lambda tmp: sized_decision(-3)),
    Case("decision-size-schedule-fraction", "a decision-size schedule returning 20.5", "fit (first row)",
         sv.driver.InvalidScheduleError, "the decision_size schedule returned 20.5", lambda tmp: sized_decision(20.5)),
    # ---- issue 23: files
    Case("cli-plateau-workdir-holds-run", "plateau into a --workdir holding a plateau run (overwrote it)",
         "plateau.py", E, "already holds a run; pass --resume", plateau_workdir_with_a_run),
    Case("cli-plateau-resume-and-overwrite", "plateau --resume --overwrite", "plateau.py", E,
         "give either --resume", lambda tmp: plateau_workdir_with_a_run(tmp, "--resume", "--overwrite")),
    Case("cli-train-workdir-empty", "--workdir '' (wrote into the current folder)", "train.py", E,
         "--workdir: must be a folder path, got an empty string",
         lambda tmp: ["--workdir", "", "--epochs", "1", *TINY]),
    Case("cli-compare-workdir-empty", "--workdir ''", "compare.py", E, "--workdir: must be a folder path",
         lambda tmp: ["--workdir", "", *TINY]),
    Case("cli-train-decision-size-above-data", "--optimizer sa --sa-decision-size 5000 on digits (traceback after "
         "config.json)", "train.py", E, "--sa-decision-size: phase 'sa' takes 128 selection + 5000 decision",
         train_cli("--optimizer", "sa", "--sa-decision-size", "5000")),
    Case("cli-compare-decision-size-above-data", "--set sa-refine.decision_size=5000 on digits", "compare.py", E,
         "--set sa-refine.decision_size: phase 'sa' takes 128 selection + 5000 decision",
         compare_cli("--methods", "sa-refine", "--set", "sa-refine.decision_size=5000")),
    Case("cli-train-resume-nothing", "train --resume into a folder with no run (started a new one)", "train.py", E,
         "holds no run to continue", train_cli("--resume")),
    Case("cli-compare-resume-nothing", "compare --resume into a folder with no run", "compare.py", E,
         "holds no run to continue", compare_cli("--resume")),
    # ---- issue 23: deep tracebacks
    Case("run-params-other-model", "driver.run with the parameters of another model", "driver.run", ValueError,
         "params do not fit images of shape (8, 8, 1)", lambda tmp: run_tiny([adam_phase()], other_params())),
    Case("sa-step-params-other-model", "sa.step from another model's parameters (Flax ScopeParamShapeError)",
         "annealing step (first trace)", ValueError, "params do not fit the batch of shape (8, 8, 1)",
         lambda tmp: step_with(anneal(), other_params())),
    Case("es-step-params-other-model", "an ES step from another model's parameters", "ES step (first trace)",
         ValueError, "params do not fit the batch", lambda tmp: step_with(es(), other_params())),
    Case("replicas-step-params-other-model", "a replica-exchange step from another model's parameters",
         "replica step (first trace)", ValueError, "params do not fit the batch",
         lambda tmp: step_with(replicas(), other_params())),
    Case("run-uint8", "driver.run with uint8 images (reported as a non-finite loss)", "driver.run", ValueError,
         "images must be a float array with values in [0, 1], got dtype uint8",
         lambda tmp: run_tiny([adam_phase()], images=(digits().images * 255).astype(np.uint8))),
    Case("sa-step-uint8", "sa.step on a uint8 batch (a silent NaN loss)", "annealing step (first trace)",
         ValueError, "batch must be float images in [0, 1], got dtype uint8",
         lambda tmp: step_with(anneal(), batch=(digits().images[:16] * 255).astype(np.uint8))),
    # ---- issue 23: unclear or late messages
    Case("fit-validation-tuple", "fit(validation=split_validation(train, 0.1)) (the tuple)", "fit", ValueError,
         "validation must be a Dataset or an (N, H, W, C) array in [0, 1], got a tuple of 2 (data.split_validation",
         lambda tmp: sv.fit(jax.random.key(0), tiny()[2], tiny()[1], optax.adam(1e-3), digits(), 1,
                            validation=sv.data.split_validation(digits(), 0.1))),
    Case("replicas-of-optax", "replica_exchange(lambda t: optax.adam(1e-3), ...)", "annealing.replica_exchange",
         ValueError, "build must return a savae_jax Optimizer", lambda tmp: replicas(lambda t: optax.adam(1e-3))),
    Case("polish-of-optax", "local_polish(optax.adam(1e-3), ...)", "annealing.local_polish", ValueError,
         "optimizer must be a savae_jax Optimizer to polish",
         lambda tmp: an.local_polish(optax.adam(1e-3), tiny()[1], optax.adam(1e-2), 2, 2)),
    Case("cauchy-fraction-bool", "cauchy(1.0, fraction=True)", "annealing.cauchy", ValueError,
         "fraction must be a real number, got True", lambda tmp: an.cauchy(1.0, fraction=True)),
    Case("gaussian-fraction-string", "gaussian(1.0, fraction='0.5')", "annealing.gaussian", ValueError,
         "fraction must be a real number, got '0.5'", lambda tmp: an.gaussian(1.0, fraction="0.5")),
    Case("ladder-huge", "a ladder of 10^7 values, not increasing (16.8 s to print it whole)",
         "annealing.replica_exchange", ValueError, "10000000 values [0.0, 0.0, 0.0, 0.0, ..., 0.0, 0.0]",
         lambda tmp: replicas(ladder=np.zeros(10**7, np.float32))),
    Case("iwae-k-huge", "evaluate_iwae(..., 10**9) (would run for weeks)", "evaluate_iwae", ValueError,
         "num_samples=1000000000 on 50 images is 5e+10 decoder passes",
         lambda tmp: sv.evaluate_iwae(tiny()[0], tiny()[2], digits().images[:50], 10**9)),
    Case("cli-compare-eval-iwae-huge", "--eval-iwae 1000000000", "compare.py", E, "--eval-iwae=1000000000 on",
         compare_cli("--eval-iwae", "1000000000")),
    # ---- issue 23: usability
    Case("cli-compare-seeds-empty-entry", "--seeds 0,,1", "compare.py", E, "--seeds: expected a comma-separated "
         "list without empty entries", compare_cli("--seeds", "0,,1")),
    Case("cli-compare-methods-repeated", "--methods adam,adam", "compare.py", E,
         "--methods: adam given more than once", compare_cli("--methods", "adam,adam")),
    Case("cli-compare-fraction-low-rank", "--set sa.fraction=0.5 with the low_rank proposal", "compare.py", E,
         "sa.fraction: moves a fraction of the entries of gaussian and cauchy proposals only",
         compare_cli("--methods", "sa", "--set", "sa.fraction=0.5")),
    # ---- issue 25: integer weights
    Case("quantize-bits-one", "quantize(params, bits=1)", "quantize.quantize", ValueError,
         "bits must be an integer >= 2", lambda tmp: quantize.quantize(tiny()[2], 1)),
    Case("quantize-bits-nine", "quantize(params, bits=9) (codes are int8)", "quantize.quantize", ValueError,
         "bits must be an integer from 2 to 8", lambda tmp: quantize.quantize(tiny()[2], 9)),
    Case("quantize-bits-float", "quantize(params, bits=2.5)", "quantize.quantize", ValueError,
         "bits must be an integer >= 2", lambda tmp: quantize.quantize(tiny()[2], 2.5)),
    Case("quantize-clip-unknown", "quantize(params, 4, clip='min')", "quantize.quantize", ValueError,
         "clip must be one of max, mse", lambda tmp: quantize.quantize(tiny()[2], 4, clip="min")),
    Case("quantize-no-kernel", "quantize of a tree without Dense or Conv kernels", "quantize.quantize",
         ValueError, "params: no Dense or Conv kernel to quantize", lambda tmp: quantize.quantize({"b": jnp.ones(3)}, 4)),
    Case("lattice-fraction-zero", "lattice(fraction=0)", "annealing.lattice", ValueError,
         "fraction must be", lambda tmp: an.lattice(0.0)),
    Case("lattice-step-zero", "lattice(0.1, step=0)", "annealing.lattice", ValueError,
         "step must be an integer >= 1", lambda tmp: an.lattice(0.1, step=0)),
    Case("lattice-float-params", "lattice moves of float (not quantized) parameters",
         "annealing step (first trace)", ValueError, "params: lattice moves need quantized parameters",
         lambda tmp: first_step(anneal(proposal=an.lattice(0.01)))),
    Case("lattice-low-rank-scale-zero", "lattice_low_rank(scale=0)", "annealing.lattice_low_rank", ValueError,
         "scale must be", lambda tmp: an.lattice_low_rank(0.0)),
    Case("lattice-es-float-params", "lattice_es(...).init of float (not quantized) parameters",
         "annealing.lattice_es (init)", ValueError, "params: lattice moves need quantized parameters",
         lambda tmp: an.lattice_es(tiny()[1], 2, 0.01).init(tiny()[2])),
    Case("lattice-es-step-beyond-int8", "lattice_es(..., step=128) (the members' moves are int8)",
         "annealing.lattice_es", ValueError, "step must be an integer in [1, 127], got 128",
         lambda tmp: an.lattice_es(tiny()[1], 2, 0.01, step=128)),
    Case("lattice-es-learning-rate-zero", "lattice_es(..., learning_rate=0)", "annealing.lattice_es", ValueError,
         "learning_rate must be", lambda tmp: an.lattice_es(tiny()[1], 2, 0.01, learning_rate=0.0)),
    Case("bounds-lower-not-below-upper", "simulated_annealing(..., bounds=(1.0, 1.0))", "annealing.simulated_annealing",
         ValueError, "bounds: lower must be below upper", lambda tmp: anneal(bounds=(1.0, 1.0))),
    Case("bounds-nan", "bounds=(nan, 1.0)", "annealing.simulated_annealing", ValueError,
         "bounds: lower must be finite", lambda tmp: anneal(bounds=(float("nan"), 1.0))),
    Case("bounds-infinite", "bounds=(-inf, 1.0) (reflection needs a finite box)", "annealing.simulated_annealing",
         ValueError, "bounds: lower must be finite", lambda tmp: anneal(bounds=(-np.inf, 1.0))),
    Case("bounds-not-a-pair", "bounds=(0.0,)", "annealing.simulated_annealing", ValueError,
         "bounds must be a pair (lower, upper)", lambda tmp: anneal(bounds=(0.0,))),
    Case("bounds-wrong-structure", "bounds pytrees of another structure than the parameters", "AnnealState init",
         ValueError, "bounds: lower must be a number or a pytree of the parameters' structure",
         lambda tmp: anneal(bounds=({"v": -1.0}, {"v": 1.0})).init(tiny()[2])),
    Case("bounds-per-entry-inverted", "per-entry bounds with lower >= upper somewhere", "AnnealState init",
         ValueError, "bounds: lower must be below upper everywhere",
         lambda tmp: an.simulated_annealing(lambda p, k, b: jnp.sum(p), 4, an.gaussian(0.1), 1.0, an.metropolis(),
                                            bounds=(jnp.zeros(2), jnp.array([1.0, -1.0]))).init(jnp.zeros(2))),
    Case("bounds-start-outside", "a starting point outside the box", "AnnealState init", ValueError,
         "params: 1 entries of leaf 0 lie outside bounds",
         lambda tmp: an.simulated_annealing(lambda p, k, b: jnp.sum(p), 4, an.gaussian(0.1), 1.0, an.metropolis(),
                                            bounds=(-1.0, 1.0)).init(jnp.array([0.0, 2.0]))),
    Case("bounds-quantized", "bounds on a quantized model (integer codes)", "AnnealState init", ValueError,
         "bounds: apply to floating-point parameters",
         lambda tmp: anneal(proposal=an.lattice(0.1), bounds=(-1.0, 1.0)).init(quantize.quantize(tiny()[2], 4))),
    Case("es-bounds-inverted", "evolution_strategy(..., bounds=(2.0, -2.0))", "annealing.evolution_strategy",
         ValueError, "bounds: lower must be below upper",
         lambda tmp: an.evolution_strategy(tiny()[1], 2, 0.01, bounds=(2.0, -2.0))),
]

NUM_BAD_INPUTS = len(CASES)  # reported in the README's reliability section


def table() -> str:
    """The markdown table of docs/bad_inputs.md, generated from ``CASES``."""
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731
    rows = ["| id | input | where | error raised | message excerpt |", "|---|---|---|---|---|"]
    for c in CASES:
        error = "exit 2 (argparse usage error)" if c.cli else c.error.__name__
        rows.append(f"| `{c.id}` | {esc(c.input)} | `{c.where}` | {error} | `{esc(c.excerpt)}` |")
    return "\n".join(rows) + "\n"


def test_catalogue_is_large_and_ids_are_unique():
    assert NUM_BAD_INPUTS >= 25
    assert len({c.id for c in CASES}) == NUM_BAD_INPUTS


def test_doc_table_matches_the_cases():
    doc = DOC.read_text()
    assert table() in doc, "docs/bad_inputs.md is out of date: run `python tests/test_bad_inputs.py`"
    assert f"**{NUM_BAD_INPUTS} bad inputs**" in doc


# Cases that repeat another case's check with other values (each compiles and runs a fit of its
# own) run in the slow tier; the first value of each stays in the default run.
SLOW_CASES = {"decision-size-schedule-negative", "decision-size-schedule-fraction"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW_CASES else c
                                  for c in CASES], ids=[c.id for c in CASES])
def test_bad_input_gives_a_clear_error(case, tmp_path, capsys):
    if not case.cli:
        with pytest.raises(case.error) as info:
            case.run(tmp_path)
        assert case.excerpt in str(info.value)
        return
    argv = case.run(tmp_path)
    workdir = Path(argv[argv.index("--workdir") + 1])
    before = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else None
    main = {"train.py": train_script.main, "compare.py": compare_script.main,
            "plateau.py": plateau_script.main}[case.where]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert case.excerpt in err, err
    # Refused before any file was written.
    assert (sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else None) == before


def test_zero_temperature_constant_is_greedy_not_an_error():
    """Documented recovery: a constant T = 0 is allowed and behaves as greedy descent."""

    def quadratic(params, key, x):
        return jnp.sum(jnp.square(params - 1.0))

    runs = []
    for acceptance in (an.metropolis(), an.greedy()):
        sa = an.simulated_annealing(quadratic, 8, an.gaussian(0.5), 0.0, acceptance)
        state, infos = sa.init(jnp.zeros(3)), []
        step = jax.jit(sa.step)
        for i in range(10):
            state, info = step(jax.random.key(i), state, None)
            infos.append((bool(info.accepted), float(info.delta)))
        runs.append(infos)
    assert runs[0] == runs[1]
    assert any(accepted for accepted, _ in runs[0])
    assert all(delta < 0 for accepted, delta in runs[0] if accepted)


if __name__ == "__main__":
    sys.stdout.write(table())
