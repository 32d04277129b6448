"""The importance-weighted bound: key path, monotonicity in k, closed-form log p(x)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import evaluation, models, objectives, rng


@pytest.fixture(scope="module")
def digits():
    return sv.load("digits", "train"), sv.load("digits", "test")


@pytest.fixture(scope="module")
def trained(digits):
    """A small MLP VAE trained briefly on binarised digits."""
    train, _ = digits
    model = sv.MLPVAE(hidden=64, latents=8)
    params = models.init(jax.random.key(0), model, train.images[:1])
    params, _ = sv.fit(jax.random.key(1), params, sv.make_loss(model), optax.adam(3e-3),
                       train, epochs=8, batch_size=100, binarize="dynamic")
    return model, params


def _log_normal(z, mean, logvar):
    return -0.5 * jnp.sum(math.log(2 * math.pi) + logvar + jnp.square(z - mean) / jnp.exp(logvar), -1)


_iwae = jax.jit(objectives.iwae_bound, static_argnames=("model", "num_samples", "chunk_size"))


def test_k1_is_the_one_sample_elbo_on_the_same_key_path():
    model = sv.MLPVAE(hidden=32, latents=4)
    x = rng.flat_draw(jax.random.bernoulli, jax.random.key(0), (5, 8, 8, 1), p=0.3).astype(jnp.float32)
    params = models.init(jax.random.key(1), model, x)
    key = jax.random.key(2)
    bound = _iwae(key, params, x, model=model, num_samples=1)
    # Sample 0 uses fold_in(key, 0): the z that `elbo` draws from that key.
    k0 = jax.random.fold_in(key, 0)
    parts, out = jax.jit(lambda k: (objectives.elbo(k, params, x, model), model.apply(params, x, k)))(k0)
    mc_elbo = (parts.log_likelihood + _log_normal(out.z, 0.0, jnp.zeros_like(out.z))
               - _log_normal(out.z, out.mean, out.logvar))
    np.testing.assert_allclose(bound, mc_elbo, rtol=1e-5, atol=1e-5)
    # Chunking does not change the value: each sample keeps its own noise.
    np.testing.assert_allclose(_iwae(key, params, x, model=model, num_samples=7, chunk_size=3),
                               _iwae(key, params, x, model=model, num_samples=7, chunk_size=7),
                               rtol=1e-5, atol=1e-5)


# Slow tier: trains a model; the default tier keeps the IWAE bound's exact cases (K = 1, the closed
# form).
@pytest.mark.slow
def test_bound_increases_with_k_on_a_trained_model(trained, digits):
    model, params = trained
    x = jnp.asarray(sv.data.binarize(jax.random.key(4), digits[1].images))  # 297 test digits
    key = jax.random.key(5)
    bounds = [np.asarray(_iwae(key, params, x, model=model, num_samples=k, chunk_size=10))
              for k in (1, 10, 100)]
    means = [float(b.mean()) for b in bounds]
    assert means[0] < means[1] < means[2], means
    assert means[2] - means[0] > 0.5, means  # a real gain, not rounding
    # k = 1 is the (analytic-KL) ELBO in expectation: 297 examples, one sample each.
    elbo = objectives.elbo(jax.random.key(6), params, x, model).elbo
    assert abs(means[0] - float(elbo.mean())) < 1.0, (means[0], float(elbo.mean()))


def test_evaluate_iwae_matches_evaluate_conventions(digits):
    """``evaluate`` of a loss that is the negative IWAE bound gives exactly
    ``evaluate_iwae``: same binary images, same per-example keys, same chunking."""
    model = sv.MLPVAE(hidden=32, latents=4)
    params = models.init(jax.random.key(0), model, digits[1].images[:1])
    images = digits[1].images[:45]
    key = jax.random.key(9)

    def neg_iwae_loss(p, k, x):
        return -jnp.mean(objectives.iwae_bound(k, p, x, model, 3))

    # "dynamic" is the mode whose images depend on the key.
    want = evaluation.evaluate(neg_iwae_loss, params, images, key, batch_size=20,
                               binarize="dynamic")
    got = evaluation.evaluate_iwae(model, params, images, 3, key=key, batch_size=16,
                                   binarize="dynamic")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got > 0  # a negative log-likelihood in nats


def test_the_old_argument_order_is_refused_with_the_order_named(digits):
    """``evaluate_iwae`` and ``report`` take ``(model, params, images)``, as ``evaluate``
    takes ``(loss_fn, params, images)``; the old ``(params, model, images)`` (deprecated before
    0.1.0) is a ValueError that names the order, before anything is compiled."""
    model = sv.MLPVAE(hidden=16, latents=3)
    params = models.init(jax.random.key(0), model, digits[1].images[:1])
    images = digits[1].images[:30]
    with pytest.raises(ValueError, match=r"model must be a flax Module; the arguments are \(model, params, images"):
        evaluation.evaluate_iwae(params, model, images, 4, batch_size=16, binarize="dynamic")
    with pytest.raises(ValueError, match=r"model must be a flax Module; the arguments are \(model, params, images"):
        evaluation.report(params, model, images, iwae_samples=2)
    want = evaluation.report(model, params, images, iwae_samples=2)
    assert want["test_neg_iwae"] == sv.evaluate_iwae(model, params, images, 2)


class LinearGaussianVAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I); q(z|x) = N(A x + c, diag(exp(v)))."""

    latents: int = 2
    sigma: float = 0.5

    @nn.compact
    def encode(self, x):
        h = x.reshape(x.shape[0], -1)
        mean = nn.Dense(self.latents, name="mean")(h)
        logvar = self.param("logvar", nn.initializers.zeros, (self.latents,))
        return mean, jnp.broadcast_to(logvar, mean.shape)

    @nn.compact
    def decode(self, z, image_shape):
        loc = nn.Dense(math.prod(image_shape), name="decoder")(z)
        return loc.reshape(z.shape[0], *image_shape)

    def log_likelihood(self, loc, x):
        return models.gaussian_log_prob(loc, math.log(self.sigma), x)

    def __call__(self, x, key):
        mean, logvar = self.encode(x)
        z = models.reparameterize(key, mean, logvar)
        return models.VAEOutput(self.decode(z, x.shape[1:]), mean, logvar, z)


