"""Posterior diagnostics: per-dimension KL, active units, mutual information."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import evaluation


def _dense(kernel, bias):
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def _model_with_encoder(n_pixels, hidden, latents, mean_w, logvar_b, rng):
    """An MLPVAE whose encoder is identity-like: hidden = relu(x), mean = h @ mean_w."""
    model = sv.MLPVAE(hidden=hidden, latents=latents)
    params = {"params": {
        "encoder": {
            "hidden": _dense(np.eye(n_pixels, hidden), np.zeros(hidden)),
            "mean": _dense(mean_w, np.zeros(latents)),
            "logvar": _dense(np.zeros((hidden, latents)), logvar_b),
        },
        "decoder": {
            "hidden": _dense(rng.normal(size=(latents, hidden)) * 0.1, np.zeros(hidden)),
            "logits": _dense(rng.normal(size=(hidden, n_pixels)) * 0.1, np.zeros(n_pixels)),
        },
    }}
    return model, params


def test_ignored_dimensions_are_inactive_with_zero_kl():
    rng = np.random.default_rng(0)
    n, pixels, hidden, latents = 300, 4, 4, 5
    images = rng.uniform(size=(n, 2, 2, 1)).astype(np.float32)
    # Dimensions 0, 1 read pixels 0, 1 (scaled by 2); dimensions 2-4 ignore x.
    mean_w = np.zeros((hidden, latents))
    mean_w[0, 0] = mean_w[1, 1] = 2.0
    logvar_b = np.array([-2.0, -2.0, 0.0, 0.0, 0.0])
    model, params = _model_with_encoder(pixels, hidden, latents, mean_w, logvar_b, rng)
    d = evaluation.diagnostics(model, params, images, batch_size=128)

    assert d["active_units"] == 2
    np.testing.assert_allclose(d["kl_per_dim"][2:], 0.0, atol=1e-6)
    # By hand: KL_j = 1/2 (e^-2 + E[(2 x_j)^2] - 1 + 2), Var(2 x_j) for the posterior means.
    for j in (0, 1):
        m = 2.0 * images[:, j // 2, j % 2, 0].astype(np.float64)
        np.testing.assert_allclose(d["kl_per_dim"][j], 0.5 * (math.exp(-2) + np.mean(m**2) + 1.0),
                                   rtol=1e-5)
        np.testing.assert_allclose(d["posterior_mean_variance"][j], np.var(m), rtol=1e-4)
        assert d["posterior_mean_variance"][j] > 0.01
    np.testing.assert_allclose(d["kl"], sum(d["kl_per_dim"]), rtol=1e-6)
    assert 0.0 < d["mutual_info"] <= d["mi_max"] + 1e-6
    assert d["mi_examples"] == n and all(isinstance(v, float) for v in d["kl_per_dim"])


def test_mutual_information_limits():
    rng = np.random.default_rng(1)
    n, latents = 200, 2
    images = rng.uniform(size=(n, 2, 2, 1)).astype(np.float32)
    # An encoder that ignores x: q(z|x) = N(0, I) for every x, so I(x; z) = 0 exactly.
    model, params = _model_with_encoder(4, 4, latents, np.zeros((4, latents)), np.zeros(latents), rng)
    d = evaluation.diagnostics(model, params, images)
    assert abs(d["mutual_info"]) < 1e-5 and d["active_units"] == 0 and d["kl"] < 1e-6
    # A sharp encoder of distinct inputs: each z identifies its x, so the
    # estimate reaches its ceiling log M.
    w = np.zeros((4, latents))
    w[0, 0] = w[1, 1] = 50.0
    model, params = _model_with_encoder(4, 4, latents, w, np.full(latents, -12.0), rng)
    d = evaluation.diagnostics(model, params, images, mi_examples=150)
    assert d["mi_examples"] == 150
    np.testing.assert_allclose(d["mutual_info"], math.log(150), atol=0.02)
    assert d["active_units"] == 2


def test_diagnostics_binarises_like_evaluate_and_validates():
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(50, 2, 2, 1)).astype(np.float32)
    w = np.zeros((4, 3))
    w[0, 0] = 1.0
    model, params = _model_with_encoder(4, 4, 3, w, np.zeros(3), rng)
    key = jax.random.key(7)
    d = evaluation.diagnostics(model, params, images, key=key, binarize="dynamic")
    # The binary images `evaluate` scores for this key: mean of dimension 0 is pixel 0.
    key_bin, _ = jax.random.split(key)
    x = evaluation._eval_images(jnp.asarray(images), jnp.arange(50), key_bin, sv.data.BatchFn("dynamic"))
    pixel = np.asarray(x[:, 0, 0, 0], np.float64)
    np.testing.assert_allclose(d["posterior_mean_variance"][0], np.var(pixel), rtol=1e-5)
    np.testing.assert_allclose(d["kl_per_dim"][0], 0.5 * np.mean(pixel**2), rtol=1e-5)
    with pytest.raises(ValueError, match="mi_examples"):
        evaluation.diagnostics(model, params, images, mi_examples=0)


def test_diagnostics_refuses_the_old_argument_order():
    """``(params, model, images)`` (deprecated before 0.1.0) is a ValueError naming the order."""
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(40, 2, 2, 1)).astype(np.float32)
    model, params = _model_with_encoder(4, 4, 2, rng.normal(size=(4, 2)), np.zeros(2), rng)
    with pytest.raises(ValueError, match=r"the arguments are \(model, params, images"):
        evaluation.diagnostics(params, model, images, mi_examples=30)
