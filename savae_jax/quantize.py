"""Integer-weight models: per-output-channel symmetric int-b codes for every Dense and Conv kernel.

    q = quantize(params, bits=3)                 # round to nearest (RTN) from float parameters
    loss_q = quantized_loss(make_loss(model))    # the same objective, of quantized parameters
    loss_q(q, key, x)                            # = make_loss(model)(dequantize(q), key, x)
    sa = simulated_annealing(loss_q, 16, lattice(fraction=1e-3), ...)   # search the lattice

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


def quantize(params, bits: int, clip: str = "max") -> QuantizedParams:
    """``params`` with every Dense and Conv kernel rounded to the nearest int-``bits`` code (RTN).

    Args:
      params: float parameters (e.g. an Adam optimum x*).
      bits: 2 to 8.
      clip: how each output channel's scale is chosen: "max" or "mse" (module docstring).
    Returns:
      :class:`QuantizedParams`; ``dequantize`` of it is the rounded model.
    """
    validation.integer("bits", bits, MIN_BITS)
    if bits > MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS} (codes are stored in int8), got {bits}")
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
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
        if jnp.issubdtype(code.dtype, jnp.integer):
            return code.astype(jnp.float32) * scale
        return code
    return tree_map(one, q.codes, q.scales)


def quantized_loss(loss_fn):
    """``loss_fn`` of quantized parameters: ``loss(q, key, x) = loss_fn(dequantize(q), key, x)``.

    Keeps ``loss_fn``'s ``model`` and gives a matching ``per_example`` (the
    annealers' decision batches need it), so every optimizer of the library
    takes it as it takes ``loss_fn``.
    """
    def check(q):
        if not isinstance(q, QuantizedParams):
            raise ValueError(f"params: a quantized loss takes QuantizedParams (quantize(params, bits)), "
                             f"got {type(q).__name__}")

    def loss(q, key, x, *args, **kwargs):
        check(q)
        return loss_fn(dequantize(q), key, x, *args, **kwargs)

    per_example = getattr(loss_fn, "per_example", None)

    def per_example_q(q, key, x):
        check(q)
        return per_example(dequantize(q), key, x)

    loss.per_example = per_example_q if per_example is not None else None
    for name in ("model", "beta", "scheduled", "free_bits"):
        if hasattr(loss_fn, name):
            setattr(loss, name, getattr(loss_fn, name))
    loss.quantized = True
    return loss


def codes_in_range(q: QuantizedParams) -> bool:
    """Whether every code lies in [-qmax, qmax] (a valid int-b model)."""
    return all(bool(jnp.all(jnp.abs(c.astype(jnp.int32)) <= q.qmax))
               for c in jax.tree_util.tree_leaves(q.codes) if jnp.issubdtype(c.dtype, jnp.integer))
