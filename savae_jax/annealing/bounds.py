"""Box constraints: every point a bounded search evaluates or returns lies in ``[lower, upper]``.

    sa = simulated_annealing(loss_fn, 16, cauchy(1.0, fraction=0.1), temperature, metropolis(),
                             bounds=(-5.12, 5.12))

``bounds=(lower, upper)``: each a number or a pytree of the parameters'
structure whose leaves broadcast to the parameter leaves; finite, with
``lower < upper`` everywhere. ``None`` (the default everywhere) is unbounded:
the searches run exactly as without this module, bit for bit.

How each search keeps to the box:

- a proposal (any kind: gaussian, cauchy with or without ``fraction``,
  low_rank, langevin) that leaves the box is **reflected** at its faces,
  coordinate by coordinate, folding as often as a long jump needs
  (:func:`reflect`). Reflection keeps a symmetric proposal symmetric
  (q(x' | x) = q(x | x'): the sum over the mirror images of a symmetric
  kernel is symmetric), so the Metropolis rule still samples the Boltzmann
  distribution restricted to the box; clipping instead would pile
  probability mass on the faces. A coordinate that stayed inside is not
  touched (bit for bit). ``info.num_reflected`` counts the proposals of a
  step that had to be moved back. A bounded ``low_rank`` proposal is
  materialised (a full copy of the parameters per member, evaluated in
  chunks like ``gaussian``): reflection needs the perturbed weights.
- the ES step reflects its members the same way and **projects** its move
  (clips it to the box, :func:`project`), a projected gradient step;
- a local polish takes projected steps (``optax.projections.projection_box``
  after every update) and evaluates the loss, its gradient and every line
  search trial at the projected point, so L-BFGS never looks outside;
- replica exchange swaps parameters between replicas that each keep to the
  box (pass ``bounds`` to the annealer its ``build`` returns).

Bounds apply to floating-point leaves; parameters with integer leaves
(``quantize.QuantizedParams``) are refused.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from savae_jax import validation


class Bounds(NamedTuple):
    """A checked box: ``lower`` and ``upper``, numbers or pytrees of the parameters' structure."""

    lower: Any
    upper: Any


def _is_number(x) -> bool:
    return np.ndim(x) == 0 and not isinstance(x, (bool, np.bool_)) and np.issubdtype(np.asarray(x).dtype, np.number)


def check(bounds) -> Bounds | None:
    """``bounds`` as :class:`Bounds` (None stays None), checked as far as possible without the parameters.

    Raises:
      ValueError naming ``bounds``: not a pair; a traced, non-numeric,
      NaN or infinite entry; ``lower >= upper`` somewhere.
    """
    if bounds is None:
        return None
    if isinstance(bounds, Bounds):
        pair = tuple(bounds)
    elif isinstance(bounds, (tuple, list)) and len(bounds) == 2:
        pair = tuple(bounds)
    else:
        raise ValueError(f"bounds must be a pair (lower, upper) of numbers or parameter pytrees, or None; "
                         f"got {type(bounds).__name__}")
    leaves = []
    for side, value in zip(("lower", "upper"), pair):
        side_leaves = jax.tree_util.tree_leaves(value)
        if not side_leaves:
            raise ValueError(f"bounds: {side} is empty ({value!r}); give a number or a pytree of arrays")
        for leaf in side_leaves:
            if validation.is_traced(leaf):
                raise ValueError(f"bounds: {side} must be concrete numbers or arrays, got a traced value")
            arr = np.asarray(leaf)
            if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
                raise ValueError(f"bounds: {side} must hold numbers, got dtype {arr.dtype}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"bounds: {side} must be finite (no NaN or inf), got {arr.ravel()[:4]}...; "
                                 "use bounds=None for an unbounded search")
        leaves.append(side_leaves)
    lower, upper = pair
    if all(_is_number(v) for v in (lower, upper)) and not float(lower) < float(upper):
        raise ValueError(f"bounds: lower must be below upper, got lower={lower}, upper={upper}")
    return Bounds(lower, upper)


