"""Proposal kernels: how the annealer draws K neighbours of the incumbent.

Protocol (a tiny one, so kernels are pluggable)::

    proposal = Proposal(init=init, prepare=prepare, cost=0)   # cost: extra evaluations per step
    proposal_state = proposal.init(params)                 # () when stateless
    prep = proposal.prepare(loss_fn, params, key_loss, batch,
                            temperature, radius, proposal_state)
    members = prep.draw(keys) if prep.draw else keys   # all K+1 members, once
    loss_j = prep.loss(members[j], active_j)  # called INSIDE jax.vmap over K+1
    winner = prep.materialize(key_j)        # the accepted proposal's params
    prep.proposal_state                     # carried to the next step

``prepare`` runs once per step outside the vmap: it computes what all
proposals share (a gradient, per-leaf scales, the model's Dense layout) and
returns the functions below, bound to it. ``prep.loss(key, active)`` draws ONE proposal's noise from
its own key and returns ``loss_fn`` at the perturbed parameters with the
step's shared ``key_loss`` and ``batch`` (common random numbers); with
``active=False`` it must return the loss of the unperturbed incumbent (the
kernel evaluates the incumbent as the (K+1)-th member of the same vmap).
Full-rank kernels (gaussian, cauchy, langevin) generate the noise inside the
vmapped function, so nothing outside it holds K copies of the parameters;
they also set ``prep.chunk_size``, so the kernel evaluates them a chunk at a
time and at most ``chunk_bytes()`` of perturbed copies exist at once.
``low_rank``, whose noise is small (O(r (m + n)) per Dense layer), sets
``prep.draw`` instead: the kernel draws every member's noise once, up front,
and passes member j's to ``prep.loss`` in place of its key (see ``lowrank.draw_all``).
``prep.materialize(key)`` re-generates the same noise from the winner's key
and returns its parameters.

Scales: every kernel's noise standard deviation is ``scale * radius`` where
``radius`` is the annealer's radius schedule value (1.0 by default); with
``scale_by_rms=True`` it is further multiplied, per leaf, by
``max(rms(leaf), rms_floor)`` (the floor keeps zero-initialised biases moving).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from savae_jax import rng, validation
from savae_jax.annealing import lowrank
from savae_jax.optimizer import GRAD_COST, checked_loss

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
        step's memory is O(chunk_size * P), independent of K; ``low_rank``
        sets it on CPU so that a chunk's activations stay in cache
        (``lowrank.member_chunk``).
      draw: None, or ``keys (n,) -> members``: every member's noise drawn
        at once (a pytree with leading axis n); ``loss`` then takes member
        j's slice of it in place of ``keys[j]``. ``materialize`` still takes
        the winner's key.
    """

    loss: Callable[[Any, jax.Array], jax.Array]
    materialize: Callable[[jax.Array], Any]
    proposal_state: Any
    chunk_size: int | None = None
    draw: Callable[[jax.Array], Any] | None = None


class Proposal(NamedTuple):
    """A proposal kernel: ``init(params) -> state`` and ``prepare(...) -> Prepared``.

    Attributes:
      init: ``init(params) -> state``.
      prepare: ``prepare(loss_fn, params, key_loss, batch, temperature,
        radius, state) -> Prepared``.
      cost: loss evaluations ``prepare`` spends per step on top of the K + 1
        members' (``GRAD_COST`` for the one gradient of ``langevin``), so an
        annealer's step costs K + 1 + cost.
    """

    init: Callable[[Any], Any]
    prepare: Callable[..., Prepared]
    cost: int = 0


# Bytes of perturbed parameters that full-rank kernels hold at once: chunks of
# about this size keep a step's memory O(P), not O(K * P). None picks it by
# the default backend (``chunk_bytes``); set an int to override it.
CHUNK_BYTES: int | None = None
# On CPU a chunk the size of a core's L2 cache was the fastest (issue 14, 2-core
# EPYC, 2 MiB L2, gaussian step at K = 256: MNIST MLP, P = 3.3 MB, one member
# at a time 0.74 s against 1.71 s for 64 MiB chunks; digits MLP, P = 0.36 MB,
# 138 ms against 389 ms). Accelerators keep the large chunks that batch their
# products (not measured on one here).
CPU_CHUNK_BYTES = 2 * 2**20
ACCELERATOR_CHUNK_BYTES = 64 * 2**20


def chunk_bytes() -> int:
    """Bytes of perturbed parameters a full-rank kernel evaluates at once (``CHUNK_BYTES`` or by backend)."""
    if CHUNK_BYTES is not None:
        return CHUNK_BYTES
    return CPU_CHUNK_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_BYTES


