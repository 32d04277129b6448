"""Integer-weight models: per-output-channel symmetric int-b codes for every Dense and Conv kernel.

    q = quantize(params, bits=3)                 # round to nearest (RTN) from float parameters
    loss = make_loss(model)
    loss(q, key, x)                              # = loss(dequantize(q), key, x): the model runs dequantized
    sa = simulated_annealing(loss, 16, lattice(fraction=1e-3), ...)   # search the lattice
    ste = straight_through(loss, q)              # Optax baseline: STE on q's lattice, then requantize
    ada = learned_rounding(loss, q, x_star, steps=1000)   # AdaRound-style: learn each weight's up/down

A kernel ``w`` (its last axis the output channels) becomes integer codes
``c`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and one float32 scale per output
channel, ``w ~ c * s``: symmetric, so zero is exactly representable and the
codes of b bits use 2^b - 1 levels. The scales are fixed when the model is
quantized (from the float parameters x*) and stay fixed while the codes move;
biases stay float. Codes are stored in int8 (b <= 8). The model itself runs
on ``dequantize(q)``: simulated quantization, the numbers an integer kernel
with these codes and scales would compute up to float rounding.

The scale of a channel comes from ``clip``:

- ``"max"``: s = max|w| / qmax, no weight clipped.
- ``"mse"``: s = a * max|w| / qmax with a in {0.30, 0.31, ..., 1.00} chosen per
  channel to minimise the squared rounding error sum (w - s * round(w / s))^2;
  clipping a few large weights buys finer steps for the many small ones.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from savae_jax import validation

tree_map = jax.tree_util.tree_map

MIN_BITS, MAX_BITS = 2, 8
CLIPS = ("max", "mse")
MSE_FRACTIONS = np.round(np.arange(0.30, 1.0001, 0.01), 2)  # the clip fractions "mse" tries


@flax.struct.dataclass
class QuantizedParams:
    """A model's parameters with integer kernels (a pytree; ``bits`` is static).

    Attributes:
      codes: the parameters' tree with every quantized kernel replaced by its
        int8 codes; other leaves (biases) are the float leaves themselves.
      scales: the same tree: a float32 scale per output channel (shape
        ``(1, ..., 1, out)``) for quantized kernels, float32 1.0 elsewhere.
      bits: b, 2 to 8.
    """

    codes: Any
    scales: Any
    bits: int = flax.struct.field(pytree_node=False)

    @property
    def qmax(self) -> int:
        """The largest code, 2^(b-1) - 1 (the smallest is -qmax)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def num_codes(self) -> int:
        """How many integer codes the model has (the lattice's dimension)."""
        return sum(c.size for c in jax.tree_util.tree_leaves(self.codes) if is_code(c))


def is_code(leaf) -> bool:
    """Whether a leaf of ``QuantizedParams.codes`` holds integer codes (else it is a float leaf)."""
    return jnp.issubdtype(leaf.dtype, jnp.integer)


def is_quantized_leaf(path, leaf) -> bool:
    """Whether a parameter is quantized: a Dense (2-D) or Conv (4-D) kernel."""
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    return name == "kernel" and np.ndim(leaf) in (2, 4)


def _channel_scale(w: np.ndarray, qmax: int, clip: str) -> np.ndarray:
    axes = tuple(range(w.ndim - 1))
    peak = np.max(np.abs(w), axis=axes, keepdims=True)
    peak = np.where(peak > 0, peak, 1.0)  # an all-zero channel: any scale represents it exactly
    if clip == "max":
        return (peak / qmax).astype(np.float32)
    candidates = MSE_FRACTIONS.reshape(-1, *[1] * w.ndim) * peak[None] / qmax  # (fractions, 1.., out)
    codes = np.clip(np.round(w[None] / candidates), -qmax, qmax)
    errors = np.sum((w[None] - codes * candidates) ** 2, axis=tuple(range(1, w.ndim)), keepdims=True)
    best = np.argmin(errors, axis=0)  # the first (smallest) fraction on a tie
    return np.take_along_axis(candidates, best[None], axis=0)[0].astype(np.float32)


def check_bits(bits) -> None:
    """Refuse ``bits`` outside 2..8 (or not an integer), naming it."""
    validation.integer("bits", bits, MIN_BITS)
    if bits > MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS} (codes are stored in int8), got {bits}")


