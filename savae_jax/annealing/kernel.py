"""The simulated-annealing kernel: ``init`` + ``step`` over a NamedTuple state.

One step from the incumbent x at temperature T = schedule(count):

1. draw K proposals from the proposal kernel (noise generated inside the vmap;
   full-rank kernels are evaluated ``prep.chunk_size`` proposals at a time,
   so memory stays O(P) in K);
2. evaluate all K proposals AND the incumbent in one ``jax.vmap`` on the same
   batch with the same loss key (common random numbers); non-finite proposal
   losses count as +inf;
3. take the best proposal j, dL = L_j - L_incumbent;
4. accept by the acceptance rule; keep the best-so-far params and loss;
5. count += 1; the state is ``done`` once T < t_min or after ``patience``
   steps without improvement of the best loss, and later steps return it
   unchanged.

With a ``mesh`` (a ``jax.sharding.Mesh``), step 2 is sharded over the mesh
axis with ``jax.shard_map``: each device evaluates its slice of the K + 1
members (a vmap, or chunks of one, on its slice); the per-member losses are
gathered and steps 3-5 run replicated. When K + 1 is not a multiple of the
number of devices the members are PADDED with copies of the incumbent's
member (``active=False``) that are dropped before the argmin, so they can
never win and are not counted in ``info``. Member j draws its noise from the
same ``keys[j]`` as without a mesh, so the sharded step computes the same
proposals; see docs/distributed.md for the equality achieved.

``step`` is pure and not jitted here: callers ``jax.jit`` it, and
``jax.vmap(step)(keys, states)`` runs independent chains.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from savae_jax import distributed
from savae_jax.annealing.proposals import Proposal
from savae_jax.annealing.schedules import ScheduleEvent, as_stateful

tree_map = jax.tree_util.tree_map


class ScheduleState(NamedTuple):
    """States of the temperature and radius schedules (``()`` for plain ones)."""

    temperature: Any
    radius: Any


class AnnealState(NamedTuple):
    """The annealer's state; no PRNG key (the key is an argument of ``step``).

    Attributes:
      params: the incumbent parameters.
      count: int32, steps taken (schedules are evaluated at ``count``).
      loss: the incumbent's loss at the last step, on that step's batch
        (+inf before the first step).
      best_params: parameters with the lowest ``loss`` seen so far.
      best_loss: that loss (+inf before the first step).
      num_accepted: int32, accepted moves so far.
      steps_since_improvement: int32, steps since ``best_loss`` last decreased.
      done: bool, T < t_min or patience exhausted; further steps are no-ops.
      schedule_state: :class:`ScheduleState` of the temperature/radius schedules.
      proposal_state: the proposal kernel's state (e.g. an optax state for
        ``langevin(optimizer=...)``); ``()`` when unused.
    """

    params: Any
    count: jax.Array
    loss: jax.Array
    best_params: Any
    best_loss: jax.Array
    num_accepted: jax.Array
    steps_since_improvement: jax.Array
    done: jax.Array
    schedule_state: ScheduleState
    proposal_state: Any


class AnnealInfo(NamedTuple):
    """Per-step diagnostics.

    Attributes:
      accepted: bool, the best proposal replaced the incumbent.
      delta: L(best proposal) - L(incumbent) on this batch (+inf if no
        proposal was finite).
      temperature: T used at this step.
      radius: radius schedule value used at this step.
      loss: the incumbent's loss AFTER the step, on this batch (the train loss
        a training loop logs).
      proposal_loss_min: lowest proposal loss (non-finite counted as +inf).
      proposal_loss_mean: mean of the finite proposal losses (+inf if none).
      num_nonfinite: int32, proposals with a non-finite loss.
      acceptance_rate: cumulative num_accepted / count after the step.
      error: bool, the incumbent's loss on this batch is non-finite.
    """

    accepted: jax.Array
    delta: jax.Array
    temperature: jax.Array
    radius: jax.Array
    loss: jax.Array
    proposal_loss_min: jax.Array
    proposal_loss_mean: jax.Array
    num_nonfinite: jax.Array
    acceptance_rate: jax.Array
    error: jax.Array


class SimulatedAnnealing(NamedTuple):
    """The ``(init, step)`` pair: ``state = init(params)``; ``state, info = step(key, state, batch)``."""

    init: Callable[[Any], AnnealState]
    step: Callable[[jax.Array, AnnealState, Any], tuple[AnnealState, AnnealInfo]]


def _check_params_finite(params) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.core.Tracer):
            continue  # under jit/vmap: cannot be checked eagerly
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            raise ValueError(
                f"params must be finite; leaf {jax.tree_util.keystr(path)} has non-finite values"
            )


def _validate(num_proposals, proposal, acceptance, t_min, patience):
    if isinstance(num_proposals, bool) or not isinstance(num_proposals, numbers.Integral) or num_proposals < 1:
        raise ValueError(f"num_proposals must be an integer >= 1, got {num_proposals!r}")
    if not isinstance(proposal, Proposal):
        raise ValueError(f"proposal must be a Proposal (e.g. gaussian(0.1)), got {proposal!r}")
    if not callable(acceptance):
        raise ValueError(f"acceptance must be callable (e.g. metropolis()), got {acceptance!r}")
    if t_min is not None and not (isinstance(t_min, numbers.Real) and math.isfinite(t_min) and t_min > 0):
        raise ValueError(f"t_min must be a finite number > 0 or None, got {t_min!r}")
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1
    ):
        raise ValueError(f"patience must be an integer >= 1 or None, got {patience!r}")


def init(params, proposal: Proposal, temperature, radius=None) -> AnnealState:
    """The initial AnnealState for ``params`` (ValueError if a leaf is non-finite).

    Args:
      params: the starting parameter pytree.
      proposal: the proposal kernel (its ``init`` gives ``proposal_state``).
      temperature: scalar, plain schedule or StatefulSchedule.
      radius: scalar, plain schedule, StatefulSchedule or None (1.0).
    """
    _check_params_finite(params)
    temp = as_stateful(temperature, "temperature")
    rad = as_stateful(1.0 if radius is None else radius, "radius")
    inf = jnp.full((), jnp.inf, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return AnnealState(
        params=params,
        count=zero,
        loss=inf,
        best_params=params,
        best_loss=inf,
        num_accepted=zero,
        steps_since_improvement=zero,
        done=jnp.zeros((), bool),
        schedule_state=ScheduleState(temp.init(), rad.init()),
        proposal_state=proposal.init(params),
    )


def _evaluate(prep, keys, active):
    """Losses of the members ``keys``/``active``: one vmap, or chunks of ``prep.chunk_size``."""
    chunk = getattr(prep, "chunk_size", None)
    if chunk is None or chunk >= keys.shape[0]:
        return jax.vmap(prep.loss)(keys, active)
    # A vmap over all K would hold K perturbed copies of the params.
    return jax.lax.map(lambda ka: prep.loss(*ka), (keys, active), batch_size=int(chunk))


def _evaluate_sharded(prep, keys, active, mesh, axis_name):
    """``_evaluate`` with the members sharded over ``mesh[axis_name]``, padded to a multiple of it."""
    members = keys.shape[0]
    size = mesh.shape[axis_name]
    pad = -members % size
    if pad:
        # Dummy members: copies of the incumbent's member (inactive), dropped below.
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad, axis=0)])
        active = jnp.concatenate([active, jnp.zeros((pad,), bool)])
    spec = PartitionSpec(axis_name)
    losses = jax.shard_map(
        lambda k, a: _evaluate(prep, k, a), mesh=mesh, in_specs=(spec, spec), out_specs=spec,
        check_vma=False,
    )(keys, active)
    return losses[:members]


def build_kernel(
    loss_fn,
    num_proposals: int,
    proposal: Proposal,
    temperature,
    acceptance,
    radius=None,
    t_min: float | None = None,
    patience: int | None = None,
    mesh=None,
    axis_name: str | None = None,
):
    """The pure ``step(key, state, batch) -> (state, info)`` (see simulated_annealing)."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
    _validate(num_proposals, proposal, acceptance, t_min, patience)
    if mesh is not None:
        axis_name = distributed.mesh_axis(mesh, axis_name)
    elif axis_name is not None:
        raise ValueError(f"axis_name {axis_name!r} given without a mesh")
    num_proposals = int(num_proposals)
    temp = as_stateful(temperature, "temperature")
    rad = as_stateful(1.0 if radius is None else radius, "radius")

    def step(key, state: AnnealState, batch):
        key_prop, key_loss, key_accept = jax.random.split(key, 3)
        count = state.count
        t = temp.value(state.schedule_state.temperature, count)
        r = rad.value(state.schedule_state.radius, count)
        halt = state.done
        if t_min is not None:
            halt = halt | (t < t_min)

        prep = proposal.prepare(loss_fn, state.params, key_loss, batch, t, r, state.proposal_state)
        # K proposal keys + one for the incumbent (its noise is masked out).
        keys = jax.random.split(key_prop, num_proposals + 1)
        active = jnp.arange(num_proposals + 1) < num_proposals
        # The mesh is read when the step is traced: an explicit one, else use_mesh's.
        sharding = (mesh, axis_name) if mesh is not None else distributed.current_mesh()
        if sharding is None:
            losses = _evaluate(prep, keys, active)
        else:
            losses = _evaluate_sharded(prep, keys, active, *sharding)

        incumbent_loss = losses[num_proposals]
        raw = losses[:num_proposals]
        finite = jnp.isfinite(raw)
        prop_losses = jnp.where(finite, raw, jnp.inf)
        num_finite = jnp.sum(finite)
        j = jnp.argmin(prop_losses)
        best_prop = prop_losses[j]
        delta = best_prop - incumbent_loss
        accepted = acceptance(key_accept, delta, t) & jnp.isfinite(best_prop) & ~halt

        params = jax.lax.cond(accepted, prep.materialize, lambda k: state.params, keys[j])
        loss = jnp.where(accepted, best_prop, incumbent_loss)
        improved = loss < state.best_loss
        best_params = tree_map(lambda n, o: jnp.where(improved, n, o), params, state.best_params)
        best_loss = jnp.where(improved, loss, state.best_loss)
        stale = jnp.where(improved, 0, state.steps_since_improvement + 1).astype(jnp.int32)
        event = ScheduleEvent(accepted, improved)
        sched = ScheduleState(
            temp.update(state.schedule_state.temperature, count, event),
            rad.update(state.schedule_state.radius, count, event),
        )
        new_count = count + 1
        done = jnp.zeros((), bool)
        if patience is not None:
            done = done | (stale >= patience)
        if t_min is not None:
            done = done | (temp.value(sched.temperature, new_count) < t_min)
        num_accepted = state.num_accepted + accepted.astype(jnp.int32)

        stepped = AnnealState(
            params=params,
            count=new_count.astype(jnp.int32),
            loss=loss.astype(state.loss.dtype),
            best_params=best_params,
            best_loss=best_loss.astype(state.best_loss.dtype),
            num_accepted=num_accepted,
            steps_since_improvement=stale,
            done=done,
            schedule_state=sched,
            proposal_state=prep.proposal_state,
        )
        frozen = state._replace(done=jnp.ones((), bool))
        new_state = tree_map(lambda f, s: jnp.where(halt, f, s), frozen, stepped)

        mean = jnp.where(
            num_finite > 0,
            jnp.sum(jnp.where(finite, raw, 0.0)) / jnp.maximum(num_finite, 1),
            jnp.inf,
        )
        info = AnnealInfo(
            accepted=accepted,
            delta=delta,
            temperature=t,
            radius=r,
            loss=loss,
            proposal_loss_min=best_prop,
            proposal_loss_mean=mean,
            num_nonfinite=(num_proposals - num_finite).astype(jnp.int32),
            acceptance_rate=new_state.num_accepted / jnp.maximum(new_state.count, 1),
            error=~jnp.isfinite(incumbent_loss),
        )
        return new_state, info

    return step


