"""experiments/train.py: outputs, schema, atomic writes and flag errors."""

import csv
import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import checkpoint

from conftest import subprocess_work, subprocess_result, popen, run_script

ROOT = Path(__file__).resolve().parents[1]


from savae_jax.experiments import settings  # noqa: E402
from savae_jax.experiments import train as train_script  # noqa: E402
SMALL = ["--hidden", "32", "--latents", "4", "--batch-size", "100", "--quiet"]


def test_train_writes_metrics_grids_and_params(tmp_path):
    workdir = tmp_path / "run"
    metrics = train_script.main(["--epochs", "2", "--workdir", str(workdir), *SMALL])
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["config"]["optimizer"] == "adam" and saved["config"]["epochs"] == 2
    assert [set(row) >= {"epoch", "train_loss", "test_neg_elbo", "seconds"} for row in saved["history"]] == [True, True]
    final = saved["final"]
    assert final["test_neg_elbo"] == saved["history"][-1]["test_neg_elbo"]
    assert 20.0 < final["test_neg_elbo"] < 60.0 and final["train_seconds"] > 0
    for png in ("reconstructions.png", "samples.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved parameters restore into the same model shape, and not into another.
    model = sv.MLPVAE(hidden=32, latents=4)
    like = sv.models.init(jax.random.key(0), model, np.zeros((1, 8, 8, 1), np.float32))
    restored = checkpoint.load_params(workdir / "params", like)
    loss = sv.evaluate(sv.make_loss(model), restored, sv.load("digits", "test").images, binarize="dynamic")
    np.testing.assert_allclose(loss, final["test_neg_elbo"], rtol=1e-6)
    other = sv.models.init(jax.random.key(0), sv.MLPVAE(hidden=16, latents=4), np.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="another model shape"):
        checkpoint.load_params(workdir / "params", other)
    assert not list(workdir.glob(".*.tmp"))


def test_any_optax_alias_is_accepted(tmp_path):
    assert {"adam", "rmsprop", "sgd", "adamw", "lion"} <= set(settings.OPTAX_ALIASES)
    metrics = train_script.main(["--optimizer", "rmsprop", "--epochs", "1", "--workdir", str(tmp_path), *SMALL])
    assert np.isfinite(metrics["final"]["test_neg_elbo"])


@pytest.mark.parametrize("flags, needle", [
    (["--optimizer", "adamm"], "--optimizer"),
    (["--dataset", "imagenet"], "name"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-5"], "--batch-size"),
    (["--batch-size", "5000"], "--batch-size"),
    (["--binarize", "maybe"], "--binarize"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main([*flags, "--workdir", str(tmp_path / "w"), "--epochs", "1", *flags])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written before the error


def test_workdir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit):
        train_script.main(["--workdir", str(target), *SMALL])
    assert "--workdir" in capsys.readouterr().err


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    checkpoint.atomic_write_json(path, {"ok": 1})
    with pytest.raises(ValueError):  # NaN is refused before anything is written
        checkpoint.atomic_write_json(path, {"bad": float("nan")})

    def killed(*args):
        raise KeyboardInterrupt  # as if the process died between write and rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@subprocess_work("langevin_refine_runs")
def _langevin_refine_runs(tmp):
    """`savae train` of Adam, then annealing with Langevin proposals from its parameters, in subprocesses
    (subprocess work, see conftest.py): their metrics.json."""
    run_script("-m", "savae_jax.cli", "train", "--epochs", "5", "--workdir", tmp / "adam", *SMALL)
    run_script("-m", "savae_jax.cli", "train", "--optimizer", "sa", "--epochs", "3", "--init-from", tmp / "adam" / "params",
               "--sa-proposal", "langevin", "--sa-proposals", "8", "--sa-langevin-optimizer", "adam",
               "--sa-t0", "0.01", "--workdir", tmp / "sa", *SMALL)
    return [json.loads((tmp / name / "metrics.json").read_text()) for name in ("adam", "sa")]


@pytest.fixture(scope="module")
def langevin_refine_runs(request):
    return subprocess_result(request)


# Slow tier: two train runs end to end; Langevin proposals stay in the default run through the
# README's comparison (langevin-sa against its pinned numbers, test_compare.py).
@pytest.mark.slow
def test_sa_refines_an_adam_optimum_with_langevin_proposals(langevin_refine_runs):
    """The seed's x0 = x*: Adam first, then annealing from its parameters (--init-from)."""
    adam, sa = langevin_refine_runs
    adam_final, sa_final = adam["final"]["test_neg_elbo"], sa["final"]["test_neg_elbo"]
    # Started from Adam's result (a fresh model scores ~51 nats, so the first
    # annealing epoch could not be at or below Adam's score otherwise) and
    # improved on it (measured: adam 35.2, first SA epoch 32.8, final 30.4).
    assert sa["history"][0]["test_neg_elbo"] < adam_final + 0.5
    assert sa_final < adam_final
    assert all(row["phase"] == "sa" and 0.0 <= row["acceptance_rate"] <= 1.0 for row in sa["history"])


def test_pretrain_epochs_then_sa_in_one_run(tmp_path):
    metrics = train_script.main([
        "--optimizer", "sa", "--epochs", "1", "--pretrain-epochs", "2", "--sa-proposal", "low_rank",
        "--sa-proposals", "8", "--sa-acceptance", "greedy", "--workdir", str(tmp_path), *SMALL])
    assert [(row["phase"], row["epoch"]) for row in metrics["history"]] == [("adam", 1), ("adam", 2), ("sa", 3)]
    # Greedy annealing never accepts a worse incumbent on its batch, so the
    # training loss cannot jump; the test score stays near Adam's.
    assert abs(metrics["history"][2]["test_neg_elbo"] - metrics["history"][1]["test_neg_elbo"]) < 1.0
    # trace.csv: one row per step (2 Adam epochs, then 1 annealing epoch of 15 batches of 100), the
    # annealer's rows with its step diagnostics; greedy accepts only an improvement on the batch.
    with open(tmp_path / "trace.csv", newline="") as f:
        trace = list(csv.DictReader(f))
    assert [int(r["step"]) for r in trace] == list(range(1, metrics["history"][-1]["step"] + 1)) and len(trace) == 45
    assert [r["phase"] for r in trace] == ["adam"] * 30 + ["sa"] * 15
    sa_rows = trace[30:]
    assert all(float(r["delta"]) < 0 for r in sa_rows if r["accepted"] == "True")
    assert float(sa_rows[-1]["acceptance_rate"]) == pytest.approx(metrics["history"][-1]["acceptance_rate"], rel=1e-6)


@pytest.mark.parametrize("flags, needle", [
    (["--optimizer", "sa", "--sa-proposals", "0"], "num_proposals"),
    (["--optimizer", "sa", "--sa-proposal", "quantum"], "--sa-proposal"),
    (["--optimizer", "sa", "--sa-acceptance", "threshold", "--sa-alpha", "1.5"], "alpha"),
    (["--optimizer", "sa", "--sa-t0", "-1"], "t0"),
    (["--pretrain-epochs", "-1"], "--pretrain-epochs"),
    (["--init-from", "/nonexistent/params"], "--init-from"),
])
def test_bad_sa_flags(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit):
        train_script.main([*flags, "--workdir", str(tmp_path / "w"), *SMALL])
    assert needle in capsys.readouterr().err


def test_init_from_another_model_shape_is_refused(tmp_path, capsys):
    train_script.main(["--epochs", "1", "--workdir", str(tmp_path / "a"), *SMALL])
    with pytest.raises(SystemExit):
        train_script.main(["--epochs", "1", "--init-from", str(tmp_path / "a" / "params"),
                           "--workdir", str(tmp_path / "b"), "--hidden", "16", "--latents", "4", "--quiet"])
    err = capsys.readouterr().err
    assert "--init-from" in err and "another model shape" in err


def test_iwae_diagnostics_and_beta_warmup_reach_metrics(tmp_path):
    metrics = train_script.main([
        "--epochs", "2", "--eval-iwae", "20", "--beta-schedule", "warmup", "--beta-steps", "15",
        "--free-bits", "0.05", "--workdir", str(tmp_path), *SMALL])
    final = metrics["final"]
    # The reported ELBO is the true one (beta = 1), the same number fit logged.
    assert final["test_neg_elbo"] == pytest.approx(metrics["history"][-1]["test_neg_elbo"], rel=1e-6)
    assert final["iwae_samples"] == 20
    assert 0.0 <= final["elbo_iwae_gap"] < 5.0  # IWAE-20 is the tighter bound
    assert 0 <= final["diagnostics"]["active_units"] <= 4
    assert len(final["diagnostics"]["kl_per_dim"]) == 4


@subprocess_work("conv_train_run")
def _conv_train_run(tmp):
    """`savae train` of the conv VAE with the logistic likelihood, in a subprocess (subprocess work, see
    conftest.py): (its metrics.json, its output)."""
    log = run_script("-m", "savae_jax.cli", "train", "--model", "conv", "--likelihood", "logistic", "--binarize", "none",
                     "--epochs", "1", "--hidden", "32", "--latents", "4", "--batch-size", "100", "--quiet",
                     "--workdir", tmp / "w")
    return json.loads((tmp / "w" / "metrics.json").read_text()), log


@pytest.fixture(scope="module")
def conv_train_run(request):
    return subprocess_result(request)


# Slow tier: a conv train run end to end; the default tier keeps the conv VAE's training step and
# the bits-per-dim warning in-process.
@pytest.mark.slow
def test_conv_model_with_logistic_likelihood_reports_bits_per_dim(conv_train_run):
    metrics, log = conv_train_run
    assert "bits_per_dim assumes 8-bit images" in log  # the digits have 17 grey levels
    final = metrics["final"]
    assert final["bits_per_dim"] == pytest.approx(final["test_neg_elbo"] / (64 * np.log(2)), rel=1e-6)
    assert 0.0 < final["bits_per_dim"] < 20.0


def test_rerunning_into_a_workdir_that_holds_a_run_needs_resume(tmp_path, capsys):
    train_script.main(["--epochs", "1", "--workdir", str(tmp_path), *SMALL])
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(SystemExit):
        train_script.main(["--epochs", "2", "--workdir", str(tmp_path), *SMALL])
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_bytes() == before  # nothing was overwritten
    with pytest.raises(SystemExit):  # (more epochs would be allowed: test_resume_with_more_epochs_...)
        train_script.main(["--epochs", "1", "--lr", "0.01", "--workdir", str(tmp_path), "--resume", *SMALL])
    err = capsys.readouterr().err
    assert "different config" in err and "lr: saved 0.001, now 0.01" in err


PRETRAIN_FLAGS = ["--optimizer", "sa", "--pretrain-epochs", "1", "--epochs", "8", "--sa-proposals", "8",
                  "--eval-iwae", "0", *SMALL]


@subprocess_work("pretrain_killed_runs")
def _pretrain_killed_runs(tmp):
    """An uninterrupted `savae train --pretrain-epochs` run, and the same run SIGKILLed after its first
    annealing checkpoint and resumed, in subprocesses (subprocess work, see conftest.py):
    ``(reference workdir, killed workdir, what was seen at the kill)``."""
    import signal
    import sys
    import time

    run_script("-m", "savae_jax.cli", "train", *PRETRAIN_FLAGS, "--workdir", tmp / "reference")
    workdir = tmp / "killed"
    proc = popen([sys.executable, "-m", "savae_jax.cli", "train", *PRETRAIN_FLAGS, "--workdir", str(workdir)],
                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # 15 steps per epoch: step 30 ends the first annealing epoch.
    annealing_saved = lambda: any(int(p.name) >= 30 for p in (workdir / "checkpoints").glob("*")  # noqa: E731
                                  if p.name.isdigit())
    deadline = time.monotonic() + 300
    while proc.poll() is None and not annealing_saved() and time.monotonic() < deadline:
        time.sleep(0.005)
    seen = {"alive": proc.poll() is None}
    proc.send_signal(signal.SIGKILL)
    seen["log"] = proc.communicate()[0][-3000:]
    seen["saved"], seen["finished"] = annealing_saved(), (workdir / "metrics.json").exists()
    run_script("-m", "savae_jax.cli", "train", *PRETRAIN_FLAGS, "--workdir", workdir, "--resume")
    return tmp / "reference", workdir, seen


@pytest.fixture(scope="module")
def pretrain_killed_runs(request):
    return subprocess_result(request)


@pytest.mark.slow  # a third SIGKILL run; the SIGKILL tests of test_faults stay in the default run
def test_pretrain_then_annealing_killed_mid_annealing_resumes_bitwise(pretrain_killed_runs):
    """train.py --pretrain-epochs: SIGKILL after the first annealing checkpoint, --resume, and the
    history and final parameters equal an uninterrupted run's, bitwise."""
    from conftest import without_seconds

    reference_dir, workdir, seen = pretrain_killed_runs
    assert seen["alive"], "the run finished before it could be killed:\n" + seen["log"]
    assert seen["saved"] and not seen["finished"]
    reference, resumed = (json.loads((d / "metrics.json").read_text()) for d in (reference_dir, workdir))
    assert without_seconds(resumed["history"]) == without_seconds(reference["history"])
    assert [row["phase"] for row in resumed["history"]] == ["adam"] + ["sa"] * 8
    assert resumed["final"]["test_neg_elbo"] == reference["final"]["test_neg_elbo"]
    like = sv.models.init(jax.random.key(0), sv.MLPVAE(hidden=32, latents=4), np.zeros((1, 8, 8, 1)))
    got, want = (checkpoint.load_params(d / "params", like) for d in (workdir, reference_dir))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_resume_with_more_epochs_extends_a_finished_run_exactly(tmp_path, capsys):
    """Issue 23: --resume --epochs 2 on a finished 1-epoch run continues it; the result equals a
    2-epoch run bitwise. Fewer epochs than the run had, or --resume where there is no run, are refused."""
    grown, direct = tmp_path / "grown", tmp_path / "direct"
    train_script.main(["--epochs", "1", "--workdir", str(grown), *SMALL])
    metrics = train_script.main(["--epochs", "2", "--resume", "--workdir", str(grown), *SMALL])
    reference = train_script.main(["--epochs", "2", "--workdir", str(direct), *SMALL])
    assert [r["train_loss"] for r in metrics["history"]] == [r["train_loss"] for r in reference["history"]]
    assert metrics["final"]["test_neg_elbo"] == reference["final"]["test_neg_elbo"]
    assert json.loads((grown / "config.json").read_text())["config"]["epochs"] == 2
    like = sv.models.init(jax.random.key(0), sv.MLPVAE(hidden=32, latents=4), np.zeros((1, 8, 8, 1), np.float32))
    a, b = checkpoint.load_params(grown / "params", like), checkpoint.load_params(direct / "params", like)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    for flags, needle in ((["--epochs", "1", "--resume", "--workdir", str(grown)], "epochs: saved 2, now 1"),
                          (["--epochs", "1", "--resume", "--workdir", str(tmp_path / "none")], "holds no run")):
        with pytest.raises(SystemExit):
            train_script.main([*flags, *SMALL])
        assert needle in capsys.readouterr().err
