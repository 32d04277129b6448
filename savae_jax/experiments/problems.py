"""Test problems of the global-optimisation comparison: each as a JAX loss (for the annealer) and a NumPy twin
(for scipy), with its search box and the final proposal radius of the recipe."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rastrigin(x, key=None, batch=None):
    return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


def ackley(x, key=None, batch=None):
    n = x.shape[-1]
    return (-20.0 * jnp.exp(-0.2 * jnp.sqrt(jnp.sum(x**2) / n))
            - jnp.exp(jnp.sum(jnp.cos(2 * jnp.pi * x)) / n) + 20.0 + jnp.e)


def rastrigin_np(x):
    return 10.0 * x.size + float(np.sum(x**2 - 10.0 * np.cos(2 * np.pi * x)))


def ackley_np(x):
    n = x.size
    return float(-20.0 * np.exp(-0.2 * np.sqrt(np.sum(x**2) / n))
                 - np.exp(np.sum(np.cos(2 * np.pi * x)) / n) + 20.0 + np.e)


# name: (jax fn, numpy fn, half width of the domain, final radius multiplier)
PROBLEMS = {
    "rastrigin": (rastrigin, rastrigin_np, 5.12, 1e-2),
    "ackley": (ackley, ackley_np, 32.768, 1e-3),
}

