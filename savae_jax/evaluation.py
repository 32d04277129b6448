"""Held-out evaluation: negative ELBO over a whole dataset at a fixed key."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from savae_jax import data as data_lib

# The default evaluation key: every method in a comparison is scored with the
# same reparameterisation and binarisation noise.
EVAL_SEED = 0


def per_example_loss(loss_fn, params, key: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
    """``loss_fn`` on each example alone; example ``index[i]`` uses ``fold_in(key, index[i])``.

    Keying by the example's index in the dataset (not its place in a chunk)
    makes the result independent of how the data is chunked. Works for any
    ``loss_fn(params, key, x) -> scalar`` that averages over the batch: with a
    batch of one the mean is that example's loss. Returns shape (B,).
    """
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(index)
    return jax.vmap(lambda k, xi: loss_fn(params, k, xi[None]))(keys, x)


def _eval_images(images, idx, key, binarize, static_seed):
    """The examples ``idx``; "dynamic" binarisation is keyed per example index too."""
    if binarize != "dynamic":
        return data_lib.make_batch(images, idx, None, binarize, static_seed)
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(idx)
    return jax.vmap(data_lib.binarize)(keys, images[idx])


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size", "binarize", "static_seed"))
def _evaluate(loss_fn, params, key, images, *, batch_size, binarize, static_seed):
    n = images.shape[0]
    num_chunks = -(-n // batch_size)
    # Pad the index list to whole chunks; padded slots are masked out below.
    idx = jnp.arange(num_chunks * batch_size, dtype=jnp.int32)
    mask = (idx < n).reshape(num_chunks, batch_size)
    idx = jnp.where(idx < n, idx, 0).reshape(num_chunks, batch_size)
    key_bin, key_loss = jax.random.split(key)

    def chunk_sum(args):
        chunk_idx, chunk_mask = args
        x = _eval_images(images, chunk_idx, key_bin, binarize, static_seed)
        losses = per_example_loss(loss_fn, params, key_loss, x, chunk_idx)
        return jnp.sum(jnp.where(chunk_mask, losses, 0.0))

    sums = jax.lax.map(chunk_sum, (idx, mask))
    return jnp.sum(sums) / n


def evaluate(
    loss_fn,
    params,
    images,
    key: jax.Array | None = None,
    batch_size: int = 1000,
    binarize: str | None = None,
    static_seed: int = 0,
) -> float:
    """Mean of ``loss_fn`` per example over all of ``images`` (nats per example).

    Args:
      loss_fn: ``loss_fn(params, key, x) -> scalar`` (e.g. ``make_loss(model)``,
        whose value is the negative ELBO).
      params: model parameters.
      images: (N, H, W, C) array in [0, 1]; every example is used once.
      key: evaluation key; ``None`` means the fixed ``jax.random.key(EVAL_SEED)``.
      batch_size: examples per chunk (memory bound); the last chunk is padded
        and masked, so the result does not depend on it beyond float rounding.
      binarize: as in ``data.make_batch``; "dynamic" uses a fixed sample drawn
        from ``key``, so repeated evaluations see the same binary images.
      static_seed: seed of the "static" binarisation.
    Returns:
      A Python float.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = jnp.asarray(images)
    if key is None:
        key = jax.random.key(EVAL_SEED)
    batch_size = min(batch_size, images.shape[0])
    value = _evaluate(
        loss_fn, params, key, images,
        batch_size=batch_size, binarize=binarize, static_seed=static_seed,
    )
    return float(value)


def image_grid(images, ncols: int = 8) -> np.ndarray:
    """Tile (N, H, W, C) images into one (rows*H, ncols*W, C) array for plotting."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    pad = np.ones((nrows * ncols - n, h, w, c), images.dtype)
    tiles = np.concatenate([images, pad]).reshape(nrows, ncols, h, w, c)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(nrows * h, ncols * w, c)
