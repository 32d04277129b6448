"""Acceptance rules: ``accept(key, delta, temperature) -> bool``, some of them noise-aware.

``delta`` = L(candidate) - L(incumbent), both on the same examples and the same
reparameterisation noise; ``temperature`` = T of this step. Rules are plain
functions of scalars (scalar bool out), so ``jax.jit`` and ``jax.vmap`` (over
chains, over draws) work. A rule must return False for a non-finite (NaN or
+inf) ``delta``.

Two kinds of rule, told apart by the function attribute ``needs_stderr``
(read it with :func:`needs_stderr`):

- **Plain rules** (``needs_stderr = False``): called with the three positional
  arguments only. ``metropolis``, ``threshold``, ``greedy``.
- **Noise-aware rules** (``needs_stderr = True``): called as
  ``rule(key, delta, temperature, stderr=..., num=...)``, where ``delta`` is a
  mean of ``num`` paired per-example differences and ``stderr`` = s / sqrt(num)
  its standard error (float32 >= 0; ``num`` an int32). ``penalty``,
  ``confident``.

The formulas (dL = delta, s = stderr, n = num):

- metropolis: accept iff dL < 0 or u < exp(-dL / T), u ~ U[0, 1).
- threshold(alpha, d): accept iff dL < (T + d) ln(1 / alpha).
- greedy: accept iff dL < 0.
- penalty (Ceperley & Dewing 1999): accept iff u < exp(-dL / T - s^2 / (2 T^2)).
  For Gaussian noise on dL with known s this keeps detailed balance:
  P(accept | Delta) / P(accept | -Delta) = exp(-Delta / T).
- confident(alpha, margin): accept iff dL + q s < -margin, q the (1 - alpha)
  quantile of Student's t with n - 1 degrees of freedom: the one-sided upper
  confidence bound of the true dL lies below -margin (a paired t-test). q is
  exact (a table from scipy, looked up on n) when a bound on n is known: the
  annealers bind it (:func:`with_max_num`); else an expansion
  (:func:`student_t_quantile`).

The optimizer's curse (Smith & Winkler 2006): the smallest of K noisy loss
estimates is biased low (by about s * E[max of K standard normals]), so a
difference measured on the batch that *selected* the candidate is not an
unbiased estimate and the noise-aware rules' guarantees do not hold for it.
Apply them to an independent decision batch (other examples, fresh noise).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from savae_jax import validation

Acceptance = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def needs_stderr(rule) -> bool:
    """Whether ``rule`` is noise-aware (wants the ``stderr=`` and ``num=`` keywords).

    Args:
      rule: an acceptance rule.

    Returns:
      ``bool(rule.needs_stderr)``; False for a rule without the attribute.
    """
    return bool(getattr(rule, "needs_stderr", False))


def check_rule(acceptance, name: str = "acceptance") -> None:
    """Check that ``acceptance`` is a rule, not an uncalled factory (ValueError naming ``name``).

    Every optimizer that takes a rule (annealing, ES, and replica exchange and
    polish through them) checks it here when it is built.
    """
    validation.rule(name, acceptance, 3, "metropolis()")


def with_max_num(rule, max_num: int):
    """``rule`` for decisions on at most ``max_num`` examples (``num <= max_num``).

    A rule that can use the bound (one with a ``with_max_num`` attribute:
    :func:`confident`, which then looks its Student-t quantile up in a table
    of exact values) is rebuilt with it; any other rule is returned as it is.
    The annealers (``simulated_annealing``, ``evolution_strategy``) call this
    with their decision batch's ``max_size``, or with the selection batch's
    size when they decide on it.

    Args:
      rule: an acceptance rule.
      max_num: the largest ``num`` the rule will be called with, >= 2.
    """
    bind = getattr(rule, "with_max_num", None)
    return rule if bind is None else bind(int(max_num))


def metropolis() -> Acceptance:
    """Metropolis rule: accept iff dL < 0 or u < exp(-dL / T), u ~ U[0, 1).

    The probability of accepting a worse move is exp(-dL / T); at T = 0 only
    improvements are accepted.
    """

    def accept(key, delta, temperature):
        u = jax.random.uniform(key, (), jnp.float32)
        return (delta < 0) | (u < jnp.exp(-delta / temperature))

    accept.needs_stderr = False
    return accept


def threshold(alpha: float, d: float = 0.0) -> Acceptance:
    """The seed document's deterministic rule: accept iff exp(-dL / (T + d)) > alpha.

    Equivalently dL < (T + d) * ln(1 / alpha), which is what is evaluated (it
    is also defined at T + d = 0, where it reduces to dL < 0). The key is
    unused.

    Args:
      alpha: threshold on the Boltzmann factor, in (0, 1).
      d: offset added to the temperature, >= 0.
    """
    validation.in_interval("alpha", alpha, 0, 1)
    validation.non_negative("d", d)
    log_inv_alpha = -jnp.log(alpha) if validation.is_traced(alpha) else -math.log(alpha)

    def accept(key, delta, temperature):
        bound = (jnp.asarray(temperature, jnp.float32) + d) * jnp.asarray(log_inv_alpha, jnp.float32)
        return delta < bound

    accept.needs_stderr = False
    return accept


def greedy() -> Acceptance:
    """Greedy descent: accept iff dL < 0 (T and the key are ignored)."""

    def accept(key, delta, temperature):
        return delta < 0

    accept.needs_stderr = False
    return accept


def _finite_stderr(delta, stderr):
    """Whether ``delta`` and ``stderr`` are usable: both finite and ``stderr >= 0``."""
    return jnp.isfinite(delta) & jnp.isfinite(stderr) & (stderr >= 0)


def penalty() -> Acceptance:
    """Ceperley & Dewing's penalty rule: accept iff u < exp(-dL / T - s^2 / (2 T^2)).

    u ~ U[0, 1) from the key, s = ``stderr``. If dL is Gaussian around the true
    difference Delta with standard deviation s, the acceptance probability is
    A(Delta) with A(Delta) / A(-Delta) = exp(-Delta / T): detailed balance, as
    for Metropolis on the exact loss. The penalty s^2 / (2 T^2) is what the
    noise costs; it dominates once s is comparable to T.

    At T <= 0 (and NaN) the rule is its limit T -> 0+: the exponent
    -(dL + s^2 / (2 T)) / T goes to -inf when s > 0 (reject), and the rule is
    greedy (accept iff dL < 0) when s = 0. A tiny T > 0 reaches the same
    answers without NaN because the exponent is evaluated in that factored form.
    A non-finite ``delta`` or ``stderr``, or ``stderr < 0``, is rejected.

    Returns:
      ``accept(key, delta, temperature, *, stderr, num=None) -> bool`` with
      ``needs_stderr = True``; ``num`` is accepted for the protocol and unused.
    """

    def accept(key, delta, temperature, *, stderr, num=None):
        delta, stderr = jnp.asarray(delta), jnp.asarray(stderr)
        temperature = jnp.asarray(temperature)
        hot = temperature > 0
        t = jnp.where(hot, temperature, 1.0)  # a safe divisor in the branch not taken
        # Factored so that T**2 never underflows to 0 against a finite s**2 (inf - inf).
        exponent = -(delta + stderr**2 / (2 * t)) / t
        u = jax.random.uniform(key, (), jnp.float32)
        warm = u < jnp.exp(exponent)
        cold = (stderr == 0) & (delta < 0)
        return _finite_stderr(delta, stderr) & jnp.where(hot, warm, cold)

    accept.needs_stderr = True
    return accept


def _cornish_fisher(z, df):
    """Cornish-Fisher expansion of Student's t quantile in the normal quantile ``z``.

    Abramowitz & Stegun 26.7.5, terms up to df**-4.

    Args:
      z: the standard normal quantile at the same probability.
      df: degrees of freedom (> 0).

    Returns:
      The approximate t quantile.
    """
    z2 = z * z
    g1 = z * (z2 + 1) / 4
    g2 = z * ((5 * z2 + 16) * z2 + 3) / 96
    g3 = z * (((3 * z2 + 19) * z2 + 17) * z2 - 15) / 384
    g4 = z * ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) / 92160
    return z + (g1 + (g2 + (g3 + g4 / df) / df) / df) / df


def student_t_quantile(p, df):
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (jittable, vmappable), approximately.

    The fallback of :func:`confident` where no bound on the number of
    examples is known (a rule built without ``max_num`` and called directly,
    or a traced ``alpha``); the annealers use exact quantiles
    (:func:`t_quantile_table`, bound by :func:`with_max_num`).

    Exact closed forms for df = 1 and df = 2; the Cornish-Fisher expansion
    (A&S 26.7.5, four terms) for df >= 3. Relative error against
    ``scipy.stats.t.ppf`` for p in [0.5, 0.999]: below 2.1e-4 for df >= 9
    (n >= 10 examples); below 2.2e-5 for p <= 0.99 and 2.1e-6 for p <= 0.95
    there; for 3 <= df <= 8 below 3.9e-3 at p <= 0.99 and 2.8e-2 at p = 0.999.
    Add float32 rounding: ~1e-6, up to 1.3e-5 for df = 1 at p = 0.999, where
    1 - p loses digits. The expansion underestimates |t|, so
    with few examples a test built on it is very slightly liberal.

    Args:
      p: probability in (0, 1).
      df: degrees of freedom, >= 1 (a float or an integer array).

    Returns:
      The quantile, in float32.
    """
    p = jnp.asarray(p, jnp.float32)
    df = jnp.asarray(df, jnp.float32)
    one = 1.0 / jnp.tan(jnp.pi * (1 - p))  # df = 1 (Cauchy): tan(pi (p - 1/2))
    two = (2 * p - 1) / jnp.sqrt(2 * p * (1 - p))
    many = _cornish_fisher(ndtri(p), jnp.maximum(df, 3.0))
    return jnp.where(df < 1.5, one, jnp.where(df < 2.5, two, many))


