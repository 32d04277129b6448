"""Held-out evaluation at a fixed key: negative ELBO, IWAE-k, posterior diagnostics."""

from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from savae_jax import data as data_lib
from savae_jax import models as models_lib
from savae_jax import objectives, validation
from savae_jax.quantize import as_float

# The default evaluation key: every method in a comparison is scored with the
# same reparameterisation and binarisation noise.
EVAL_SEED = 0


def _check_model(model) -> None:
    """Refuse a ``model`` that is not a flax Module: the argument order is ``(model, params, images, ...)``."""
    if not isinstance(model, nn.Module):
        raise ValueError("model must be a flax Module; the arguments are (model, params, images, ...), "
                         f"got a {type(model).__name__} first")


def _eval_inputs(images, key, batch_size: int, model=None, params=None):
    """Shared argument handling of the evaluations: validated device images, the default key, chunk size.

    ``images`` may be a ``Dataset`` or an array (``data.as_images``: float in
    [0, 1], finite, (N, H, W, C)); with a ``model``, ``params`` are checked
    to be its parameters for these images (``models.check_params``).
    """
    validation.integer_number("batch_size", batch_size, 1)
    images = data_lib.as_images(images, "images")
    if model is not None:
        _check_model(model)
        models_lib.check_params(model, params, images.shape[1:])
    if key is None:
        key = jax.random.key(EVAL_SEED)
    return images, key, min(int(batch_size), images.shape[0])


