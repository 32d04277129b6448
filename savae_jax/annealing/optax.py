"""Simulated annealing as an ``optax.GradientTransformationExtraArgs``.

Lets SA run in any Optax loop and compose with ``optax.chain``. The
transformation ignores the incoming gradient ``updates``; its ``update`` runs
one annealing step from ``params`` and returns ``new_params - params``.
"""

from __future__ import annotations

import optax as _optax

from savae_jax.annealing.kernel import _validate, build_kernel, init as _init


def as_optax(
    num_proposals: int,
    proposal,
    temperature,
    acceptance,
    radius=None,
    t_min: float | None = None,
    patience: int | None = None,
    loss_fn=None,
) -> _optax.GradientTransformationExtraArgs:
    """SA as an optax transformation (same arguments as ``simulated_annealing``).

    ``init(params)`` returns the :class:`AnnealState`.
    ``update(updates, state, params, *, key, batch, value_fn=None, value=None,
    **extra_args) -> (updates, state)``:

      - ``updates``: ignored (SA does not use the caller's gradient; the
        langevin proposal computes its own).
      - ``params``: the current parameters (required); they replace the
        state's incumbent, so the step starts from what the loop holds.
      - ``key``: PRNG key of this step (required; used exactly as
        ``step(key, state, batch)`` uses it).
      - ``batch``: the data passed to ``loss_fn`` as its third argument.
      - ``value_fn``: ``loss_fn(params, key, batch)``; required unless
        ``loss_fn`` was given here.
      - ``value``: ignored (the incumbent is re-evaluated with the step's
        own loss key so that it shares the proposals' noise).
      - other extra args (from ``optax.chain``) are ignored.

    The returned updates are ``new_params - params``, so
    ``optax.apply_updates(params, updates)`` equals the annealer's new params
    up to floating-point rounding of that difference.
    """
    _validate(num_proposals, proposal, acceptance, t_min, patience)

    def init_fn(params):
        return _init(params, proposal, temperature, radius)

    def update_fn(updates, state, params=None, *, key=None, batch=None, value_fn=None, value=None, **extra_args):
        del updates, value, extra_args
        if params is None:
            raise ValueError("params is required by the annealing transformation")
        if key is None:
            raise ValueError("key is required by the annealing transformation (update(..., key=...))")
        fn = loss_fn if loss_fn is not None else value_fn
        if fn is None:
            raise ValueError("value_fn is required unless loss_fn was given to as_optax")
        step = build_kernel(fn, num_proposals, proposal, temperature, acceptance, radius, t_min, patience)
        new_state, _ = step(key, state._replace(params=params), batch)
        new_updates = _optax.tree_utils.tree_sub(new_state.params, params)
        return new_updates, new_state

    return _optax.GradientTransformationExtraArgs(init_fn, update_fn)
