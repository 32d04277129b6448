"""What issue 16's bad inputs must leave behind: no file replaced, the last finite state kept, valid JSON.

The catalogue (tests/test_bad_inputs.py) checks each refusal's message; the
tests here check the behaviour around it with numbers: what survives on disk,
which parameters a stopped run hands back, what a flagged schedule does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
import savae_jax.annealing as an
from savae_jax import checkpoint, driver

from conftest import nan_after

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    """The experiment module behind ``savae <name>``."""
    return importlib.import_module(f"savae_jax.experiments.{name}")


@pytest.fixture(scope="module")
def tiny():
    train, test = sv.load("digits", "train"), sv.load("digits", "test")
    model = sv.MLPVAE(hidden=16, latents=3)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    return train, test, model, params, sv.make_loss(model)


# ---- files


def test_save_params_never_replaces_what_is_not_a_checkpoint(tiny, tmp_path):
    params = tiny[3]
    thesis = tmp_path / "thesis.tex"
    thesis.write_text("chapter 1")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for path in (thesis, folder, thesis / "sub"):
        with pytest.raises(ValueError, match=str(path)):
            checkpoint.save_params(path, params)
    assert thesis.read_text() == "chapter 1"
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"
    # An earlier checkpoint and an empty folder are written; the newer parameters replace the older.
    (tmp_path / "empty").mkdir()
    checkpoint.save_params(tmp_path / "empty", params)
    target = tmp_path / "ckpt"
    checkpoint.save_params(target, params)
    doubled = jax.tree.map(lambda x: 2 * x, params)
    checkpoint.save_params(target, doubled)
    chex.assert_trees_all_equal(checkpoint.load_params(target, like=params), doubled)
    chex.assert_trees_all_equal(checkpoint.load_params(tmp_path / "empty", like=params), params)


def test_save_params_under_a_file_fails_at_once_and_the_process_exits(tmp_path):
    """Orbax used to fail after seconds and then hang ~300 s at exit; the check runs before it."""
    (tmp_path / "somefile").write_text("x")
    code = ("import jax, savae_jax as sv\n"
            "try:\n"
            "    sv.checkpoint.save_params('somefile/sub', {'w': jax.numpy.ones(3)})\n"
            "except ValueError as err:\n"
            "    print('refused:', err)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "is a file, not a folder" in done.stdout


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.atomic_write_text(tmp_path / "a.txt", "x")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = checkpoint.atomic_write_text(tmp_path / "b.txt", "x")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_json_safe_writes_nan_and_inf_as_null(tmp_path):
    obj = {"loss": float("nan"), "rows": [{"x": float("inf"), "y": 1.5}], "n": 3, "name": "sa"}
    checkpoint.atomic_write_json(tmp_path / "m.json", checkpoint.json_safe(obj))
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "loss": None, "rows": [{"x": None, "y": 1.5}], "n": 3, "name": "sa"}


# ---- schedules


def quadratic(params, key, x):
    return jnp.sum(jnp.square(params - 1.0))


def test_a_negative_or_nan_schedule_halts_the_chain_and_is_flagged():
    for temperature, radius, flag in ((lambda c: -1.0, None, "bad_temperature"),
                                      (lambda c: jnp.nan, None, "bad_temperature"),
                                      (1.0, lambda c: jnp.nan, "bad_radius")):
        sa = an.simulated_annealing(quadratic, 8, an.gaussian(0.5), temperature, an.metropolis(), radius=radius)
        state = sa.init(jnp.zeros(3))
        new, info = jax.jit(sa.step)(jax.random.key(0), state, None)
        assert bool(getattr(info, flag)) and not bool(info.accepted)
        chex.assert_trees_all_equal(new.params, state.params)
        assert bool(new.done)
    # A good schedule is not flagged (and moves: a gaussian step of 0.5 improves on the origin).
    sa = an.simulated_annealing(quadratic, 8, an.gaussian(0.5), 1.0, an.greedy())
    _, info = jax.jit(sa.step)(jax.random.key(0), sa.init(jnp.zeros(3)), None)
    assert not bool(info.bad_temperature) and not bool(info.bad_radius) and bool(info.accepted)


def test_a_vmapped_sweep_flags_only_its_negative_member():
    def step(t0, key):
        sa = an.simulated_annealing(quadratic, 8, an.gaussian(0.5), an.exponential(t0, 0.9), an.metropolis())
        return sa.step(key, sa.init(jnp.zeros(3)), None)

    states, infos = jax.jit(jax.vmap(step, in_axes=(0, None)))(jnp.array([0.5, -1.0]), jax.random.key(3))
    assert np.asarray(infos.bad_temperature).tolist() == [False, True]
    assert not bool(infos.accepted[1])
    np.testing.assert_array_equal(np.asarray(states.params[1]), np.zeros(3))
    alone, _ = jax.jit(lambda key: step(0.5, key))(jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(states.params[0]), np.asarray(alone.params))


def test_fit_stops_on_a_bad_schedule_naming_it(tiny):
    train, _, _, params, loss_fn = tiny
    sa = an.simulated_annealing(loss_fn, 4, an.gaussian(0.01), optax.linear_schedule(-1.0, -1.0, 10), an.metropolis())
    with pytest.raises(driver.InvalidScheduleError, match=r"temperature schedule returned -1.0.*first at step 1") as err:
        sv.fit(jax.random.key(1), params, loss_fn, sa, train, 2, 100)
    chex.assert_trees_all_equal(err.value.params, params)  # no move was made
    assert err.value.step == 1 and err.value.history == []


def test_replica_exchange_stops_on_a_bad_replica_schedule(tiny):
    """The replicas' infos are stacked inside the exchange's info: their flags stop the loop too."""
    train, _, _, params, loss_fn = tiny

    def build(t):  # the coldest replica's schedule goes negative at its third step
        schedule = lambda count: jnp.where((t < 0.75) & (count >= 2), -0.5, t)  # noqa: E731
        return an.simulated_annealing(loss_fn, 4, an.gaussian(0.01), schedule, an.metropolis())

    rex = an.replica_exchange(build, jnp.array([0.5, 1.0]), loss_fn)
    with pytest.raises(driver.InvalidScheduleError, match=r"temperature schedule returned -0.5.*first at step 3"):
        sv.fit(jax.random.key(1), params, loss_fn, rex, train, 1, 100)


# ---- divergence


def test_fit_stops_at_the_first_non_finite_step_and_keeps_the_last_finite_epoch(tiny):
    train, test, _, params, loss_fn = tiny
    steps_per_epoch = len(train.images) // 100  # 15
    with pytest.raises(driver.NonFiniteLossError, match=rf"first at step {steps_per_epoch + 5}\)") as err:
        sv.fit(jax.random.key(1), params, loss_fn, nan_after(loss_fn, steps_per_epoch + 5), train, 3, 100, test=test)
    clean, history = sv.fit(jax.random.key(1), params, loss_fn, nan_after(loss_fn, 10**9), train, 1, 100, test=test)
    assert err.value.step == steps_per_epoch + 5
    chex.assert_trees_all_equal(err.value.params, clean)
    assert [row["test_neg_elbo"] for row in err.value.history] == [row["test_neg_elbo"] for row in history]


def test_fit_stops_when_adam_diverges(tiny):
    train, _, _, params, loss_fn = tiny
    with pytest.raises(driver.NonFiniteLossError, match=r"first at step \d+\)") as err:
        sv.fit(jax.random.key(1), params, loss_fn, optax.sgd(1e6), train, 3, 100)
    assert err.value.step >= 1
    chex.assert_trees_all_equal(err.value.params, params)  # diverged in the first epoch: the initial ones


# ---- evaluation inputs


def test_evaluations_accept_a_dataset_and_its_array_alike(tiny):
    _, test, model, params, loss_fn = tiny
    assert sv.evaluate(loss_fn, params, test) == sv.evaluate(loss_fn, params, test.images)
    assert sv.evaluate_iwae(model, params, test, 5) == sv.evaluate_iwae(model, params, test.images, 5)
    assert sv.diagnostics(model, params, test) == sv.diagnostics(model, params, test.images)
    assert 20 < sv.evaluate(loss_fn, params, test) < 80  # nats per 8x8 digit, untrained


def test_bits_per_dim_says_it_assumes_8_bit_data():
    model = sv.MLPVAE(hidden=16, latents=3, likelihood="logistic")
    images = sv.load("digits", "test").images[:40]  # 17 grey levels: k/16, not k/255
    params = sv.models.init(jax.random.key(0), model, images[:1])
    with pytest.warns(UserWarning, match="bits_per_dim assumes 8-bit images"):
        out = sv.evaluation.report(model, params, images)
    assert "bits_per_dim_note" in out
    eight_bit = np.round(images * 255) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = sv.evaluation.report(model, params, eight_bit.astype(np.float32))
    assert "bits_per_dim_note" not in out and out["bits_per_dim"] > 0


# ---- memory guard


def test_the_memory_guard_reads_the_compiled_step(tiny):
    train, _, _, params, loss_fn = tiny
    opt = sv.from_optax(loss_fn, optax.adam(1e-3))
    compiled = jax.jit(opt.step).lower(jax.random.key(0), opt.init(params), jnp.asarray(train.images[:100])).compile()
    need = driver.step_memory_bytes(compiled)
    assert need > sum(x.nbytes for x in jax.tree.leaves(params))  # at least the parameters and the batch
    assert driver.check_step_memory(compiled, limit=100 * need) == need
    with pytest.warns(ResourceWarning, match="needs about"):
        driver.check_step_memory(compiled, limit=int(1.5 * need))
    with pytest.raises(ValueError, match=r"needs about .* GiB .* but the device has"):
        driver.check_step_memory(compiled, limit=need // 2)


# ---- scripts


def test_train_cli_warns_about_flags_that_do_nothing_and_does_not_record_them(tmp_path, capsys):
    train_script = _script("train")
    argv = ["--workdir", str(tmp_path / "w"), "--hidden", "16", "--latents", "3", "--quiet", "--epochs", "1",
            "--eval-iwae", "0", "--sa-proposals", "8", "--pretrain-lr", "0.5"]
    train_script.main(argv)
    err = capsys.readouterr().err
    assert "--sa-proposals has no effect with --optimizer adam" in err and "--pretrain-lr has no effect" in err
    config = json.loads((tmp_path / "w" / "config.json").read_text())["config"]
    assert not any(k.startswith("sa_") or k.startswith("pretrain_l") for k in config) and config["lr"] == 1e-3


def test_train_cli_divergence_writes_valid_metrics_and_the_last_finite_parameters(tmp_path, capsys):
    train_script = _script("train")
    workdir = tmp_path / "w"
    argv = ["--workdir", str(workdir), "--hidden", "16", "--latents", "3", "--quiet", "--epochs", "2",
            "--eval-iwae", "0", "--optimizer", "sgd", "--lr", "1e6"]
    with pytest.raises(SystemExit) as info:
        train_script.main(argv)
    assert "first at step" in str(info.value.code)
    metrics = json.loads((workdir / "metrics.json").read_text())  # valid JSON
    assert "first at step" in metrics["stopped"] and metrics["history"] == []
    model = sv.MLPVAE(hidden=16, latents=3)
    init = sv.models.init(jax.random.split(jax.random.key(0), 4)[0], model, np.zeros((1, 8, 8, 1), np.float32))
    kept = checkpoint.load_params(workdir / "params", like=init)
    chex.assert_trees_all_equal(kept, init)  # diverged in the first epoch: the initial parameters
    assert 20 < metrics["final"]["test_neg_elbo"] < 80


def test_help_shows_defaults_choices_and_the_set_keys(capsys):
    for name, needles in (("train", ["learning rate of an optax --optimizer (default: 0.001)",
                                     "metropolis, threshold, greedy, penalty, confident",
                                     "gaussian, cauchy, low_rank, langevin", "(default: runs/train)"]),
                          ("compare", ["sa-refine: adam_share=0.5, adam_lr=0.001", "adam: lr=0.001",
                                       "es: pairs=32", "(default 128)"])):
        with pytest.raises(SystemExit):
            _script(name).build_parser().parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (name, needle)


def test_train_cli_numbers_epochs_alike_in_the_console_and_metrics_after_pretraining(tmp_path, capsys):
    train_script = _script("train")
    argv = ["--workdir", str(tmp_path / "w"), "--hidden", "16", "--latents", "3", "--quiet", "--epochs", "2",
            "--eval-iwae", "0", "--optimizer", "sgd", "--pretrain-epochs", "1"]
    metrics = train_script.main(argv)
    console = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert console == [["epoch", "1", "adam"], ["epoch", "2", "sgd"], ["epoch", "3", "sgd"]]
    assert [(row["epoch"], row["phase"]) for row in metrics["history"]] == [(1, "adam"), (2, "sgd"), (3, "sgd")]


def test_train_cli_overwrite_replaces_only_its_own_run(tmp_path, capsys):
    from savae_jax.experiments import workdir as workdir_lib

    train_script = _script("train")
    workdir = tmp_path / "w"
    base = ["--workdir", str(workdir), "--hidden", "16", "--latents", "3", "--quiet", "--epochs", "1",
            "--eval-iwae", "0"]
    first = train_script.main(base)
    with pytest.raises(SystemExit):
        train_script.main([*base, "--lr", "0.01"])
    assert "--overwrite to replace it" in capsys.readouterr().err
    second = train_script.main([*base, "--lr", "0.01", "--overwrite"])
    saved = json.loads((workdir / "config.json").read_text())["config"]
    assert saved["lr"] == 0.01 and second["config"]["lr"] == 0.01
    assert second["final"]["test_neg_elbo"] != first["final"]["test_neg_elbo"]  # trained again, at lr 0.01
    assert workdir_lib.foreign_files(workdir, train_script.OUTPUTS) == []  # --overwrite's own-file rule
    assert {"config.json", "metrics.json", "checkpoints", "params"} <= set(p.name for p in workdir.iterdir())


def test_set_values_are_parsed_and_typed_by_the_defaults():
    compare_script = _script("compare")
    from savae_jax.experiments import settings

    assert compare_script.parse_set("sa.scale=.05") == ("sa", "scale", 0.05)
    assert compare_script.parse_set("sa.proposal=gaussian") == ("sa", "proposal", "gaussian")
    checked = settings.check_settings({"proposals": 8.0, "scale": 1, "t_min": None}, settings.SA_DEFAULTS, "sa.", "annealing")
    assert checked == {"proposals": 8, "scale": 1, "t_min": None} and isinstance(checked["proposals"], int)
    for value in (True, "8", 8.5):
        with pytest.raises(ValueError, match=r"sa\.proposals: must be an integer"):
            settings.check_settings({"proposals": value}, settings.SA_DEFAULTS, "sa.", "annealing")