def quantize(params, bits: int, clip: str = "max") -> QuantizedParams:
    """``params`` with every Dense and Conv kernel rounded to the nearest int-``bits`` code (RTN).

    Args:
      params: float parameters (e.g. an Adam optimum x*); :class:`QuantizedParams` of
        ``bits`` bits are returned unchanged (of other bits: their values are quantized).
      bits: 2 to 8.
      clip: how each output channel's scale is chosen: "max" or "mse" (module docstring).
    Returns:
      :class:`QuantizedParams`; ``dequantize`` of it is the rounded model.
    """
    check_bits(bits)
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    if isinstance(params, QuantizedParams):
        if params.bits == bits:
            return params  # already on an int-bits lattice: unchanged
        params = dequantize(params)
    qmax = 2 ** (bits - 1) - 1
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not any(is_quantized_leaf(path, leaf) for path, leaf in leaves):
        raise ValueError("params: no Dense or Conv kernel to quantize (leaves named 'kernel', 2-D or 4-D)")
    codes, scales = [], []
    for path, leaf in leaves:
        if not is_quantized_leaf(path, leaf):
            codes.append(leaf)
            scales.append(jnp.float32(1.0))
            continue
        w = np.asarray(leaf, np.float64)
        if not np.all(np.isfinite(w)):
            raise ValueError(f"params: {jax.tree_util.keystr(path)} has non-finite weights; cannot quantize")
        scale = _channel_scale(w, qmax, clip)
        codes.append(jnp.asarray(np.clip(np.round(w / scale), -qmax, qmax), jnp.int8))
        scales.append(jnp.asarray(scale))
    return QuantizedParams(codes=jax.tree_util.tree_unflatten(treedef, codes),
                           scales=jax.tree_util.tree_unflatten(treedef, scales), bits=bits)


def dequantize(q: QuantizedParams):
    """The float parameters ``codes * scale`` (float32) for quantized kernels, the other leaves as they are."""
    def one(code, scale):
        if is_code(code):
            return code.astype(jnp.float32) * scale
        return code
    return tree_map(one, q.codes, q.scales)


def as_float(params):
    """``params`` as the model runs them: ``dequantize(params)`` for :class:`QuantizedParams`, else unchanged.

    Every place the library applies a model calls it, so ``make_loss(model)``,
    evaluation and the annealers take quantized parameters as they take float ones.
    """
    return dequantize(params) if isinstance(params, QuantizedParams) else params


def to_lattice(params, like: QuantizedParams):
    """Float ``params`` with every quantized kernel rounded to ``like``'s lattice (its scales and bits)."""
    def one(w, code, scale):
        if is_code(code):
            return jnp.clip(jnp.round(w / scale), -like.qmax, like.qmax) * scale
        return w
    return tree_map(one, params, like.codes, like.scales)


def requantize(params, like: QuantizedParams) -> QuantizedParams:
    """Float ``params`` as codes on ``like``'s lattice (``like``'s scales kept): e.g. the result of
    straight-through training, which moved a float shadow of the weights."""
    def one(w, code, scale):
        if is_code(code):
            return jnp.clip(jnp.round(w / scale), -like.qmax, like.qmax).astype(code.dtype)
        return w
    return like.replace(codes=tree_map(one, params, like.codes, like.scales))


def straight_through(loss_fn, like: QuantizedParams):
    """Straight-through estimation (STE) of ``loss_fn`` on ``like``'s lattice, for Optax.

    ``loss(w, key, x) = loss_fn(w + stop_gradient(to_lattice(w) - w), key, x)``: the
    forward pass runs the rounded model, and the gradient with respect to the float
    shadow ``w`` is ``loss_fn``'s gradient at the rounded point, as if rounding were
    the identity. Train ``w`` (from ``dequantize(like)`` or x*) with any Optax
    optimizer; ``requantize(w, like)`` is the integer model.
    """
    def loss(params, key, x, *args, **kwargs):
        rounded = tree_map(lambda w, r: w + jax.lax.stop_gradient(r - w), params, to_lattice(params, like))
        return loss_fn(rounded, key, x, *args, **kwargs)

    return _like(loss, loss_fn, scheduled=getattr(loss_fn, "scheduled", False))


def _like(loss, loss_fn, scheduled: bool):
    """``loss`` carrying ``loss_fn``'s model, beta and free bits (what evaluation and the trainers read),
    marked ``scheduled`` or not, and without ``per_example`` (it has no per-example losses)."""
    for name in ("model", "beta", "free_bits"):
        if hasattr(loss_fn, name):
            setattr(loss, name, getattr(loss_fn, name))
    loss.scheduled = scheduled
    loss.per_example = None
    return loss


# AdaRound's rectified sigmoid h(v) = clip(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1) (Nagel et al.
# 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): stretched past [0, 1] so
# that 0 and 1 are reached at finite v, where the gradient of the clip is zero.
ZETA, GAMMA = 1.1, -0.1


