"""The simulated-annealing kernel: ``init`` + ``step`` over a NamedTuple state.

One step from the incumbent x at temperature T = schedule(count):

1. draw K proposals from the proposal kernel (full-rank noise is generated
   inside the vmap and evaluated ``prep.chunk_size`` proposals at a time, so
   memory stays O(P) in K; ``low_rank``'s small noise is drawn for all
   members at once, before the vmap, by ``prep.draw``);
2. evaluate all K proposals AND the incumbent in one ``jax.vmap`` on the same
   batch with the same loss key (common random numbers); non-finite proposal
   losses count as +inf;
3. take the best proposal j, dL = L_j - L_incumbent;
4. accept by the acceptance rule; keep the best-so-far params and loss;
5. count += 1; the state is ``done`` once T < t_min or after ``patience``
   steps without improvement of the best loss, and later steps return it
   unchanged.

Stopping lives in the state (``done``, ``steps_since_improvement``), not in
the driver: a halted chain's step is a no-op computed on device, so
``jax.vmap(step)`` runs chains that stop at different steps in one program,
and a checkpointed state resumes exactly where it stopped, with no driver
bookkeeping to save beside it.

With a ``mesh`` (a ``jax.sharding.Mesh``), step 2 is sharded over the mesh
axis with ``jax.shard_map``: each device evaluates its slice of the K + 1
members (a vmap, or chunks of one, on its slice); the per-member losses are
gathered and steps 3-5 run replicated. When K + 1 is not a multiple of the
number of devices the members are PADDED with copies of the incumbent's
member (``active=False``) that are dropped before the argmin, so they can
never win and are not counted in ``info``. Member j draws its noise from the
same ``keys[j]`` as without a mesh, so the sharded step computes the same
proposals; see docs/distributed.md for the equality achieved. Without a
mesh the step never shards, whatever mesh context it is traced in.

``step`` is pure and not jitted here: callers ``jax.jit`` it, and
``jax.vmap(step)(keys, states)`` runs independent chains.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from savae_jax import validation
from savae_jax.annealing import acceptance as acceptance_lib
from savae_jax.annealing import decision as decision_lib
from savae_jax.annealing import bounds as bounds_lib
from savae_jax.annealing import lowrank, sharding
from savae_jax.annealing import proposals as proposals_lib
from savae_jax.annealing.proposals import Proposal
from savae_jax.annealing.schedules import ScheduleEvent, StatefulSchedule, as_stateful, scalar_value
from savae_jax.annealing.schedules import fault as schedule_fault
from savae_jax.optimizer import Optimizer, checked_loss, tree_where

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
      delta_selection: dL of the best proposal on the selection batch (the
        batch the K proposals were ranked on; equal to ``delta`` unless the
        annealer decides on a decision batch).
      stderr_selection: standard error of ``delta_selection`` from the
        per-example paired differences (NaN when not measured: a plain rule
        without a decision batch).
      stderr: standard error of ``delta``, the difference the rule decided
        on (NaN when not measured).
      decision_size: examples the decision was made on (int32).
      bad_temperature: bool, the temperature schedule returned a negative or
        non-finite value at this step (the chain then halts: no move).
      bad_radius: bool, the same for the radius schedule.
      decision_size_requested: the decision size the decision batch's
        schedule returned at this step (NaN without a decision batch).
      bad_decision_size: bool, that value was NaN, negative or fractional
        (the chain then halts: no move).
      num_reflected: int32, proposals that left the box and were reflected
        back into it (``annealing.bounds``; 0 without bounds).
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
    delta_selection: jax.Array
    stderr_selection: jax.Array
    stderr: jax.Array
    decision_size: jax.Array
    bad_temperature: jax.Array
    bad_radius: jax.Array
    decision_size_requested: jax.Array
    bad_decision_size: jax.Array
    num_reflected: jax.Array

    # What a training log records of each step (its schema: keep the order).
    LOGGED = ("temperature", "radius", "acceptance_rate")
    # Flags that stop a training loop, each with the field holding the offending value
    # (the driver notes them on the device and reads them at its rows; see driver._faults).
    FAULTS = {"bad_temperature": "temperature", "bad_radius": "radius",
              "bad_decision_size": "decision_size_requested"}


def _check_params_finite(params) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if validation.is_traced(leaf):
            continue  # under jit/vmap: cannot be checked eagerly
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            raise ValueError(
                f"params must be finite; leaf {jax.tree_util.keystr(path)} has non-finite values"
            )


def check_arguments(num_proposals, proposal, acceptance, t_min, patience) -> None:
    """Check ``simulated_annealing``'s scalar arguments (ValueError naming the argument)."""
    validation.integer("num_proposals", num_proposals, 1)
    validation.instance("proposal", proposal, Proposal, "gaussian(0.1)")
    acceptance_lib.check_rule(acceptance)
    validation.finite_positive("t_min", t_min, optional=True)
    validation.integer("patience", patience, 1, optional=True)


