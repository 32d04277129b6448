"""ConvVAE shapes, the likelihoods against hand computations, a training step on mock CIFAR-10."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import data, models, objectives, rng
from conftest import slow_after_first

SMALL = dict(latents=4, features=(8, 16), hidden=32)


SHAPES = [((32, 32, 3), "logistic"), ((28, 28, 1), "bernoulli"), ((32, 32, 3), "gaussian"), ((28, 28, 1), "logistic")]


@pytest.mark.parametrize("shape, likelihood", SHAPES)
def test_conv_vae_shapes(shape, likelihood):
    """The shapes of the parameters, the forward pass and the prior samples, by abstract evaluation
    (jax.eval_shape traces, compiles nothing: the values are the next test's)."""
    model = models.ConvVAE(likelihood=likelihood, **SMALL)
    x = jax.ShapeDtypeStruct((3,) + shape, jnp.float32)
    params = jax.eval_shape(lambda k, images: models.init(k, model, images), jax.random.key(1), x)
    out = jax.eval_shape(model.apply, params, x, jax.random.key(2))
    assert out.logits.shape == x.shape
    assert out.mean.shape == out.logvar.shape == out.z.shape == (3, 4)
    assert (out.log_scale is None) == (likelihood == "bernoulli")
    if out.log_scale is not None:
        assert out.log_scale.shape == x.shape
    samples = jax.eval_shape(lambda p, k: models.sample_prior(k, p, model, 2, shape), params, jax.random.key(3))
    assert samples.shape == (2,) + shape


# The second shape and likelihood run in the slow tier (the shapes of all four are checked above).
@pytest.mark.parametrize("shape, likelihood", slow_after_first(SHAPES[:2]))
def test_conv_vae_values(shape, likelihood):
    """Run for real (a learned-scale and the Bernoulli likelihood): the scale floor holds, prior samples
    are images in [0, 1], the loss is finite."""
    model = models.ConvVAE(likelihood=likelihood, **SMALL)
    x = rng.flat_draw(jax.random.uniform, jax.random.key(0), (3,) + shape)
    params = models.init(jax.random.key(1), model, x)
    # Jitted: one compile of the forward pass, not one per primitive.
    out = jax.jit(model.apply)(params, x, jax.random.key(2))
    assert out.logits.shape == x.shape
    if out.log_scale is not None:
        assert float(out.log_scale.min()) >= models.MIN_LOG_SCALE
    samples = models.sample_prior(jax.random.key(3), params, model, 2, shape)
    assert samples.shape == (2,) + shape and 0.0 <= float(samples.min()) <= float(samples.max()) <= 1.0
    assert np.isfinite(float(jax.jit(sv.make_loss(model))(params, jax.random.key(4), x)))


def test_mlp_vae_default_param_tree_is_unchanged():
    params = models.init(jax.random.key(0), sv.MLPVAE(hidden=8, latents=2), jnp.zeros((1, 4, 4, 1)))
    tree = jax.tree_util.tree_map(jnp.shape, params)["params"]
    assert tree == {
        "encoder": {"hidden": {"kernel": (16, 8), "bias": (8,)}, "mean": {"kernel": (8, 2), "bias": (2,)},
                    "logvar": {"kernel": (8, 2), "bias": (2,)}},
        "decoder": {"hidden": {"kernel": (2, 8), "bias": (8,)}, "logits": {"kernel": (8, 16), "bias": (16,)}},
    }
    # Learned-scale likelihoods add one decoder head; a fixed sigma adds none.
    logistic = models.init(jax.random.key(0), sv.MLPVAE(8, 2, "logistic"), jnp.zeros((1, 4, 4, 1)))
    assert set(logistic["params"]["decoder"]) == {"hidden", "logits", "log_scale"}
    fixed = models.init(jax.random.key(0), sv.MLPVAE(8, 2, "gaussian", 0.1), jnp.zeros((1, 4, 4, 1)))
    assert set(fixed["params"]["decoder"]) == {"hidden", "logits"}
    with pytest.raises(ValueError, match="likelihood"):
        models.init(jax.random.key(0), sv.MLPVAE(8, 2, "poisson"), jnp.zeros((1, 4, 4, 1)))


def _logistic_cdf(v):
    return 1.0 / (1.0 + np.exp(-v))


def test_discretized_logistic_by_hand_and_normalised():
    loc = np.array([0.3, 0.0, 0.9, 0.5], np.float64)
    log_s = np.array([-3.0, -2.0, -4.0, -7.0])
    k = np.array([77, 0, 255, 128])
    x = k / 255.0
    h = 0.5 / 255
    want = []
    for xi, mi, si, ki in zip(x, loc, np.exp(log_s), k):
        hi = 1.0 if ki == 255 else _logistic_cdf((xi + h - mi) / si)
        lo = 0.0 if ki == 0 else _logistic_cdf((xi - h - mi) / si)
        want.append(math.log(hi - lo))
    as_img = lambda a: jnp.asarray(a, jnp.float32).reshape(4, 1, 1, 1)  # noqa: E731
    got = models.discretized_logistic_log_prob(as_img(loc), as_img(log_s), as_img(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Probabilities of all 256 pixel values sum to 1 for any loc and scale.
    values = jnp.arange(256, dtype=jnp.float32) / 255.0
    for mu, ls in [(0.5, -3.0), (0.0, -5.0), (1.0, 0.0), (-0.2, -7.0), (0.37, -6.5), (1.3, 1.0)]:
        lp = models.discretized_logistic_log_prob(jnp.full((256, 1, 1, 1), mu), jnp.full((256, 1, 1, 1), ls),
                                                  values.reshape(256, 1, 1, 1))
        assert abs(float(jnp.sum(jnp.exp(lp))) - 1.0) < 1e-4, (mu, ls)
        assert bool(jnp.all(jnp.isfinite(lp)))


def test_gaussian_and_bernoulli_by_hand():
    x = np.array([[0.2, 0.9]], np.float32).reshape(1, 1, 2, 1)
    mean = np.array([[0.5, 0.7]], np.float32).reshape(1, 1, 2, 1)
    sigma = 0.3
    want = sum(-0.5 * ((a - b) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
               for a, b in zip(x.ravel(), mean.ravel()))
    np.testing.assert_allclose(models.gaussian_log_prob(mean, math.log(sigma), x), [want], rtol=1e-6)
    # The model-level dispatch: fixed sigma vs learned log-scale.
    fixed = sv.MLPVAE(4, 2, "gaussian", gaussian_sigma=sigma)
    np.testing.assert_allclose(fixed.log_likelihood(mean, x), [want], rtol=1e-6)
    learned = sv.MLPVAE(4, 2, "gaussian")
    np.testing.assert_allclose(learned.log_likelihood(mean, x, jnp.full(x.shape, math.log(sigma))),
                               [want], rtol=1e-6)
    np.testing.assert_allclose(models.log_likelihood("bernoulli", jnp.zeros((1, 1, 2, 1)), x),
                               [2 * math.log(0.5)], rtol=1e-6)


def test_bits_per_dim():
    assert models.bits_per_dim(3072 * math.log(2) * 4.5, (32, 32, 3)) == pytest.approx(4.5)
    assert models.bits_per_dim(784 * math.log(2), (28, 28, 1)) == pytest.approx(1.0)


# Slow tier: the default keeps the mocked CIFAR-10 load (tests/test_data.py) and the conv VAE's loss
# values and shapes above; this adds Adam steps on that loss.
@pytest.mark.slow
def test_training_step_on_mock_cifar10_lowers_the_loss(tfds_mock, tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    with tfds_mock.testing.mock_data(num_examples=8, policy=tfds_mock.testing.MockPolicy.USE_CODE):
        train = data.load("cifar10", "train", data_dir=tmp_path)
    x = jnp.asarray(train.images)
    assert x.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(np.round(x * 255), x * 255)  # 8-bit values k / 255
    model = models.ConvVAE(likelihood="logistic", **SMALL)
    params = models.init(jax.random.key(0), model, x)
    loss_fn = sv.make_loss(model)
    key = jax.random.key(1)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, key, x)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params1, _, loss0 = step(params, opt.init(params))
    loss1 = loss_fn(params1, key, x)
    assert float(loss1) < float(loss0)
    bpd = models.bits_per_dim(float(loss1), x.shape[1:])
    # A proper discrete likelihood: at most ~8 bits/dim plus the KL, and finite.
    assert np.isfinite(bpd) and 0.0 < bpd < 12.0
    # The IWAE bound works for the conv model too.
    assert bool(jnp.all(jnp.isfinite(objectives.iwae_bound(key, params1, x[:2], model, 3))))


def test_kernels_have_the_bits_of_flax_s_default_initialiser(monkeypatch):
    """kernel_init draws a kernel as one flat vector (faster to compile) with the bits of flax's
    default ``lecun_normal`` at the kernel's shape, which the Dense, Conv and ConvTranspose layers
    used before; and every kernel of the MLP and conv VAEs is drawn by it."""
    default = nn.initializers.lecun_normal()
    for shape in [(2, 2, 1, 3), (3, 5, 2, 4), (7, 3), (64, 16)]:  # small: flax's own 4-D draw compiles slowly
        key = jax.random.key(sum(shape))
        chex.assert_trees_all_equal(models.kernel_init(key, shape), default(key, shape))
    drawn, original = [], models.kernel_init

    def recording(key, shape, dtype=jnp.float32):
        drawn.append(tuple(shape))
        return original(key, shape, dtype)

    monkeypatch.setattr(models, "kernel_init", recording)
    for model, num_kernels in ((models.ConvVAE(**SMALL), 9), (models.MLPVAE(hidden=8, latents=2), 5)):
        drawn.clear()
        shapes = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 28, 28, 1)), key), jax.random.key(0))
        kernels = [leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
                   if jax.tree_util.keystr(path).endswith("['kernel']")]
        assert len(kernels) == num_kernels and sorted(drawn) == sorted(kernels), (drawn, kernels)
