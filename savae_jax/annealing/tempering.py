"""Replica exchange (parallel tempering): R annealers on a temperature ladder, one vmap.

    ladder = geometric_ladder(t0=0.05, ratio=2.0, num_replicas=4)        # T_k = t0 * ratio**k
    pt = replica_exchange(lambda t: simulated_annealing(loss_fn, 16, gaussian(0.01), t, metropolis()),
                          ladder, loss_fn, swap_every=1)
    state = pt.init(params)
    state, info = jax.jit(pt.step)(key, state, batch)
    state.params                                                      # the coldest replica's

A step runs every replica's own step on the same batch, each with its own
key, as one ``jax.vmap`` over the ladder (``build(T_k)`` is traced once with
T_k a vmapped scalar, so the replicas share one compiled step). Every
``swap_every`` steps, neighbouring replicas (pairs (0, 1), (2, 3), ... on
even swap rounds, (1, 2), (3, 4), ... on odd ones: the deterministic
even-odd scheme) propose to exchange their parameters, accepted with
probability

    min(1, exp((1/T_j - 1/T_{j+1}) (L_j - L_{j+1}) - (1/T_j - 1/T_{j+1})^2 (s_j^2 + s_{j+1}^2) / 2))

where L_j is replica j's loss on the step's batch (one shared key: the same
examples and noise for every replica) and s_j its standard error from the
per-example losses (``loss_fn.per_example``; 0 when the loss gives none).
The second term is the noise correction of Deng et al. (2020) for minibatch
losses; with exact losses it vanishes and the rule is the textbook one, which
keeps the product of the replicas' Boltzmann distributions invariant.

A swap exchanges ``params`` only; each slot keeps its own temperature,
schedule, counters and proposal state. ``state.params`` is the coldest
replica's (slot 0), so the driver, checkpoints and exact resume treat a
replica exchange like any other optimizer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from savae_jax import validation
from savae_jax.annealing import decision as decision_lib
from savae_jax.annealing import sharding
from savae_jax.optimizer import Optimizer, replace_params

tree_map = jax.tree_util.tree_map


def geometric_ladder(t0: float, ratio: float, num_replicas: int) -> jax.Array:
    """The temperatures T_k = t0 * ratio**k, k = 0 .. R - 1 (coldest first), float32."""
    validation.positive("t0", t0)
    validation.integer("num_replicas", num_replicas, 2)
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"ratio must be a number > 1 (each replica hotter than the last), got {ratio!r}")
    # Evaluated now even when built inside a traced function (a tuning study builds its optimizers
    # under jit and vmap): the ladder of concrete values stays concrete, with the same bits as eagerly.
    with jax.ensure_compile_time_eval():
        return t0 * jnp.asarray(ratio, jnp.float32) ** jnp.arange(num_replicas, dtype=jnp.float32)


class ReplicaState(NamedTuple):
    """The replicas' states (stacked along a leading axis of size R) and the swap counters.

    Attributes:
      replicas: the inner optimizer's state, every leaf with a leading axis R.
      count: int32, steps taken.
      swap_attempts: int32 (R - 1,), swaps proposed per neighbouring pair.
      swap_accepts: int32 (R - 1,), swaps accepted per pair.
    """

    replicas: Any
    count: jax.Array
    swap_attempts: jax.Array
    swap_accepts: jax.Array

    @property
    def params(self):
        """The coldest replica's parameters (what a run evaluates and returns)."""
        return tree_map(lambda leaf: leaf[0], self.replicas.params)


class ReplicaInfo(NamedTuple):
    """Per-step diagnostics.

    Attributes:
      loss: the coldest replica's training loss (its inner ``info.loss``).
      temperature: the coldest replica's temperature at this step.
      acceptance_rate: the coldest replica's cumulative acceptance rate.
      swap_rate: mean over pairs of the cumulative swap acceptance rates.
      pair_swap_rate: (R - 1,) cumulative swap acceptance rate of each pair.
      swapped: (R - 1,) bool, which pairs exchanged at this step.
      losses: (R,) the replicas' losses on the shared batch at the last swap round.
      replicas: the inner optimizers' infos, stacked along R.
    """

    loss: jax.Array
    temperature: jax.Array
    acceptance_rate: jax.Array
    swap_rate: jax.Array
    pair_swap_rate: jax.Array
    swapped: jax.Array
    losses: jax.Array
    replicas: Any

    LOGGED = ("temperature", "acceptance_rate", "swap_rate")


def swap_log_ratio(loss_a, loss_b, stderr_a, stderr_b, temperature_a, temperature_b):
    """The log acceptance ratio of exchanging replicas a and b, with Deng et al.'s noise correction."""
    beta = 1.0 / temperature_a - 1.0 / temperature_b
    return beta * (loss_a - loss_b) - 0.5 * beta**2 * (stderr_a**2 + stderr_b**2)


