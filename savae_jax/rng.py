"""Random draws of any shape made as one flat vector: the same bits, a faster compile
(:func:`flat_draw`, :func:`bernoulli`), and one draw split over many shapes (:func:`sample_flat`).

JAX's threefry counters are the elements' row-major indices, so ``sampler(key, (n,))`` reshaped
to ``shape`` has the bits of ``sampler(key, shape)`` (tested for every sampler used here). On CPU
the flat draw compiles several times faster for a 2-D to 4-D shape, and every step program holds
a few draws (the batch's binarisation, the ELBO's noise): a (128, 28, 28, 1) Bernoulli compiled in
0.54 s against 1.89 s, a (4, 4, 128, 64) truncated normal in 0.6 s against 3.3 s (2 CPU cores).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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
    p = jnp.asarray(p)
    return flat_draw(jax.random.bernoulli, key, p.shape, p=p.reshape(-1))


def sample_flat(sampler, key, shapes):
    """One draw of sum(sizes) float32 variates split into ``shapes``.

    A single random call for all leaves: far cheaper to compile (and run)
    than one threefry call per leaf.
    """
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    if total == 0:
        return [jnp.zeros(shape, jnp.float32) for shape in shapes]
    flat = sampler(key, (total,), jnp.float32)
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out
