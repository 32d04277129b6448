"""rng.flat_draw: a draw made as one flat vector has the bits of the shaped draw."""

import chex
import jax
import jax.numpy as jnp
import pytest

from savae_jax import rng

# Small shapes: the shaped reference draws are the slow-to-compile ones (1-3 s each on CPU).
SHAPES = [(2, 3), (2, 2, 1, 3)]  # the ELBO's noise is 2-D, a batch of images 4-D
SAMPLERS = {
    "normal": (jax.random.normal, {}),
    "uniform": (jax.random.uniform, {"minval": -1.0, "maxval": 2.0}),
    "bernoulli": (jax.random.bernoulli, {"p": 0.3}),
    "rademacher": (jax.random.rademacher, {"dtype": jnp.int32}),
    "truncated_normal": (jax.random.truncated_normal, {"lower": -2.0, "upper": 2.0}),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_flat_draw_has_the_bits_of_the_shaped_draw(name):
    sampler, kwargs = SAMPLERS[name]
    for i, shape in enumerate(SHAPES):
        key = jax.random.key(i)
        chex.assert_trees_all_equal(rng.flat_draw(sampler, key, shape, **kwargs), sampler(key, shape=shape, **kwargs))


def test_an_array_bernoulli_and_a_vmapped_draw_have_the_shaped_bits():
    """``rng.bernoulli`` with one probability per entry (the binarisation of a batch), and a flat
    draw under vmap over a batch of keys (the ELBO's noise for K members)."""
    p = jax.random.uniform(jax.random.key(0), (2, 2, 2, 1))
    chex.assert_trees_all_equal(rng.bernoulli(jax.random.key(1), p), jax.random.bernoulli(jax.random.key(1), p))
    keys = jax.random.split(jax.random.key(2), 3)
    chex.assert_trees_all_equal(jax.vmap(lambda k: rng.flat_draw(jax.random.normal, k, (2, 3)))(keys),
                                jax.vmap(lambda k: jax.random.normal(k, (2, 3)))(keys))
    # Not vacuous: another key gives other bits.
    assert not bool(jnp.all(rng.flat_draw(jax.random.normal, jax.random.key(9), (2, 3))
                            == jax.random.normal(jax.random.key(8), (2, 3))))
