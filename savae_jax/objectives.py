"""The evidence lower bound and the one loss every optimizer shares.

All quantities are in nats per example: log-likelihoods are summed over
pixels, never averaged.
"""

from __future__ import annotations

import functools

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from savae_jax import models as models_lib
from savae_jax.quantize import as_float

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


def gaussian_kl_per_dim(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(q || N(0, I)) of each latent dimension, shape of ``mean`` (B, latents).

    KL_j = 1/2 (exp(logvar_j) + mean_j^2 - 1 - logvar_j); ``gaussian_kl`` is its sum.
    """
    return 0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def output_log_likelihood(model, out, x: jax.Array) -> jax.Array:
    """log p(x|z) per example from a model output (passes ``out.log_scale`` when there is one)."""
    log_scale = getattr(out, "log_scale", None)
    if log_scale is None:
        return model.log_likelihood(out.logits, x)
    return model.log_likelihood(out.logits, x, log_scale)


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
    out = model.apply(as_float(params), x, key)
    log_likelihood = output_log_likelihood(model, out, x)
    kl = gaussian_kl(out.mean, out.logvar)
    return ELBOParts(log_likelihood - beta * kl, log_likelihood, kl)


def _free_bits_loss(key, params, x, model, beta, free_bits):
    """-mean log p(x|z) + beta * sum_j max(mean_batch KL_j, free_bits)."""
    out = model.apply(as_float(params), x, key)
    log_likelihood = output_log_likelihood(model, out, x)
    kl_dims = jnp.mean(gaussian_kl_per_dim(out.mean, out.logvar), axis=0)
    return -jnp.mean(log_likelihood) + beta * jnp.sum(jnp.maximum(kl_dims, free_bits))


def make_loss(model, beta=1.0, free_bits: float | None = None) -> LossFn:
    """The shared objective (see :func:`_make_loss`); one object per ``(model, beta, free_bits)``.

    The same arguments give the same function object (Flax modules compare by
    their fields), so every evaluation jitted with the loss as a static
    argument compiles once per loss, not once per call of ``make_loss``
    (``evaluation.report`` builds the true ELBO's loss for every model it
    scores). Arguments that cannot be hashed get a new function each time.
    """
    try:
        return _cached_loss(model, beta, free_bits)
    except TypeError:  # an unhashable beta (e.g. an array): build it afresh
        return _make_loss(model, beta, free_bits)


@functools.lru_cache(maxsize=256)
def _cached_loss(model, beta, free_bits):
    return _make_loss(model, beta, free_bits)


def _make_loss(model, beta=1.0, free_bits: float | None = None) -> LossFn:
    """The shared objective: ``loss_fn(params, key, x)`` = mean negative ELBO (nats).

    With a constant ``beta`` (a number) the result is
    ``loss_fn(params, key, x) -> scalar``. With a schedule (any callable
    ``count -> beta``, e.g. ``savae_jax.beta.linear_warmup``) it is
    ``loss_fn(params, key, x, step=None)``: ``step`` is the optimizer's step
    count (``optimizer.from_optax`` passes it, since such a loss is marked
    ``loss_fn.scheduled = True``); ``step=None`` (evaluation, the annealer, any caller that uses
    three arguments) means ``beta.final``, the schedule's settled value; a
    schedule without ``.final`` (a bare optax schedule) then raises: wrap it
    as ``savae_jax.beta.BetaSchedule(fn, final)``.

    Free bits (Kingma et al. 2016, IAF paper): with ``free_bits=lam`` the KL
    term is ``sum_j max(KL_j, lam)``, where KL_j is latent dimension j's KL
    averaged over the batch, so dimensions below ``lam`` nats get no
    gradient toward the prior. This is a training objective, not a bound on
    a single example: report test numbers with ``make_loss(model)``.

    Args:
      model: a VAE module (e.g. ``MLPVAE()``).
      beta: KL weight >= 0, or a schedule ``count -> beta``.
      free_bits: minimum KL per latent dimension in nats (>= 0), or None.
    Returns:
      A pure loss function used by every optimizer: Optax takes its
      gradient, the annealer its values. It carries ``.beta`` and
      ``.free_bits`` for logging, and ``.per_example(params, key, x) -> (B,)``:
      each example's negative ELBO (at ``beta``, or a schedule's ``final``),
      whose mean is the loss; the noise-aware annealing rules use it for
      paired differences and their standard errors. With free bits the loss
      is not a mean over examples, so ``.per_example`` is None.
    """
    if free_bits is not None and not free_bits >= 0:
        raise ValueError(f"free_bits must be >= 0 or None, got {free_bits}")

    def objective(params, key, x, b):
        if free_bits is None:
            return -jnp.mean(elbo(key, params, x, model, b).elbo)
        return _free_bits_loss(key, params, x, model, b, free_bits)

    if callable(beta):
        schedule = beta
        final = getattr(schedule, "final", None)

        def loss_fn(params, key, x, step=None):
            if step is None:
                if final is None:
                    raise ValueError(
                        "this loss has a beta schedule without .final and was called without "
                        "step=; pass step= or wrap the schedule as "
                        "savae_jax.beta.BetaSchedule(fn, final)")
                b = final
            else:
                b = schedule(step)
            return objective(params, key, x, b)
    else:
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")

        def loss_fn(params, key, x):
            return objective(params, key, x, beta)

    loss_fn.model = model  # what fit and evaluate check the parameters against
    loss_fn.beta = beta
    loss_fn.free_bits = free_bits
    loss_fn.scheduled = callable(beta)  # optimizer.from_optax then passes step=count
    loss_fn.per_example = None if free_bits is not None else _per_example(
        model, getattr(beta, "final", None) if callable(beta) else beta)
    return loss_fn


def _per_example(model, beta):
    """``per_example(params, key, x) -> (B,)``: each example's negative ELBO at ``beta``."""

    def per_example(params, key, x):
        if beta is None:
            raise ValueError("per-example losses need a constant beta or a schedule with .final")
        return -elbo(key, params, x, model, beta).elbo

    return per_example


