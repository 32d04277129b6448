"""experiments/train.py: outputs, schema, atomic writes and flag errors."""

import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = load_script("train")
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
    assert {"adam", "rmsprop", "sgd", "adamw", "lion"} <= set(train_script.OPTAX_ALIASES)
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