def _chunk_size(leaves, moves=lowrank.is_float) -> int:
    """Members per chunk: ``chunk_bytes()`` over the bytes of the leaves a proposal ``moves``."""
    size = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves if moves(leaf))
    return max(1, chunk_bytes() // max(size, 1))


def full_rank_chunk(params) -> int:
    """Members per chunk when every member holds a full copy of ``params``' floating leaves."""
    return _chunk_size(jax.tree_util.tree_leaves(params))


def _stateless_init(params):
    return ()


def _full_rank(loss_fn, params, key_loss, batch, sampler, delta, proposal_state) -> Prepared:
    """Members theta' = theta + delta(i, noise_i) on every float leaf i, noise_i = sampler(key).

    ``loss_fn`` is already checked; inactive members (padding) keep theta.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    floats = [i for i, p in enumerate(leaves) if lowrank.is_float(p)]

    def moved(key, active):
        noise = rng.sample_flat(sampler, key, [leaves[i].shape for i in floats])
        out = list(leaves)
        for i, e in zip(floats, noise):
            p = leaves[i]
            out[i] = jnp.where(active, p + delta(i, e).astype(p.dtype), p)
        return jax.tree_util.tree_unflatten(treedef, out)

    def loss(key, active):
        return loss_fn(moved(key, active), key_loss, batch)

    def materialize(key):
        return moved(key, jnp.bool_(True))

    return Prepared(loss=loss, materialize=materialize, proposal_state=proposal_state,
                    chunk_size=_chunk_size(leaves))


def _masked(sampler, fraction: float):
    """``sampler`` whose entries are each kept with probability ``fraction`` and zero otherwise, at
    least one entry per draw.

    The mask is drawn from its own subkey, so for ``fraction=1`` the noise is
    the unmasked sampler's, bit for bit. A draw whose Bernoulli mask keeps no
    entry moves one entry chosen uniformly instead (from a key folded out of
    the mask's, so every other draw is unchanged): a proposal equal to the
    incumbent has a delta of exactly 0, which would win the best of K against
    every uphill proposal, so the chain could never climb and the temperature
    would not matter (measured, issue 26: at fraction 1/D with D = 10 and
    K = 16, 35 % of the proposals were null, and 10-D Schwefel gave the same
    result at T0 = 5 and T0 = 1000). The mask stays independent of the
    position, so a symmetric sampler gives a symmetric proposal.
    """
    if fraction == 1.0:
        return sampler

    def masked(key, shape, dtype):
        key_noise, key_mask = jax.random.split(key)
        keep = rng.flat_draw(jax.random.bernoulli, key_mask, shape, p=fraction)
        size = math.prod(shape)
        one = jax.random.randint(jax.random.fold_in(key_mask, 1), (), 0, max(size, 1))
        keep = jnp.where(jnp.any(keep), keep, (jnp.arange(size) == one).reshape(shape))
        return jnp.where(keep, sampler(key_noise, shape, dtype), jnp.zeros((), dtype))

    return masked


def _additive(sampler, scale, scale_by_rms, rms_floor, fraction=1.0) -> Proposal:
    """Full-rank additive noise theta' = theta + std_leaf * sampler(key_leaf), on a ``fraction`` of entries."""
    if validation.is_traced(fraction):  # the mask is built at trace time: fraction cannot be swept
        raise ValueError("fraction must be a Python number, got a traced value")
    validation.real("fraction", fraction, lambda v: 0 < v <= 1, "in (0, 1]")
    sampler = _masked(sampler, float(fraction))

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        base = jnp.asarray(scale, jnp.float32) * radius
        stds = [lowrank.leaf_std(p, base, scale_by_rms, rms_floor) if lowrank.is_float(p) else None
                for p in jax.tree_util.tree_leaves(params)]
        return _full_rank(checked_loss(loss_fn), params, key_loss, batch, sampler,
                          lambda i, e: stds[i] * e, proposal_state)

    return Proposal(init=_stateless_init, prepare=prepare)


def gaussian(scale: float, scale_by_rms: bool = False, rms_floor: float = 1e-3,
             fraction: float = 1.0) -> Proposal:
    """Isotropic Gaussian neighbourhood: theta' = theta + scale * r * xi, xi ~ N(0, I).

    Args:
      scale: noise standard deviation (before the radius schedule), > 0.
      scale_by_rms: multiply the std per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
      fraction: probability that an entry moves, in (0, 1]; each proposal
        perturbs an independent Bernoulli(fraction) subset of the entries
        (block-coordinate moves; see :func:`cauchy`). 1.0 moves them all.
    """
    validation.positive("scale", scale)
    validation.positive("rms_floor", rms_floor)
    return _additive(jax.random.normal, scale, scale_by_rms, rms_floor, fraction)


def cauchy(scale: float, scale_by_rms: bool = False, rms_floor: float = 1e-3,
           fraction: float = 1.0) -> Proposal:
    """Heavy-tailed neighbourhood: theta' = theta + scale * r * c, c ~ Cauchy(0, 1) per entry.

    Args:
      scale: Cauchy scale (before the radius schedule), > 0.
      scale_by_rms: multiply the scale per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
      fraction: probability that an entry moves, in (0, 1]. With
        ``fraction = 1/D`` a proposal moves about one of D coordinates, as
        the second half of scipy's ``dual_annealing`` visiting loop does: on a
        (nearly) separable landscape (Rastrigin, Ackley) a long jump of one
        coordinate into a better basin is not undone by the other D - 1
        coordinates' jumps, which is what makes full moves fail in many
        dimensions. A proposal whose mask draws no entry moves one entry
        chosen uniformly (never a copy of the incumbent, whose delta of 0
        would beat every uphill proposal). 1.0 moves every entry.
    """
    validation.positive("scale", scale)
    validation.positive("rms_floor", rms_floor)
    return _additive(jax.random.cauchy, scale, scale_by_rms, rms_floor, fraction)


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
    validation.positive("step_size", step_size)
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

    return Proposal(init=init, prepare=prepare, cost=GRAD_COST)


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
    validation.positive("scale", scale)
    validation.positive("rms_floor", rms_floor)
    validation.integer("rank", rank, 1)
    rank = int(rank)

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        loss_fn = checked_loss(loss_fn)
        base = jnp.asarray(scale, jnp.float32) * radius
        layout = lowrank.build_layout(loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor)
        return Prepared(loss=functools.partial(lowrank.perturbed_loss, layout, loss_fn, key_loss, batch),
                        materialize=functools.partial(lowrank.materialize, layout),
                        proposal_state=proposal_state, chunk_size=lowrank.member_chunk(layout),
                        draw=functools.partial(lowrank.draw_all, layout))

    return Proposal(init=_stateless_init, prepare=prepare)