def _rectified_sigmoid(v):
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def learned_rounding(loss_fn, like: QuantizedParams, params, *, steps: int, reg: float = 0.01,
                     exponent: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2):
    """AdaRound-style learned rounding of ``params`` onto ``like``'s lattice, for Optax.

    Each kernel weight w, on its channel's scale s, is rounded down or up:
    its code is ``floor(w / s) + h(v)`` with one free variable v per weight
    and h the rectified sigmoid (``ZETA``, ``GAMMA``), v initialised so that
    ``h(v) = w / s - floor(w / s)`` (the soft model starts at ``params``,
    clipped to the code range). Biases (and other float leaves) are trained
    as they are. The loss of the soft model plus, from step ``warmup * steps``
    on, ``reg * mean(1 - |2 h(v) - 1| ** b)`` over every kernel weight (in the
    loss's units: nats), with b falling linearly from ``exponent[0]`` to
    ``exponent[1]`` by step ``steps``: the term pushes every h to 0 or 1, so that
    the hardened model ``floor(w / s) + [h(v) >= 1/2]`` is the one trained.
    Unlike the original (layer by layer, on each layer's output), it is
    trained on the model's own loss, as every other method here.

    Args:
      loss_fn: a loss of float parameters (``make_loss``).
      like: the lattice (scales and bits), e.g. ``quantize(params, bits)``.
      params: the float parameters to round (x*).
      steps: the optimizer steps the run will take (the regularizer's schedule).
      reg: the regularizer's weight, >= 0.
      exponent: b's first and last value, first >= last > 0.
      warmup: the share of ``steps`` without the regularizer, in [0, 1).

    Returns:
      ``(loss, v0, harden)``: ``loss(v, key, x, step=None)`` (scheduled: Optax
      passes the step; without one, the soft model's loss alone), the initial
      variables ``v0`` (``params``' tree, kernels replaced by v), and
      ``harden(v) -> QuantizedParams`` on ``like``'s scales.
    """
    validation.integer("steps", steps, 1)
    validation.non_negative("reg", reg)
    params = as_float(params)
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(like.codes):
        raise ValueError("params: not the tree of like's codes (round the parameters of the model that was quantized)")
    validation.in_interval("warmup", warmup, 0, 1, closed_low=True)
    if not (isinstance(exponent, tuple | list) and len(exponent) == 2
            and all(isinstance(e, int | float) for e in exponent) and exponent[0] >= exponent[1] > 0):
        raise ValueError(f"exponent must be (first, last) with first >= last > 0, got {exponent!r}")

    def base_of(w, code, scale):  # the code below each weight (0 for a float leaf: unused)
        return jnp.floor(w / scale) if is_code(code) else 0.0

    base = tree_map(base_of, params, like.codes, like.scales)

    def v_of(w, code, scale, b):
        if not is_code(code):
            return w
        frac = jnp.clip(w / scale - b, 0.0, 1.0)
        return jax.scipy.special.logit((frac - GAMMA) / (ZETA - GAMMA))

    def soft(v):
        return tree_map(lambda x, code, scale, b: jnp.clip(b + _rectified_sigmoid(x), -like.qmax, like.qmax) * scale
                        if is_code(code) else x, v, like.codes, like.scales, base)

    def kernel_hs(v):
        return [_rectified_sigmoid(x) for x, code in zip(jax.tree_util.tree_leaves(v),
                                                          jax.tree_util.tree_leaves(like.codes)) if is_code(code)]

    scheduled = bool(getattr(loss_fn, "scheduled", False))

    def loss(v, key, x, *args, step=None, **kwargs):
        value = loss_fn(soft(v), key, x, *args, **({"step": step} if scheduled else {}), **kwargs)
        if step is None:
            return value
        progress = jnp.clip((step - warmup * steps) / ((1 - warmup) * steps), 0.0, 1.0)
        b = exponent[0] + (exponent[1] - exponent[0]) * progress
        hs = jnp.concatenate([h.ravel() for h in kernel_hs(v)])
        penalty = jnp.mean(1.0 - jnp.abs(2.0 * hs - 1.0) ** b)
        return value + jnp.where(step >= warmup * steps, reg * penalty, 0.0)

    def harden(v) -> QuantizedParams:
        def one(x, code, b):
            if not is_code(code):
                return x
            return jnp.clip(b + (_rectified_sigmoid(x) >= 0.5), -like.qmax, like.qmax).astype(code.dtype)
        return like.replace(codes=tree_map(one, v, like.codes, base))

    v0 = tree_map(v_of, params, like.codes, like.scales, base)
    return _like(loss, loss_fn, scheduled=True), v0, harden


def codes_in_range(q: QuantizedParams) -> bool:
    """Whether every code lies in [-qmax, qmax] (a valid int-b model)."""
    return all(bool(jnp.all(jnp.abs(c.astype(jnp.int32)) <= q.qmax))
               for c in jax.tree_util.tree_leaves(q.codes) if is_code(c))
