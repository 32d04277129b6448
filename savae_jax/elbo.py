"""The evidence lower bound and the one loss every optimizer shares.

All quantities are in nats per example: log-likelihoods are summed over
pixels, never averaged.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

LossFn = Callable[[object, jax.Array, jax.Array], jax.Array]


class ELBOParts(NamedTuple):
    """Per-example ELBO and its two terms, each of shape (B,), in nats.

    elbo = log_likelihood - beta * kl.
    """

    elbo: jax.Array
    log_likelihood: jax.Array
    kl: jax.Array


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over latents.

    KL = 1/2 * sum_j (exp(logvar_j) + mean_j^2 - 1 - logvar_j).
    """
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


def elbo(key: jax.Array, params, x: jax.Array, model, beta: float = 1.0) -> ELBOParts:
    """One-sample ELBO per example: E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)).

    Args:
      key: PRNG key for the reparameterisation noise.
      params: the model's parameter pytree.
      x: images (B, H, W, C) in [0, 1].
      model: a VAE module whose ``__call__(x, key)`` returns a VAEOutput.
      beta: weight of the KL term (1.0 is the true ELBO).
    Returns:
      ELBOParts with arrays of shape (B,).
    """
    out = model.apply(params, x, key)
    log_likelihood = model.log_likelihood(out.logits, x)
    kl = gaussian_kl(out.mean, out.logvar)
    return ELBOParts(log_likelihood - beta * kl, log_likelihood, kl)


def make_loss(model, beta: float = 1.0) -> LossFn:
    """The shared objective: ``loss_fn(params, key, x)`` = mean negative ELBO (nats).

    Args:
      model: a VAE module (e.g. ``MLPVAE()``).
      beta: KL weight; must be >= 0.
    Returns:
      A pure function ``loss_fn(params, key, x) -> scalar`` used by every
      optimizer: Optax takes its gradient, the annealer its values.
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")

    def loss_fn(params, key, x):
        return -jnp.mean(elbo(key, params, x, model, beta).elbo)

    return loss_fn
