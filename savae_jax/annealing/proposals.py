"""Proposal kernels: how the annealer draws K neighbours of the incumbent.

Protocol (a tiny one, so kernels are pluggable)::

    proposal = Proposal(init, prepare)
    proposal_state = proposal.init(params)                 # () when stateless
    prep = proposal.prepare(loss_fn, params, key_loss, batch,
                            temperature, radius, proposal_state)
    loss_j = prep.loss(key_j, active_j)     # called INSIDE jax.vmap over K+1
    winner = prep.materialize(key_j)        # the accepted proposal's params
    prep.proposal_state                     # carried to the next step

``prepare`` runs once per step outside the vmap: it computes what all
proposals share (a gradient, per-leaf scales, the model's Dense layout) and
returns closures. ``prep.loss(key, active)`` draws ONE proposal's noise from
its own key and returns ``loss_fn`` at the perturbed parameters with the
step's shared ``key_loss`` and ``batch`` (common random numbers); with
``active=False`` it must return the loss of the unperturbed incumbent (the
kernel evaluates the incumbent as the (K+1)-th member of the same vmap).
The noise is generated inside the vmapped function, so nothing outside it
holds K copies of the parameters; full-rank kernels (gaussian, cauchy,
langevin) also set ``prep.chunk_size``, so the kernel evaluates them a chunk
at a time and at most ``CHUNK_BYTES`` of perturbed copies exist at once.
``prep.materialize(key)`` re-generates the same noise from the winner's key
and returns its parameters.

Scales: every kernel's noise standard deviation is ``scale * radius`` where
``radius`` is the annealer's radius schedule value (1.0 by default); with
``scale_by_rms=True`` it is further multiplied, per leaf, by
``max(rms(leaf), rms_floor)`` (the floor keeps zero-initialised biases moving).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from savae_jax.annealing.schedules import _check

tree_map = jax.tree_util.tree_map


class Prepared(NamedTuple):
    """A proposal kernel prepared for one step (see the module docstring).

    Attributes:
      loss: ``(key, active) -> scalar`` loss of one proposal (of the incumbent
        when ``active`` is False); vmapped by the kernel.
      materialize: ``key -> params`` the proposal drawn from ``key``.
      proposal_state: the kernel's state for the next step.
      chunk_size: proposals evaluated at once (``jax.lax.map`` over chunks
        of a vmap); None evaluates all K + 1 in one vmap. Kernels whose
        proposals each hold a full copy of the parameters set it so that a
        step's memory is O(chunk_size * P), independent of K.
    """

    loss: Callable[[jax.Array, jax.Array], jax.Array]
    materialize: Callable[[jax.Array], Any]
    proposal_state: Any
    chunk_size: int | None = None


class Proposal(NamedTuple):
    """A proposal kernel: ``init(params) -> state`` and ``prepare(...) -> Prepared``.

    ``prepare(loss_fn, params, key_loss, batch, temperature, radius, state)``.
    """

    init: Callable[[Any], Any]
    prepare: Callable[..., Prepared]


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _leaf_std(leaf, base, scale_by_rms: bool, rms_floor: float):
    """Noise std of one leaf: base (= scale * radius), times its floored RMS if asked."""
    if not scale_by_rms:
        return base
    rms = jnp.sqrt(jnp.mean(jnp.square(leaf.astype(jnp.float32))))
    return base * jnp.maximum(rms, rms_floor)


def _check_positive(name, value):
    _check(name, value, lambda v: v > 0, "> 0")


def _sample_flat(sampler, key, shapes):
    """One draw of sum(sizes) float32 variates split into ``shapes``.

    A single random call for all leaves: far cheaper to compile (and run)
    than one threefry call per leaf.
    """
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    if total == 0:
        return [jnp.zeros(shape, jnp.float32) for shape in shapes]
    flat = sampler(key, (total,), jnp.float32)
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out


# Bytes of perturbed parameters that full-rank kernels hold at once: chunks
# of about this size keep a step's memory O(P), not O(K * P), and are no
# slower than one vmap over all K (the copies stay in cache; see
# experiments/benchmark.py).
CHUNK_BYTES = 64 * 2**20


def _chunk_size(leaves) -> int:
    size = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves if _is_float(leaf))
    return max(1, CHUNK_BYTES // max(size, 1))


def _stateless_init(params):
    return ()


def checked_loss(loss_fn):
    """``loss_fn`` whose output is checked to be a floating-point scalar when traced.

    Shapes and dtypes are static, so the check costs nothing at run time; a
    batch of losses or an integer loss would otherwise surface as an obscure
    error deep in the kernel (or silently compare the wrong numbers).
    """

    def wrapped(params, key, batch):
        out = loss_fn(params, key, batch)
        shape, dtype = tuple(jnp.shape(out)), jnp.result_type(out)
        if shape != () or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                "loss_fn must return a floating-point scalar (the batch's mean loss), "
                f"got shape {shape} and dtype {dtype}"
            )
        return out

    return wrapped


def _full_rank(loss_fn, params, key_loss, batch, sampler, delta, proposal_state) -> Prepared:
    """Members theta' = theta + delta(i, noise_i) on every float leaf i, noise_i = sampler(key).

    ``loss_fn`` is already checked; inactive members (padding) keep theta.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    floats = [i for i, p in enumerate(leaves) if _is_float(p)]

    def moved(key, active):
        noise = _sample_flat(sampler, key, [leaves[i].shape for i in floats])
        out = list(leaves)
        for i, e in zip(floats, noise):
            p = leaves[i]
            out[i] = jnp.where(active, p + delta(i, e).astype(p.dtype), p)
        return jax.tree_util.tree_unflatten(treedef, out)

    def loss(key, active):
        return loss_fn(moved(key, active), key_loss, batch)

    def materialize(key):
        return moved(key, jnp.bool_(True))

    return Prepared(loss, materialize, proposal_state, _chunk_size(leaves))


