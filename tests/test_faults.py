"""Fault injection (issue 7): NaN losses, SIGKILL mid-checkpoint, a full disk, and determinism.

Counts reported in the README's reliability section are derived from this
module's parametrization: ``NUM_FAULTS_INJECTED`` and ``NUM_RUNS_COMPARED``.

NaN/Inf *proposals* (never accepted, counted in ``info.num_nonfinite``) are
tested in ``tests/test_annealing.py::test_nonfinite_proposals_rejected_and_counted``
and a NaN incumbent setting ``info.error`` in
``tests/test_annealing.py::test_nonfinite_incumbent_sets_error``; here the
incumbent goes NaN in the middle of full runs.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import savae_jax as sv
import savae_jax.annealing as an
from savae_jax import checkpoint, driver

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "compare.py"
from savae_jax.experiments import builders, compare, registry  # noqa: E402
from conftest import subprocess_work, subprocess_result, popen, slow_after_first, small_vae, without_seconds  # noqa: E402

TINY = ["--hidden", "32", "--latents", "4", "--batch-size", "100", "--quiet"]
# The subprocess runs of the SIGKILL test (the tiny digits config): Adam, then sa-refine
# (Adam, then annealing from its optimum: two phases in one method), a checkpoint every 5 steps.
_RUN = [*TINY, "--methods", "adam,sa-refine", "--set", "sa-refine.proposals=8", "--eval-every", "5",
        "--budget-evals", "600", "--eval-iwae", "10"]
RUN_FLAGS = [*_RUN, "--checkpoint-every", "5"]
# The uninterrupted runs it is compared with (the reference and the determinism runs): the same
# run with fewer checkpoints. Checkpoints never enter the results or the parameters (the history
# rows are at --eval-every), so the killed run must equal them to the bit all the same.
REFERENCE_FLAGS = [*_RUN, "--checkpoint-every", "50"]
# The in-process runs of the disk-full tests: a smaller budget, the same shapes.
SMALL_FLAGS = [*TINY, "--methods", "adam,sa", "--set", "sa.proposals=8", "--eval-every", "5",
               "--checkpoint-every", "10", "--budget-evals", "150", "--eval-iwae", "10"]

# Where the SIGKILL test kills its successive launches (each resumes the previous one): "tmp"
# while an orbax temporary checkpoint folder exists (a checkpoint write in progress);
# "second-method" as soon as sa-refine has committed a checkpoint (adam finished, sa-refine's
# Adam phase under way: mid-run and mid-method); "delay" a random time after the launch has
# committed a new checkpoint. The default tier kills once at each kind of point; the slow tier
# repeats the sequence with a second "tmp" and a second random "delay" (MORE_KILL_POINTS).
KILL_POINTS = ["tmp", "second-method", "delay"]
MORE_KILL_POINTS = ["tmp", "second-method", "tmp", "delay", "delay"]
# (what fails with ENOSPC, on which call): run-state checkpoints mid-Adam,
# the first annealing checkpoint (Adam finished), a results file write.
DISK_FAULTS = [("run-checkpoint", 4), ("run-checkpoint", 8), ("atomic-write", 7)]
NAN_FAULTS = ["nan-incumbent-run_method", "nan-incumbent-compare"]
DETERMINISM_RUNS = 3

# The full disk of `savae train` and `savae plateau` (one injection each, issue 23).
SUBCOMMAND_DISK_FAULTS = ["train", "plateau"]
NUM_FAULTS_INJECTED = len(NAN_FAULTS) + len(KILL_POINTS) + len(DISK_FAULTS) + len(SUBCOMMAND_DISK_FAULTS)
# Runs whose results are compared with another run's: the NaN test's clean
# reference, the killed-and-resumed run, each disk-full run after its resume,
# and the determinism runs (the first of which is the SIGKILL test's reference).
NUM_RUNS_COMPARED = 2 + 1 + len(DISK_FAULTS) + DETERMINISM_RUNS


def results(workdir) -> dict:
    return without_seconds(json.loads((Path(workdir) / "results.json").read_text()))


def assert_same_params(a, b, methods=("adam", "sa")):
    for name in methods:
        chex.assert_trees_all_equal(checkpoint.load_params(Path(a) / "params" / name / "seed0"),
                                    checkpoint.load_params(Path(b) / "params" / name / "seed0"))


def nan_on(loss_fn, target):
    """``loss_fn`` that returns NaN for any batch holding the image ``target`` (a fault injection)."""

    def faulty(params, key, x):
        hit = jnp.any(jnp.all(x == target, axis=(1, 2, 3)))
        return jnp.where(hit, jnp.nan, loss_fn(params, key, x))

    return faulty


# ------------------------------------------------------------------ NaN incumbent


# Slow tier: the default run keeps an annealer's NaN loss through compare
# (test_compare_stops_on_a_nan_annealing_loss_...) and the driver's stop at the last good checkpoint
# (test_driver.py::test_a_nan_loss_stops_the_run_...).
@pytest.mark.slow
def test_annealer_whose_loss_goes_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train, test = sv.load("digits", "train"), sv.load("digits", "test")
    images = jnp.asarray(train.images)
    model, loss_fn = small_vae(16, 3)
    params = sv.models.init(jax.random.key(0), model, images[:1])
    key, batch_size = jax.random.key(1), 100
    # The image in the 8th batch of the first epoch poisons the loss from then on.
    idx, _ = driver.epoch_plan(jax.random.fold_in(key, 0), 0, len(images), batch_size)
    target = images[int(idx[7, 0])]
    hits = [bool(jnp.any(jnp.all(images[row] == target, axis=(1, 2, 3)))) for row in np.asarray(idx)]
    first_bad = hits.index(True) + 1  # steps count from 1
    assert first_bad >= 6, first_bad

    def phases(loss):
        sa = an.simulated_annealing(loss, 4, an.low_rank(0.01), an.exponential(0.01, 0.99), an.metropolis())
        return [driver.Phase("sa", sa)]

    faulty = phases(nan_on(loss_fn, target))
    kwargs = dict(batch_size=batch_size, eval_every=2, budget_evals=5 * 40,
                  evaluate=lambda p: sv.evaluate(loss_fn, p, test.images))
    with pytest.raises(driver.NonFiniteLossError) as info:
        driver.run(key, faulty, params, images, checkpoint_dir=tmp_path / "ckpt", **kwargs)
    row_end = -(-first_bad // 2) * 2  # the history row whose steps include the NaN
    last_good = row_end - 2
    message = str(info.value)
    assert "nan" in message and f"the last good checkpoint is step {last_good}" in message
    saver = checkpoint.RunCheckpointer(tmp_path / "ckpt")
    assert saver.steps()[-1] == last_good
    step, state, meta = saver.restore(faulty[0].optimizer.init(params))
    assert step == last_good and not meta["finished"]
    assert all(np.isfinite(row["train_loss"]) for row in meta["history"])
    # The checkpoint equals a clean run stopped there (run 1 of NUM_RUNS_COMPARED's pair).
    clean, _, _ = driver.run(key, phases(loss_fn), params, images, **{**kwargs, "budget_evals": 5 * last_good})
    chex.assert_trees_all_equal(state.params, clean)


def test_compare_stops_on_a_nan_annealing_loss_and_keeps_finished_results(tmp_path, monkeypatch, capsys):
    train, _ = sv.data.split_validation(sv.load("digits", "train"), compare.DEFAULTS["validation"])  # compare.py's
    key_run = jax.random.split(jax.random.key(0), 3)[1]  # compare.py's derivation (seed 0)
    idx, _ = driver.epoch_plan(jax.random.fold_in(key_run, 0), 0, len(train.images), 100)
    target = jnp.asarray(train.images[int(idx[5, 0])])
    make_annealer = builders.make_annealer
    monkeypatch.setattr(builders, "make_annealer",
                        lambda loss_fn, config, prefix="", **kw: make_annealer(nan_on(loss_fn, target), config, prefix, **kw))
    flags = [*TINY, "--methods", "adam,sa", "--set", "sa.proposals=8", "--binarize", "none",
             "--eval-every", "2", "--checkpoint-every", "4", "--budget-evals", "90", "--eval-iwae", "0"]
    with pytest.raises(SystemExit) as info:
        compare.main(["--workdir", str(tmp_path), *flags])
    message = str(info.value.code)
    assert message.startswith("savae compare: stopped: sa/seed0: the training loss became nan"), message
    assert "the last good checkpoint is step" in message and str(tmp_path) in message
    # The finished method's results are intact; the annealer's last checkpoint restores.
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == ["adam"]
    assert not (tmp_path / "summary.md").exists()
    model = sv.MLPVAE(hidden=32, latents=4)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    sa = builders.make_annealer(sv.make_loss(model), registry.METHOD_DEFAULTS["sa"] | {"proposals": 8})
    # With the validation gate the run state is (optimizer state, the gate's parameters).
    step, (state, kept), meta = checkpoint.RunCheckpointer(tmp_path / "checkpoints" / "sa" / "seed0").restore(
        (sa.init(params), params))
    assert f"is step {step} " in message
    # Row 0 is the initial parameters' (no training loss yet); every trained row's loss is finite.
    assert meta["history"][0]["step"] == 0 and meta["history"][0]["train_loss"] is None
    assert meta["history"][1:] and all(np.isfinite(r["train_loss"]) for r in meta["history"][1:])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves((state.params, kept)))


# ------------------------------------------------------------------ disk full


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    """An uninterrupted in-process run of SMALL_FLAGS."""
    workdir = tmp_path_factory.mktemp("small_reference")
    compare.main(["--workdir", str(workdir), *SMALL_FLAGS])
    return workdir


# All three faults in the slow tier; the default tier keeps the full-disk error of `savae train`
# (below: one handler for every subcommand) and the SIGKILL sequence's resume.
@pytest.mark.slow
@pytest.mark.parametrize("target, fail_at", slow_after_first(DISK_FAULTS), ids=[f"{t}-call{n}" for t, n in DISK_FAULTS])
def test_disk_full_mid_run_is_a_clear_error_and_resume_completes(tmp_path, monkeypatch, small_reference,
                                                                   target, fail_at):
    calls = {"n": 0}

    def failing(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
            return original(*args, **kwargs)

        return wrapper

    if target == "atomic-write":
        monkeypatch.setattr(checkpoint, "atomic_write_bytes", failing(checkpoint.atomic_write_bytes))
    else:
        monkeypatch.setattr(checkpoint.RunCheckpointer, "save", failing(checkpoint.RunCheckpointer.save))
    with pytest.raises(SystemExit) as info:
        compare.main(["--workdir", str(tmp_path), *SMALL_FLAGS])
    message = str(info.value.code)
    assert "cannot write to --workdir" in message and "No space left on device" in message, message
    assert "--resume" in message
    monkeypatch.undo()

    # Everything written before the fault is intact and valid.
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["budget_evals"] == 150
    expected = results(small_reference)
    if (tmp_path / "results.json").exists():
        partial = results(tmp_path)
        assert partial and all(partial[name] == expected[name] for name in partial)
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written temporary files left behind

    compare.main(["--workdir", str(tmp_path), *SMALL_FLAGS, "--resume"])
    assert results(tmp_path) == expected
    assert_same_params(tmp_path, small_reference)


# ------------------------------------------------------------------ SIGKILL and determinism


def launch(workdir, log_path, *extra, flags=RUN_FLAGS):
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(workdir), *flags, *extra]
    log = open(log_path, "w")
    return popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log


def finish(proc, log, timeout=600):
    rc = proc.wait(timeout=timeout)
    log.close()
    assert rc == 0, Path(log.name).read_text()[-3000:]


# The DETERMINISM_RUNS uninterrupted subprocess runs of REFERENCE_FLAGS: run 1 (the SIGKILL
# test's reference), then runs 2 and 3 side by side (subprocess work, see conftest.py).


@subprocess_work("reference_run")
def _reference_run(tmp):
    finish(*launch(tmp / "run1", tmp / "run1.log", flags=REFERENCE_FLAGS))
    return tmp / "run1"


@subprocess_work("determinism_runs")
def _determinism_runs(tmp):
    runs = [(tmp / f"run{i}", launch(tmp / f"run{i}", tmp / f"run{i}.log", flags=REFERENCE_FLAGS))
            for i in range(2, DETERMINISM_RUNS + 1)]
    for _, (proc, log) in runs:
        finish(proc, log)
    return [workdir for workdir, _ in runs]


@pytest.fixture(scope="module")
def reference_run(request):
    """An uninterrupted subprocess run of REFERENCE_FLAGS (determinism run 1, the SIGKILL reference)."""
    return subprocess_result(request)


@pytest.fixture(scope="module")
def determinism_runs(request):
    """Determinism runs 2 and 3: the same command as ``reference_run``."""
    return subprocess_result(request)


def orbax_tmp_exists(workdir: Path) -> bool:
    for sub in ("checkpoints", "params"):
        # params/<method>/seed<s> and checkpoints/<method>/seed<s>/<step>: every level
        for folder in [workdir / sub, *(workdir / sub).glob("*"), *(workdir / sub).glob("*/*")]:
            try:
                if any(".orbax-checkpoint-tmp" in e.name for e in os.scandir(folder)):
                    return True
            except OSError:  # renamed or removed while we looked
                pass
    return False


def committed_checkpoints(workdir: Path, method: str = "*") -> int:
    return sum(1 for p in workdir.glob(f"checkpoints/{method}/seed*/*") if p.name.isdigit())


def kill_sequence(tmp, points):
    """The SIGKILL sequence: ``(workdir, what was seen)``.

    Run i kills `savae compare` at points[i] (run 0 starts it, the others --resume), then a last
    --resume finishes it; the tests compare the result with the reference run.
    """
    workdir = tmp / "killed"
    rng = np.random.default_rng(7)
    delays = iter(rng.uniform(0.0, 2.0, size=points.count("delay")))
    seen = {"kills": 0, "unreadable": [], "second_method": None, "points": len(points)}
    for i, kind in enumerate(points):
        log_path = tmp / f"run{i}.log"
        proc, log = launch(workdir, log_path, *(["--resume"] if i else []))
        start_count, deadline = committed_checkpoints(workdir), time.time() + 300
        start_second = committed_checkpoints(workdir, "sa-refine")
        delay = next(delays) if kind == "delay" else None
        while proc.poll() is None and time.time() < deadline:
            if kind == "tmp" and orbax_tmp_exists(workdir):
                break
            if kind == "second-method" and committed_checkpoints(workdir, "sa-refine") > start_second:
                break
            if kind == "delay" and committed_checkpoints(workdir) > start_count:
                time.sleep(delay)
                break
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
            seen["kills"] += 1
        proc.wait()
        log.close()
        seen["unreadable"].append("unreadable" in log_path.read_text())
        if kind == "second-method":
            seen["second_method"] = {
                "killed": killed, "log": log_path.read_text()[-3000:],
                "results": list(json.loads((workdir / "results.json").read_text())),
                "summary": (workdir / "summary.md").exists()}
    log_path = tmp / "final.log"
    finish(*launch(workdir, log_path, "--resume"))
    seen["unreadable"].append("unreadable" in log_path.read_text())
    return workdir, seen


@subprocess_work("sigkill_runs")
def _sigkill_runs(tmp):
    return kill_sequence(tmp, KILL_POINTS)


@subprocess_work("more_sigkill_runs")
def _more_sigkill_runs(tmp):
    return kill_sequence(tmp, MORE_KILL_POINTS)


@pytest.fixture(scope="module")
def sigkill_runs(request):
    """The SIGKILL sequence at KILL_POINTS (subprocess work, see conftest.py)."""
    return subprocess_result(request)


@pytest.fixture(scope="module")
def more_sigkill_runs(request):
    """The SIGKILL sequence at MORE_KILL_POINTS (subprocess work, see conftest.py)."""
    return subprocess_result(request)


def check_killed_run(workdir, seen, reference_run):
    # Every --resume started from a complete checkpoint: none had to skip a damaged one.
    assert not any(seen["unreadable"]), seen["unreadable"]
    # Killed mid-run: adam's results are written, sa-refine's and the summary are not.
    second = seen["second_method"]
    assert second["killed"], second["log"]
    assert second["results"] == ["adam"] and not second["summary"]
    assert seen["kills"] >= seen["points"] - 1
    assert results(workdir) == results(reference_run)
    assert_same_params(workdir, reference_run, ("adam", "sa-refine"))


def test_sigkill_at_many_points_then_resume_equals_an_uninterrupted_run(sigkill_runs, reference_run):
    check_killed_run(*sigkill_runs, reference_run)


@pytest.mark.slow  # two more kills, at a second "tmp" and a second random "delay" point (the test above kills once at each kind)
def test_sigkill_at_more_points_then_resume_equals_an_uninterrupted_run(more_sigkill_runs, reference_run):
    check_killed_run(*more_sigkill_runs, reference_run)


@pytest.mark.slow
def test_three_runs_of_compare_give_identical_results(reference_run, determinism_runs):
    assert len(determinism_runs) == DETERMINISM_RUNS - 1
    for other in determinism_runs:
        assert results(other) == results(reference_run)
        assert_same_params(other, reference_run, ("adam", "sa-refine"))


# `savae train` by default, `savae plateau` in the slow tier: one handler serves both (issue 23).
@pytest.mark.parametrize("subcommand", slow_after_first(SUBCOMMAND_DISK_FAULTS))
def test_a_full_disk_is_one_clear_error_in_every_subcommand(tmp_path, monkeypatch, subcommand):
    """Issue 23: `savae train` on a full disk ended in a raw OSError traceback (compare's clear message
    did not reach it). One handler (flags.disk_errors) now serves every subcommand."""
    from savae_jax.experiments import plateau, train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")

    small = ["--hidden", "16", "--latents", "3", "--batch-size", "100", "--workdir", str(tmp_path / "w")]
    if subcommand == "train":
        monkeypatch.setattr(checkpoint.RunCheckpointer, "save", full)  # the first epoch's checkpoint
        argv, main = [*small, "--epochs", "1", "--quiet"], train.main
    else:
        original = checkpoint.atomic_write_bytes
        calls = []

        def third_write(*args, **kwargs):  # the workdir probe and config.json are written, results.json not
            calls.append(1)
            return full() if len(calls) >= 3 else original(*args, **kwargs)

        monkeypatch.setattr(checkpoint, "atomic_write_bytes", third_write)
        argv = [*small, "--max-epochs", "1", "--extra-evals", "30", "--eval-iwae", "0", "--seeds", "0",
                "--arms", "adam"]
        main = plateau.main
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith(f"savae {subcommand}: cannot write to --workdir") and "No space left" in message
    assert "--resume" in message
    assert json.loads((tmp_path / "w" / "config.json").read_text())["config"]  # what was written is intact
