"""Noise-aware decisions: paired per-example differences, on an independent decision batch.

Selecting the best of K proposals on one noisy minibatch biases that batch's
estimate of the winner low (the optimizer's curse: about sigma * c_K, with
sigma the sd of one measured difference and c_K the expected maximum of K
standard normals, c_64 ~ 2.34), so a rule that compares that estimate with 0
accepts moves that are truly worse. The fix (the double estimator) is to
*select* on one batch and *decide* on another: the winner and the incumbent
are re-evaluated on a decision batch of other examples with fresh
reparameterisation noise, evaluating only those two, and the rule sees the
mean paired difference dL and its standard error s / sqrt(n).

Layout: an annealer built with ``decision=decision_batch(selection, size)``
expects batches of ``selection + max_size`` examples (the driver gathers
them: ``Optimizer.examples_per_step``); the first ``selection`` are the
selection batch, the last ``max_size`` the decision batch, of which the first
``size(count)`` are used (a schedule may grow it as the temperature falls).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from savae_jax import validation
from savae_jax.annealing.schedules import as_stateful


class DecisionBatch(NamedTuple):
    """Where a step's decision examples are: see :func:`decision_batch`."""

    selection: int
    max_size: int
    size: Any  # an int or a schedule count -> examples used (<= max_size)


class Paired(NamedTuple):
    """A paired comparison of the winner with the incumbent on the same examples and noise.

    Attributes:
      delta: mean over examples of L_winner,i - L_incumbent,i.
      stderr: its standard error, sd(d_i) / sqrt(n) (sample sd, n - 1).
      num: n, int32.
    """

    delta: jax.Array
    stderr: jax.Array
    num: jax.Array


def decision_batch(selection: int, size, max_size: int | None = None) -> DecisionBatch:
    """Decide on ``size`` examples other than the ``selection`` ones the K proposals were ranked on.

    Args:
      selection: examples of the selection batch (the run's batch size), >= 2.
      size: decision examples, an int >= 2, or a schedule ``count -> size``
        (then ``max_size`` is required; whole numbers are clipped to
        [2, max_size]; a NaN, negative or fractional value halts the step
        and is flagged in ``info.bad_decision_size``, which stops a run
        with ``driver.InvalidScheduleError``).
      max_size: examples reserved per step for the decision batch; default ``size``.
    Returns:
      A ``DecisionBatch`` for ``simulated_annealing(..., decision=...)``.
    """
    validation.integer("selection", selection, 2)
    if callable(size):
        validation.integer("max_size", max_size, 2)
    else:
        validation.integer("size", size, 2)
        max_size = size if max_size is None else max_size
        validation.integer("max_size", max_size, size)
    return DecisionBatch(selection=int(selection), max_size=int(max_size), size=size)


def cost(decision: DecisionBatch | None) -> int:
    """Evaluations a step spends on deciding, in selection-batch units (rounded up).

    The winner and the incumbent are evaluated per example on the selection
    batch (2) and on up to ``max_size`` decision examples (2 * max_size /
    selection); without a decision batch only the first term.
    """
    if decision is None:
        return 2
    return 2 + math.ceil(2 * decision.max_size / decision.selection)


class Split(NamedTuple):
    """A step's batch split by :func:`split`.

    Attributes:
      x: the selection batch (the whole batch without a decision batch).
      x_decide: the decision batch, or None.
      mask: (max_size,) bool, the decision examples used, or None.
      requested: float32, the decision size the schedule returned at this
        step (NaN without a decision batch).
      bad: bool, ``requested`` is unusable (:func:`size_fault`); the step must not move.
    """

    x: Any
    x_decide: Any
    mask: Any
    requested: jax.Array
    bad: jax.Array


def size_fault(requested):
    """Whether a decision size from a schedule is unusable: non-finite, negative or not a whole number.

    Temperature and radius schedules are flagged the same way (``schedules.faults``);
    a usable value is clipped to [2, max_size].
    """
    return ~(jnp.isfinite(requested) & (requested >= 0) & (requested == jnp.round(requested)))


def split(decision: DecisionBatch | None, batch, count) -> Split:
    """The step's :class:`Split`: selection batch, decision batch and mask, the requested size and its fault."""
    if decision is None:
        return Split(batch, None, None, jnp.full((), jnp.nan, jnp.float32), jnp.zeros((), bool))
    total = decision.selection + decision.max_size
    if batch.shape[0] != total:
        raise ValueError(
            f"decision: the annealer expects batches of {decision.selection} selection + "
            f"{decision.max_size} decision examples = {total}, got {batch.shape[0]}; run it with "
            f"batch_size={decision.selection} (the driver adds the decision examples)")
    requested = as_stateful(decision.size, "decision size").value((), count)
    if jnp.shape(requested) != ():
        raise ValueError("decision size schedule must return a scalar (one value per step), "
                         f"got shape {jnp.shape(requested)}")
    bad = size_fault(requested)
    size = jnp.clip(jnp.where(bad, 2, requested), 2, decision.max_size).astype(jnp.int32)
    mask = jnp.arange(decision.max_size) < size
    return Split(batch[: decision.selection], batch[decision.selection:], mask, requested, bad)


def per_example_losses(per_example: Callable, params, key, x):
    """``per_example(params, key, x)``, checked when traced to be one floating-point loss per example, (n,).

    A scalar would give a standard error of 0 (every move looks certain) and
    an (n, 1) column would broadcast the paired differences to (n, n).
    """
    out = per_example(params, key, x)
    shape, dtype = tuple(jnp.shape(out)), jnp.result_type(out)
    if shape != (x.shape[0],) or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "loss_fn.per_example must return one floating-point loss per example, shape "
            f"({x.shape[0]},) for a batch of {x.shape[0]}, got shape {shape} and dtype {dtype}")
    return out


def paired(per_example: Callable, winner, incumbent, key, x, mask=None) -> Paired:
    """Paired differences of ``per_example`` losses (same examples, same ``key``): mean and stderr.

    ``mask`` (n,) selects the examples used (None: all). A non-finite winner
    loss gives a non-finite ``delta``, which every rule rejects.
    """
    return paired_stats(per_example_losses(per_example, winner, key, x)
                        - per_example_losses(per_example, incumbent, key, x), mask)


def paired_stats(d, mask=None) -> Paired:
    """Mean, standard error and count of per-example differences ``d`` (n,) where ``mask``."""
    mask = jnp.ones(d.shape, bool) if mask is None else mask
    n = jnp.sum(mask)
    mean = jnp.sum(jnp.where(mask, d, 0.0)) / n
    var = jnp.sum(jnp.where(mask, jnp.square(d - mean), 0.0)) / jnp.maximum(n - 1, 1)
    return Paired(delta=mean, stderr=jnp.sqrt(var / n), num=n.astype(jnp.int32))