def test_linear_gaussian_k5000_matches_closed_form_log_px():
    d, latents, sigma = 4, 2, 0.5
    rng = np.random.default_rng(0)
    w = rng.normal(size=(d, latents))
    b = rng.normal(size=d)
    cov = w @ w.T + sigma**2 * np.eye(d)
    x = rng.multivariate_normal(b, cov, size=6)
    sign, logdet = np.linalg.slogdet(cov)
    diff = x - b
    exact = -0.5 * (d * math.log(2 * math.pi) + logdet
                    + np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff))
    # The exact posterior is N(S W^T (x - b) / sigma^2, S), S = (I + W^T W / sigma^2)^-1;
    # q uses a shrunk mean and an inflated diagonal variance, so it is not exact.
    s = np.linalg.inv(np.eye(latents) + w.T @ w / sigma**2)
    a = 0.8 * s @ w.T / sigma**2
    c = -a @ b + 0.1
    model = LinearGaussianVAE(latents, sigma)
    params = {"params": {
        "mean": {"kernel": jnp.asarray(a.T, jnp.float32), "bias": jnp.asarray(c, jnp.float32)},
        "logvar": jnp.asarray(np.log(1.5 * np.diag(s)), jnp.float32),
        "decoder": {"kernel": jnp.asarray(w.T, jnp.float32), "bias": jnp.asarray(b, jnp.float32)},
    }}
    xs = jnp.asarray(x, jnp.float32).reshape(6, 1, 1, d)
    key = jax.random.key(0)
    k1 = np.asarray(jax.vmap(lambda k: objectives.iwae_bound(k, params, xs, model, 1))(
        jax.random.split(key, 500)).mean(0))
    k5000 = np.asarray(objectives.iwae_bound(key, params, xs, model, 5000, chunk_size=500))
    # Tolerance 0.02 nats per example (Monte Carlo error and the O(1/k) bias
    # are ~1e-3 here); the one-sample ELBO is clearly further away.
    np.testing.assert_allclose(k5000, exact, atol=0.02)
    assert np.all(exact - k1 > 0.05), exact - k1
    assert np.all(k5000 <= exact + 0.02)


def test_iwae_validates_arguments():
    model = sv.MLPVAE(hidden=4, latents=2)
    x = jnp.zeros((1, 2, 2, 1))
    params = models.init(jax.random.key(0), model, x)
    with pytest.raises(ValueError, match="num_samples"):
        objectives.iwae_bound(jax.random.key(0), params, x, model, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        objectives.iwae_bound(jax.random.key(0), params, x, model, 3, chunk_size=0)