def exchange(key, losses, stderrs, temperatures, parity):
    """One round of neighbour swaps: ``(permutation (R,), proposed (R-1,), accepted (R-1,))``.

    Pairs (j, j + 1) with ``j % 2 == parity`` propose to swap; each is
    accepted with probability min(1, exp(:func:`swap_log_ratio`)). A
    non-finite loss on either side rejects. ``permutation[k]`` is the slot
    whose parameters slot ``k`` holds after the round.
    """
    num = losses.shape[0]
    j = jnp.arange(num - 1)
    proposed = (j % 2) == parity
    log_ratio = swap_log_ratio(losses[:-1], losses[1:], stderrs[:-1], stderrs[1:],
                               temperatures[:-1], temperatures[1:])
    u = jax.random.uniform(key, (num - 1,))
    finite = jnp.isfinite(losses[:-1]) & jnp.isfinite(losses[1:]) & jnp.isfinite(log_ratio)
    accepted = proposed & finite & (jnp.log(u) < jnp.minimum(log_ratio, 0.0))
    # Swapped pairs never overlap (same parity), so each slot moves at most once.
    up = jnp.concatenate([accepted, jnp.zeros((1,), bool)])     # slot k swaps with k + 1
    down = jnp.concatenate([jnp.zeros((1,), bool), accepted])   # slot k swaps with k - 1
    slots = jnp.arange(num)
    permutation = jnp.where(up, slots + 1, jnp.where(down, slots - 1, slots))
    return permutation, proposed, accepted


def _shared_losses(loss_fn, params, key, batch):
    """Every replica's mean loss and its standard error on one batch with one key, (R,) each."""
    per_example = getattr(loss_fn, "per_example", None)
    if per_example is None:
        losses = jax.vmap(lambda p: loss_fn(p, key, batch))(params).astype(jnp.float32)
        return losses, jnp.zeros_like(losses)
    stats = jax.vmap(lambda p: decision_lib.paired_stats(
        decision_lib.per_example_losses(per_example, p, key, batch)))(params)
    return stats.delta.astype(jnp.float32), stats.stderr.astype(jnp.float32)


def _check_ladder(temperatures) -> jax.Array:
    """``temperatures`` as a float32 (R,) ladder (ValueError unless 1-D, R >= 2, finite, > 0 and increasing)."""
    with jax.ensure_compile_time_eval():  # concrete values stay concrete inside a traced builder
        temperatures = jnp.asarray(temperatures, jnp.float32)
        if temperatures.ndim != 1 or temperatures.shape[0] < 2:
            raise ValueError(f"temperatures must be a 1-D ladder of at least 2 values, got shape {temperatures.shape}")
        # A traced ladder (e.g. a swept t0) is not checkable here; the replicas' temperature schedules
        # flag a non-finite or negative value when the step runs (bad_temperature), as for one annealer.
        if not validation.is_traced(temperatures) and not bool(
                jnp.all(jnp.isfinite(temperatures)) & jnp.all(temperatures > 0) & jnp.all(jnp.diff(temperatures) > 0)):
            raise ValueError("temperatures must be finite, > 0 and increasing (coldest first), "
                             f"got {_shown(temperatures)}")
    return temperatures


def _shown(values, limit: int = 8) -> str:
    """``values`` for a message: whole when short, else the first and last few and their number."""
    flat = [float(v) for v in jnp.ravel(values)[:limit]]
    if values.size <= limit:
        return str(flat)
    tail = [float(v) for v in jnp.ravel(values)[-2:]]
    return f"{values.size} values [{', '.join(map(str, flat[:4]))}, ..., {', '.join(map(str, tail))}]"


