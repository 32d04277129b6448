"""Models and the ELBO against closed forms and hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import models, objectives, rng


def test_gaussian_kl_matches_closed_form():
    mean = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    logvar = jnp.array([[math.log(0.5), 0.0], [0.0, 0.0]])
    # 1/2 (0.5 + 1 - 1 - ln 0.5) + 1/2 (1 + 4 - 1 - 0); the standard normal has KL 0.
    expected = [0.5 * (0.5 - math.log(0.5)) + 2.0, 0.0]
    np.testing.assert_allclose(sv.gaussian_kl(mean, logvar), expected, rtol=1e-6, atol=1e-7)


def test_bernoulli_log_prob_matches_numpy():
    logits = jnp.array([[[[2.0]], [[-1.0]]]])  # (1, 2, 1, 1)
    x = jnp.array([[[[1.0]], [[0.0]]]])
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    expected = np.log(sig(2.0)) + np.log(1 - sig(-1.0))
    np.testing.assert_allclose(models.bernoulli_log_prob(logits, x), [expected], rtol=1e-6)


def _one_pixel_params():
    # hidden=1, latents=1 on a 1x1x1 image: every weight set by hand.
    dense = lambda w, b: {"kernel": jnp.array([[w]]), "bias": jnp.array([b])}  # noqa: E731
    return {"params": {
        "encoder": {"hidden": dense(2.0, 0.5), "mean": dense(0.3, -0.1), "logvar": dense(-0.4, 0.2)},
        "decoder": {"hidden": dense(1.5, 0.25), "logits": dense(-2.0, 0.7)},
    }}


def test_elbo_of_one_pixel_model_matches_hand_computation():
    model = sv.MLPVAE(hidden=1, latents=1)
    params = _one_pixel_params()
    x = jnp.full((1, 1, 1, 1), 0.8)
    key = jax.random.key(3)
    # By hand, with the same noise the model draws from `key`.
    eps = float(jax.random.normal(key, (1, 1))[0, 0])
    h = max(0.0, 2.0 * 0.8 + 0.5)
    mean, logvar = 0.3 * h - 0.1, -0.4 * h + 0.2
    z = mean + math.exp(logvar / 2) * eps
    logit = -2.0 * max(0.0, 1.5 * z + 0.25) + 0.7
    log_lik = 0.8 * logit - math.log1p(math.exp(logit))
    kl = 0.5 * (math.exp(logvar) + mean**2 - 1 - logvar)

    parts = objectives.elbo(key, params, x, model, beta=1.0)
    np.testing.assert_allclose(parts.log_likelihood, [log_lik], rtol=1e-5)
    np.testing.assert_allclose(parts.kl, [kl], rtol=1e-5)
    np.testing.assert_allclose(parts.elbo, [log_lik - kl], rtol=1e-5)
    loss = sv.make_loss(model, beta=2.5)(params, key, x)
    np.testing.assert_allclose(loss, -(log_lik - 2.5 * kl), rtol=1e-5)


def test_vae_shapes_and_key_dependence():
    model = sv.MLPVAE(hidden=16, latents=3)
    x = rng.flat_draw(jax.random.uniform, jax.random.key(0), (5, 8, 8, 1))
    params = models.init(jax.random.key(1), model, x)
    out = model.apply(params, x, jax.random.key(2))
    assert out.logits.shape == (5, 8, 8, 1)
    assert out.mean.shape == out.logvar.shape == out.z.shape == (5, 3)
    again = model.apply(params, x, jax.random.key(2))
    other = model.apply(params, x, jax.random.key(3))
    np.testing.assert_array_equal(out.z, again.z)
    assert not np.allclose(out.z, other.z)
    # The mean and variance do not depend on the key; only z does.
    np.testing.assert_array_equal(out.mean, other.mean)
    assert models.sample_prior(jax.random.key(4), params, model, 7, (8, 8, 1)).shape == (7, 8, 8, 1)


def test_loss_is_mean_negative_elbo():
    model = sv.MLPVAE(hidden=16, latents=3)
    x = rng.flat_draw(jax.random.uniform, jax.random.key(0), (6, 8, 8, 1))
    params = models.init(jax.random.key(1), model, x)
    parts = objectives.elbo(jax.random.key(5), params, x, model)
    loss = sv.make_loss(model)(params, jax.random.key(5), x)
    np.testing.assert_allclose(loss, -np.mean(parts.elbo), rtol=1e-6)
    # A 64-pixel Bernoulli model at init is near 64 ln 2 = 44.4 nats.
    assert 30.0 < float(loss) < 60.0


def test_init_compiles_once_per_model_and_gives_the_eager_bits():
    """models.init runs as one compiled program per (model, input shape); its parameters are the
    eager initialisation's, bit for bit, and a module with an unhashable field (it cannot be a static
    argument of jit) is initialised eagerly, to the same bits. (The MLP only: the conv VAE's eager
    initialisation, one compile per primitive and shape, took 20-25 s of the suite's 2 cores.)"""
    import dataclasses

    class Tagged(sv.MLPVAE):
        tags: list = dataclasses.field(default_factory=list)

    x = jnp.zeros((1, 8, 8, 1))
    for model in (sv.MLPVAE(hidden=16, latents=3), Tagged(16, 3, tags=[1])):
        jitted = models.init(jax.random.key(3), model, x)
        eager = models._init(jax.random.key(3), model, x)  # flax's own initialisation, op by op
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)))
    size = models._jitted_init._cache_size()
    models.init(jax.random.key(4), sv.MLPVAE(hidden=16, latents=3), x)  # another key, another instance
    assert models._jitted_init._cache_size() == size  # no new program