def init(params, proposal: Proposal, temperature, radius=None, bounds=None) -> AnnealState:
    """The initial AnnealState for ``params`` (ValueError if a leaf is non-finite, or outside ``bounds``).

    Args:
      params: the starting parameter pytree.
      proposal: the proposal kernel (its ``init`` gives ``proposal_state``).
      temperature: scalar, plain schedule or StatefulSchedule.
      radius: scalar, plain schedule, StatefulSchedule or None (1.0).
      bounds: None, or ``(lower, upper)`` (``annealing.bounds``): concrete
        parameters outside the box are refused; traced ones (an init under
        ``jax.vmap``) are projected onto it.
    """
    _check_params_finite(params)
    params = bounds_lib.start(params, bounds_lib.check(bounds))
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
        schedule_state=ScheduleState(temperature=temp.init(), radius=rad.init()),
        proposal_state=proposal.init(params),
    )


def _evaluate(prep, keys, active):
    """Losses of the members ``keys``/``active``: one vmap, or chunks of ``prep.chunk_size``.

    A kernel with ``prep.draw`` has every member's noise drawn here, once,
    and its ``loss`` takes a member's noise instead of its key.
    """
    draw = getattr(prep, "draw", None)
    if draw is not None:
        lowrank.check_drawn_memory(draw, keys, "num_proposals")
    members = keys if draw is None else draw(keys)
    return sharding.map_members(prep.loss, members, active, chunk=getattr(prep, "chunk_size", None))


class _Config(NamedTuple):
    """What ``build_kernel`` fixes for every step (validated, schedules lifted)."""

    loss_fn: Callable
    num_proposals: int
    proposal: Proposal
    temperature: StatefulSchedule
    radius: StatefulSchedule
    acceptance: Callable
    t_min: float | None
    patience: int | None
    mesh: Any  # None: never sharded
    axis_name: str | None
    decision: decision_lib.DecisionBatch | None = None  # None: decide on the selection batch
    per_example: Callable | None = None  # the loss per example, when a decision needs it
    bounds: bounds_lib.Bounds | None = None  # None: unbounded

    @property
    def noise_aware(self) -> bool:
        """Whether steps measure paired per-example differences (a decision batch or a noise-aware rule)."""
        return self.decision is not None or acceptance_lib.needs_stderr(self.acceptance)


class _Selection(NamedTuple):
    """The best of a step's K proposals against the incumbent (non-finite losses as +inf)."""

    index: jax.Array  # j, the best proposal
    loss: jax.Array  # its loss (+inf if no proposal was finite)
    incumbent_loss: jax.Array
    delta: jax.Array  # loss - incumbent_loss
    finite: jax.Array  # (K,) bool, which proposal losses are finite
    raw: jax.Array  # (K,) the proposal losses as evaluated
    num_reflected: jax.Array  # int32, proposals moved back into the box (0 without bounds)