def _swap(loss_fn, replicas, step_temperatures, key_loss, key_swap, batch, count, swap_every: int):
    """The swap round due after step ``count`` (none unless ``count`` is a multiple of ``swap_every``).

    Returns ``(replicas with their params exchanged, proposed (R-1,),
    accepted (R-1,), losses (R,))``; the losses are NaN when no round is due.
    """
    num = step_temperatures.shape[0]
    due = count % swap_every == 0
    # Only a swap round evaluates the replicas on the shared key (what ``cost`` charges).
    losses, stderrs = jax.lax.cond(
        due, lambda: _shared_losses(loss_fn, replicas.params, key_loss, batch),
        lambda: (jnp.full((num,), jnp.nan, jnp.float32), jnp.zeros((num,), jnp.float32)))
    permutation, proposed, accepted = exchange(key_swap, losses, stderrs, step_temperatures,
                                               (count // swap_every) % 2)
    proposed, accepted = proposed & due, accepted & due
    permutation = jnp.where(due, permutation, jnp.arange(num))
    replicas = replace_params(replicas, tree_map(lambda leaf: leaf[permutation], replicas.params))
    return replicas, proposed, accepted, losses


def replica_exchange(build: Callable[[jax.Array], Optimizer], temperatures, loss_fn,
                     swap_every: int = 1, mesh=None, axis_name: str | None = None) -> Optimizer:
    """R replicas of ``build(T_k)`` on the ladder ``temperatures``, exchanging neighbours.

    Args:
      build: ``T -> Optimizer``, e.g. ``lambda t: simulated_annealing(loss_fn,
        K, proposal, t, metropolis())`` (T may be used as the constant
        temperature or to scale a schedule: ``lambda c: t * schedule(c)``). It
        is called with a traced scalar inside ``jax.vmap``, so it must build
        the same computation for every T, and the optimizer's state must have
        a ``params`` field. Its optimizer must be built on ``loss_fn``.
      temperatures: (R,) ladder, coldest first, R >= 2, increasing
        (``geometric_ladder``).
      loss_fn: the loss the swaps compare the replicas on; with
        ``loss_fn.per_example`` (``make_loss``) the swap carries the noise
        correction, without it the losses are taken as exact.
      swap_every: steps between swap rounds, >= 1.
      mesh, axis_name: run the replicas' steps sharded over this mesh axis
        (each device steps R / devices replicas; R must be a multiple of the
        axis size); the swap round runs replicated. None: one device.
    Returns:
      An :class:`~savae_jax.optimizer.Optimizer` whose state is a
      :class:`ReplicaState` (``.params``: the coldest replica's) and info a
      :class:`ReplicaInfo`; ``cost`` = R times the inner step's cost plus R
      evaluations per swap round (rounded up per step).
    """
    temperatures = _check_ladder(temperatures)
    validation.integer("swap_every", swap_every, 1)
    num = int(temperatures.shape[0])
    axis_name = sharding.mesh_axis(mesh, axis_name)
    if mesh is not None and num % mesh.shape[axis_name]:
        raise ValueError(f"temperatures: {num} replicas cannot be split evenly over the mesh axis "
                         f"{axis_name!r} of {mesh.shape[axis_name]} devices; use a multiple of it")
    validation.is_callable("build", build, "lambda t: simulated_annealing(loss_fn, 16, gaussian(0.01), t, metropolis())")
    probe = build(temperatures[0])
    if not isinstance(probe, Optimizer):
        raise ValueError("build must return a savae_jax Optimizer for a temperature T (an annealer or ES step, "
                         "e.g. lambda t: simulated_annealing(loss_fn, 16, gaussian(0.01), t, metropolis())), "
                         f"got {type(probe).__name__}; replicas of a gradient optimizer have no temperature")
    if probe.loss_fn is not None and probe.loss_fn is not loss_fn:
        raise ValueError("loss_fn: the replicas' optimizer was built on a different loss_fn")

    def init_fn(params) -> ReplicaState:
        replicas = jax.vmap(lambda t: build(t).init(params))(temperatures)
        zeros = jnp.zeros((num - 1,), jnp.int32)
        return ReplicaState(replicas=replicas, count=jnp.zeros((), jnp.int32), swap_attempts=zeros,
                            swap_accepts=zeros)

    def step_fn(key, state: ReplicaState, batch):
        key_steps, key_loss, key_swap = jax.random.split(key, 3)
        run = jax.vmap(lambda t, s, k: build(t).step(k, s, batch))
        keys = jax.random.split(key_steps, num)
        if mesh is None:
            replicas, infos = run(temperatures, state.replicas, keys)
        else:  # the swap round on every device, in one device's order
            replicas, infos = sharding.replicated(sharding.shard_members(
                run, temperatures, state.replicas, keys, mesh=mesh, axis_name=axis_name), mesh)
        count = state.count + 1
        # With a decision batch the swap compares the replicas on the selection examples only.
        swap_batch = batch if probe.examples_per_step is None else batch[:probe.batch_size]
        step_temperatures = getattr(infos, "temperature", jnp.broadcast_to(temperatures, (num,)))
        replicas, proposed, accepted, losses = _swap(loss_fn, replicas, step_temperatures, key_loss, key_swap,
                                                     swap_batch, count, swap_every)
        attempts = state.swap_attempts + proposed.astype(jnp.int32)
        accepts = state.swap_accepts + accepted.astype(jnp.int32)
        pair_rate = accepts / jnp.maximum(attempts, 1)
        cold = tree_map(lambda leaf: leaf[0], infos)
        info = ReplicaInfo(loss=cold.loss, temperature=step_temperatures[0],
                           acceptance_rate=getattr(cold, "acceptance_rate", jnp.nan), swap_rate=pair_rate.mean(),
                           pair_swap_rate=pair_rate, swapped=accepted, losses=losses, replicas=infos)
        return ReplicaState(replicas=replicas, count=count, swap_attempts=attempts, swap_accepts=accepts), info

    cost = num * probe.cost + math.ceil(num / swap_every)
    return Optimizer(init=init_fn, step=step_fn, cost=cost, loss_fn=loss_fn, mesh=mesh,
                     examples_per_step=probe.examples_per_step, batch_size=probe.batch_size,
                     bounds=probe.bounds)  # replicas built with bounds keep to them, and so do the swaps