@pytest.mark.parametrize("kwargs, name", [({"hidden": 0}, "hidden"), ({"latents": 0}, "latents"),
                                          ({"likelihood": "poisson"}, "likelihood")])
def test_bad_model_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        models.init(jax.random.key(0), sv.MLPVAE(**kwargs), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("cls", [sv.MLPVAE, sv.ConvVAE])
@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": 0}, "hidden must be an integer >= 1, got 0"),
    ({"latents": -2}, "latents must be an integer >= 1, got -2"),
    ({"hidden": 2.5}, "hidden must be an integer >= 1, got 2.5"),
    ({"latents": True}, "latents must be an integer >= 1, got True"),
])
def test_model_sizes_are_checked_when_the_model_is_built(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        cls(**kwargs)


def test_make_model_names_the_flag():
    """The scripts' ``make_model`` rewords the library's check to name the flag."""
    from savae_jax.experiments import builders, settings

    config = dict(settings.MODEL_DEFAULTS, hidden=32, latents=4)
    for model in ("mlp", "conv"):
        assert builders.make_model(dict(config, model=model)).hidden == 32
        with pytest.raises(ValueError, match=r"^--hidden: must be an integer >= 1, got 0$"):
            builders.make_model(dict(config, model=model, hidden=0))
        with pytest.raises(ValueError, match=r"^--latents: must be an integer >= 1, got -1$"):
            builders.make_model(dict(config, model=model, latents=-1))
    with pytest.raises(ValueError, match="^--model: unknown model"):
        builders.make_model(dict(config, model="rnn"))


def test_elbo_is_the_function_at_top_level():
    """``sv.elbo`` is the ELBO itself (the module is ``savae_jax.objectives``)."""
    model = sv.MLPVAE(hidden=8, latents=2)
    x = jnp.full((3, 4, 4, 1), 0.5)
    params = models.init(jax.random.key(0), model, x)
    parts = sv.elbo(jax.random.key(1), params, x, model, beta=0.5)
    assert isinstance(parts, sv.ELBOParts) and parts.elbo.shape == (3,)
    assert sv.elbo is objectives.elbo and sv.make_loss is objectives.make_loss
    assert sv.iwae_bound is objectives.iwae_bound and sv.gaussian_kl is objectives.gaussian_kl


def test_bad_init_rank_and_beta():
    with pytest.raises(ValueError, match="x must be a 4-D"):
        models.init(jax.random.key(0), sv.MLPVAE(), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="beta"):
        sv.make_loss(sv.MLPVAE(), beta=-1.0)
