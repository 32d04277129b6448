"""Beta schedules, free bits, and the step count that training passes to them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import beta as beta_lib
from savae_jax import objectives as elbo_lib
from savae_jax import models, optimizer, rng


def _values(schedule, counts):
    return [float(schedule(c)) for c in counts]


def test_constant_table():
    s = beta_lib.constant(0.7)
    np.testing.assert_allclose(_values(s, [0, 1, 10**6]), [0.7] * 3, rtol=1e-7)
    assert s.final == 0.7


def test_linear_warmup_table():
    s = beta_lib.linear_warmup(2.0, num_steps=10)
    np.testing.assert_allclose(_values(s, [0, 1, 5, 9, 10, 11, 1000]),
                               [0.0, 0.2, 1.0, 1.8, 2.0, 2.0, 2.0], rtol=1e-6, atol=1e-7)
    s = beta_lib.linear_warmup(1.0, num_steps=4, start=0.5)
    np.testing.assert_allclose(_values(s, [0, 2, 4, 8]), [0.5, 0.75, 1.0, 1.0], rtol=1e-6)
    assert s.final == 1.0


def test_cyclical_table():
    # Fu et al. 2019: T = 100 steps, M = 4 cycles of 25, ramp over R = 0.5 of each.
    s = beta_lib.cyclical(1.0, total_steps=100, num_cycles=4, ratio=0.5)
    counts = [0, 5, 10, 12.5, 20, 24, 25, 30, 50, 62.5, 99, 100, 500]
    want = [0.0, 0.4, 0.8, 1.0, 1.0, 1.0, 0.0, 0.4, 0.0, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(_values(s, counts), want, rtol=1e-6, atol=1e-6)
    # Traced counts (inside jit) give the same values.
    jitted = jax.jit(jax.vmap(s))(jnp.asarray([0, 5, 25, 30, 100]))
    np.testing.assert_allclose(jitted, [0.0, 0.4, 0.0, 0.4, 1.0], atol=1e-6)


@pytest.mark.parametrize("bad", [
    lambda: beta_lib.constant(-1.0),
    lambda: beta_lib.linear_warmup(1.0, num_steps=0),
    lambda: beta_lib.cyclical(1.0, 100, num_cycles=0),
    lambda: beta_lib.cyclical(1.0, 100, ratio=0.0),
    lambda: sv.make_loss(sv.MLPVAE(), free_bits=-0.1),
])
def test_schedule_validation(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.fixture(scope="module")
def setup():
    model = sv.MLPVAE(hidden=16, latents=3)
    x = rng.flat_draw(jax.random.bernoulli, jax.random.key(0), (8, 4, 4, 1), p=0.4).astype(jnp.float32)
    params = models.init(jax.random.key(1), model, x)
    return model, params, x


def test_warmup_changes_the_gradient(setup):
    model, params, x = setup
    key = jax.random.key(2)
    loss_fn = sv.make_loss(model, beta=beta_lib.linear_warmup(1.0, num_steps=100))
    assert optimizer.is_scheduled(loss_fn) and not optimizer.is_scheduled(sv.make_loss(model))
    grad = jax.jit(jax.grad(loss_fn), static_argnames=())
    g0 = grad(params, key, x, step=0)
    g50 = grad(params, key, x, step=50)
    g100 = grad(params, key, x, step=100)
    recon = jax.grad(sv.make_loss(model, beta=0.0))(params, key, x)
    full = jax.grad(sv.make_loss(model, beta=1.0))(params, key, x)
    # Step 0: beta = 0, the KL gradient is absent; step N: the full ELBO's gradient.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, recon)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g100, full)
    # Halfway: the loss is linear in beta, so the gradient is the average.
    jax.tree_util.tree_map(
        lambda a, b, c: np.testing.assert_allclose(a, 0.5 * (b + c), rtol=1e-4, atol=1e-5), g50, g0, g100)
    # The KL's gradient on the encoder's logvar head is not small.
    d = g100["params"]["encoder"]["logvar"]["bias"] - g0["params"]["encoder"]["logvar"]["bias"]
    assert float(jnp.max(jnp.abs(d))) > 1e-2
    # No step (evaluation, the annealer): the schedule's final value.
    np.testing.assert_allclose(loss_fn(params, key, x), sv.make_loss(model)(params, key, x), rtol=1e-6)


def test_optax_schedule_without_final_needs_a_step(setup):
    model, params, x = setup
    loss_fn = sv.make_loss(model, beta=optax.linear_schedule(0.0, 1.0, 10))
    assert np.isfinite(float(loss_fn(params, jax.random.key(0), x, step=3)))
    with pytest.raises(ValueError, match="final"):
        loss_fn(params, jax.random.key(0), x)


def test_free_bits_is_a_per_dimension_floor(setup):
    model, params, x = setup
    key = jax.random.key(3)
    out = model.apply(params, x, key)
    parts = elbo_lib.elbo(key, params, x, model)
    kl_dims = np.asarray(jnp.mean(elbo_lib.gaussian_kl_per_dim(out.mean, out.logvar), 0))
    np.testing.assert_allclose(kl_dims.sum(), float(parts.kl.mean()), rtol=1e-5)
    lam = float(np.median(kl_dims))  # some dimensions below the floor, some above
    loss = sv.make_loss(model, beta=2.0, free_bits=lam)(params, key, x)
    want = -float(parts.log_likelihood.mean()) + 2.0 * np.maximum(kl_dims, lam).sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # free_bits=0 is the plain objective; a floor above every KL_j removes the KL gradient.
    np.testing.assert_allclose(sv.make_loss(model, free_bits=0.0)(params, key, x),
                               sv.make_loss(model)(params, key, x), rtol=1e-5)
    g = jax.grad(sv.make_loss(model, free_bits=float(kl_dims.max()) + 1.0))(params, key, x)
    g_recon = jax.grad(sv.make_loss(model, beta=0.0))(params, key, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_recon)


def test_training_passes_the_step_count(setup):
    model, params, x = setup
    loss_fn = sv.make_loss(model, beta=beta_lib.linear_warmup(1.0, num_steps=2))
    opt = optimizer.from_optax(loss_fn, optax.sgd(0.0))  # no update: params fixed
    state = opt.init(params)
    step = jax.jit(opt.step)
    keys = jax.random.split(jax.random.key(4), 3)
    for s, key in enumerate(keys):
        state, info = step(key, state, x)
        np.testing.assert_allclose(info.loss, loss_fn(params, key, x, step=s), rtol=1e-6)
    assert int(state.count) == 3


@pytest.mark.slow  # the default tier keeps the beta schedule in test_warmup_changes_the_gradient
def test_fit_and_annealer_with_a_schedule():
    train = sv.load("digits", "train")
    model = sv.MLPVAE(hidden=16, latents=2)
    params = models.init(jax.random.key(0), model, train.images[:1])
    loss_fn = sv.make_loss(model, beta=beta_lib.cyclical(1.0, total_steps=20, num_cycles=2))
    _, history = sv.fit(jax.random.key(1), params, loss_fn, optax.adam(1e-3), train, epochs=2,
                        batch_size=100, test=train.images[:50], binarize="dynamic")
    assert len(history) == 2 and all(np.isfinite(r["test_neg_elbo"]) for r in history)
    # The annealer calls loss_fn(params, key, x): it sees the final beta.
    sa = sv.annealing.simulated_annealing(loss_fn, 4, sv.annealing.gaussian(scale=1e-3), 1.0,
                                          sv.annealing.metropolis())
    x = jnp.asarray(train.images[:32])
    state, info = jax.jit(sa.step)(jax.random.key(2), sa.init(params), x)
    assert np.isfinite(float(info.loss))