@functools.lru_cache(maxsize=64)
def t_quantile_table(alpha: float, max_df: int) -> np.ndarray:
    """The exact (1 - ``alpha``) quantiles of Student's t for df = 1 .. ``max_df``: entry df - 1, float32.

    Computed once per (alpha, max_df) with ``scipy.stats.t.isf(alpha, df)``
    (= ``t.ppf(1 - alpha, df)``, without rounding 1 - alpha) in float64 and
    rounded to float32; the array is read-only (it is cached).

    Args:
      alpha: the upper tail probability, a Python float in (0, 1).
      max_df: the largest degrees of freedom, >= 1.
    """
    from scipy import stats  # a dependency of jax; imported here, where a table is built

    table = stats.t.isf(float(alpha), np.arange(1, int(max_df) + 1)).astype(np.float32)
    table.flags.writeable = False
    return table


def _t_quantile(alpha, df, max_num: int | None):
    """The (1 - alpha) t quantile at ``df``: from the exact table when ``max_num`` bounds n, else approximated."""
    if max_num is None:
        return student_t_quantile(1 - jnp.asarray(alpha, jnp.float32), df)
    # df > max_num - 1 cannot occur; clipped, it would take a larger quantile (a stricter test).
    return jnp.take(jnp.asarray(t_quantile_table(float(alpha), max_num - 1)), df - 1, mode="clip")


