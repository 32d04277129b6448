"""Evolution-strategy recombination: use all K evaluations of a step, not just the best.

    es = evolution_strategy(loss_fn, num_pairs=32, scale=1e-3, noise="low_rank",
                            optimizer=optax.adam(1e-3), acceptance=confident(0.05),
                            decision=decision_batch(128, 512))
    state = es.init(params)
    state, info = jax.jit(es.step)(key, state, batch)

A step draws ``num_pairs`` antithetic pairs of perturbations +-E_i of the
incumbent theta (the same noise as the ``low_rank`` proposal: inside every
Dense layer E_i = (s / sqrt(r)) A_i B_i^T, never materialised, and Gaussian
noise of std s on biases and other leaves; or full-rank Gaussian everywhere
with ``noise="gaussian"``), evaluates all K = 2 * num_pairs members on the
step's batch in one vmap (common random numbers), shapes their losses
(centred ranks by default) and recombines them into the search-gradient
estimate

    g = 1 / (K s) * sum_k f_k eps_k,       eps_k = E_k / s (unit-variance noise),

assembled per Dense layer from the low-rank factors as
(1 / (K s sqrt(r))) * A^T diag(f) B. An Optax optimizer (Adam by default)
turns g into ONE candidate move, and the candidate is accepted or rejected by
an acceptance rule on the paired per-example differences of the candidate and
the incumbent (on the selection batch, or on an independent decision batch:
``annealing.decision``), so the step stays an annealing step that never
accepts a move its rule would not. The optimizer's state advances only when
the move is accepted.

Cost per step: K members, plus the paired decision (``decision.cost``: 2 on the
selection batch, and 2 * max_size / selection on a decision batch).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from savae_jax import validation
from savae_jax.annealing import decision as decision_lib
from savae_jax.annealing import bounds as bounds_lib
from savae_jax.annealing import lowrank, proposals, sharding
from savae_jax.annealing.acceptance import check_rule, metropolis, needs_stderr, with_max_num
from savae_jax.annealing.schedules import ScheduleEvent, as_stateful, fault, scalar_value
from savae_jax.optimizer import Optimizer, checked_loss, tree_norm, tree_where

SHAPINGS = ("centered_ranks", "z_scores", "none")


class ESState(NamedTuple):
    """The ES step's state.

    Attributes:
      params: the incumbent parameters.
      opt_state: the Optax optimizer's state (advanced on accepted moves only).
      count: int32, steps taken (the temperature schedule's argument).
      num_accepted: int32, accepted moves.
      schedule_state: the temperature schedule's state (``()`` unless it is a StatefulSchedule).
    """

    params: Any
    opt_state: Any
    count: jax.Array
    num_accepted: jax.Array
    schedule_state: Any = ()


class ESInfo(NamedTuple):
    """Per-step diagnostics.

    Attributes:
      loss: the incumbent's loss after the step on the selection batch.
      accepted: bool, the candidate replaced the incumbent.
      delta: the decided difference L(candidate) - L(incumbent).
      stderr: its standard error (paired per-example differences).
      temperature: T at this step.
      acceptance_rate: cumulative accepted / steps.
      member_loss_mean: mean loss of the K members.
      grad_norm: global norm of the recombined gradient estimate.
      bad_temperature: bool, the temperature schedule returned a negative or
        non-finite value (no move at this step; the driver stops the run).
      decision_size_requested, bad_decision_size: the decision batch's size
        at this step as its schedule returned it, and whether it was NaN,
        negative or fractional (no move).
      num_reflected: int32, members reflected back into the box
        (``annealing.bounds``; 0 without bounds).
    """

    loss: jax.Array
    accepted: jax.Array
    delta: jax.Array
    stderr: jax.Array
    temperature: jax.Array
    acceptance_rate: jax.Array
    member_loss_mean: jax.Array
    grad_norm: jax.Array
    bad_temperature: jax.Array
    decision_size_requested: jax.Array
    bad_decision_size: jax.Array
    num_reflected: jax.Array

    LOGGED = ("temperature", "acceptance_rate")
    FAULTS = {"bad_temperature": "temperature", "bad_decision_size": "decision_size_requested"}


def check_shaping(shaping) -> None:
    """Refuse a fitness shaping that :func:`shape_fitness` does not know, naming ``shaping``."""
    if shaping not in SHAPINGS:
        raise ValueError(f"shaping must be one of {', '.join(SHAPINGS)}, got {shaping!r}")


def shape_fitness(losses, shaping: str = "centered_ranks"):
    """Fitness weights of K losses: centred ranks in [-0.5, 0.5] (the highest loss 0.5), z-scores,
    or the losses minus their mean (``"none"``: a linear, unbiased search-gradient estimate)."""
    losses = jnp.asarray(losses, jnp.float32)
    if shaping == "centered_ranks":
        ranks = jnp.argsort(jnp.argsort(losses)).astype(jnp.float32)
        return ranks / (losses.shape[0] - 1) - 0.5
    centred = losses - losses.mean()
    if shaping == "z_scores":
        return centred / jnp.maximum(losses.std(), 1e-12)
    return centred


def _member_loss(layout, loss_fn, key_loss, batch, noise):
    """The loss at theta + E for one member's noise E (kernels perturbed inside their layers)."""
    return lowrank.perturbed_loss(layout, loss_fn, key_loss, batch, noise, jnp.bool_(True))


def _bounded_member_loss(layout, box, loss_fn, key_loss, batch, noise):
    """``(loss, left)`` at theta + E reflected into the box (``annealing.bounds``), materialised;
    ``left`` whether theta + E had left it."""
    point, left = bounds_lib.reflect(lowrank.apply_noise(layout, noise), box)
    return loss_fn(point, key_loss, batch), left


class Estimate(NamedTuple):
    """One step's search-gradient estimate (:func:`estimate`)."""

    grad: Any  # g, a params pytree
    losses: jax.Array  # (K,) the members' losses
    layout: lowrank.Layout
    noises: lowrank.Noise  # the K members' noise, stacked
    num_reflected: jax.Array  # int32, members reflected back into the box (0 without bounds)


def search_gradient(layout, noises: lowrank.Noise, weights, scale):
    """g = 1 / (K s) * sum_k w_k eps_k from K stacked noises (leading axis K), as a params pytree.

    A Dense kernel's sum is formed from its factors, (1 / (K s)) * coef / s *
    A^T diag(w) B with coef = s_l / sqrt(r), never from K materialised
    matrices; other leaves sum their noise. ``scale`` is the base s; leaves
    scaled by their RMS (``scale_by_rms``) use their own std, so each leaf's
    estimate is that of its own unit-variance noise.
    """
    num = weights.shape[0]
    kernel_of, bias_of = layout.kernel_of, layout.bias_of
    out = []
    for i, p in enumerate(layout.leaves):
        std = layout.stds.get(i)
        if i in kernel_of:
            path = kernel_of[i]
            a_fac, b_fac = noises.factors[path]
            summed = jnp.einsum("k,kmr,knr->mn", weights, a_fac, b_fac) * layout.layers[path].coef
        elif i in bias_of:
            summed = jnp.einsum("k,k...->...", weights, noises.biases[bias_of[i]])
        elif i in noises.leaves:
            summed = jnp.einsum("k,k...->...", weights, noises.leaves[i])
        else:
            out.append(jnp.zeros_like(p))
            continue
        out.append((summed / (num * std * std)).astype(p.dtype))  # sum_k w_k E_k / (K s_l^2)
    return jax.tree_util.tree_unflatten(layout.treedef, out)


def estimate(loss_fn, params, key_noise, key_loss, batch, num_pairs: int, scale, *, noise: str = "low_rank",
             rank: int = 1, scale_by_rms: bool = False, rms_floor: float = 1e-3, shaping: str = "centered_ranks",
             mesh=None, axis_name: str | None = None, box=None) -> Estimate:
    """The search-gradient estimate of one step (:class:`Estimate`).

    ``num_pairs`` antithetic pairs drawn from ``key_noise`` (members k and
    k + num_pairs are each other's negatives), all evaluated with
    ``key_loss`` on ``batch``; ``g`` as in the module docstring. With a
    ``mesh``, the K members are sharded over ``mesh[axis_name]`` (each
    device evaluates its slice; the batch and parameters are replicated).
    With ``box`` (``bounds.for_params``) every member is materialised and
    reflected into the box before its loss is taken; ``g`` still weights the
    drawn noise (near a face the estimate is that of the reflected search
    distribution's losses against the unreflected noise).
    """
    base = jnp.asarray(scale, jnp.float32)
    layout = _layout(noise, loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor)
    pair_keys = jax.random.split(key_noise, num_pairs)
    draw_half = jax.vmap(functools.partial(lowrank.draw, layout))
    # K = 2 x num_pairs members' noise (the pairs and their negatives), checked abstractly: no draw here.
    lowrank.check_drawn_memory(draw_half, jax.ShapeDtypeStruct((2 * num_pairs, *pair_keys.shape[1:]),
                                                               pair_keys.dtype), "num_pairs")
    half = draw_half(pair_keys)
    noises = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), half, lowrank.negate(half))
    if box is None:
        member, chunk = functools.partial(_member_loss, layout, loss_fn, key_loss, batch), lowrank.member_chunk(layout)
    else:
        member = functools.partial(_bounded_member_loss, layout, box, loss_fn, key_loss, batch)
        chunk = proposals.full_rank_chunk(params)
    out = _member_losses(member, noises, mesh, axis_name, chunk)
    losses, left = out if box is not None else (out, jnp.zeros((num_pairs * 2,), bool))
    if mesh is not None:
        # Keep the assembly replicated: left to itself, XLA would shard the sum over k like the
        # members and add the partial sums across devices in another order than one device does.
        noises, losses = sharding.replicated((noises, losses), mesh)
    return Estimate(grad=search_gradient(layout, noises, shape_fitness(losses, shaping), base), losses=losses,
                    layout=layout, noises=noises, num_reflected=jnp.sum(left).astype(jnp.int32))


