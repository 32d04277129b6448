"""The one optimizer protocol: ``(init, step) -> (state, info)``, blackjax-shaped.

Every optimizer the training driver runs, gradient or annealing, is an
:class:`Optimizer`::

    opt = sv.optimizer.from_optax(loss_fn, optax.adam(1e-3))   # or simulated_annealing(...)
    state = opt.init(params)
    state, info = jax.jit(opt.step)(key, state, batch)
    state.params, info.loss, opt.cost

- ``state.params``: the parameters to evaluate;
- ``info.loss``: the training loss on ``batch`` (after the step for annealing,
  before it for a gradient step: the value the gradient was taken at);
- ``opt.cost``: loss evaluations per step, the unit of every budget (one
  forward pass of the loss on one batch; a gradient step costs
  :data:`GRAD_COST`);
- ``opt.loss_fn``: the loss the optimizer was built on; the driver refuses
  another one, so an annealer cannot silently train on loss A while the run
  is scored on loss B.

Which fields of ``info`` a training log records is said by the info class
itself, in its ``LOGGED`` tuple (see :func:`logged_stats`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from savae_jax import models

# Evaluations charged for one gradient: a forward pass plus a backward pass
# of about twice the forward's work.
GRAD_COST = 3


class Optimizer(NamedTuple):
    """An optimizer as the driver sees it (see the module docstring).

    Attributes:
      init: ``init(params) -> state``; the state has ``.params``.
      step: ``step(key, state, batch) -> (state, info)``, pure; the info has
        ``.loss``. Callers ``jax.jit`` it.
      cost: loss evaluations per step (an int).
      loss_fn: the loss ``step`` minimises.
      mesh: the ``jax.sharding.Mesh`` the step shards itself over (an
        annealer built with ``mesh=``), or None: a step that does not; the
        driver, given a mesh, then runs it data parallel (the batch sharded).
      examples_per_step: the batch size the step needs (an annealer with a
        decision batch: selection + decision examples), or None: the run's.
      batch_size: the run's batch size the step was built for (an annealer
        with a decision batch: its ``selection``), or None: any. The driver
        refuses a run whose ``batch_size`` differs.
      bounds: the box ``(lower, upper)`` every point the step evaluates and
        returns lies in (``annealing.bounds.Bounds``), or None: unbounded.
        Wrappers (``local_polish``) keep to it too.
    """

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, Any]]
    cost: int
    loss_fn: Callable[..., jax.Array]
    mesh: Any = None
    examples_per_step: int | None = None
    batch_size: int | None = None
    bounds: Any = None


class OptaxState(NamedTuple):
    """State of an Optax transformation run through the protocol."""

    params: Any
    opt_state: Any
    count: jax.Array  # int32, steps done: what a scheduled loss is evaluated at


class OptaxInfo(NamedTuple):
    """Per-step diagnostics of a gradient step: the loss the gradient was taken at."""

    loss: jax.Array

    LOGGED = ()


# ``tree_where(condition, new, old)``: ``new`` where the scalar ``condition`` holds, else ``old``, leaf
# by leaf (an accept/reject of a pytree); ``tree_norm(tree)``: the global L2 norm. They are
# ``optax.tree.where`` and ``optax.tree.norm``; the ``optax.tree`` namespace appeared in optax 0.2.5,
# so on 0.2.4 (the oldest the project allows) the same functions come from ``optax.tree_utils``.
if hasattr(optax, "tree"):
    tree_where, tree_norm = optax.tree.where, optax.tree.norm
else:  # optax 0.2.4
    tree_where, tree_norm = optax.tree_utils.tree_where, optax.tree_utils.tree_l2_norm


def replace_params(state, params):
    """``state`` with its parameters replaced: its ``params`` field, or that of the state it wraps.

    Wrappers (``local_polish``'s ``PolishState``) expose ``params`` as a
    property of their ``inner`` state; this reaches through them, so code
    that moves parameters between states (replica exchange) works on any of them.
    """
    if "params" in getattr(state, "_fields", ()):
        return state._replace(params=params)
    if "inner" in getattr(state, "_fields", ()):
        return state._replace(inner=replace_params(state.inner, params))
    raise TypeError(f"cannot replace the parameters of a {type(state).__name__}: it has neither a params "
                    "field nor an inner state")


def logged_stats(info) -> dict:
    """The fields of ``info`` that a training log records, as Python floats.

    An info class lists them in its class attribute ``LOGGED`` (the
    annealer's: temperature, radius, acceptance rate); none by default.
    """
    return {name: float(getattr(info, name)) for name in getattr(type(info), "LOGGED", ())}


def is_scheduled(loss_fn) -> bool:
    """Whether ``loss_fn`` takes the step count as ``step=`` (``make_loss`` with a beta schedule).

    ``make_loss`` marks such a loss with ``scheduled = True``; a user loss
    that wants the count sets the same attribute.
    """
    return bool(getattr(loss_fn, "scheduled", False))


def checked_loss(loss_fn):
    """``loss_fn`` whose output is checked to be a floating-point scalar when traced.

    Shapes and dtypes are static, so the check costs nothing at run time; a
    batch of losses or an integer loss would otherwise surface as an obscure
    error deep in ``jax.grad`` or the annealing kernel. A loss that names its
    model (``make_loss``'s ``loss_fn.model``) also has the parameters checked
    against the model's for the batch's images (``models.check_params``), so
    every optimizer's step refuses another model's parameters by name.
    """

    def wrapped(params, key, batch, **kwargs):
        if hasattr(batch, "shape") and getattr(loss_fn, "model", None) is not None:
            # Static shapes and dtypes, checked when traced: another model's parameters or uint8
            # pixels are named here, not by a Flax scope error or a NaN loss from the compiled step.
            if not jnp.issubdtype(batch.dtype, jnp.floating):
                raise ValueError(f"batch must be float images in [0, 1], got dtype {batch.dtype} "
                                 "(convert uint8 pixels with x / 255)")
            models.check_loss_params(loss_fn, params, batch.shape[1:], "the batch")
        out = loss_fn(params, key, batch, **kwargs)
        if isinstance(out, (tuple, list, dict)):
            # e.g. (loss, aux) for jax.value_and_grad(has_aux=True): numpy would fail on the tracers
            raise ValueError(
                "loss_fn must return a floating-point scalar (the batch's mean loss), "
                f"got a {type(out).__name__} of {len(out)}; return the loss alone (no aux values)")
        shape, dtype = tuple(jnp.shape(out)), jnp.result_type(out)
        if shape != () or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                "loss_fn must return a floating-point scalar (the batch's mean loss), "
                f"got shape {shape} and dtype {dtype}"
            )
        return out

    return wrapped


def from_optax(loss_fn, transformation: optax.GradientTransformation) -> Optimizer:
    """Any Optax transformation as an :class:`Optimizer`: one gradient step per batch.

    ``GradientTransformationExtraArgs`` (``optax.lbfgs``, ``annealing.as_optax``)
    also receive ``value``, ``grad`` and ``value_fn(params)``: the loss on
    this batch with this step's noise. A scheduled loss (:func:`is_scheduled`)
    is called with ``step=state.count``, the number of steps done (0 at the
    first); the count is saved with the state, so a resumed run continues the
    schedule.

    Args:
      loss_fn: ``loss_fn(params, key, x) -> scalar``.
      transformation: an ``optax.GradientTransformation``.
    Returns:
      ``Optimizer`` with ``cost = GRAD_COST`` and states :class:`OptaxState`.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
    if not isinstance(transformation, optax.GradientTransformation):
        raise ValueError("transformation must be an optax.GradientTransformation, "
                         f"got {type(transformation).__name__}")
    checked = checked_loss(loss_fn)
    scheduled = is_scheduled(loss_fn)
    extra_args = isinstance(transformation, optax.GradientTransformationExtraArgs)

    def init(params):
        return OptaxState(params=params, opt_state=transformation.init(params), count=jnp.zeros((), jnp.int32))

    def step(key, state, batch):
        kwargs = {"step": state.count} if scheduled else {}
        value_fn = lambda p: checked(p, key, batch, **kwargs)  # noqa: E731
        loss, grads = jax.value_and_grad(value_fn)(state.params)
        extra = {"value": loss, "grad": grads, "value_fn": value_fn} if extra_args else {}
        updates, opt_state = transformation.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        return OptaxState(params=params, opt_state=opt_state, count=state.count + 1), OptaxInfo(loss=loss)

    return Optimizer(init=init, step=step, cost=GRAD_COST, loss_fn=loss_fn)


def as_optimizer(optimizer, loss_fn=None) -> Optimizer:
    """What users pass as ``optimizer``, as an :class:`Optimizer`.

    Accepts an ``optax.GradientTransformation`` (wrapped on ``loss_fn`` by
    :func:`from_optax`) or an ``Optimizer`` (an annealer from
    ``annealing.simulated_annealing``), which must have been built on
    ``loss_fn`` when one is given.
    """
    if isinstance(optimizer, optax.GradientTransformation):
        if loss_fn is None:
            raise ValueError("loss_fn is required to run an optax.GradientTransformation")
        return from_optax(loss_fn, optimizer)
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            "optimizer must be an optax.GradientTransformation or a savae_jax Optimizer "
            f"(e.g. annealing.simulated_annealing(...)), got {type(optimizer).__name__}")
    if loss_fn is not None and optimizer.loss_fn is not loss_fn:
        raise ValueError(
            "optimizer was built on a different loss_fn than the one passed here: it would train "
            "on its own loss while the run reports this one; build it on this loss_fn "
            "(e.g. simulated_annealing(loss_fn, ...)) or pass its own optimizer.loss_fn")
    return optimizer
