"""Flax linen VAEs and their likelihoods.

A model maps images ``x`` of shape (B, H, W, C) and a PRNG key to the decoder's
output (likelihood parameters) and the posterior q(z|x) = N(mean, exp(logvar)).
Everything here is a pure function of its inputs: the key is an argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LIKELIHOODS = ("bernoulli",)


class VAEOutput(NamedTuple):
    """What a VAE's ``__call__`` returns.

    Attributes:
      logits: decoder output, shape (B, H, W, C): Bernoulli logits of p(x|z).
      mean: posterior mean, shape (B, latents).
      logvar: posterior log-variance, shape (B, latents).
      z: the reparameterised latent sample, shape (B, latents).
    """

    logits: jax.Array
    mean: jax.Array
    logvar: jax.Array
    z: jax.Array


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Sample z = mean + exp(logvar / 2) * eps with eps ~ N(0, I) from ``key``."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def bernoulli_log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x | logits) for Bernoulli pixels, summed over all but the first axis.

    Uses log sigmoid(l) = -softplus(-l), so x * l - softplus(l) is stable for
    large |l| and is also defined for x in [0, 1] (continuous Bernoulli-style
    use on grey images, as in most VAE code).
    """
    per_pixel = x * logits - jax.nn.softplus(logits)
    return per_pixel.reshape(per_pixel.shape[0], -1).sum(axis=-1)


class Encoder(nn.Module):
    """q(z|x): flatten -> Dense(hidden) -> ReLU -> (mean, logvar)."""

    hidden: int
    latents: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(h))
        mean = nn.Dense(self.latents, name="mean")(h)
        logvar = nn.Dense(self.latents, name="logvar")(h)
        return mean, logvar


class Decoder(nn.Module):
    """p(x|z): Dense(hidden) -> ReLU -> Dense(prod(image_shape)) logits."""

    hidden: int

    @nn.compact
    def __call__(self, z: jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
        logits = nn.Dense(math.prod(image_shape), name="logits")(h)
        return logits.reshape(z.shape[0], *image_shape)


class MLPVAE(nn.Module):
    """The Kingma & Welling MLP VAE with one hidden layer each way.

    Attributes:
      hidden: width of the encoder's and decoder's hidden layer.
      latents: dimension of z.
      likelihood: decoder likelihood; "bernoulli" (logits over pixels).
    """

    hidden: int = 500
    latents: int = 20
    likelihood: str = "bernoulli"

    def setup(self):
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.latents < 1:
            raise ValueError(f"latents must be >= 1, got {self.latents}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        self.encoder = Encoder(self.hidden, self.latents)
        self.decoder = Decoder(self.hidden)

    def __call__(self, x: jax.Array, key: jax.Array) -> VAEOutput:
        """Encode ``x``, sample z with ``key``, decode; returns a VAEOutput."""
        mean, logvar = self.encoder(x)
        z = reparameterize(key, mean, logvar)
        return VAEOutput(self.decoder(z, x.shape[1:]), mean, logvar, z)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior parameters (mean, logvar) of q(z|x)."""
        return self.encoder(x)

    def decode(self, z: jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
        """Decoder logits for latents ``z``, reshaped to (B, *image_shape)."""
        return self.decoder(z, tuple(image_shape))

    def log_likelihood(self, logits: jax.Array, x: jax.Array) -> jax.Array:
        """log p(x|z) per example in nats, summed over pixels."""
        return bernoulli_log_prob(logits, x)


def init(key: jax.Array, model: nn.Module, x: jax.Array):
    """Initialise ``model``'s parameters for inputs shaped like ``x``.

    Args:
      key: PRNG key for the initialisers (split inside, never reused).
      model: a VAE module (e.g. ``MLPVAE()``).
      x: example batch (B, H, W, C); only its shape and dtype are used.
    Returns:
      The parameter pytree ``{"params": ...}`` accepted by ``model.apply``.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D batch (N, H, W, C), got shape {x.shape}")
    key_params, key_z = jax.random.split(key)
    return model.init(key_params, x[:1], key_z)


def sample_prior(key: jax.Array, params, model: nn.Module, num: int, image_shape) -> jax.Array:
    """Draw ``num`` images' Bernoulli means sigmoid(decode(z)) with z ~ N(0, I)."""
    z = jax.random.normal(key, (num, model.latents))
    logits = model.apply(params, z, tuple(image_shape), method=model.decode)
    return jax.nn.sigmoid(logits)


def reconstruct(key: jax.Array, params, model: nn.Module, x: jax.Array) -> jax.Array:
    """Bernoulli means of p(x|z) for one posterior sample z ~ q(z|x)."""
    return jax.nn.sigmoid(model.apply(params, x, key).logits)