def confident(alpha: float = 0.05, margin: float = 0.0, max_num: int | None = None) -> Acceptance:
    """Significance rule: accept iff the upper (1 - alpha) confidence bound of dL is below -margin.

    Deterministic: accept iff dL + q * s < -margin, with s = ``stderr`` and q
    the (1 - alpha) quantile of Student's t with n - 1 degrees of freedom
    (n = ``num``). When the per-example
    differences are Gaussian with true mean Delta >= -margin, the probability
    of accepting is at most alpha (a one-sided paired t-test of level alpha);
    an accepted move is, with that confidence, better by more than ``margin``.
    The key and T are unused, so the rule never accepts a worse move on
    purpose: use it to refine, not to explore.

    Which quantile: with ``max_num`` (and ``alpha`` a number, not traced), q
    is exact, looked up on n - 1 in :func:`t_quantile_table`, built when the
    rule is. The annealers (``simulated_annealing``,
    ``evolution_strategy``) rebuild the rule so, with ``max_num`` their
    decision batch's ``max_size`` or their selection batch's size
    (:func:`with_max_num`): inside them q is always exact. Without a bound
    (the rule called directly, or a traced ``alpha``), q is the Cornish-Fisher
    approximation :func:`student_t_quantile` (relative error below 2.1e-4
    for n >= 10, up to 2.8e-2 for n <= 9).

    With n < 2 there is no variance estimate and the rule rejects; with s = 0
    it is accept iff dL < -margin. A non-finite ``delta`` or ``stderr``, or
    ``stderr < 0``, is rejected.

    Args:
      alpha: the test's level (false-acceptance probability), in (0, 0.5).
      margin: the improvement required, in loss units, >= 0.
      max_num: the largest ``num`` the rule is called with (>= 2), or None.

    Returns:
      ``accept(key, delta, temperature, *, stderr, num) -> bool`` with
      ``needs_stderr = True`` and ``with_max_num(n) -> rule`` (the same rule
      bound to ``num <= n``).
    """
    validation.in_interval("alpha", alpha, 0, 0.5)
    validation.non_negative("margin", margin)
    validation.integer("max_num", max_num, 2, optional=True)
    bound = None if max_num is None or validation.is_traced(alpha) else int(max_num)

    def accept(key, delta, temperature, *, stderr, num):
        delta, stderr = jnp.asarray(delta), jnp.asarray(stderr)
        num = jnp.asarray(num)
        q = _t_quantile(alpha, jnp.maximum(num - 1, 1), bound)
        upper = delta + q * stderr
        return _finite_stderr(delta, stderr) & (num >= 2) & (upper < -jnp.asarray(margin, jnp.float32))

    accept.needs_stderr = True
    accept.with_max_num = functools.partial(confident, alpha, margin)
    return accept