def _additive(sampler, scale, scale_by_rms, rms_floor) -> Proposal:
    """Full-rank additive noise theta' = theta + std_leaf * sampler(key_leaf)."""

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        base = jnp.asarray(scale, jnp.float32) * radius
        stds = [_leaf_std(p, base, scale_by_rms, rms_floor) if _is_float(p) else None
                for p in jax.tree_util.tree_leaves(params)]
        return _full_rank(checked_loss(loss_fn), params, key_loss, batch, sampler,
                          lambda i, e: stds[i] * e, proposal_state)

    return Proposal(_stateless_init, prepare)


def gaussian(scale: float, scale_by_rms: bool = False, rms_floor: float = 1e-3) -> Proposal:
    """Isotropic Gaussian neighbourhood: theta' = theta + scale * r * xi, xi ~ N(0, I).

    Args:
      scale: noise standard deviation (before the radius schedule), > 0.
      scale_by_rms: multiply the std per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
    """
    _check_positive("scale", scale)
    _check_positive("rms_floor", rms_floor)
    return _additive(jax.random.normal, scale, scale_by_rms, rms_floor)


def cauchy(scale: float, scale_by_rms: bool = False, rms_floor: float = 1e-3) -> Proposal:
    """Heavy-tailed neighbourhood: theta' = theta + scale * r * c, c ~ Cauchy(0, 1) per entry.

    Args:
      scale: Cauchy scale (before the radius schedule), > 0.
      scale_by_rms: multiply the scale per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
    """
    _check_positive("scale", scale)
    _check_positive("rms_floor", rms_floor)
    return _additive(jax.random.cauchy, scale, scale_by_rms, rms_floor)


def langevin(step_size: float, optimizer=None) -> Proposal:
    """Gradient-informed proposals (unadjusted Langevin), one gradient per step.

    theta'_j = theta - step_size * g + r * sqrt(2 * step_size * T) * xi_j,
    xi_j ~ N(0, I), where g = grad loss_fn(theta, key_loss, batch) is computed
    once per step with the step's loss key. With ``optimizer`` (any optax
    GradientTransformation, e.g. ``optax.adam(1e-3)``) the drift
    ``-step_size * g`` is replaced by the optimizer's update of g; its state is
    the proposal state and is updated once per step (accepted or not).

    Args:
      step_size: Langevin step, > 0 (also sets the noise scale).
      optimizer: optional optax GradientTransformation giving the drift.
    """
    _check_positive("step_size", step_size)
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")

    def init(params):
        return () if optimizer is None else optimizer.init(params)

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        loss_fn = checked_loss(loss_fn)
        grads = jax.grad(loss_fn)(params, key_loss, batch)
        if optimizer is None:
            drift = tree_map(lambda g: -step_size * g, grads)
            new_state = proposal_state
        else:
            drift, new_state = optimizer.update(grads, proposal_state, params)
        std = radius * jnp.sqrt(2.0 * step_size * jnp.maximum(temperature, 0.0))
        drifts = jax.tree_util.tree_structure(params).flatten_up_to(drift)
        return _full_rank(loss_fn, params, key_loss, batch, jax.random.normal,
                          lambda i, e: drifts[i] + std * e, new_state)

    return Proposal(init, prepare)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _dense_paths(loss_fn, params, key_loss, batch) -> list[tuple[str, ...]]:
    """Module paths of every nn.Dense called by ``loss_fn`` (abstract trace, no FLOPs)."""
    found: list[tuple[str, ...]] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            path = tuple(context.module.path)
            if path not in found:
                found.append(path)
        return next_fun(*args, **kwargs)

    def traced(p, k, b):
        with nn.intercept_methods(record):
            return loss_fn(p, k, b)

    jax.eval_shape(traced, params, key_loss, batch)
    return found


