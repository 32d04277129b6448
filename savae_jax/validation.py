"""Argument checks shared by the library: each raises ValueError naming the argument.

Every message has the form ``"{name} must be {what}, got {value!r}"`` (tests
and docs/bad_inputs.md match on these texts, so a helper never rewords
one). Checks run eagerly, when an object is built; values that JAX traces
(a hyperparameter swept with ``jax.vmap``) cannot be inspected in Python and
are let through by :func:`real` and the helpers built on it.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable

import jax
import numpy as np


def is_traced(value) -> bool:
    """Whether ``value`` is a JAX tracer (under jit/vmap/grad), so not checkable in Python."""
    return isinstance(value, jax.core.Tracer)


def real(name: str, value, ok: Callable[[float], bool], what: str) -> None:
    """Check that ``value`` is a finite real number with ``ok(float(value))``.

    Python and NumPy numbers and 0-d arrays count; a bool or a string does
    not (``float`` would read ``True`` as 1.0 and ``"0.5"`` as 0.5); a
    traced value is not checked.

    Args:
      name: the argument, as the message names it.
      value: the value given.
      ok: the condition on the float value.
      what: the condition in words, e.g. ``"> 0"`` or ``"in (0, 1)"``.
    """
    if is_traced(value):
        return
    if isinstance(value, (bool, np.bool_, str, bytes)):  # float() would take True as 1.0 and "0.5" as 0.5
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def positive(name: str, value) -> None:
    """Check that ``value`` is a finite real number > 0 (see :func:`real`)."""
    real(name, value, lambda v: v > 0, "> 0")


def non_negative(name: str, value) -> None:
    """Check that ``value`` is a finite real number >= 0 (see :func:`real`)."""
    real(name, value, lambda v: v >= 0, ">= 0")


def in_interval(name: str, value, low: float, high: float, closed_low: bool = False) -> None:
    """Check that ``value`` is a real number in (low, high), or [low, high) with ``closed_low``."""
    above = (lambda v: v >= low) if closed_low else (lambda v: v > low)
    bracket = "[" if closed_low else "("
    real(name, value, lambda v: above(v) and v < high, f"in {bracket}{low:g}, {high:g})")


def integer(name: str, value, minimum: int, optional: bool = False) -> None:
    """Check that ``value`` is a Python/NumPy integer (not a bool) >= ``minimum``.

    Args:
      name: the argument.
      value: the value given.
      minimum: the smallest value allowed.
      optional: None is allowed too (the message then says "or None").
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        alternative = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{alternative}, got {value!r}")


def finite_positive(name: str, value, optional: bool = False) -> None:
    """Check that ``value`` is a finite Python/NumPy real > 0 (arrays and tracers refused).

    For arguments compared with traced values in Python control flow
    (``if t_min is not None``), which must be static numbers.

    Args:
      name: the argument.
      value: the value given.
      optional: None is allowed too (the message then says "or None").
    """
    if optional and value is None:
        return
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        alternative = " or None" if optional else ""
        raise ValueError(f"{name} must be a finite number > 0{alternative}, got {value!r}")


def at_least(name: str, value, low: float = 0.0, strict: bool = False) -> None:
    """Check ``value >= low`` (``value > low`` with ``strict``); the message shows ``str(value)``.

    Unlike :func:`real`, NaN and non-numbers are not given their own message
    (NaN fails the comparison; a non-number raises TypeError there).
    """
    ok = value > low if strict else value >= low
    if not ok:
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")


def is_callable(name: str, value, example: str = "") -> None:
    """Check that ``value`` is callable; ``example`` (e.g. ``"metropolis()"``) is suggested."""
    if not callable(value):
        hint = f" (e.g. {example})" if example else ""
        raise ValueError(f"{name} must be callable{hint}, got {value!r}")


def instance(name: str, value, cls: type, example: str = "") -> None:
    """Check ``isinstance(value, cls)``; ``example`` (e.g. ``"gaussian(0.1)"``) is suggested."""
    if not isinstance(value, cls):
        hint = f" (e.g. {example})" if example else ""
        raise ValueError(f"{name} must be a {cls.__name__}{hint}, got {value!r}")


def rule(name: str, value, num_args: int, example: str) -> None:
    """Check that ``value`` can be called with ``num_args`` positional arguments.

    Catches a factory passed uncalled (``acceptance=metropolis`` instead of
    ``metropolis()``), which would otherwise fail at the first traced step.
    Callables whose signature Python cannot read are let through.
    """
    is_callable(name, value, example)
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return
    # Keyword-only arguments (a noise-aware rule's stderr=) are the caller's business, not the factory's.
    keywords = {k: None for k, q in signature.parameters.items()
                if q.kind is q.KEYWORD_ONLY and q.default is q.empty}
    try:
        signature.bind(*range(num_args), **keywords)
    except TypeError:
        raise ValueError(f"{name} must be a rule taking {num_args} arguments, such as {example} "
                         f"(a factory must be called), got {value!r}") from None


def integer_number(name: str, value, minimum: int) -> None:
    """Check that ``value`` is an integer >= ``minimum``: an int, or an integral 0-d array (not a bool or float).

    For sizes and counts (``batch_size``, ``num_samples``): ``True`` or
    ``1.9`` would otherwise be used as 1.
    """
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and not is_traced(value):
        if np.issubdtype(value.dtype, np.integer):
            value = int(value)
    integer(name, value, minimum)

