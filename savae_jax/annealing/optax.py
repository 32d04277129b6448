"""Simulated annealing as an ``optax.GradientTransformationExtraArgs``.

Lets SA run in any Optax loop and compose with ``optax.chain``. The
transformation ignores the incoming gradient ``updates``; its ``update`` runs
one annealing step from ``params`` and returns ``new_params - params``.
"""

from __future__ import annotations

import jax
import optax as _optax

from savae_jax.annealing.bounds import check as check_bounds
from savae_jax.annealing.kernel import build_kernel, check_arguments, init as _init


def as_optax(
    loss_fn,
    num_proposals: int,
    proposal,
    temperature,
    acceptance,
    radius=None,
    t_min: float | None = None,
    patience: int | None = None,
    bounds=None,
    seed: int = 0,
) -> _optax.GradientTransformationExtraArgs:
    """SA as an optax transformation: the arguments of ``simulated_annealing`` in its order.

    ``loss_fn`` may be None (then ``update`` needs ``value_fn``); ``mesh``,
    ``axis_name`` and ``decision`` are not taken; ``seed`` derives per-step
    keys when ``update`` gets no ``key`` (below).

    ``init(params)`` returns the :class:`AnnealState`.
    ``update(updates, state, params, *, key, batch, value_fn=None, value=None,
    **extra_args) -> (updates, state)``:

      - ``updates``: ignored (SA does not use the caller's gradient; the
        langevin proposal computes its own).
      - ``params``: the current parameters (required); they replace the
        state's incumbent, so the step starts from what the loop holds.
      - ``key``: PRNG key of this step, used exactly as
        ``step(key, state, batch)`` uses it. Loops that pass only Optax's
        standard extra args (``savae_jax.fit``, ``optax.chain`` in user code)
        may leave it out: the step then uses
        ``fold_in(jax.random.key(seed), state.count)``, a fresh key per step.
      - ``batch``: the data passed to ``loss_fn`` as its third argument.
      - ``value_fn``: ``value_fn(params) -> scalar``, Optax's convention (as
        in ``optax.lbfgs``): the loss on this step's batch with its noise
        fixed, so all proposals share it (common random numbers). Required
        unless ``loss_fn`` was given here, in which case the step calls
        ``loss_fn(params, key_loss, batch)`` with its own loss key exactly as
        ``simulated_annealing(...).step`` does.
      - ``value``: ignored (the incumbent is re-evaluated with the step's
        own loss key so that it shares the proposals' noise).
      - other extra args (from ``optax.chain``) are ignored.

    The returned updates are ``new_params - params``, so
    ``optax.apply_updates(params, updates)`` equals the annealer's new params
    up to floating-point rounding of that difference (so with ``bounds`` a
    point on a face may land one rounding step outside it: project it with
    ``annealing.bounds.project`` where that matters). The step is built
    without a mesh, so it never shards its proposals.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable or None, got {loss_fn!r}")
    check_arguments(num_proposals, proposal, acceptance, t_min, patience)
    bounds = check_bounds(bounds)

    def init_fn(params):
        return _init(params, proposal, temperature, radius, bounds)

    def update_fn(updates, state, params=None, *, key=None, batch=None, value_fn=None, value=None, **extra_args):
        del updates, value, extra_args
        if params is None:
            raise ValueError("params is required by the annealing transformation")
        if key is None:
            key = jax.random.fold_in(jax.random.key(seed), state.count)
        if loss_fn is not None:
            fn = loss_fn
        elif value_fn is not None:
            fn = lambda p, k, b: value_fn(p)  # noqa: E731  (noise fixed by the caller)
        else:
            raise ValueError("value_fn is required unless loss_fn was given to as_optax")
        step = build_kernel(fn, num_proposals, proposal, temperature, acceptance, radius, t_min, patience,
                            bounds=bounds)
        new_state, _ = step(key, state._replace(params=params), batch)
        new_updates = _optax.tree_utils.tree_sub(new_state.params, params)
        return new_updates, new_state

    return _optax.GradientTransformationExtraArgs(init=init_fn, update=update_fn)