def low_rank(
    scale: float, rank: int = 1, scale_by_rms: bool = False, rms_floor: float = 1e-3
) -> Proposal:
    """EGGROLL-style rank-r perturbations of every Dense kernel, never materialised.

    For each ``flax.linen.Dense`` kernel W of shape (m, n), proposal j draws
    A ~ N(0, I_{m x r}), B ~ N(0, I_{n x r}) and the layer computes

        y = x @ W + b + (s / sqrt(r)) * (x @ A) @ B.T  (+ s_b * e_b)

    i.e. W' = W + (s / sqrt(r)) A B^T, whose entries have variance s^2 (the
    1/sqrt(r) normalisation makes ``scale`` comparable with ``gaussian``).
    Here s = scale * radius (times the kernel's floored RMS with
    ``scale_by_rms``). The shared product x @ W is one large matmul; each
    proposal adds O(r (m + n)) per row. Every ``nn.Dense.__call__`` inside
    ``loss_fn`` is intercepted with ``flax.linen.intercept_methods``, so
    ``loss_fn`` is used unchanged; a Dense module is matched to its params
    leaves by its module path (``('encoder', 'hidden')`` <->
    ``params['params']['encoder']['hidden']['kernel']``). Dense biases and all
    other floating leaves get plain Gaussian noise. Only the accepted
    proposal is materialised: ``materialize`` re-draws its A, B from its key
    and forms W + (s / sqrt(r)) A @ B.T once.

    Args:
      scale: per-entry noise std s (before the radius schedule), > 0.
      rank: r, >= 1.
      scale_by_rms: multiply s per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
    """
    _check_positive("scale", scale)
    _check_positive("rms_floor", rms_floor)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    rank = int(rank)

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        loss_fn = checked_loss(loss_fn)
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [tuple(_key_name(k) for k in path) for path, _ in with_paths]
        leaves = [leaf for _, leaf in with_paths]
        index = {name: i for i, name in enumerate(names)}

        # module path -> (kernel leaf index, bias leaf index or None)
        dense: dict[tuple[str, ...], tuple[int, int | None]] = {}
        for mpath in _dense_paths(loss_fn, params, key_loss, batch):
            for prefix in (("params",), ()):
                k = index.get(prefix + mpath + ("kernel",))
                if k is not None and leaves[k].ndim == 2:
                    dense[mpath] = (k, index.get(prefix + mpath + ("bias",)))
                    break
        for mpath, (k, _) in dense.items():
            if rank > min(leaves[k].shape):
                m, n = leaves[k].shape
                raise ValueError(
                    f"rank={rank} is larger than the Dense layer {'/'.join(mpath)} allows: its "
                    f"kernel is {m}x{n}, so rank must be <= min(m, n) = {min(m, n)}"
                )
        kernel_ids = {k for k, _ in dense.values()}
        bias_ids = {b for _, b in dense.values() if b is not None}

        base = jnp.asarray(scale, jnp.float32) * radius
        stds = [_leaf_std(p, base, scale_by_rms, rms_floor) if _is_float(p) else None for p in leaves]
        coefs = {i: stds[i] / math.sqrt(rank) for i in kernel_ids}

        floats = [i for i, s in enumerate(stds) if s is not None]

        def shapes_of(i):
            if i in kernel_ids:
                m, n = leaves[i].shape
                return [(m, rank), (n, rank)]
            return [leaves[i].shape]

        def draw(key):
            """Per leaf: (A, B) for Dense kernels, std-scaled noise for the rest."""
            shapes = [shape for i in floats for shape in shapes_of(i)]
            flat = iter(_sample_flat(jax.random.normal, key, shapes))
            noise = [None] * len(leaves)
            for i in floats:
                p = leaves[i]
                if i in kernel_ids:
                    noise[i] = (next(flat).astype(p.dtype), next(flat).astype(p.dtype))
                else:
                    noise[i] = (stds[i] * next(flat)).astype(p.dtype)
            return noise

        def loss(key, active):
            noise = draw(key)
            perturbed = []
            for i, (p, e) in enumerate(zip(leaves, noise)):
                if e is None or i in kernel_ids or i in bias_ids:
                    perturbed.append(p)  # Dense leaves are perturbed in the interceptor
                else:
                    perturbed.append(jnp.where(active, p + e, p))
            perturbed = jax.tree_util.tree_unflatten(treedef, perturbed)

            def intercept(next_fun, args, kwargs, context):
                y = next_fun(*args, **kwargs)
                if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
                    return y
                entry = dense.get(tuple(context.module.path))
                if entry is None:
                    return y
                k, b = entry
                x = args[0] if args else kwargs["inputs"]
                a_fac, b_fac = noise[k]
                delta = (coefs[k] * ((x @ a_fac) @ b_fac.T)).astype(y.dtype)
                if b is not None:
                    delta = delta + noise[b].astype(y.dtype)
                return jnp.where(active, y + delta, y)

            with nn.intercept_methods(intercept):
                return loss_fn(perturbed, key_loss, batch)

        def materialize(key):
            noise = draw(key)
            out = []
            for i, (p, e) in enumerate(zip(leaves, noise)):
                if e is None:
                    out.append(p)
                elif i in kernel_ids:
                    a_fac, b_fac = e
                    out.append(p + (coefs[i] * (a_fac @ b_fac.T)).astype(p.dtype))
                else:
                    out.append(p + e)
            return jax.tree_util.tree_unflatten(treedef, out)

        return Prepared(loss, materialize, proposal_state)

    return Proposal(_stateless_init, prepare)