def simulated_annealing(
    loss_fn,
    num_proposals: int,
    proposal: Proposal,
    temperature,
    acceptance,
    radius=None,
    t_min: float | None = None,
    patience: int | None = None,
    mesh=None,
    axis_name: str | None = None,
) -> SimulatedAnnealing:
    """Build simulated annealing for ``loss_fn(params, key, batch) -> scalar``.

    Args:
      loss_fn: the objective; ``key`` is the loss's own randomness
        (reparameterisation noise), shared by all proposals of a step.
      num_proposals: K, proposals per step, >= 1.
      proposal: a :class:`Proposal` (gaussian, cauchy, low_rank, langevin).
      temperature: scalar, ``count -> T`` schedule (any optax schedule) or a
        StatefulSchedule (adaptive, reheat).
      acceptance: ``(key, delta, temperature) -> bool`` (metropolis, threshold,
        greedy).
      radius: multiplier of the proposal scale: scalar, schedule or
        StatefulSchedule; None means 1.0.
      t_min: stop (``done``) once T < t_min; > 0 or None.
      patience: stop after this many steps without improvement of the best
        loss; >= 1 or None.
      mesh: a ``jax.sharding.Mesh`` (e.g. ``savae_jax.distributed.make_mesh()``)
        to shard the K + 1 loss evaluations of a step over, or None: one
        device (or the mesh of an enclosing ``distributed.use_mesh`` block).
        K + 1 need not divide the device count: the members are padded with
        inactive copies of the incumbent, which never win.
      axis_name: the mesh axis to shard along; None: the mesh's only axis.
    Returns:
      SimulatedAnnealing(init, step): ``init(params) -> AnnealState``;
      ``step(key, state, batch) -> (AnnealState, AnnealInfo)``, pure, to be
      jitted by the caller. When the incumbent is halted, the step returns the
      state unchanged (with ``done`` set) and ``info.accepted`` False.
    """
    step = build_kernel(loss_fn, num_proposals, proposal, temperature, acceptance, radius, t_min, patience,
                        mesh, axis_name)

    def init_fn(params) -> AnnealState:
        return init(params, proposal, temperature, radius)

    return SimulatedAnnealing(init_fn, step)