def _schedule_values(cfg: _Config, state: AnnealState):
    """This step's temperature T, radius r, and whether the chain is halted (done, T < t_min, or a bad schedule).

    A schedule must return a scalar (checked when traced); a negative or
    non-finite value halts the chain (a negative T would accept every worse
    move, a NaN one none) and is flagged in ``info`` (:func:`schedule_faults`).
    """
    t = scalar_value(cfg.temperature, state.schedule_state.temperature, state.count, "temperature")
    r = scalar_value(cfg.radius, state.schedule_state.radius, state.count, "radius")
    bad_t, bad_r = schedule_faults(t, r)
    halt = state.done | bad_t | bad_r
    if cfg.t_min is not None:
        halt = halt | (t < cfg.t_min)
    return t, r, halt


def schedule_faults(t, r):
    """Whether the temperature ``t`` and the radius ``r`` are unusable: negative or non-finite (two bools)."""
    return schedule_fault(t), schedule_fault(r)


def _member_losses(cfg: _Config, prep, keys):
    """Losses of the K proposals and, last, the incumbent (its noise masked out by ``active``); with
    bounds, ``(losses, left)``, ``left`` which members were reflected back into the box (:func:`_bounded`)."""
    active = jnp.arange(cfg.num_proposals + 1) < cfg.num_proposals
    if cfg.mesh is None:
        return _evaluate(prep, keys, active)
    # Padding members repeat the last one, the incumbent's (inactive): they never win.
    return sharding.shard_members(lambda k, a: _evaluate(prep, k, a), keys, active, mesh=cfg.mesh,
                                  axis_name=cfg.axis_name)


def _bounded(cfg: _Config, prep, params, key_loss, batch):
    """``prep`` with every member reflected into ``cfg.bounds`` before its loss is evaluated.

    A member's loss becomes ``(loss, left)``: ``left`` whether it had left the
    box. Members are materialised (``draw`` dropped, full-rank chunks), since
    reflection needs the perturbed parameters themselves.
    """
    box = bounds_lib.for_params(cfg.bounds, params)
    loss_fn = checked_loss(cfg.loss_fn)

    def member(key, active):
        moved, left = bounds_lib.reflect(prep.materialize(key), box)
        return loss_fn(tree_where(active, moved, params), key_loss, batch), left & active

    return prep._replace(loss=member, materialize=lambda key: bounds_lib.reflect(prep.materialize(key), box)[0],
                         chunk_size=proposals_lib.full_rank_chunk(params), draw=None)


def _prepare(cfg: _Config, state: AnnealState, key_loss, batch, t, r):
    """The proposal kernel prepared for this step (members kept to the box with bounds)."""
    prep = cfg.proposal.prepare(cfg.loss_fn, state.params, key_loss, batch, t, r, state.proposal_state)
    return prep if cfg.bounds is None else _bounded(cfg, prep, state.params, key_loss, batch)


def _select(members, num_proposals: int) -> _Selection:
    """The best proposal of the members' losses (K proposals, then the incumbent); NaN and inf never win.

    ``members``: the losses, or ``(losses, left)`` with bounds (:func:`_member_losses`).
    """
    losses, left = members if isinstance(members, tuple) else (members, None)
    num_reflected = jnp.zeros((), jnp.int32) if left is None else jnp.sum(left).astype(jnp.int32)
    incumbent_loss = losses[num_proposals]
    raw = losses[:num_proposals]
    finite = jnp.isfinite(raw)
    prop_losses = jnp.where(finite, raw, jnp.inf)
    j = jnp.argmin(prop_losses)
    best = prop_losses[j]
    return _Selection(index=j, loss=best, incumbent_loss=incumbent_loss, delta=best - incumbent_loss,
                      finite=finite, raw=raw, num_reflected=num_reflected)


def _track_best(state: AnnealState, params, loss):
    """Best-so-far params and loss after a step, whether they improved, and the patience counter."""
    improved = loss < state.best_loss
    best_params = tree_map(lambda n, o: jnp.where(improved, n, o), params, state.best_params)
    best_loss = jnp.where(improved, loss, state.best_loss)
    stale = jnp.where(improved, 0, state.steps_since_improvement + 1).astype(jnp.int32)
    return best_params, best_loss, improved, stale


