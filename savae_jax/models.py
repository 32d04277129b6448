"""Flax linen VAEs and their likelihoods.

A model maps images ``x`` of shape (B, H, W, C) and a PRNG key to the decoder's
output (likelihood parameters) and the posterior q(z|x) = N(mean, exp(logvar)).
Everything here is a pure function of its inputs: the key is an argument.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from savae_jax import rng, validation
from savae_jax.quantize import as_float

LIKELIHOODS = ("bernoulli", "gaussian", "logistic")

# Floor of a learned log-scale (Gaussian sigma or logistic scale), as in
# PixelCNN++: without it a decoder can shrink the scale until the density on a
# well-predicted pixel (e.g. the black background) diverges.
MIN_LOG_SCALE = -7.0

# 8-bit images: pixel values k / 255, k = 0..255.
NUM_BINS = 256


class VAEOutput(NamedTuple):
    """What a VAE's ``__call__`` returns.

    Attributes:
      logits: decoder output, shape (B, H, W, C): the location of p(x|z):
        Bernoulli logits, the Gaussian mean, or the logistic location (both in
        pixel units, [0, 1]).
      mean: posterior mean, shape (B, latents).
      logvar: posterior log-variance, shape (B, latents).
      z: the reparameterised latent sample, shape (B, latents).
      log_scale: per-pixel log-scale of p(x|z), shape (B, H, W, C), for the
        likelihoods with a learned scale ("gaussian" with ``gaussian_sigma=None``,
        "logistic"); None otherwise.
    """

    logits: jax.Array
    mean: jax.Array
    logvar: jax.Array
    z: jax.Array
    log_scale: jax.Array | None = None


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Sample z = mean + exp(logvar / 2) * eps with eps ~ N(0, I) from ``key``."""
    eps = rng.flat_draw(jax.random.normal, key, mean.shape, dtype=mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def _flat(a: jax.Array) -> jax.Array:
    """``a`` as (B, pixels): flattened BEFORE the per-pixel terms, so XLA sums one axis.

    Reducing the (B, H, W, C) image axes instead gives the same sum, bit for
    bit, but XLA's CPU reduction over three trailing axes (one of size 1) ran
    3-4x slower (issue 14: 242 ms against 66 ms for 257 x 128 MNIST images).
    """
    return a.reshape(a.shape[0], -1)


def bernoulli_log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x | logits) for Bernoulli pixels, summed over all but the first axis.

    Uses log sigmoid(l) = -softplus(-l), so x * l - softplus(l) is stable for
    large |l| and is also defined for x in [0, 1] (continuous Bernoulli-style
    use on grey images, as in most VAE code).
    """
    logits, x = _flat(logits), _flat(x)
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def gaussian_log_prob(mean: jax.Array, log_scale, x: jax.Array) -> jax.Array:
    """log N(x; mean, exp(log_scale)^2) summed over all but the first axis (nats).

    A density, not a probability: on [0, 1]-scaled data it is not comparable
    with the discrete likelihoods (add D * ln 255 to a negative log-density
    for the usual uniform-dequantisation bound on 8-bit data).
    ``log_scale`` is an array broadcastable to ``x`` or a float.
    """
    log_scale = _flat(jnp.broadcast_to(jnp.asarray(log_scale, x.dtype), x.shape))
    mean, x = _flat(mean), _flat(x)
    per_pixel = (-0.5 * jnp.square((x - mean) * jnp.exp(-log_scale))
                 - log_scale - 0.5 * math.log(2 * math.pi))
    return jnp.sum(per_pixel, axis=-1)


def discretized_logistic_log_prob(loc: jax.Array, log_scale: jax.Array, x: jax.Array,
                                  num_bins: int = NUM_BINS) -> jax.Array:
    """log P(x) of a discretized logistic on pixel values k/(num_bins-1), summed per example.

    The logistic(loc, s) density is integrated over the bin [x - h, x + h]
    with h = 1 / (2 (num_bins - 1)); the first bin extends to -inf and the
    last to +inf (Salimans et al. 2017, PixelCNN++, here in [0, 1] pixel
    units), so the probabilities of the ``num_bins`` values sum to 1. The bin
    mass uses the exact identity
    sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - exp(b - a)),
    which is stable in log space for every a > b (no PixelCNN++ fallback
    branch needed).

    Args:
      loc: location, shape of ``x``, in pixel units.
      log_scale: log s, broadcastable to ``x``.
      x: pixels in [0, 1] that are multiples of 1/(num_bins - 1).
      num_bins: number of pixel values (256 for 8-bit images).
    Returns:
      Shape (B,): log-probabilities in nats (<= 0).
    """
    log_scale = _flat(jnp.broadcast_to(jnp.asarray(log_scale, x.dtype), x.shape))
    loc, x = _flat(loc), _flat(x)
    half = 0.5 / (num_bins - 1)
    inv_s = jnp.exp(-log_scale)
    plus = inv_s * (x - loc + half)
    minus = inv_s * (x - loc - half)
    log_cdf_plus = -jax.nn.softplus(-plus)  # log sigma(plus): the bin of 0
    log_sf_minus = -jax.nn.softplus(minus)  # log (1 - sigma(minus)): the bin of 1
    log_mass = log_cdf_plus + log_sf_minus + jnp.log(-jnp.expm1(minus - plus))
    per_pixel = jnp.where(x < half, log_cdf_plus, jnp.where(x > 1.0 - half, log_sf_minus, log_mass))
    return jnp.sum(per_pixel, axis=-1)


def log_likelihood(likelihood: str, loc: jax.Array, x: jax.Array, log_scale=None) -> jax.Array:
    """log p(x|z) per example (nats) for a likelihood name in ``LIKELIHOODS``.

    ``loc`` is the decoder output (Bernoulli logits or location); ``log_scale``
    is required for "gaussian" and "logistic" (an array or a float).
    """
    if likelihood == "bernoulli":
        return bernoulli_log_prob(loc, x)
    if log_scale is None:
        raise ValueError(f"likelihood {likelihood!r} needs log_scale")
    if likelihood == "gaussian":
        return gaussian_log_prob(loc, log_scale, x)
    if likelihood == "logistic":
        return discretized_logistic_log_prob(loc, log_scale, x)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def mean_image(likelihood: str, loc: jax.Array) -> jax.Array:
    """The image to show for decoder output ``loc``: E[x|z] (Bernoulli) or loc clipped to [0, 1]."""
    if likelihood == "bernoulli":
        return jax.nn.sigmoid(loc)
    return jnp.clip(loc, 0.0, 1.0)


def bits_per_dim(neg_elbo_nats, image_shape) -> float:
    """Convert nats per example to bits per dimension: nats / (prod(image_shape) * ln 2).

    Meaningful for discrete likelihoods of 8-bit data ("logistic"; "bernoulli"
    on binary data). ``image_shape`` is (H, W, C) of one example.
    """
    return float(neg_elbo_nats) / (math.prod(tuple(image_shape)) * math.log(2.0))


def _check_likelihood(likelihood: str, gaussian_sigma) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if gaussian_sigma is not None and not gaussian_sigma > 0:
        raise ValueError(f"gaussian_sigma must be > 0 or None, got {gaussian_sigma}")


def _learned_scale(likelihood: str, gaussian_sigma) -> bool:
    return likelihood == "logistic" or (likelihood == "gaussian" and gaussian_sigma is None)


class _VAEBase(nn.Module):
    """What the VAEs share: apply, encode, decode and the likelihood.

    A subclass defines the fields ``likelihood`` and ``gaussian_sigma``, a
    ``setup`` with submodules ``encoder`` (x -> (mean, logvar)) and
    ``decoder``, ``decode_params(z, image_shape) -> (loc, log_scale)`` and
    ``_validate()``, which checks the fields when the module is constructed
    (a bad size is a ValueError at ``MLPVAE(hidden=0)``, not at ``init``).
    """

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def __call__(self, x: jax.Array, key: jax.Array) -> VAEOutput:
        """Encode ``x``, sample z with ``key``, decode; returns a VAEOutput."""
        mean, logvar = self.encoder(x)
        z = reparameterize(key, mean, logvar)
        loc, log_scale = self.decode_params(z, x.shape[1:])
        return VAEOutput(loc, mean, logvar, z, log_scale)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior parameters (mean, logvar) of q(z|x)."""
        return self.encoder(x)

    def decode(self, z: jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
        """Decoder location (logits for "bernoulli") for latents ``z``, shape (B, *image_shape)."""
        return self.decode_params(z, image_shape)[0]

    def _fixed_log_scale(self):
        if self.likelihood == "gaussian" and self.gaussian_sigma is not None:
            return math.log(self.gaussian_sigma)
        return None

    def _split(self, out):
        """Decoder head output -> (loc, log_scale or None), log_scale floored at MIN_LOG_SCALE."""
        if isinstance(out, tuple):
            loc, raw = out
            return loc, jnp.maximum(raw, MIN_LOG_SCALE)
        return out, None

    def log_likelihood(self, logits: jax.Array, x: jax.Array, log_scale=None) -> jax.Array:
        """log p(x|z) per example in nats, summed over pixels.

        ``log_scale`` is the decoder's learned log-scale (``VAEOutput.log_scale``);
        a fixed ``gaussian_sigma`` is used when it is None.
        """
        if log_scale is None:
            log_scale = self._fixed_log_scale()
        return log_likelihood(self.likelihood, logits, x, log_scale)


def kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Flax's default kernel initialiser for Dense, Conv and ConvTranspose (``lecun_normal``: a
    normal truncated to +-2 sd, variance 1 / fan_in), the same bits, drawn as one flat vector.

    JAX's threefry counters are the elements' row-major indices, so a flat draw reshaped has the
    bits of the shaped draw (tested), and on CPU it compiles faster: a (4, 4, 128, 64) kernel's
    draw took 0.6 s against 3.3 s, the default conv VAE's initialisation for 32x32x3 images
    4.0-4.5 s against 19.6-19.8 s, and an MLP VAE's (2-D kernels) 1.9-2.5 s against 2.9-4.0 s
    (2 CPU cores shared with another job).
    """
    shape = tuple(shape)
    fan_in = math.prod(shape[:-1])  # kernel (..., in, out): receptive field x in, as flax's fan_in
    variance = jnp.array(1.0 / fan_in, dtype=dtype)
    stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)  # sd of a normal truncated to +-2
    return rng.flat_draw(jax.random.truncated_normal, key, shape, lower=-2, upper=2, dtype=dtype) * stddev


class Encoder(nn.Module):
    """q(z|x): flatten -> Dense(hidden) -> ReLU -> (mean, logvar)."""

    hidden: int
    latents: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, kernel_init=kernel_init, name="hidden")(h))
        mean = nn.Dense(self.latents, kernel_init=kernel_init, name="mean")(h)
        logvar = nn.Dense(self.latents, kernel_init=kernel_init, name="logvar")(h)
        return mean, logvar


class Decoder(nn.Module):
    """p(x|z): Dense(hidden) -> ReLU -> Dense(prod(image_shape)) logits.

    With ``scale_head`` a second Dense layer "log_scale" gives a per-pixel
    log-scale and the output is the pair (loc, raw log-scale).
    """

    hidden: int
    scale_head: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, image_shape: tuple[int, ...]):
        h = nn.relu(nn.Dense(self.hidden, kernel_init=kernel_init, name="hidden")(z))
        logits = nn.Dense(math.prod(image_shape), kernel_init=kernel_init, name="logits")(h)
        logits = logits.reshape(z.shape[0], *image_shape)
        if not self.scale_head:
            return logits
        log_scale = nn.Dense(math.prod(image_shape), kernel_init=kernel_init, name="log_scale")(h)
        return logits, log_scale.reshape(z.shape[0], *image_shape)


class MLPVAE(_VAEBase):
    """The Kingma & Welling MLP VAE with one hidden layer each way.

    With the default "bernoulli" likelihood the parameter tree is
    ``encoder/{hidden,mean,logvar}``, ``decoder/{hidden,logits}``; a learned
    scale adds ``decoder/log_scale``.

    Attributes:
      hidden: width of the encoder's and decoder's hidden layer.
      latents: dimension of z.
      likelihood: decoder likelihood: "bernoulli" (logits over pixels; binary
        or binarised data, the default), "gaussian" (continuous data in
        [0, 1]) or "logistic" (discretized logistic for 8-bit data, k/255).
      gaussian_sigma: for "gaussian": a fixed observation std (e.g. 0.1), or
        None for a learned per-pixel, z-dependent log-std (floored at
        ``MIN_LOG_SCALE``). Ignored by the other likelihoods.
    """

    hidden: int = 500
    latents: int = 20
    likelihood: str = "bernoulli"
    gaussian_sigma: float | None = None

    def _validate(self):
        validation.integer("hidden", self.hidden, 1)
        validation.integer("latents", self.latents, 1)
        _check_likelihood(self.likelihood, self.gaussian_sigma)

    def setup(self):
        self.encoder = Encoder(self.hidden, self.latents)
        self.decoder = Decoder(self.hidden, _learned_scale(self.likelihood, self.gaussian_sigma))

    def decode_params(self, z: jax.Array, image_shape: tuple[int, ...]):
        """(loc, log_scale) of p(x|z), each (B, *image_shape); log_scale None when not learned."""
        return self._split(self.decoder(z, tuple(image_shape)))


def _conv_stack_shape(image_shape, depth: int) -> tuple[int, int]:
    h, w = image_shape[0], image_shape[1]
    for _ in range(depth):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


class ConvEncoder(nn.Module):
    """q(z|x): [Conv 4x4 stride 2 -> ReLU] per feature -> flatten -> Dense(hidden) -> ReLU -> (mean, logvar)."""

    features: Sequence[int]
    hidden: int
    latents: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x
        for i, f in enumerate(self.features):
            h = nn.relu(nn.Conv(f, (4, 4), strides=(2, 2), padding="SAME", kernel_init=kernel_init,
                                  name=f"conv{i}")(h))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, kernel_init=kernel_init, name="hidden")(h))
        return (nn.Dense(self.latents, kernel_init=kernel_init, name="mean")(h),
                nn.Dense(self.latents, kernel_init=kernel_init, name="logvar")(h))


class ConvDecoder(nn.Module):
    """p(x|z): Dense(hidden) -> Dense to a (H/2^n, W/2^n, features[-1]) map ->
    [ConvTranspose 4x4 stride 2] per feature -> crop to (H, W).

    The last transposed convolution has C channels (2C with ``scale_head``:
    location and raw log-scale); the output is cropped from (2^n ceil(H/2^n))
    to exactly (H, W), so any image size works (28x28 and 32x32 need no crop
    for n = 2).
    """

    features: Sequence[int]
    hidden: int
    scale_head: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, image_shape: tuple[int, ...]):
        height, width, channels = image_shape
        depth = len(self.features)
        h0, w0 = _conv_stack_shape(image_shape, depth)
        h = nn.relu(nn.Dense(self.hidden, kernel_init=kernel_init, name="hidden")(z))
        h = nn.relu(nn.Dense(h0 * w0 * self.features[-1], kernel_init=kernel_init, name="project")(h))
        h = h.reshape(z.shape[0], h0, w0, self.features[-1])
        out_channels = channels * (2 if self.scale_head else 1)
        ups = list(reversed(self.features[:-1])) + [out_channels]
        for i, f in enumerate(ups):
            h = nn.ConvTranspose(f, (4, 4), strides=(2, 2), padding="SAME", kernel_init=kernel_init,
                                 name=f"deconv{i}")(h)
            if i < len(ups) - 1:
                h = nn.relu(h)
        h = h[:, :height, :width, :]
        if not self.scale_head:
            return h
        return h[..., :channels], h[..., channels:]


class ConvVAE(_VAEBase):
    """Convolutional VAE for (H, W, C) images, e.g. 32x32x3 (CIFAR-10) or 28x28x1 (MNIST).

    Encoder: one 4x4 stride-2 convolution per entry of ``features`` (ReLU),
    then Dense(hidden) and the (mean, logvar) heads. Decoder: the mirror
    image with transposed convolutions; its output has the input's shape.

    Attributes:
      latents: dimension of z.
      features: channels of the convolutions (each halves H and W).
      hidden: width of the Dense layer between the convolutions and z.
      likelihood: "bernoulli" (binarised data; the default, as for
        ``MLPVAE``), "logistic" (discretized logistic per sub-pixel, for 8-bit
        images such as CIFAR-10; report ``bits_per_dim``) or "gaussian"
        (continuous data).
      gaussian_sigma: fixed observation std for "gaussian"; None = learned
        per-pixel log-std (floored at ``MIN_LOG_SCALE``).
    """

    latents: int = 128
    features: Sequence[int] = (32, 64, 128)
    hidden: int = 512
    likelihood: str = "bernoulli"
    gaussian_sigma: float | None = None

    def _validate(self):
        validation.integer("latents", self.latents, 1)
        validation.integer("hidden", self.hidden, 1)
        if len(self.features) < 1 or min(self.features) < 1:
            raise ValueError(f"features must be a non-empty sequence of positive ints, got {self.features}")
        _check_likelihood(self.likelihood, self.gaussian_sigma)

    def setup(self):
        self.encoder = ConvEncoder(tuple(self.features), self.hidden, self.latents)
        self.decoder = ConvDecoder(tuple(self.features), self.hidden,
                                   _learned_scale(self.likelihood, self.gaussian_sigma))

    def decode_params(self, z: jax.Array, image_shape: tuple[int, ...]):
        """(loc, log_scale) of p(x|z), each (B, *image_shape); log_scale None when not learned."""
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
        return self._split(self.decoder(z, tuple(image_shape)))


def decoder_log_likelihood(model: nn.Module, params, z: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x|z) per example for latents ``z`` (B, latents) and images ``x`` (B, H, W, C).

    Works for any module with ``decode(z, image_shape)`` and
    ``log_likelihood(loc, x)``; uses ``decode_params`` (learned scales) when
    the module has it.
    """

    def fn(module, z, x):
        if hasattr(module, "decode_params"):
            loc, log_scale = module.decode_params(z, x.shape[1:])
        else:
            loc, log_scale = module.decode(z, x.shape[1:]), None
        if log_scale is None:
            return module.log_likelihood(loc, x)
        return module.log_likelihood(loc, x, log_scale)

    return model.apply(as_float(params), z, x, method=fn)


