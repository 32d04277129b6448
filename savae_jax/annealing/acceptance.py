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
  confidence bound of the true dL lies below -margin (a paired t-test).

The optimizer's curse (Smith & Winkler 2006): the smallest of K noisy loss
estimates is biased low (by about s * E[max of K standard normals]), so a
difference measured on the batch that *selected* the candidate is not an
unbiased estimate and the noise-aware rules' guarantees do not hold for it.
Apply them to an independent decision batch (other examples, fresh noise).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
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
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (jittable, vmappable).

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


def confident(alpha: float = 0.05, margin: float = 0.0) -> Acceptance:
    """Significance rule: accept iff the upper (1 - alpha) confidence bound of dL is below -margin.

    Deterministic: accept iff dL + q * s < -margin, with s = ``stderr`` and q
    the (1 - alpha) quantile of Student's t with n - 1 degrees of freedom
    (:func:`student_t_quantile`; n = ``num``). When the per-example
    differences are Gaussian with true mean Delta >= -margin, the probability
    of accepting is at most alpha (a one-sided paired t-test of level alpha);
    an accepted move is, with that confidence, better by more than ``margin``.
    The key and T are unused, so the rule never accepts a worse move on
    purpose: use it to refine, not to explore.

    With n < 2 there is no variance estimate and the rule rejects; with s = 0
    it is accept iff dL < -margin. A non-finite ``delta`` or ``stderr``, or
    ``stderr < 0``, is rejected.

    Args:
      alpha: the test's level (false-acceptance probability), in (0, 0.5).
      margin: the improvement required, in loss units, >= 0.

    Returns:
      ``accept(key, delta, temperature, *, stderr, num) -> bool`` with
      ``needs_stderr = True``.
    """
    validation.in_interval("alpha", alpha, 0, 0.5)
    validation.non_negative("margin", margin)

    def accept(key, delta, temperature, *, stderr, num):
        delta, stderr = jnp.asarray(delta), jnp.asarray(stderr)
        num = jnp.asarray(num)
        q = student_t_quantile(1 - jnp.asarray(alpha, jnp.float32), jnp.maximum(num - 1, 1))
        bound = delta + q * stderr
        return _finite_stderr(delta, stderr) & (num >= 2) & (bound < -jnp.asarray(margin, jnp.float32))

    accept.needs_stderr = True
    return accept
