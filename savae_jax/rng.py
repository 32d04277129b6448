"""Random draws of any shape made as one flat vector: the same bits, a faster compile.

JAX's threefry counters are the elements' row-major indices, so ``sampler(key, (n,))`` reshaped
to ``shape`` has the bits of ``sampler(key, shape)`` (tested for every sampler used here). On CPU
the flat draw compiles several times faster for a 2-D to 4-D shape, and every step program holds
a few draws (the batch's binarisation, the ELBO's noise): a (128, 28, 28, 1) Bernoulli compiled in
0.54 s against 1.89 s, a (4, 4, 128, 64) truncated normal in 0.6 s against 3.3 s (2 CPU cores).
"""

from __future__ import annotations

import math

import jax


def flat_draw(sampler, key: jax.Array, shape, **kwargs) -> jax.Array:
    """``sampler(key, shape=shape, **kwargs)``, bit for bit, drawn as one flat vector.

    ``sampler`` is a ``jax.random`` function with a ``shape`` argument (normal, uniform,
    bernoulli, rademacher, truncated_normal, ...); an array argument that has the draw's shape
    (bernoulli's ``p``) is passed flattened by the caller.
    """
    shape = tuple(shape)
    return sampler(key, shape=(math.prod(shape),), **kwargs).reshape(shape)


def bernoulli(key: jax.Array, p) -> jax.Array:
    """``jax.random.bernoulli(key, p)`` for an array ``p`` (one draw per entry), bit for bit."""
    p = jax.numpy.asarray(p)
    return flat_draw(jax.random.bernoulli, key, p.shape, p=p.reshape(-1))