def _next_schedules(cfg: _Config, state: AnnealState, event: ScheduleEvent) -> ScheduleState:
    """The schedules' states after a step with outcome ``event``."""
    sched = state.schedule_state
    return ScheduleState(
        temperature=cfg.temperature.update(sched.temperature, state.count, event),
        radius=cfg.radius.update(sched.radius, state.count, event),
    )


def _stops(cfg: _Config, stale, sched: ScheduleState, new_count):
    """Whether the chain is done after a step: patience exhausted, or the NEXT T below t_min."""
    done = jnp.zeros((), bool)
    if cfg.patience is not None:
        done = done | (stale >= cfg.patience)
    if cfg.t_min is not None:
        done = done | (cfg.temperature.value(sched.temperature, new_count) < cfg.t_min)
    return done


def _advance(cfg: _Config, state: AnnealState, prep, params, sel: _Selection, accepted):
    """The state after a step whose new incumbent is ``params`` (the winner if ``accepted``)."""
    loss = jnp.where(accepted, sel.loss, sel.incumbent_loss)
    best_params, best_loss, improved, stale = _track_best(state, params, loss)
    sched = _next_schedules(cfg, state, ScheduleEvent(accepted=accepted, improved=improved))
    new_count = state.count + 1
    return AnnealState(
        params=params,
        count=new_count.astype(jnp.int32),
        loss=loss.astype(state.loss.dtype),
        best_params=best_params,
        best_loss=best_loss.astype(state.best_loss.dtype),
        num_accepted=state.num_accepted + accepted.astype(jnp.int32),
        steps_since_improvement=stale,
        done=_stops(cfg, stale, sched, new_count),
        schedule_state=sched,
        proposal_state=prep.proposal_state,
    )


def _freeze(halt, state: AnnealState, stepped: AnnealState) -> AnnealState:
    """``state`` itself (marked done) when halted, else ``stepped``: a halted chain never moves."""
    frozen = state._replace(done=jnp.ones((), bool))
    return tree_map(lambda f, s: jnp.where(halt, f, s), frozen, stepped)


def _info(cfg: _Config, sel: _Selection, accepted, t, r, new_state: AnnealState,
          on_selection=None, decided=None, parts: decision_lib.Split | None = None) -> AnnealInfo:
    """The step's :class:`AnnealInfo` (``on_selection``/``decided``: the paired comparisons made;
    ``parts``: the batch's split, for the decision size requested)."""
    parts = parts or decision_lib.split(None, None, None)
    nan = jnp.full((), jnp.nan, jnp.float32)
    on_selection = on_selection or decision_lib.Paired(delta=sel.delta, stderr=nan, num=jnp.zeros((), jnp.int32))
    decided = decided or on_selection
    num_finite = jnp.sum(sel.finite)
    mean = jnp.where(
        num_finite > 0,
        jnp.sum(jnp.where(sel.finite, sel.raw, 0.0)) / jnp.maximum(num_finite, 1),
        jnp.inf,
    )
    return AnnealInfo(
        accepted=accepted,
        delta=decided.delta,
        temperature=t,
        radius=r,
        loss=jnp.where(accepted, sel.loss, sel.incumbent_loss),
        proposal_loss_min=sel.loss,
        proposal_loss_mean=mean,
        num_nonfinite=(cfg.num_proposals - num_finite).astype(jnp.int32),
        acceptance_rate=new_state.num_accepted / jnp.maximum(new_state.count, 1),
        error=~jnp.isfinite(sel.incumbent_loss),
        delta_selection=on_selection.delta,
        stderr_selection=on_selection.stderr,
        stderr=decided.stderr,
        decision_size=decided.num,
        bad_temperature=schedule_faults(t, r)[0],
        bad_radius=schedule_faults(t, r)[1],
        decision_size_requested=parts.requested,
        bad_decision_size=parts.bad,
        num_reflected=sel.num_reflected,
    )