def _side_leaves(side, params, name: str) -> list:
    """``side`` (a number or a pytree of ``params``' structure) as one array per parameter leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if _is_number(side):
        return [side] * len(leaves)
    try:
        return treedef.flatten_up_to(side)
    except (ValueError, TypeError) as err:
        raise ValueError(f"bounds: {name} must be a number or a pytree of the parameters' structure "
                         f"({treedef}); {err}") from None


def for_params(bounds: Bounds | None, params) -> tuple[list, list] | None:
    """Per parameter leaf, ``(lowers, uppers)`` as float arrays of the leaf's dtype; None without bounds.

    Raises:
      ValueError naming ``bounds``: a pytree of another structure, a leaf
      that does not broadcast, ``lower >= upper`` somewhere, or a
      non-floating parameter leaf (integer codes of a quantized model).
    """
    if bounds is None:
        return None
    leaves = jax.tree_util.tree_leaves(params)
    lows, highs = _side_leaves(bounds.lower, params, "lower"), _side_leaves(bounds.upper, params, "upper")
    out_l, out_h = [], []
    for i, (p, lo, hi) in enumerate(zip(leaves, lows, highs)):
        if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
            raise ValueError(f"bounds: apply to floating-point parameters; leaf {i} has dtype "
                             f"{jnp.result_type(p)} (a quantized model's codes cannot be bounded this way)")
        shape = np.shape(p)
        try:
            lo_b, hi_b = (np.broadcast_to(np.asarray(v, np.float64), shape) for v in (lo, hi))
        except ValueError:
            raise ValueError(f"bounds: leaf {i}: bounds of shapes {np.shape(lo)} and {np.shape(hi)} do not "
                             f"broadcast to the parameter's shape {shape}") from None
        if not np.all(lo_b < hi_b):
            raise ValueError(f"bounds: lower must be below upper everywhere; leaf {i} has lower >= upper")
        dtype = jnp.result_type(p)
        out_l.append(jnp.asarray(lo, dtype))
        out_h.append(jnp.asarray(hi, dtype))
    return out_l, out_h


def reflect_leaf(x, lower, upper):
    """``x`` folded into ``[lower, upper]`` by reflection at the faces (entries inside untouched).

    With w = upper - lower: y = (x - lower) mod 2w, then w - |y - w|, then
    lower + that, clipped once more against float rounding.
    """
    width = upper - lower
    y = jnp.mod(x - lower, 2 * width)
    folded = jnp.clip(lower + (width - jnp.abs(y - width)), lower, upper)
    inside = (x >= lower) & (x <= upper)
    return jnp.where(inside, x, folded).astype(x.dtype)


def reflect(params, box):
    """``params`` reflected into the box ``box = for_params(bounds, params)``: ``(params, left)``,
    ``left`` whether any entry was outside (and so moved)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out, left = [], jnp.zeros((), bool)
    for p, lo, hi in zip(leaves, *box):
        out.append(reflect_leaf(p, lo, hi))
        left = left | jnp.any((p < lo) | (p > hi))
    return jax.tree_util.tree_unflatten(treedef, out), left


def project(params, box):
    """``params`` clipped to the box ``box = for_params(bounds, params)`` (the Euclidean projection,
    ``optax.projections.projection_box``)."""
    treedef = jax.tree_util.tree_structure(params)
    lower, upper = (jax.tree_util.tree_unflatten(treedef, side) for side in box)
    return optax.projections.projection_box(params, lower, upper)


def start(params, bounds: Bounds | None):
    """The starting point of a bounded search: ``params`` itself without bounds; with them, concrete
    parameters outside the box are refused (ValueError naming ``params``) and traced ones (an init
    under ``jax.vmap``) are projected onto it (a no-op, bit for bit, for a point inside)."""
    if bounds is None:
        return params
    box = for_params(bounds, params)
    for i, (p, lo, hi) in enumerate(zip(jax.tree_util.tree_leaves(params), *box)):
        if validation.is_traced(p):
            continue
        arr = np.asarray(p)
        outside = (arr < np.asarray(lo)) | (arr > np.asarray(hi))
        if np.any(outside):
            raise ValueError(f"params: {int(outside.sum())} entries of leaf {i} lie outside bounds "
                             f"(e.g. {arr[outside].ravel()[0]}); start the search inside the box, e.g. "
                             "with annealing.bounds.project(params, for_params(bounds, params))")
    return project(params, box)