def per_example_loss(loss_fn, params, key: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
    """``loss_fn`` on each example alone; example ``index[i]`` uses ``fold_in(key, index[i])``.

    Keying by the example's index in the dataset (not its place in a chunk)
    makes the result independent of how the data is chunked. Works for any
    ``loss_fn(params, key, x) -> scalar`` that averages over the batch: with a
    batch of one the mean is that example's loss. Returns shape (B,).
    """
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(index)
    return jax.vmap(lambda k, xi: loss_fn(params, k, xi[None]))(keys, x)


def _eval_images(images, idx, key, batch_fn: data_lib.BatchFn):
    """The examples ``idx``; "dynamic" binarisation is keyed per example index too."""
    if batch_fn.binarize != "dynamic":
        return batch_fn(images, idx)
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(idx)
    return jax.vmap(data_lib.binarize)(keys, images[idx])


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size", "batch_fn"))
def _evaluate(loss_fn, params, key, images, *, batch_size, batch_fn):
    n = images.shape[0]
    num_chunks = -(-n // batch_size)
    # Pad the index list to whole chunks; padded slots are masked out below.
    idx = jnp.arange(num_chunks * batch_size, dtype=jnp.int32)
    mask = (idx < n).reshape(num_chunks, batch_size)
    idx = jnp.where(idx < n, idx, 0).reshape(num_chunks, batch_size)
    key_bin, key_loss = jax.random.split(key)

    def chunk_sum(args):
        chunk_idx, chunk_mask = args
        x = _eval_images(images, chunk_idx, key_bin, batch_fn)
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
      binarize: as in ``data.make_batch``, or the run's ``data.BatchFn`` (which
        carries its static seed); "dynamic" uses a fixed sample drawn from
        ``key``, keyed per example, so repeated evaluations see the same
        binary images.
      static_seed: seed of the "static" binarisation (when ``binarize`` is a mode).
    Returns:
      A Python float.
    """
    images, key, batch_size = _eval_inputs(images, key, batch_size, getattr(loss_fn, "model", None), params)
    value = _evaluate(loss_fn, params, key, images, batch_size=batch_size,
                      batch_fn=data_lib.as_batch_fn(binarize, static_seed))
    return float(value)


def _stacked_inputs(loss_fn, params, images, key, batch_size):
    """:func:`_eval_inputs` for members stacked along a leading axis of ``params``."""
    one = jax.tree_util.tree_map(lambda p: p[0] if np.ndim(p) else p, params)  # one member's shapes
    try:
        return _eval_inputs(images, key, batch_size, getattr(loss_fn, "model", None), one)
    except ValueError as err:
        if not str(err).startswith("params do not fit"):
            raise
        raise ValueError(f"params must be stacked along a leading member axis: one member's {err}") from None


def evaluate_stacked(loss_fn, params, images, key: jax.Array | None = None, batch_size: int = 1000,
                     binarize: str | None = None, static_seed: int = 0) -> np.ndarray:
    """:func:`evaluate` of every member of ``params``, stacked along a leading axis: (n,) numpy.

    One ``jax.vmap`` over the members (e.g. the trials of a tuning group), each
    scored on the same examples and noise as :func:`evaluate` scores it.
    """
    images, key, batch_size = _stacked_inputs(loss_fn, params, images, key, batch_size)
    batch_fn = data_lib.as_batch_fn(binarize, static_seed)
    return np.asarray(_evaluate_members(loss_fn, params, key, images, batch_size=batch_size, batch_fn=batch_fn))


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size", "batch_fn"))
def _evaluate_members(loss_fn, params, key, images, *, batch_size, batch_fn):
    return jax.vmap(lambda p: _evaluate(loss_fn, p, key, images, batch_size=batch_size, batch_fn=batch_fn))(params)


def per_example_stacked(loss_fn, params, images, key: jax.Array | None = None, batch_size: int = 1000,
                        binarize: str | None = None, static_seed: int = 0) -> np.ndarray:
    """Each member's loss on each example, (members, N) numpy: the terms whose means
    :func:`evaluate_stacked` returns (the same examples, binarisation and noise).

    What a paired comparison of two members needs: the per-example differences
    and their spread (e.g. a noise-aware decision between tuning trials).
    """
    images, key, batch_size = _stacked_inputs(loss_fn, params, images, key, batch_size)
    batch_fn = data_lib.as_batch_fn(binarize, static_seed)
    return np.asarray(_per_example_members(loss_fn, params, key, images, batch_size=batch_size, batch_fn=batch_fn))


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size", "batch_fn"))
def _per_example_members(loss_fn, params, key, images, *, batch_size, batch_fn):
    n = images.shape[0]
    idx, _ = _chunk_plan(n, batch_size)
    key_bin, key_loss = jax.random.split(key)

    def member(p):
        def chunk(chunk_idx):
            return per_example_loss(loss_fn, p, key_loss, _eval_images(images, chunk_idx, key_bin, batch_fn), chunk_idx)
        return jax.lax.map(chunk, idx).reshape(-1)[:n]  # the padded slots are the last ones

    return jax.vmap(member)(params)


def _chunk_plan(n: int, batch_size: int):
    """Padded example indices (chunks, batch_size) and their validity mask."""
    num_chunks = -(-n // batch_size)
    idx = jnp.arange(num_chunks * batch_size, dtype=jnp.int32)
    mask = (idx < n).reshape(num_chunks, batch_size)
    return jnp.where(idx < n, idx, 0).reshape(num_chunks, batch_size), mask


@functools.partial(jax.jit, static_argnames=(
    "model", "num_samples", "chunk_size", "batch_size", "batch_fn"))
def _evaluate_iwae(params, key, images, *, model, num_samples, chunk_size, batch_size, batch_fn):
    n = images.shape[0]
    idx, mask = _chunk_plan(n, batch_size)
    # The same split and the same binarisation as `_evaluate`.
    key_bin, key_loss = jax.random.split(key)

    def one(k, xi):
        return objectives.iwae_bound(k, params, xi[None], model, num_samples, chunk_size)[0]

    def chunk_sum(args):
        chunk_idx, chunk_mask = args
        x = _eval_images(images, chunk_idx, key_bin, batch_fn)
        keys = jax.vmap(functools.partial(jax.random.fold_in, key_loss))(chunk_idx)
        bounds = jax.vmap(one)(keys, x)
        return jnp.sum(jnp.where(chunk_mask, bounds, 0.0))

    return jnp.sum(jax.lax.map(chunk_sum, (idx, mask))) / n


# The most decoder passes (images x importance samples) one IWAE evaluation may take on. The usual
# IWAE-5000 of a 10,000-image test set is 5e7; 1e10 (k = 10^6 there) is hours of an MLP VAE on a CPU
# core, and a k of 10^9 (1e13 passes) would run for weeks: refused before it starts.
MAX_IWAE_PASSES = 10**10


def check_iwae_work(num_samples: int, num_images: int, name: str = "num_samples") -> None:
    """Refuse an IWAE evaluation of more than :data:`MAX_IWAE_PASSES` decoder passes (ValueError naming ``name``)."""
    passes = int(num_samples) * int(num_images)
    if passes > MAX_IWAE_PASSES:
        raise ValueError(
            f"{name}={num_samples} on {num_images} images is {passes:.2g} decoder passes, more than the "
            f"{MAX_IWAE_PASSES:.0e} one evaluation may take (IWAE-5000 on 10,000 images is 5e7); use a smaller k")


def evaluate_iwae(
    model,
    params,
    images,
    num_samples: int,
    key: jax.Array | None = None,
    batch_size: int = 100,
    binarize: str | None = None,
    static_seed: int = 0,
    chunk_size: int = 100,
) -> float:
    """Mean negative IWAE-k bound over all of ``images`` (nats per example).

    The sign matches ``evaluate`` (a loss: lower is better), so
    ``evaluate(make_loss(model), ...) - evaluate_iwae(...)`` is the ELBO-IWAE
    gap (>= 0 in expectation); ``-evaluate_iwae(...)`` is the IWAE estimate
    of the test log-likelihood. The images are binarised exactly as
    ``evaluate`` does for the same ``key`` (``key_bin, key_loss =
    split(key)``, dynamic noise keyed by example index), so the ELBO and the
    IWAE bound score the same binary images. Example ``i`` draws its
    importance samples from ``iwae_bound(fold_in(key_loss, i), ...)``.

    Memory: ``batch_size * chunk_size`` decoder outputs at a time
    (``objectives.iwae_bound`` scans over sample chunks with a running
    log-sum-exp), independent of ``num_samples``.

    Args:
      model: the VAE module (hashable: it is a static argument of the jit).
      params: model parameters.
      images: (N, H, W, C) array in [0, 1].
      num_samples: k, importance samples per example (e.g. 5000); k times
        the number of images may not exceed :data:`MAX_IWAE_PASSES`.
      key: evaluation key; ``None`` means ``jax.random.key(EVAL_SEED)``.
      batch_size: examples per chunk.
      binarize, static_seed: as in ``evaluate``.
      chunk_size: importance samples per scan step.
    Returns:
      A Python float.
    """
    validation.integer_number("num_samples", num_samples, 1)
    validation.integer_number("chunk_size", chunk_size, 1)
    images, key, batch_size = _eval_inputs(images, key, batch_size, model, params)
    check_iwae_work(num_samples, images.shape[0])
    value = _evaluate_iwae(
        params, key, images, model=model, num_samples=int(num_samples),
        chunk_size=int(chunk_size), batch_size=batch_size,
        batch_fn=data_lib.as_batch_fn(binarize, static_seed),
    )
    return -float(value)


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "batch_fn"))
def _posteriors(params, key_bin, images, *, model, batch_size, batch_fn):
    """q(z|x) means and log-variances (N, latents) for every image, binarised as in `evaluate`."""
    n = images.shape[0]
    idx, _ = _chunk_plan(n, batch_size)

    def chunk(chunk_idx):
        x = _eval_images(images, chunk_idx, key_bin, batch_fn)
        return model.apply(as_float(params), x, method=model.encode)

    mean, logvar = jax.lax.map(chunk, idx)
    latents = mean.shape[-1]
    return mean.reshape(-1, latents)[:n], logvar.reshape(-1, latents)[:n]


@functools.partial(jax.jit, static_argnames=("block",))
def _mutual_info(key, mean, logvar, *, block):
    """I(x; z) under q(z|x) p_data(x): mean_i [log q(z_i|x_i) - log q(z_i)].

    z_i ~ q(z|x_i) with noise ``normal(fold_in(key, i))``; the aggregate
    posterior q(z) is the mixture (1/M) sum_j q(z|x_j) over the same M
    examples (He et al. 2019's estimator; it equals
    E_x KL(q(z|x)||p(z)) - KL(q(z)||p(z)) and is at most log M).
    """
    m, latents = mean.shape
    std = jnp.exp(0.5 * logvar)
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (latents,), mean.dtype))(
        jnp.arange(m))
    z = mean + std * eps
    log_norm = -0.5 * latents * math.log(2 * math.pi) - 0.5 * jnp.sum(logvar, -1)  # (M,)
    log_q_own = log_norm - 0.5 * jnp.sum(jnp.square(eps), -1)
    num_blocks = -(-m // block)
    zi = jnp.pad(z, ((0, num_blocks * block - m), (0, 0))).reshape(num_blocks, block, latents)

    def log_q_agg(zb):
        dev = (zb[:, None, :] - mean[None]) / std[None]  # (block, M, latents)
        log_dens = log_norm[None] - 0.5 * jnp.sum(jnp.square(dev), -1)
        return jax.nn.logsumexp(log_dens, axis=1) - math.log(m)

    log_q = jax.lax.map(log_q_agg, zi).reshape(-1)[:m]
    return jnp.mean(log_q_own - log_q)


def diagnostics(
    model,
    params,
    images,
    key: jax.Array | None = None,
    batch_size: int = 1000,
    binarize: str | None = None,
    static_seed: int = 0,
    mi_examples: int = 2000,
    active_threshold: float = 0.01,
) -> dict:
    """Posterior diagnostics over a dataset: per-dimension KL, active units, I(x; z).

    * ``kl_per_dim[j]`` = mean over the data of KL(q(z_j|x) || N(0, 1)) (nats);
      ``kl`` is their sum (the ELBO's KL term averaged over the data).
    * ``active_units``: number of dimensions j with Var_x(E_q[z_j|x]) >
      ``active_threshold`` (0.01, Burda et al. 2016); the variances are
      ``posterior_mean_variance``.
    * ``mutual_info``: I(x; z) under q(x, z) = p_data(x) q(z|x), estimated as
      mean_i [log q(z_i|x_i) - log q(z_i)] with one z_i ~ q(z|x_i) per
      example and q(z) the mixture of the posteriors of the same examples
      (He et al. 2019, "Lagging inference networks"; equals
      E_x KL(q(z|x)||p(z)) - KL(q(z)||p(z))). It uses the first
      ``min(N, mi_examples)`` examples (cost O(M^2 * latents)) and is at
      most log M (``mi_max``).

    Images are binarised exactly as ``evaluate`` does for the same ``key``.

    Args:
      model, params: the VAE (``model.encode`` is used).
      images: (N, H, W, C) array in [0, 1].
      key: evaluation key; ``None`` means ``jax.random.key(EVAL_SEED)``.
      batch_size: examples per encoder call.
      binarize, static_seed: as in ``evaluate``.
      mi_examples: examples in the mutual-information estimate.
      active_threshold: variance threshold of an active unit.
    Returns:
      A dict of plain Python numbers: ``kl``, ``kl_per_dim`` (list),
      ``active_units`` (int), ``posterior_mean_variance`` (list),
      ``mutual_info``, ``mi_examples`` (int, M), ``mi_max`` (log M).
    """
    validation.integer_number("mi_examples", mi_examples, 1)
    images, key, batch_size = _eval_inputs(images, key, batch_size, model, params)
    key_bin, key_loss = jax.random.split(key)
    mean, logvar = _posteriors(params, key_bin, images, model=model, batch_size=batch_size,
                               batch_fn=data_lib.as_batch_fn(binarize, static_seed))
    kl_per_dim = np.asarray(jnp.mean(objectives.gaussian_kl_per_dim(mean, logvar), axis=0), np.float64)
    variance = np.asarray(jnp.var(mean, axis=0), np.float64)
    m = min(images.shape[0], mi_examples)
    mi = _mutual_info(key_loss, mean[:m], logvar[:m], block=min(m, 128))
    return {
        "kl": float(kl_per_dim.sum()),
        "kl_per_dim": [float(v) for v in kl_per_dim],
        "active_units": int(np.sum(variance > active_threshold)),
        "posterior_mean_variance": [float(v) for v in variance],
        "mutual_info": float(mi),
        "mi_examples": int(m),
        "mi_max": math.log(m),
    }


def report(
    model,
    params,
    images,
    key: jax.Array | None = None,
    binarize: str | None = None,
    iwae_samples: int = 0,
    static_seed: int = 0,
) -> dict:
    """The numbers to believe before a VAE result: ELBO, IWAE-k, posterior diagnostics.

    Args:
      model, params: the trained VAE.
      images: the held-out set (N, H, W, C) in [0, 1].
      key: evaluation key (default: the fixed ``EVAL_SEED`` key).
      binarize, static_seed: as in ``evaluate``.
      iwae_samples: k of the IWAE bound; 0 skips it.
    Returns:
      ``{"test_neg_elbo", "test_neg_iwae" (if k > 0), "iwae_samples",
      "elbo_iwae_gap", "bits_per_dim" (discretized likelihoods only),
      "diagnostics": {...}}`` of plain floats; the ELBO is the true one
      (beta = 1) whatever objective trained the model.
    """
    _check_model(model)
    images = data_lib.as_images(images, "images")
    if iwae_samples:  # refused before the ELBO is computed, not after
        validation.integer_number("iwae_samples", iwae_samples, 1)
        check_iwae_work(iwae_samples, images.shape[0], "iwae_samples")
    batch_fn = data_lib.as_batch_fn(binarize, static_seed)
    out = {"test_neg_elbo": evaluate(objectives.make_loss(model), params, images, key, binarize=batch_fn)}
    if iwae_samples:
        out["iwae_samples"] = int(iwae_samples)
        out["test_neg_iwae"] = evaluate_iwae(model, params, images, iwae_samples, key, binarize=batch_fn)
        out["elbo_iwae_gap"] = out["test_neg_elbo"] - out["test_neg_iwae"]
    if getattr(model, "likelihood", "bernoulli") == "logistic":
        out["bits_per_dim"] = models_lib.bits_per_dim(out["test_neg_elbo"], np.shape(images)[1:])
        if not is_8bit(images):
            # The discretised logistic scores 256 bins per pixel: on other data the number means little.
            warnings.warn("bits_per_dim assumes 8-bit images (values k/255); these images are not "
                          "(e.g. the digits have 17 grey levels, k/16), so bits_per_dim is not comparable "
                          "with published 8-bit numbers", UserWarning, stacklevel=2)
            out["bits_per_dim_note"] = "images are not 8-bit (k/255); bits_per_dim assumes they are"
    out["diagnostics"] = diagnostics(model, params, images, key, binarize=batch_fn)
    return out


def is_8bit(images) -> bool:
    """Whether every pixel of ``images`` (in [0, 1]) is k/255 for an integer k, as 8-bit data is."""
    scaled = np.asarray(images, np.float64) * 255.0
    return bool(np.all(np.abs(scaled - np.round(scaled)) < 1e-3))


def image_grid(images, ncols: int = 8) -> np.ndarray:
    """Tile (N, H, W, C) images into one (rows*H, ncols*W, C) array for plotting."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    pad = np.ones((nrows * ncols - n, h, w, c), images.dtype)
    tiles = np.concatenate([images, pad]).reshape(nrows, ncols, h, w, c)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(nrows * h, ncols * w, c)