def _step(cfg: _Config, key, state: AnnealState, batch):
    """One annealing step (the module docstring's 1-5)."""
    key_prop, key_loss, key_accept = jax.random.split(key, 3)
    t, r, halt = _schedule_values(cfg, state)
    prep = _prepare(cfg, state, key_loss, batch, t, r)
    # K proposal keys + one for the incumbent, whose noise is masked out.
    keys = jax.random.split(key_prop, cfg.num_proposals + 1)
    sel = _select(_member_losses(cfg, prep, keys), cfg.num_proposals)
    accepted = cfg.acceptance(key_accept, sel.delta, t) & jnp.isfinite(sel.loss) & ~halt
    params = jax.lax.cond(accepted, prep.materialize, lambda k: state.params, keys[sel.index])
    new_state = _freeze(halt, state, _advance(cfg, state, prep, params, sel, accepted))
    return new_state, _info(cfg, sel, accepted, t, r, new_state)


def _noise_aware_step(cfg: _Config, key, state: AnnealState, batch):
    """A step that decides on paired per-example differences (see ``annealing.decision``).

    Selection as in :func:`_step`, on the selection batch; then the winner
    and the incumbent are compared per example on the selection batch (for
    ``info``) and on the decision batch with fresh noise (``key_decide``),
    and the rule decides on the latter (on the former without a decision batch).
    """
    key_prop, key_loss, key_accept, key_decide = jax.random.split(key, 4)
    parts = decision_lib.split(cfg.decision, batch, state.count)
    x, x_decide, mask = parts.x, parts.x_decide, parts.mask
    t, r, halt = _schedule_values(cfg, state)
    halt = halt | parts.bad
    prep = _prepare(cfg, state, key_loss, x, t, r)
    keys = jax.random.split(key_prop, cfg.num_proposals + 1)
    sel = _select(_member_losses(cfg, prep, keys), cfg.num_proposals)
    winner = prep.materialize(keys[sel.index])
    on_selection = decision_lib.paired(cfg.per_example, winner, state.params, key_loss, x)
    decided = on_selection if x_decide is None else decision_lib.paired(
        cfg.per_example, winner, state.params, key_decide, x_decide, mask)
    accepted = (_decide(cfg, key_accept, decided, t, x) & jnp.isfinite(sel.loss)
                & jnp.isfinite(decided.delta) & ~halt)
    params = tree_where(accepted, winner, state.params)
    new_state = _freeze(halt, state, _advance(cfg, state, prep, params, sel, accepted))
    return new_state, _info(cfg, sel, accepted, t, r, new_state, on_selection, decided, parts)