def iwae_bound(key: jax.Array, params, x: jax.Array, model, num_samples: int,
               chunk_size: int = 100) -> jax.Array:
    """Importance-weighted bound (Burda et al. 2016) per example, in nats.

    log (1/k) sum_{i<k} p(x, z_i) / q(z_i|x), z_i ~ q(z|x), k = ``num_samples``;
    k = 1 is the one-sample ELBO with a Monte Carlo KL, and the bound rises
    toward log p(x) as k grows.

    Sample i uses the noise ``normal(fold_in(key, i), (B, latents))``: the
    same noise ``elbo(fold_in(key, i), ...)`` draws, so
    ``iwae_bound(key, ..., 1)`` equals ``log p(x|z) + log p(z) - log q(z|x)``
    for the z of ``elbo(fold_in(key, 0), ...)``, and the values do not
    depend on ``chunk_size``. The samples are processed ``chunk_size`` at a
    time in a ``lax.scan`` with a running log-sum-exp, so memory is
    O(chunk_size * B * pixels) whatever k is.

    Args:
      key: PRNG key of the importance samples.
      params: model parameters.
      x: images (B, H, W, C).
      model: a VAE with ``encode``, ``decode`` (or ``decode_params``) and
        ``log_likelihood`` (``MLPVAE``, ``ConvVAE``).
      num_samples: k >= 1.
      chunk_size: samples per scan step (the last chunk is masked).
    Returns:
      Shape (B,): the bound for each example.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    mean, logvar = model.apply(as_float(params), x, method=model.encode)
    std = jnp.exp(0.5 * logvar)
    batch, latents = mean.shape
    x_rep = jnp.broadcast_to(x[None], (chunk,) + x.shape).reshape((chunk * batch,) + x.shape[1:])
    sum_logvar = jnp.sum(logvar, axis=-1)

    def body(carry, c):
        running_max, running_sum = carry
        index = c * chunk + jnp.arange(chunk)
        eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mean.shape, mean.dtype))(index)
        z = mean + std * eps  # (chunk, B, latents)
        log_lik = models_lib.decoder_log_likelihood(
            model, params, z.reshape(chunk * batch, latents), x_rep).reshape(chunk, batch)
        # log p(z) - log q(z|x): the 2 pi constants cancel.
        log_w = log_lik - 0.5 * jnp.sum(jnp.square(z), -1) + 0.5 * (jnp.sum(jnp.square(eps), -1) + sum_logvar)
        log_w = jnp.where((index < num_samples)[:, None], log_w, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(log_w, axis=0))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.sum(jnp.exp(log_w - new_max), axis=0))
        return (new_max, running_sum), None

    init = (jnp.full((batch,), -jnp.inf, mean.dtype), jnp.zeros((batch,), mean.dtype))
    (log_max, total), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return log_max + jnp.log(total) - math.log(num_samples)
