"""Moves on the integer lattice of a quantized model (``quantize.QuantizedParams``).

    q = quantize.quantize(params, bits=4)
    sa = simulated_annealing(loss, 16, lattice(fraction=1e-3), schedule, confident(0.05))
    sa = simulated_annealing(loss, 16, lattice_low_rank(scale=0.3, rank=1), schedule, confident(0.05))
    es = lattice_es(loss, num_pairs=8, fraction=1e-3, acceptance=confident(0.05))

Every move changes the integer codes of the quantized kernels by whole steps
and clips them to ``[-qmax, qmax]``; the scales and float leaves (biases)
never move. So every proposal, every candidate and every accepted state is a
valid int-b model. A member's move is re-created exactly from its key
(``materialize``), as the float kernels' noise is.

Two proposal kernels for ``simulated_annealing``:

- :func:`lattice`: each code moves by +-``step`` with probability ``fraction``;
- :func:`lattice_low_rank`: EGGROLL's rank-r noise, rounded to the lattice:
  a kernel's codes (reshaped to ``(fan_in, out)``) move by
  ``round(scale / sqrt(r) * A B^T)`` with A, B standard normal of rank r, so
  a code moves where the low-rank product crosses a rounding threshold, and
  the moves of one kernel are correlated along its rows and columns. Rounding
  breaks the low-rank structure, so each member's codes are materialised
  (a chunk of members at a time, as the full-rank kernels are).

A draw that would move no code moves one code chosen uniformly instead: a copy
of the incumbent has a delta of exactly 0 and would win the best of K against
every uphill move.

And :func:`lattice_es`, ES recombination on the lattice: ``num_pairs``
antithetic pairs of :func:`lattice` moves, their losses shaped, and the search
gradient turned into one integer step, decided like ``evolution_strategy``'s
candidate (any acceptance rule, a decision batch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from savae_jax import rng, validation
from savae_jax.annealing import es as es_lib
from savae_jax.annealing import sharding
from savae_jax.annealing.proposals import Prepared, Proposal, _chunk_size, _stateless_init
from savae_jax.optimizer import checked_loss, tree_norm
from savae_jax.quantize import QuantizedParams, is_code


def _codes(params):
    """``(leaves, treedef, indices of the code leaves)`` of quantized ``params`` (ValueError otherwise)."""
    if not isinstance(params, QuantizedParams):
        raise ValueError(f"params: lattice moves need quantized parameters (quantize.quantize(params, bits)), "
                         f"got {type(params).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return leaves, treedef, [i for i, p in enumerate(leaves) if is_code(p)]


def _members_per_chunk(leaves) -> int:
    """Members evaluated at once: each holds its own copy of the codes (``proposals.chunk_bytes``)."""
    return _chunk_size(leaves, moves=is_code)


def _apply(leaves, treedef, codes, moves, qmax, active=True):
    """``params`` with each code leaf moved by its int32 ``moves`` and clipped to ``[-qmax, qmax]``."""
    out = list(leaves)
    for move, i in zip(moves, codes):
        c = leaves[i]
        new = jnp.clip(c.astype(jnp.int32) + move, -qmax, qmax).astype(c.dtype)
        out[i] = jnp.where(active, new, c)
    return jax.tree_util.tree_unflatten(treedef, out)


def _at_least_one(key, drawn, shapes):
    """The drawn ``(move, fallback)`` per code leaf -> moves; if no code moves, the one code chosen
    uniformly (from ``fold_in(key, 1)``) moves by its ``fallback`` (a nonzero step) instead."""
    total = sum(math.prod(shape) for shape in shapes)
    empty = ~functools.reduce(jnp.logical_or, [jnp.any(move != 0) for move, _ in drawn])
    one = jax.random.randint(jax.random.fold_in(key, 1), (), 0, total)
    moves, offset = [], 0
    for (move, fallback), shape in zip(drawn, shapes):
        size = math.prod(shape)
        chosen = (jnp.arange(size) + offset == one).reshape(shape)
        moves.append(jnp.where(empty & chosen, fallback, move))
        offset += size
    return moves


def _sparse_draw(fraction: float, step: int):
    """``key, shapes -> [(move, fallback)]``: each code moves by +-step with probability ``fraction``."""
    def draw(key, shapes):
        out = []
        for k, shape in zip(jax.random.split(key, len(shapes)), shapes):
            key_move, key_sign = jax.random.split(k)
            sign = step * rng.flat_draw(jax.random.rademacher, key_sign, shape, dtype=jnp.int32)
            out.append((jnp.where(rng.flat_draw(jax.random.bernoulli, key_move, shape, p=fraction), sign, 0), sign))
        return out
    return draw


def _low_rank_draw(scale: float, rank: int, step: int):
    """``key, shapes -> [(move, fallback)]``: ``step * round(scale / sqrt(r) * A B^T)`` per code leaf,
    the leaf reshaped to ``(size / out, out)``; the fallback is ``step`` times the sign of the product."""
    coef = scale / math.sqrt(rank)

    def draw(key, shapes):
        out = []
        for k, shape in zip(jax.random.split(key, len(shapes)), shapes):
            n = shape[-1]
            m = math.prod(shape) // n
            key_a, key_b = jax.random.split(k)
            product = coef * (rng.flat_draw(jax.random.normal, key_a, (m, rank))
                              @ rng.flat_draw(jax.random.normal, key_b, (n, rank)).T)
            move = step * jnp.round(product).astype(jnp.int32)
            fallback = step * jnp.where(product < 0, -1, 1).astype(jnp.int32)
            out.append((move.reshape(shape), fallback.reshape(shape)))
        return out
    return draw


def _lattice_proposal(draw) -> Proposal:
    """The proposal kernel whose member moves the codes by ``draw(key, shapes)`` (at least one code)."""

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        leaves, treedef, codes = _codes(params)
        loss_fn = checked_loss(loss_fn)
        shapes = [leaves[i].shape for i in codes]

        def moved(key, active):
            moves = _at_least_one(key, draw(key, shapes), shapes)
            return _apply(leaves, treedef, codes, moves, params.qmax, active)

        return Prepared(loss=lambda key, active: loss_fn(moved(key, active), key_loss, batch),
                        materialize=lambda key: moved(key, jnp.bool_(True)), proposal_state=proposal_state,
                        chunk_size=_members_per_chunk(leaves))

    return Proposal(init=_stateless_init, prepare=prepare)


def lattice(fraction: float, step: int = 1) -> Proposal:
    """Sparse moves on the lattice: each code moves by +-``step`` (each sign equally likely) with
    probability ``fraction``, independently, clipped to ``[-qmax, qmax]``.

    A draw that moves no code moves one code chosen uniformly instead (at
    ``fraction = 1 / codes`` about 37 % of the draws would otherwise be
    copies of the incumbent, wasted evaluations that win the best of K
    against every uphill move). The annealer's radius schedule does not
    scale the move (a code moves by whole steps); the temperature schedule
    applies as usual.

    Args:
      fraction: probability that a code moves, in (0, 1]; about ``fraction *
        codes`` codes move per proposal (e.g. 1e-3 of a 0.4 M-code model: 400).
      step: the integer step, >= 1.
    """
    validation.real("fraction", fraction, lambda v: 0 < v <= 1, "in (0, 1]")
    validation.integer("step", step, 1)
    return _lattice_proposal(_sparse_draw(fraction, step))


def lattice_low_rank(scale: float, rank: int = 1, step: int = 1) -> Proposal:
    """Low-rank moves on the lattice (EGGROLL's noise, rounded): each kernel's codes, as a
    ``(fan_in, out)`` matrix, move by ``step * round(scale / sqrt(rank) * A B^T)``, A and B
    standard normal of shapes ``(fan_in, rank)`` and ``(out, rank)``, clipped to ``[-qmax, qmax]``.

    The product's entries have standard deviation ``scale``; a code moves where
    its entry crosses +-1/2, so ``scale`` sets how many codes move (at rank 1,
    P(|scale * a * b| > 1/2) for independent standard normals a, b: about 3.5 %
    of them at scale 0.2, 9 % at 0.3, 21 % at 0.5) and rows and columns with
    large factors move together. A draw that moves no code moves one code instead,
    by ``step`` in the sign of its entry.

    Args:
      scale: standard deviation of the low-rank product, in code steps, > 0.
      rank: r, >= 1.
      step: the integer step, >= 1.
    """
    validation.positive("scale", scale)
    validation.integer("rank", rank, 1)
    validation.integer("step", step, 1)
    return _lattice_proposal(_low_rank_draw(float(scale), int(rank), int(step)))


def lattice_es(loss_fn, num_pairs: int, fraction: float, learning_rate: float = 1.0, *, step: int = 1,
               shaping: str = "centered_ranks", acceptance=None, temperature=0.0, decision=None, mesh=None,
               axis_name: str | None = None):
    """ES recombination on the lattice: K = 2 * num_pairs antithetic sparse moves -> ONE integer step.

    Pair i draws a :func:`lattice` move d_i (each code +-``step`` with
    probability ``fraction``); its members are the incumbent c moved by +d_i
    and by -d_i (clipped to the range), all evaluated on the step's batch in
    one vmap. The losses are shaped (``shaping``, as ``evolution_strategy``
    shapes them) into weights w_k, and the search gradient, in steps, is

        g = sum_k w_k d_k / step = sum_i (w_i - w_{i + num_pairs}) d_i / step.

    The candidate moves every code one step against its estimate where
    ``learning_rate * |g| >= 1/2``: c' = clip(c - step * clip(round(learning_rate
    * g), -1, 1)). With centred ranks, a code that only pair i moved has |g| =
    |w_i - w_{i + num_pairs}| <= 1, so at learning rate 1 it moves when its pair's
    losses rank at least half the population apart. The candidate is decided
    against the incumbent by ``acceptance`` on paired per-example differences,
    as ``evolution_strategy`` decides (a decision batch, noise-aware rules,
    a temperature schedule).

    Args:
      loss_fn: ``loss_fn(params, key, batch) -> scalar`` on quantized
        parameters (``make_loss`` takes them); ``per_example`` for a decision
        batch or a noise-aware rule.
      num_pairs: antithetic pairs per step, >= 1.
      fraction: probability that a code moves in a member, in (0, 1].
      learning_rate: > 0, see above.
      step: the integer step, >= 1.
      shaping, acceptance, temperature, decision, mesh, axis_name: as in
        ``evolution_strategy`` (the members are sharded over the mesh axis).
    Returns:
      An :class:`~savae_jax.optimizer.Optimizer` (state ``ESState`` with
      ``opt_state=()``, info ``ESInfo``), cost ``2 * num_pairs`` plus the decision's.
    """
    validation.integer("num_pairs", num_pairs, 1)
    validation.real("fraction", fraction, lambda v: 0 < v <= 1, "in (0, 1]")
    validation.positive("learning_rate", learning_rate)
    validation.integer("step", step, 1)
    if step > 127:  # the members' moves are held as int8, like the codes (a step over 2 * qmax only clips)
        raise ValueError(f"step must be an integer in [1, 127], got {step}")
    es_lib.check_shaping(shaping)
    axis_name = sharding.mesh_axis(mesh, axis_name)
    num_pairs, draw = int(num_pairs), _sparse_draw(fraction, step)

    def start(params):
        _codes(params)  # refuses float parameters here, naming params
        return params, ()

    def propose(loss_fn, params, opt_state, key_noise, key_loss, x):
        leaves, treedef, codes = _codes(params)
        shapes = [leaves[i].shape for i in codes]

        def half(key):  # one pair's move, as int8 (step <= 127)
            return [m.astype(jnp.int8) for m, _ in draw(key, shapes)]

        # num_pairs x P int8, drawn one pair at a time: a vmap would hold every pair's random-bit
        # intermediates at once (about 38 bytes per code and pair; 2 GiB at K = 256 for 0.4 M codes)
        pairs = jax.lax.map(half, jax.random.split(key_noise, num_pairs))

        def member(index):  # member k < num_pairs is +d_k, member num_pairs + k is -d_k
            sign = jnp.where(index < num_pairs, 1, -1)
            moves = [sign * d[index % num_pairs].astype(jnp.int32) for d in pairs]
            return loss_fn(_apply(leaves, treedef, codes, moves, params.qmax), key_loss, x)

        # The members are indices into the pairs: K moves are never materialised (O(num_pairs * P)
        # int8 in all, not K copies and a K x P float32 product).
        losses = es_lib._member_losses(member, jnp.arange(2 * num_pairs), mesh, axis_name,
                                       _members_per_chunk(leaves))
        if mesh is not None:  # assemble replicated, as evolution_strategy does
            losses = sharding.replicated(losses, mesh)
        weights = es_lib.shape_fitness(losses, shaping)
        diffs = weights[:num_pairs] - weights[num_pairs:]  # sum_k w_k d_k = sum_i (w_i - w_{i+n}) d_i

        def accumulate(i, g):  # one pair at a time: O(P) float32, pairs in order
            return [gi + diffs[i] * d[i].astype(jnp.float32) for gi, d in zip(g, pairs)]

        grads = jax.lax.fori_loop(0, num_pairs, accumulate, [jnp.zeros(d.shape[1:], jnp.float32) for d in pairs])
        grads = [g / step for g in grads]
        moves = [-step * jnp.clip(jnp.round(learning_rate * g), -1, 1).astype(jnp.int32) for g in grads]
        candidate = _apply(leaves, treedef, codes, moves, params.qmax)
        return es_lib.Candidate(candidate, opt_state, losses, tree_norm(grads), jnp.zeros((), jnp.int32))

    return es_lib.recombining_optimizer(loss_fn, 2 * num_pairs, start, propose, acceptance=acceptance,
                                        temperature=temperature, decision=decision, mesh=mesh)
