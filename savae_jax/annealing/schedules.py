"""Temperature and radius schedules for simulated annealing.

A *plain* schedule is optax's ``Schedule``: a pure function ``count -> value``.
Any optax schedule (``optax.exponential_decay(...)``, ...) or a Python scalar
(a constant) is accepted wherever the annealer expects a temperature or radius.

Schedules that react to the search (``adaptive``, ``reheat``) follow a tiny
stateful protocol, :class:`StatefulSchedule`, whose state lives in
``AnnealState.schedule_state`` (never in Python, so resume and ``vmap`` over
chains are exact):

    state = schedule.init()                               # a pytree of arrays
    value = schedule.value(state, count)                  # this step's T (or r)
    state = schedule.update(state, count, event)          # after the step

``event`` is a :class:`ScheduleEvent` (was the best proposal accepted? did the
best loss improve?). :func:`as_stateful` lifts a scalar or a plain schedule
into the protocol with an empty state ``()``; the kernel calls it on whatever
it is given, so both kinds work everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from savae_jax import validation

Schedule = Callable[[jax.Array], jax.Array]


class ScheduleEvent(NamedTuple):
    """What a stateful schedule learns after each annealing step.

    Attributes:
      accepted: bool scalar, the step's best proposal was accepted.
      improved: bool scalar, the best-so-far loss decreased at this step.
    """

    accepted: jax.Array
    improved: jax.Array


class StatefulSchedule(NamedTuple):
    """A schedule with state carried in ``AnnealState.schedule_state``.

    Attributes:
      init: ``() -> state``, the initial state (a pytree of arrays).
      value: ``(state, count) -> value``, the value used at step ``count``.
      update: ``(state, count, event) -> state``, called once per step with
        the count the value was taken at and the step's :class:`ScheduleEvent`.
    """

    init: Callable[[], Any]
    value: Callable[[Any, jax.Array], jax.Array]
    update: Callable[[Any, jax.Array, ScheduleEvent], Any]


ScheduleLike = Union[float, int, jax.Array, Schedule, StatefulSchedule]


def as_stateful(schedule: ScheduleLike, name: str = "schedule") -> StatefulSchedule:
    """Lift a scalar, a plain ``count -> value`` schedule or a StatefulSchedule.

    Scalars become constants (must be finite and >= 0); plain schedules get
    the empty state ``()``.
    """
    if isinstance(schedule, StatefulSchedule):
        return schedule
    if callable(schedule):
        fn = schedule
        return StatefulSchedule(
            init=lambda: (),
            value=lambda state, count: jnp.asarray(fn(count), jnp.float32),
            update=lambda state, count, event: state,
        )
    if name == "radius":
        # A constant radius of 0 proposes the incumbent itself: the search could never move.
        validation.real(name, schedule, lambda v: v > 0, "a finite number > 0 or a schedule")
    else:
        validation.real(name, schedule, lambda v: v >= 0, "a finite number >= 0 or a schedule")
    const = schedule
    return StatefulSchedule(
        init=lambda: (),
        value=lambda state, count: jnp.asarray(const, jnp.float32),
        update=lambda state, count, event: state,
    )


def fault(value):
    """Whether a schedule's value is unusable as a temperature or radius: negative or non-finite.

    Every optimizer that takes a schedule flags it per step in its info
    (``bad_temperature``, ``bad_radius``) and does not move at that step; the
    driver stops the run with ``InvalidScheduleError``.
    """
    return ~(jnp.isfinite(value) & (value >= 0))


def scalar_value(schedule: StatefulSchedule, state, count, name: str):
    """``schedule.value(state, count)``, checked when traced to be a scalar (ValueError naming ``name``)."""
    value = schedule.value(state, count)
    if jnp.shape(value) != ():
        raise ValueError(f"{name} schedule must return a scalar (one value per step), got shape {jnp.shape(value)}")
    return value


def constant(value: float) -> Schedule:
    """T_k = value."""
    validation.real("value", value, lambda v: v >= 0, "a finite number >= 0")
    return lambda count: jnp.full((), value, jnp.float32)


def exponential(t0: float, decay: float) -> Schedule:
    """Geometric cooling: T_k = t0 * decay**k.

    Args:
      t0: initial value, > 0.
      decay: factor per step, 0 < decay < 1.
    """
    validation.positive("t0", t0)
    validation.in_interval("decay", decay, 0, 1)

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        return jnp.asarray(t0, jnp.float32) * jnp.power(jnp.asarray(decay, jnp.float32), k)

    return schedule


def linear(t0: float, t_end: float, steps: int) -> Schedule:
    """Linear cooling: T_k = t0 + (t_end - t0) * min(k / steps, 1).

    Args:
      t0: initial value, > 0.
      t_end: value from step ``steps`` on, 0 <= t_end.
      steps: number of steps of the ramp, >= 1.
    """
    validation.positive("t0", t0)
    validation.non_negative("t_end", t_end)
    validation.integer("steps", steps, 1)

    def schedule(count):
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / steps, 1.0)
        t0_ = jnp.asarray(t0, jnp.float32)
        return t0_ + (jnp.asarray(t_end, jnp.float32) - t0_) * frac

    return schedule


def logarithmic(t0: float) -> Schedule:
    """Boltzmann (classical) annealing: T_k = t0 / ln(e + k).

    Args:
      t0: initial value T_0 (at k = 0, ln(e) = 1), > 0.
    """
    validation.positive("t0", t0)

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        return jnp.asarray(t0, jnp.float32) / jnp.log(jnp.e + k)

    return schedule


def fast(t0: float) -> Schedule:
    """Fast (Cauchy) annealing: T_k = t0 / (1 + k).

    Args:
      t0: initial value, > 0.
    """
    validation.positive("t0", t0)

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        return jnp.asarray(t0, jnp.float32) / (1.0 + k)

    return schedule


class AdaptiveState(NamedTuple):
    """State of :func:`adaptive`: log T and a running acceptance average."""

    log_value: jax.Array
    acceptance: jax.Array


def adaptive(
    t0: float,
    target_rate: float,
    adapt_rate: float = 0.05,
    smoothing: float = 0.9,
    t_lo: float = 1e-12,
    t_hi: float = 1e12,
) -> StatefulSchedule:
    """Temperature that holds a target acceptance rate (stochastic approximation).

    With a = smoothing, after each step with acceptance indicator A_k:

        rate_{k+1}  = a * rate_k + (1 - a) * A_k            (rate_0 = target_rate)
        log T_{k+1} = clip(log T_k + adapt_rate * (target_rate - rate_{k+1}),
                           log t_lo, log t_hi)

    so T rises while too few proposals are accepted and falls while too many are.

    Args:
      t0: initial temperature, > 0.
      target_rate: desired acceptance rate, in (0, 1).
      adapt_rate: gain on log T per step, > 0.
      smoothing: weight of the running average's past, in [0, 1).
      t_lo, t_hi: bounds on T, 0 < t_lo < t_hi.
    """
    validation.positive("t0", t0)
    validation.in_interval("target_rate", target_rate, 0, 1)
    validation.positive("adapt_rate", adapt_rate)
    validation.in_interval("smoothing", smoothing, 0, 1, closed_low=True)
    validation.positive("t_lo", t_lo)
    validation.real("t_hi", t_hi, lambda v: v > float(t_lo), "> t_lo")

    def init():
        return AdaptiveState(
            log_value=jnp.log(jnp.asarray(t0, jnp.float32)), acceptance=jnp.asarray(target_rate, jnp.float32)
        )

    def value(state, count):
        return jnp.exp(state.log_value)

    def update(state, count, event):
        rate = smoothing * state.acceptance + (1.0 - smoothing) * event.accepted.astype(jnp.float32)
        log_value = state.log_value + adapt_rate * (target_rate - rate)
        log_value = jnp.clip(log_value, math.log(t_lo), math.log(t_hi))
        return AdaptiveState(log_value=log_value.astype(jnp.float32), acceptance=rate.astype(jnp.float32))

    return StatefulSchedule(init=init, value=value, update=update)


class ReheatState(NamedTuple):
    """State of :func:`reheat`.

    Attributes:
      inner: the wrapped schedule's state (``()`` for a plain schedule).
      count: steps since the last (re)start: the count the inner schedule sees.
      stale: steps without improvement of the best loss since the last
        improvement or reheat.
      num_reheats: how many times the schedule restarted.
    """

    inner: Any
    count: jax.Array
    stale: jax.Array
    num_reheats: jax.Array


def reheat(schedule: ScheduleLike, patience: int) -> StatefulSchedule:
    """Restart ``schedule`` from count 0 after ``patience`` steps without improvement.

    The value is ``schedule(c)`` where c counts the steps since the last
    restart; a restart also re-initialises a stateful inner schedule.

    Args:
      schedule: a scalar, a plain schedule or a StatefulSchedule.
      patience: steps without improvement of the best loss that trigger a
        restart, >= 1.
    """
    validation.integer("patience", patience, 1)
    inner = as_stateful(schedule, "schedule")

    def init():
        zero = jnp.zeros((), jnp.int32)
        return ReheatState(inner=inner.init(), count=zero, stale=zero, num_reheats=zero)

    def value(state, count):
        return inner.value(state.inner, state.count)

    def update(state, count, event):
        stale = jnp.where(event.improved, 0, state.stale + 1)
        fire = stale >= patience
        stepped = inner.update(state.inner, state.count, event)
        fresh = inner.init()
        inner_state = jax.tree_util.tree_map(lambda f, s: jnp.where(fire, f, s), fresh, stepped)
        return ReheatState(
            inner=inner_state,
            count=jnp.where(fire, 0, state.count + 1).astype(jnp.int32),
            stale=jnp.where(fire, 0, stale).astype(jnp.int32),
            num_reheats=(state.num_reheats + fire).astype(jnp.int32),
        )

    return StatefulSchedule(init=init, value=value, update=update)
