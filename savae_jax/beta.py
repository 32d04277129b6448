"""KL-weight (beta) schedules: functions of the step count, optax-style.

A schedule is ``schedule(count) -> beta`` (count = optimizer steps done, from
0), jittable with a traced ``count``. Any optax schedule works where a beta
schedule is expected; the ones built here also carry ``.final``, the value
``make_loss`` uses when its loss is called without a step (evaluation, the
annealer).

    loss_fn = sv.make_loss(model, beta=sv.beta.linear_warmup(1.0, 10_000))
    loss_fn(params, key, x, step=count)   # training: beta(count)
    loss_fn(params, key, x)               # beta.final (here 1.0)
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from savae_jax import validation


class BetaSchedule:
    """A callable ``count -> beta`` with the value it settles at, ``final``.

    Args:
      fn: ``fn(count) -> value``.
      final: the value after the schedule is done (used when no step is given).
      name: for the repr.
    """

    def __init__(self, fn: Callable, final: float, name: str = "schedule"):
        self._fn = fn
        self.final = float(final)
        self.name = name

    def __call__(self, count):
        return jnp.asarray(self._fn(jnp.asarray(count, jnp.float32)), jnp.float32)

    def __repr__(self) -> str:
        return f"BetaSchedule({self.name}, final={self.final})"


def constant(beta: float = 1.0) -> BetaSchedule:
    """beta(count) = beta for every count."""
    validation.at_least("beta", beta)
    return BetaSchedule(lambda c: jnp.full_like(c, beta), beta, f"constant({beta})")


def linear_warmup(beta: float = 1.0, num_steps: int = 10_000, start: float = 0.0) -> BetaSchedule:
    """Linear KL warm-up (Bowman et al. 2016; Sønderby et al. 2016).

    beta(count) = start + (beta - start) * min(count / num_steps, 1): ``start``
    (default 0) at count 0, ``beta`` from count ``num_steps`` on.
    """
    validation.at_least("beta", beta)
    validation.at_least("start", start)
    validation.at_least("num_steps", num_steps, 0, strict=True)
    return BetaSchedule(
        lambda c: start + (beta - start) * jnp.clip(c / num_steps, 0.0, 1.0),
        beta, f"linear_warmup(beta={beta}, num_steps={num_steps}, start={start})")


def cyclical(beta: float = 1.0, total_steps: int = 10_000, num_cycles: int = 4,
             ratio: float = 0.5) -> BetaSchedule:
    """Cyclical annealing (Fu et al. 2019, NAACL), linear ramp.

    The ``total_steps`` are cut into ``num_cycles`` cycles of length
    P = total_steps / num_cycles. Within a cycle, with tau = (count mod P) / P,
    beta(count) = beta * min(tau / ratio, 1): a linear ramp from 0 over the
    first ``ratio`` of the cycle, then ``beta`` for the rest. From
    ``total_steps`` on the value stays ``beta``.
    """
    validation.at_least("beta", beta)
    validation.at_least("total_steps", total_steps, 0, strict=True)
    validation.at_least("num_cycles", num_cycles, 0, strict=True)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    period = total_steps / num_cycles

    def fn(c):
        tau = jnp.mod(c, period) / period
        value = beta * jnp.minimum(tau / ratio, 1.0)
        return jnp.where(c >= total_steps, beta, value)

    return BetaSchedule(fn, beta, f"cyclical(beta={beta}, total_steps={total_steps}, "
                                  f"num_cycles={num_cycles}, ratio={ratio})")