def _decide(cfg: _Config, key, decided: decision_lib.Paired, t, x):
    """The rule's decision on the paired comparison ``decided``.

    A noise-aware rule also gets the standard error and n; deciding on the
    selection batch ``x``, n is its size, a bound the rule may use
    (``acceptance.with_max_num``: confident's exact t quantiles); with a
    decision batch the rule was bound to its ``max_size`` in ``build_kernel``.
    """
    if not acceptance_lib.needs_stderr(cfg.acceptance):
        return cfg.acceptance(key, decided.delta, t)
    rule = cfg.acceptance if cfg.decision is not None else acceptance_lib.with_max_num(cfg.acceptance, x.shape[0])
    return rule(key, decided.delta, t, stderr=decided.stderr, num=decided.num)


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
    decision: decision_lib.DecisionBatch | None = None,
    bounds=None,
):
    """The pure ``step(key, state, batch) -> (state, info)`` (arguments as simulated_annealing)."""
    validation.is_callable("loss_fn", loss_fn)
    check_arguments(num_proposals, proposal, acceptance, t_min, patience)
    axis_name = sharding.mesh_axis(mesh, axis_name)
    if decision is not None:
        validation.instance("decision", decision, decision_lib.DecisionBatch, "decision_batch(128, 512)")
        # n <= max_size: a rule that can use the bound (confident's exact t quantiles) gets it now.
        acceptance = acceptance_lib.with_max_num(acceptance, decision.max_size)
    cfg = _Config(
        loss_fn=loss_fn, num_proposals=int(num_proposals), proposal=proposal,
        temperature=as_stateful(temperature, "temperature"),
        radius=as_stateful(1.0 if radius is None else radius, "radius"), acceptance=acceptance,
        t_min=t_min, patience=patience, mesh=mesh, axis_name=axis_name, decision=decision,
        per_example=getattr(loss_fn, "per_example", None), bounds=bounds_lib.check(bounds),
    )
    if cfg.noise_aware and not callable(cfg.per_example):
        what = (f"the acceptance rule {getattr(acceptance, '__qualname__', acceptance)!r}"
                if acceptance_lib.needs_stderr(acceptance) else "decision")
        raise ValueError(
            f"{what} needs per-example losses (a standard error of the paired differences): "
            "loss_fn must carry .per_example(params, key, x) -> (batch,), as make_loss(model) does "
            "(not with free_bits); use metropolis, threshold or greedy without a decision batch otherwise")
    step_fn = _noise_aware_step if cfg.noise_aware else _step

    def step(key, state: AnnealState, batch):
        return step_fn(cfg, key, state, batch)

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
    decision: decision_lib.DecisionBatch | None = None,
    bounds=None,
) -> Optimizer:
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
        loss; >= 1 or None. Stopping is kept in the state, so vmapped chains
        stop independently and a resumed run stops where it would have (see
        the module docstring).
      mesh: a ``jax.sharding.Mesh`` (e.g. ``savae_jax.distributed.make_mesh()``)
        to shard the K + 1 loss evaluations of a step over, or None: the step
        never shards itself: a step built without ``mesh=`` runs unsharded
        even when called under a mesh context (``jax.set_mesh``, or
        ``jax.sharding.use_mesh`` in older JAX), since a context read at
        trace time would not be part of ``jax.jit``'s cache key. K + 1 need
        not divide the device count: the members are padded with inactive
        copies of the incumbent, which never win.
      axis_name: the mesh axis to shard along; None: the mesh's only axis.
      decision: None (default): the rule decides on the batch the proposals
        were ranked on (biased low: see ``annealing.decision``); or
        ``decision_batch(selection, size)``: it decides on the paired
        per-example differences of the winner and the incumbent on ``size``
        other examples with fresh noise. Needs ``loss_fn.per_example``, as
        does a noise-aware rule (``penalty``, ``significant``).
      bounds: None (unbounded), or ``(lower, upper)``, numbers or pytrees of
        the parameters' structure (``annealing.bounds``): proposals that
        leave the box are reflected back into it, so every point evaluated
        and returned lies inside; ``info.num_reflected`` counts them.
    Returns:
      ``savae_jax.optimizer.Optimizer(init, step, cost, loss_fn, mesh)``:
      ``init(params) -> AnnealState``; ``step(key, state, batch) ->
      (AnnealState, AnnealInfo)``, pure, to be jitted by the caller (when the
      chain is halted, it returns the state unchanged, with ``done`` set, and
      ``info.accepted`` False); ``cost = K + 1 + proposal.cost`` loss
      evaluations per step, plus ``decision.cost(decision)`` when the step
      measures paired differences; with a decision batch the step takes
      batches of ``selection + max_size`` examples (``examples_per_step``).
    """
    bounds = bounds_lib.check(bounds)
    step = build_kernel(loss_fn, num_proposals, proposal, temperature, acceptance, radius, t_min, patience,
                        mesh, axis_name, decision, bounds)

    def init_fn(params) -> AnnealState:
        return init(params, proposal, temperature, radius, bounds)

    cost = int(num_proposals) + 1 + int(proposal.cost)
    if decision is not None or acceptance_lib.needs_stderr(acceptance):
        cost += decision_lib.cost(decision)
    examples = None if decision is None else decision.selection + decision.max_size
    return Optimizer(init=init_fn, step=step, cost=cost, loss_fn=loss_fn, mesh=mesh, examples_per_step=examples,
                     batch_size=None if decision is None else decision.selection, bounds=bounds)
