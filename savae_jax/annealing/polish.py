"""Local polish: a few steps of a local optimizer on the incumbent, every M steps.

    sa = local_polish(simulated_annealing(...), loss_fn, optax.lbfgs(), num_steps=20, every=100)

scipy's ``dual_annealing`` follows every improvement with a local search
(L-BFGS-B); that is how it lands *exactly* in the minimum of the basin its
annealing found. ``local_polish`` gives any optimizer whose state has a
``params`` field the same: every ``every`` steps it runs ``num_steps`` steps
of an Optax transformation (``optax.lbfgs()``, ``optax.adam(lr)``, ...) from
the incumbent, on the step's batch and one key (the selection examples only,
for an optimizer with a decision batch), and keeps the result if its loss
there is lower (greedy, so a polish never makes the incumbent worse on
the batch it was measured on). States that track a best-so-far
(``best_params``/``best_loss``, like the annealer's) and an incumbent
``loss`` are updated to match.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from savae_jax import validation
from savae_jax.annealing import bounds as bounds_lib
from savae_jax.optimizer import GRAD_COST, Optimizer, replace_params, tree_where


class PolishState(NamedTuple):
    """The wrapped optimizer's state, the step count and the number of polishes kept."""

    inner: Any
    count: jax.Array
    num_polished: jax.Array

    @property
    def params(self):
        return self.inner.params


def polish(loss_fn, local: optax.GradientTransformation, num_steps: int, params, key, batch, box=None):
    """``num_steps`` steps of ``local`` on ``loss_fn(., key, batch)`` from ``params``: ``(params, loss)``.

    Transformations that need the loss itself (``optax.lbfgs``'s line search)
    receive ``value``, ``grad`` and ``value_fn``; others ignore them. With
    ``box`` (``bounds.for_params``) the steps are projected onto the box
    (``optax.projections.projection_box`` after every update) and the loss is
    taken at the projected point, for the gradient and for every line-search
    trial alike, so no point outside the box is ever evaluated.
    """
    local = optax.with_extra_args_support(local)
    inside = (lambda p: p) if box is None else (lambda p: bounds_lib.project(p, box))

    def f(p):
        return loss_fn(inside(p), key, batch)

    def body(carry, _):
        p, state = carry
        value, grad = jax.value_and_grad(f)(p)
        updates, state = local.update(grad, state, p, value=value, grad=grad, value_fn=f)
        return (inside(optax.apply_updates(p, updates)), state), None

    (params, _), _ = jax.lax.scan(body, (params, local.init(params)), None, length=num_steps)
    return params, f(params)


def local_polish(optimizer: Optimizer, loss_fn, local: optax.GradientTransformation, num_steps: int,
                 every: int) -> Optimizer:
    """``optimizer`` whose incumbent is polished by ``num_steps`` steps of ``local`` every ``every`` steps.

    Args:
      optimizer: any :class:`~savae_jax.optimizer.Optimizer` whose state has
        a ``params`` field (an annealer, an ES step, a replica exchange's
        replicas are not: polish its ``build`` instead).
      loss_fn: the loss to polish on (the optimizer's own).
      local: an Optax transformation, e.g. ``optax.lbfgs()`` or ``optax.adam(1e-2)``.
      num_steps: local steps per polish, >= 1.
      every: steps between polishes, >= 1.
      The polish keeps to the wrapped optimizer's ``bounds`` (projected steps:
      :func:`polish`), so a bounded search stays bounded when polished.
    Returns:
      An Optimizer with state :class:`PolishState` and the wrapped
      optimizer's info; ``cost`` adds ceil((GRAD_COST * num_steps + 2) /
      every) (the gradients, and the two losses that decide to keep it).
    """
    if not isinstance(optimizer, Optimizer):
        raise ValueError("optimizer must be a savae_jax Optimizer to polish (e.g. simulated_annealing(...) or "
                         f"evolution_strategy(...)), got {type(optimizer).__name__}; an Optax transformation is "
                         "the local optimizer, the third argument: local_polish(annealer, loss_fn, optax.lbfgs(), ...)")
    validation.is_callable("loss_fn", loss_fn)
    validation.integer("num_steps", num_steps, 1)
    validation.integer("every", every, 1)
    if not isinstance(local, optax.GradientTransformation):
        raise ValueError(f"local must be an optax.GradientTransformation, got {type(local).__name__}")
    if optimizer.loss_fn is not None and optimizer.loss_fn is not loss_fn:
        raise ValueError("loss_fn: the optimizer was built on a different loss_fn")

    def init_fn(params) -> PolishState:
        return PolishState(inner=optimizer.init(params), count=jnp.zeros((), jnp.int32),
                           num_polished=jnp.zeros((), jnp.int32))

    def step_fn(key, state: PolishState, batch):
        key_inner, key_polish = jax.random.split(key)
        inner, info = optimizer.step(key_inner, state.inner, batch)
        count = state.count + 1
        # With a decision batch, polish and judge on the selection examples only: the decision
        # examples stay independent of every choice but the rule's.
        x = batch if optimizer.examples_per_step is None else batch[:optimizer.batch_size]

        def run():
            box = bounds_lib.for_params(optimizer.bounds, inner.params)
            polished, loss = polish(loss_fn, local, num_steps, inner.params, key_polish, x, box)
            return polished, loss, loss < loss_fn(inner.params, key_polish, x)

        polished, loss, keep = jax.lax.cond(
            count % every == 0, run,
            lambda: (inner.params, jnp.asarray(jnp.inf, jnp.float32), jnp.bool_(False)))
        inner = _keep(inner, polished, loss, keep)
        return PolishState(inner=inner, count=count, num_polished=state.num_polished + keep.astype(jnp.int32)), info

    cost = optimizer.cost + math.ceil((GRAD_COST * num_steps + 2) / every)
    return Optimizer(init=init_fn, step=step_fn, cost=cost, loss_fn=loss_fn, mesh=optimizer.mesh,
                     examples_per_step=optimizer.examples_per_step, batch_size=optimizer.batch_size,
                     bounds=optimizer.bounds)


def _keep(state, polished, loss, keep):
    """``state`` with the polished parameters where ``keep`` (and its best-so-far and loss fields)."""
    state = replace_params(state, tree_where(keep, polished, state.params))
    if hasattr(state, "loss"):
        state = state._replace(loss=jnp.where(keep, loss, state.loss))
    if hasattr(state, "best_loss") and hasattr(state, "best_params"):
        better = keep & (loss < state.best_loss)
        state = state._replace(best_params=tree_where(better, polished, state.best_params),
                               best_loss=jnp.where(better, loss, state.best_loss))
    return state