def _member_losses(member, noises, mesh, axis_name, chunk=None):
    """``member`` over the stacked ``noises``: a vmap (in chunks of ``chunk``), or sharded over the mesh axis."""
    evaluate = functools.partial(sharding.map_members, member, chunk=chunk)
    if mesh is None:
        return evaluate(noises)
    return sharding.shard_members(evaluate, noises, mesh=mesh, axis_name=axis_name)


def _layout(noise: str, loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor):
    """The noise's :class:`~savae_jax.annealing.lowrank.Layout`: Dense layers found (low_rank) or none (gaussian)."""
    if noise == "low_rank":
        return lowrank.build_layout(loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    stds = {i: lowrank.leaf_std(p, base, scale_by_rms, rms_floor)
            for i, p in enumerate(leaves) if lowrank.is_float(p)}
    return lowrank.Layout(leaves=leaves, treedef=treedef, layers={}, stds=stds, rank=rank)


def evolution_strategy(loss_fn, num_pairs: int, scale: float, *, noise: str = "low_rank", rank: int = 1,
                       scale_by_rms: bool = False, rms_floor: float = 1e-3, optimizer=None,
                       shaping: str = "centered_ranks", acceptance=None, temperature=0.0,
                       decision: decision_lib.DecisionBatch | None = None, mesh=None,
                       axis_name: str | None = None, bounds=None) -> Optimizer:
    """ES recombination of K = 2 * num_pairs antithetic evaluations into one accepted-or-rejected move.

    Args:
      loss_fn: ``loss_fn(params, key, batch) -> scalar``; with ``decision``
        or a rule that needs a standard error, ``loss_fn.per_example`` too
        (``make_loss`` provides it). Without ``per_example`` the candidate is
        decided on its plain loss difference.
      num_pairs: antithetic pairs per step, >= 1 (K = 2 * num_pairs members).
      scale: per-entry noise std s, > 0.
      noise: "low_rank" (Dense kernels perturbed by rank-r products inside
        their layers, the ``low_rank`` proposal's noise) or "gaussian"
        (full-rank on every floating leaf: models without Dense layers).
      rank: r of the low-rank noise, >= 1.
      scale_by_rms, rms_floor: per-leaf std scaling as in the proposals.
      optimizer: the Optax transformation that turns the gradient estimate
        into a move (default ``optax.adam(1e-3)``).
      shaping: "centered_ranks" (default), "z_scores" or "none".
      acceptance: the rule deciding the candidate (default ``metropolis()``;
        at T = 0 it accepts improvements only); noise-aware rules
        (``penalty``, ``confident``) work too.
      temperature: T, a scalar >= 0, a schedule ``count -> T`` or a
        StatefulSchedule (default 0), checked as ``simulated_annealing``
        checks it: a step whose T is negative or non-finite does not move
        and is flagged in ``info.bad_temperature``.
      decision: ``decision_batch(selection, size)`` to decide on other
        examples with fresh noise; None: on the selection batch.
      mesh, axis_name: shard the K member evaluations over this mesh axis
        (None: the mesh's only axis), as ``simulated_annealing(mesh=...)``
        does; the gradient assembly and the decision run replicated. None:
        one device.
      bounds: None (unbounded), or ``(lower, upper)`` (``annealing.bounds``):
        members that leave the box are reflected into it (materialised, so
        the low-rank noise costs a full copy of the parameters per member)
        and the move is projected onto it (a projected gradient step), so
        every point evaluated and returned lies inside.
    Returns:
      An :class:`~savae_jax.optimizer.Optimizer` (state :class:`ESState`,
      info :class:`ESInfo`), ``cost = 2 * num_pairs + decision.cost(decision)``.
    """
    validation.integer("num_pairs", num_pairs, 1)
    validation.positive("scale", scale)
    validation.integer("rank", rank, 1)
    if noise not in ("low_rank", "gaussian"):
        raise ValueError(f"noise must be 'low_rank' or 'gaussian', got {noise!r}")
    check_shaping(shaping)
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    axis_name = sharding.mesh_axis(mesh, axis_name)
    num_pairs = int(num_pairs)
    bounds = bounds_lib.check(bounds)

    def start(params):
        params = bounds_lib.start(params, bounds)
        return params, optimizer.init(params)

    def propose(loss_fn, params, opt_state, key_noise, key_loss, x):
        box = bounds_lib.for_params(bounds, params)
        est = estimate(loss_fn, params, key_noise, key_loss, x, num_pairs, scale, noise=noise, rank=rank,
                       scale_by_rms=scale_by_rms, rms_floor=rms_floor, shaping=shaping, mesh=mesh,
                       axis_name=axis_name, box=box)
        updates, opt_state = optimizer.update(est.grad, opt_state, params)
        candidate = optax.apply_updates(params, updates)
        if box is not None:
            candidate = bounds_lib.project(candidate, box)
        return Candidate(candidate, opt_state, est.losses, tree_norm(est.grad), est.num_reflected)

    return recombining_optimizer(loss_fn, 2 * num_pairs, start, propose, acceptance=acceptance,
                                 temperature=temperature, decision=decision, mesh=mesh, bounds=bounds)


class Candidate(NamedTuple):
    """What one step's members propose (:func:`recombining_optimizer`'s ``propose`` returns it)."""

    params: Any  # the candidate move
    opt_state: Any  # the optimizer state to keep if it is accepted
    losses: jax.Array  # (K,) the members' losses
    grad_norm: jax.Array  # global norm of the recombined estimate
    num_reflected: jax.Array  # int32, members reflected into the box (0 without bounds)


def recombining_optimizer(loss_fn, num_members: int, start, propose, *, acceptance=None, temperature=0.0,
                          decision: decision_lib.DecisionBatch | None = None, mesh=None, bounds=None) -> Optimizer:
    """The ES step around a recombination rule: K members -> ONE candidate, accepted or rejected.

    Shared by :func:`evolution_strategy` (float parameters, an Optax update of
    the search gradient) and ``annealing.lattice.lattice_es`` (integer codes,
    a rounded step). ``start(params) -> (params, opt_state)`` initialises;
    ``propose(loss_fn, params, opt_state, key_noise, key_loss, x) ->
    Candidate`` evaluates the K members on the selection batch ``x`` and
    recombines them. The candidate is decided against the incumbent by the
    acceptance rule on paired per-example differences (on ``decision``'s
    independent batch if given); the optimizer state advances only when the
    move is accepted. Temperature and decision-size faults stop the move, as
    in ``simulated_annealing``.
    """
    acceptance, per_example = _rule(acceptance, decision, loss_fn)
    schedule = as_stateful(temperature, "temperature")
    checked = checked_loss(loss_fn)

    def init_fn(params) -> ESState:
        params, opt_state = start(params)
        return ESState(params=params, opt_state=opt_state, count=jnp.zeros((), jnp.int32),
                       num_accepted=jnp.zeros((), jnp.int32), schedule_state=schedule.init())

    def step_fn(key, state: ESState, batch):
        key_loss, key_noise, key_accept, key_decide = jax.random.split(key, 4)
        parts = decision_lib.split(decision, batch, state.count)
        x, x_decide, mask = parts.x, parts.x_decide, parts.mask
        t = scalar_value(schedule, state.schedule_state, state.count, "temperature")
        bad_t = fault(t)
        cand = propose(checked, state.params, state.opt_state, key_noise, key_loss, x)
        delta, stderr, num_used, on_selection = _decide_inputs(
            checked, per_example, cand.params, state.params, key_loss, x, key_decide, x_decide, mask)
        accepted = (jnp.isfinite(delta) & ~bad_t & ~parts.bad
                    & _decide(acceptance, decision, key_accept, delta, t, stderr, num_used, x))
        params, opt_state = tree_where(accepted, (cand.params, cand.opt_state), (state.params, state.opt_state))
        count, num_accepted = state.count + 1, state.num_accepted + accepted.astype(jnp.int32)
        loss = jnp.where(accepted, on_selection[0], on_selection[1])
        event = ScheduleEvent(accepted=accepted, improved=accepted & (delta < 0))
        info = ESInfo(loss=loss, accepted=accepted, delta=delta, stderr=stderr, temperature=t,
                      acceptance_rate=num_accepted / count, member_loss_mean=cand.losses.mean(),
                      grad_norm=cand.grad_norm, bad_temperature=bad_t,
                      decision_size_requested=parts.requested, bad_decision_size=parts.bad,
                      num_reflected=cand.num_reflected)
        return ESState(params=params, opt_state=opt_state, count=count, num_accepted=num_accepted,
                       schedule_state=schedule.update(state.schedule_state, state.count, event)), info

    return Optimizer(init=init_fn, step=step_fn, cost=num_members + decision_lib.cost(decision), loss_fn=loss_fn,
                     mesh=mesh, examples_per_step=None if decision is None else decision.selection + decision.max_size,
                     batch_size=None if decision is None else decision.selection, bounds=bounds)


def _rule(acceptance, decision, loss_fn):
    """``(the acceptance rule, loss_fn.per_example or None)``, checked.

    A decision batch or a noise-aware rule needs ``per_example``. With a
    decision batch n <= max_size: a rule that can use the bound
    (``confident``'s exact t quantiles) gets it here.
    """
    acceptance = metropolis() if acceptance is None else acceptance
    check_rule(acceptance)
    per_example = getattr(loss_fn, "per_example", None)
    if (decision is not None or needs_stderr(acceptance)) and not callable(per_example):
        raise ValueError("loss_fn: the " + ("decision batch" if decision is not None else "acceptance rule")
                         + " needs per-example losses (loss_fn.per_example, as make_loss provides)")
    if decision is not None:
        acceptance = with_max_num(acceptance, decision.max_size)
    return acceptance, per_example


def _decide(acceptance, decision, key, delta, t, stderr, num, x):
    """The rule's decision; a noise-aware rule also gets ``stderr`` and n.

    Without a decision batch n is the selection batch ``x``'s size, the
    bound the rule gets (``acceptance.with_max_num``).
    """
    if not needs_stderr(acceptance):
        return acceptance(key, delta, t)
    rule = acceptance if decision is not None else with_max_num(acceptance, x.shape[0])
    return rule(key, delta, t, stderr=stderr, num=num)


def _decide_inputs(loss_fn, per_example, candidate, incumbent, key_loss, x, key_decide, x_decide, mask):
    """``(delta, stderr, n, (L_candidate, L_incumbent) on the selection batch)`` for the rule.

    Paired per-example differences when the loss gives them (on the decision
    batch if there is one, with fresh noise), else the plain difference with
    stderr NaN.
    """
    if per_example is None:
        on_selection = (loss_fn(candidate, key_loss, x), loss_fn(incumbent, key_loss, x))
        num = 1 if x is None else x.shape[0]  # a loss without data (batch None): one evaluation each
        return on_selection[0] - on_selection[1], jnp.float32(jnp.nan), jnp.int32(num), on_selection
    d_cand = decision_lib.per_example_losses(per_example, candidate, key_loss, x)
    d_inc = decision_lib.per_example_losses(per_example, incumbent, key_loss, x)
    on_selection = (d_cand.mean(), d_inc.mean())
    if x_decide is None:
        paired = decision_lib.paired_stats(d_cand - d_inc)
    else:
        paired = decision_lib.paired(per_example, candidate, incumbent, key_decide, x_decide, mask)
    return paired.delta, paired.stderr, paired.num, on_selection