@functools.lru_cache(maxsize=64)
def _param_shapes(model: nn.Module, image_shape: tuple) -> dict:
    """``{leaf path: shape}`` of ``model``'s parameters for images of ``image_shape`` (traced, no FLOPs)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    tree = jax.eval_shape(lambda x: init(jax.random.key(0), model, x), x)
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params(model: nn.Module, params, image_shape, what: str = "images") -> None:
    """Refuse ``params`` that are not ``model``'s parameters for images of ``image_shape``.

    Compares the pytree's leaf paths and shapes with those ``init`` would
    give (an abstract trace of the model's init, cached), so a mismatch (an
    empty dict, parameters of a model built for 28x28 images used on 8x8
    ones) is a ValueError naming ``params`` before anything is compiled,
    instead of a Flax scope error from inside a jitted step.

    Args:
      model: the VAE module.
      params: the parameter pytree given.
      image_shape: (H, W, C) of one image.
      what: the images, as the message names them (e.g. "test").
    """
    expected = _param_shapes(model, tuple(int(d) for d in image_shape))
    got = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(as_float(params))[0]}
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing:
        detail = f"missing {missing[0]}" + (f" and {len(missing) - 1} more leaves" if len(missing) > 1 else "")
    elif wrong:
        detail = f"{wrong[0]} has shape {got[wrong[0]]}, expected {expected[wrong[0]]}"
    else:
        detail = f"unexpected leaves {sorted(set(got) - set(expected))[:3]}"
    raise ValueError(f"params do not fit {what} of shape {tuple(image_shape)} for {type(model).__name__}: "
                     f"{detail} (initialise them with models.init(key, model, images[:1]) on these images)")


def check_loss_params(loss_fn, params, image_shape, what: str = "images") -> None:
    """:func:`check_params` for the model ``loss_fn`` names (``make_loss``'s ``loss_fn.model``);
    nothing for a loss that names none."""
    model = getattr(loss_fn, "model", None)
    if model is not None:
        check_params(model, params, image_shape, what)


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
    try:
        hash(model)
    except TypeError:  # a module with an unhashable field cannot be a static argument: initialise eagerly
        return _init(key, model, x[:1])
    return _jitted_init(key, model, x[:1])


def _init(key, model, x):
    key_params, key_z = jax.random.split(key)
    return model.init(key_params, x, key_z)


# One compiled program per model and input shape, the same bits as the eager initialisation (each
# initialiser is the same random function either way; checked in tests/test_models_elbo.py). Eagerly,
# flax runs every initialiser and the forward pass op by op, one compile per distinct op and shape:
# measured (2-core CPU, fresh process) 2.0 s against 0.84 s for an MLP VAE, 6.7 s against 3.8 s for
# the conv VAE.
_jitted_init = jax.jit(_init, static_argnums=1)


def sample_prior(key: jax.Array, params, model: nn.Module, num: int, image_shape) -> jax.Array:
    """Draw ``num`` images' means with z ~ N(0, I) (Bernoulli: sigmoid(decode(z)); see ``mean_image``)."""
    z = rng.flat_draw(jax.random.normal, key, (num, model.latents))
    logits = model.apply(as_float(params), z, tuple(image_shape), method=model.decode)
    return mean_image(getattr(model, "likelihood", "bernoulli"), logits)


def reconstruct(key: jax.Array, params, model: nn.Module, x: jax.Array) -> jax.Array:
    """Means of p(x|z) for one posterior sample z ~ q(z|x) (Bernoulli: sigmoid of the logits)."""
    return mean_image(getattr(model, "likelihood", "bernoulli"), model.apply(as_float(params), x, key).logits)
