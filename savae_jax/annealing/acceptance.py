"""Acceptance rules: ``accept(key, delta, temperature) -> bool``.

``delta`` = L(best proposal) - L(incumbent), both on the same batch and the
same reparameterisation noise; ``temperature`` = T of this step. A rule must
return False for a non-finite (NaN or +inf) ``delta``; all three here do.
Rules are plain functions of scalars, so ``jax.vmap`` over chains works.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from savae_jax import validation

Acceptance = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def metropolis() -> Acceptance:
    """Metropolis rule: accept iff dL < 0 or u < exp(-dL / T), u ~ U[0, 1).

    The probability of accepting a worse move is exp(-dL / T); at T = 0 only
    improvements are accepted.
    """

    def accept(key, delta, temperature):
        u = jax.random.uniform(key, (), jnp.float32)
        return (delta < 0) | (u < jnp.exp(-delta / temperature))

    return accept


def threshold(alpha: float, d: float = 0.0) -> Acceptance:
    """The seed document's deterministic rule: accept iff exp(-dL / (T + d)) > alpha.

    Equivalently dL < (T + d) * ln(1 / alpha), which is what is evaluated (it
    is also defined at T + d = 0, where it reduces to dL < 0). The key is
    unused.

    Args:
      alpha: threshold on the Boltzmann factor, in (0, 1).
      d: offset added to the temperature, >= 0.
    """
    validation.in_interval("alpha", alpha, 0, 1)
    validation.non_negative("d", d)
    log_inv_alpha = -jnp.log(alpha) if validation.is_traced(alpha) else -math.log(alpha)

    def accept(key, delta, temperature):
        bound = (jnp.asarray(temperature, jnp.float32) + d) * jnp.asarray(log_inv_alpha, jnp.float32)
        return delta < bound

    return accept


def greedy() -> Acceptance:
    """Greedy descent: accept iff dL < 0 (T and the key are ignored)."""

    def accept(key, delta, temperature):
        return delta < 0

    return accept
