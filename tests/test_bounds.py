"""Box constraints (issue 26): every point a bounded search evaluates or returns lies in the box.

The searches run on a loss that is NaN outside the box: a NaN proposal never
wins, but it is counted (``info.num_nonfinite``), and an incumbent outside
would set ``info.error``; so "no NaN anywhere" means "no point outside was
ever evaluated".
"""

from __future__ import annotations

import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from savae_jax import annealing as an
from savae_jax import driver
from savae_jax.annealing import bounds
from conftest import slow_after_first

LOW, HIGH = -1.0, 1.0
X = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)


class Tiny(nn.Module):
    """Two Dense layers: low_rank proposals and ES noise need Dense kernels."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.tanh(nn.Dense(4)(x)))


MODEL = Tiny()


def inside(params, low=LOW, high=HIGH):
    return jnp.all(jnp.array([jnp.all((leaf >= low) & (leaf <= high)) for leaf in jax.tree.leaves(params)]))


def guarded(params, key, batch):
    """A smooth loss whose minimum lies outside the box (targets 3.0), NaN at any point outside it."""
    value = jnp.sum((MODEL.apply(params, X) - 3.0) ** 2)
    return jnp.where(inside(params), value, jnp.nan)


def start():
    raw = MODEL.init(jax.random.key(0), X)
    return bounds.project(raw, bounds.for_params(bounds.check((LOW, HIGH)), raw))


def run_chains(optimizer, chains: int, steps: int):
    """``steps`` jitted steps of ``chains`` vmapped chains in one scan: (final states, stacked infos).
    The loss takes no data: the batch is None, for the annealer and the ES step alike."""
    states = jax.vmap(lambda _: optimizer.init(start()))(jnp.arange(chains))

    def body(states, key):
        return jax.vmap(optimizer.step, in_axes=(0, 0, None))(jax.random.split(key, chains), states, None)

    return jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(1), steps)))(states)


PROPOSALS = {
    "gaussian": an.gaussian(0.5),
    "cauchy": an.cauchy(0.3),
    "cauchy-fraction": an.cauchy(0.3, fraction=0.2),
    "low_rank": an.low_rank(0.5, rank=2),
    "langevin": an.langevin(0.05),
}


# The gaussian case runs by default, the other proposals in the slow tier (the box check is one
# mechanism for every proposal; each proposal's own bounded step is tested below).
@pytest.mark.parametrize("name", slow_after_first(list(PROPOSALS)))
def test_ten_thousand_bounded_steps_never_evaluate_or_return_a_point_outside(name):
    """64 chains x 157 steps (10,048 steps) of each proposal kind at a scale that leaves the box often."""
    sa = an.simulated_annealing(guarded, 4, PROPOSALS[name], 1.0, an.metropolis(), bounds=(LOW, HIGH))
    states, infos = run_chains(sa, 64, 157)
    assert int(infos.num_nonfinite.sum()) == 0 and not bool(infos.error.any())
    assert bool(inside(states.params)) and bool(inside(states.best_params))
    assert bool(jnp.all(jnp.isfinite(states.best_loss)))
    # The box was tested: most proposals left it and were reflected (measured: 32,907 of 40,192 for
    # cauchy with fraction 0.2, over 40,000 for the others), and the chains moved (measured: 711 to
    # 6,239 accepted moves).
    assert int(infos.num_reflected.sum()) > 10_000, int(infos.num_reflected.sum())
    assert int(infos.accepted.sum()) > 300


def test_without_bounds_the_same_steps_do_leave_the_box():
    """The check above can fail: unbounded, gaussian chains evaluate points outside (NaN proposals)."""
    sa = an.simulated_annealing(guarded, 4, PROPOSALS["gaussian"], 1.0, an.metropolis())
    _, infos = run_chains(sa, 8, 20)
    assert int(infos.num_nonfinite.sum()) > 0
    assert int(infos.num_reflected.sum()) == 0


# low_rank in the slow tier: the bounds act on the materialised members either way.
@pytest.mark.parametrize("noise", slow_after_first(["gaussian", "low_rank"]))
def test_bounded_es_steps_evaluate_and_return_points_inside(noise):
    es = an.evolution_strategy(guarded, 4, 0.5, noise=noise, optimizer=optax.sgd(0.5), temperature=1.0,
                               bounds=(LOW, HIGH))
    states, infos = run_chains(es, 16, 40)
    assert bool(jnp.all(jnp.isfinite(infos.member_loss_mean)))  # no member outside: NaN would propagate
    assert bool(jnp.all(jnp.isfinite(infos.loss)))
    assert bool(inside(states.params))
    assert int(infos.num_reflected.sum()) > 0 and int(infos.accepted.sum()) > 0
    # The optimum (targets at 3.0) lies outside: the projected moves end on the box's faces.
    assert float(jnp.max(jnp.abs(jax.tree.leaves(states.params)[1]))) == pytest.approx(HIGH, abs=1e-6)


def test_a_polished_bounded_annealer_never_evaluates_outside_and_ends_on_the_face():
    """L-BFGS polish toward an optimum outside the box: every loss it evaluates (gradient and line
    search alike, recorded on the host) is at a point inside, and the polished point sits on the face."""
    seen = []

    def recorded(params, key, batch):
        jax.debug.callback(lambda v: seen.append(float(v)), jnp.max(jnp.abs(params)))
        return jnp.sum((params - 3.0) ** 2)

    sa = an.simulated_annealing(recorded, 2, an.gaussian(0.3), 0.1, an.metropolis(), bounds=(LOW, HIGH))
    polished = an.local_polish(sa, recorded, optax.lbfgs(), num_steps=10, every=5)
    assert polished.bounds == sa.bounds
    state = polished.init(jnp.zeros(3))
    step = jax.jit(polished.step)
    for i in range(10):
        state, _ = step(jax.random.key(i), state, None)
    assert int(state.num_polished) >= 1 and len(seen) > 30
    assert max(seen) <= HIGH
    np.testing.assert_array_equal(np.asarray(state.params), np.full(3, HIGH, np.float32))


def test_replica_exchange_of_bounded_annealers_keeps_every_replica_inside():
    def loss(p, key, batch):
        return jnp.where(jnp.all(jnp.abs(p) <= 2.0), jnp.sum(jnp.cos(3 * p)), jnp.nan)

    pt = an.replica_exchange(lambda t: an.simulated_annealing(loss, 4, an.cauchy(1.0), t, an.metropolis(),
                                                              bounds=(-2.0, 2.0)),
                             an.geometric_ladder(0.1, 3.0, 4), loss, swap_every=1)
    assert pt.bounds == bounds.Bounds(-2.0, 2.0)
    state, step = pt.init(jnp.zeros(5)), jax.jit(pt.step)
    for i in range(200):
        state, info = step(jax.random.key(i), state, None)
        assert int(info.replicas.num_nonfinite.sum()) == 0
    assert bool(jnp.all(jnp.abs(state.replicas.params) <= 2.0)) and int(state.swap_accepts.sum()) > 0


def test_reflection_folds_long_jumps_and_leaves_points_inside_untouched():
    x = jnp.array([1.25, -0.25, 2.25, -1.5, 0.3, 7.0, 0.0, 1.0], jnp.float32)
    got = bounds.reflect_leaf(x, jnp.float32(0.0), jnp.float32(1.0))
    # By hand: 1.25 -> 0.75, -0.25 -> 0.25, 2.25 -> 0.25 (two folds), -1.5 -> 0.5, 7 -> 1 (7 = 3 * 2 + 1).
    np.testing.assert_allclose(np.asarray(got), [0.75, 0.25, 0.25, 0.5, 0.3, 1.0, 0.0, 1.0], rtol=0, atol=1e-6)
    assert float(got[4]) == float(x[4])  # an entry inside is the same float, not l + (x - l)


def test_reflected_metropolis_on_a_flat_loss_is_uniform_on_the_box_not_piled_on_the_faces():
    """Reflection keeps a symmetric proposal symmetric, so on a flat loss every move is accepted and
    the chains spread uniformly over [0, 1]; clipping would put a mass of ~0.2 on each face."""
    sa = an.simulated_annealing(lambda p, k, b: 0.0 * jnp.sum(p), 1, an.gaussian(0.4), 1.0, an.metropolis(),
                                bounds=(0.0, 1.0))
    states = jax.vmap(sa.init)(jnp.full((8192, 1), 0.5))

    def body(s, key):
        return jax.vmap(sa.step, in_axes=(0, 0, None))(jax.random.split(key, 8192), s, None)[0], None

    states, _ = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(3), 30)))(states)
    counts, _ = np.histogram(np.asarray(states.params).ravel(), bins=10, range=(0.0, 1.0))
    # Uniform: 819.2 per bin, binomial sd 27.2; 5 sd allowed. The faces hold no point mass.
    assert np.all(np.abs(counts - 819.2) < 5 * 27.2), counts
    assert int(np.sum(np.asarray(states.params) == 0.0) + np.sum(np.asarray(states.params) == 1.0)) < 10


def test_huge_bounds_change_no_bit_of_a_run_that_stays_inside():
    """Points inside are never touched: a bounded gaussian annealer whose box is never reached gives
    the unbounded run's parameters and losses bit for bit."""
    loss = lambda p, k, b: jnp.sum((p - 0.2) ** 2)  # noqa: E731
    runs = []
    for box in (None, (-1e6, 1e6)):
        sa = an.simulated_annealing(loss, 8, an.gaussian(0.1), an.exponential(1.0, 0.99), an.metropolis(), bounds=box)
        state, step, losses = sa.init(jnp.linspace(-1, 1, 6)), jax.jit(sa.step), []
        for i in range(30):
            state, info = step(jax.random.key(i), state, None)
            losses.append(float(info.loss))
        runs.append((np.asarray(state.params), losses))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    # The losses are those of the same points, but the bounded step is another fused program (the
    # reflection's selects sit between the perturbation and the sum), which may round the sum of
    # squares differently: measured 1 float32 ulp at some steps; 4 ulps allowed.
    np.testing.assert_array_max_ulp(np.float32(runs[0][1]), np.float32(runs[1][1]), maxulp=4)


@pytest.mark.slow  # the default tier keeps the ten-thousand-step bounds check and the driver's exact resume
def test_bounded_annealing_is_deterministic_and_resumes_exactly(tmp_path):
    def loss(p, key, batch):
        return jnp.sum((p - 3.0) ** 2) + 0.0 * jnp.mean(batch)

    sa = an.simulated_annealing(loss, 8, an.cauchy(0.5), an.exponential(1.0, 0.95), an.metropolis(),
                                bounds=(-1.0, 1.0))
    images = np.random.default_rng(0).random((64, 2, 2, 1)).astype(np.float32)
    kwargs = dict(batch_size=16, eval_every=4, budget_evals=sa.cost * 24)
    phase = [driver.Phase("sa", sa)]
    a, history, _ = driver.run(jax.random.key(5), phase, jnp.zeros(4), images, **kwargs)
    b, _, _ = driver.run(jax.random.key(5), phase, jnp.zeros(4), images, **kwargs)
    chex.assert_trees_all_equal(a, b)
    assert float(jnp.max(jnp.abs(a))) <= 1.0 and history[-1]["train_loss"] < history[0]["train_loss"]
    ckpt = tmp_path / "ckpt"
    driver.run(jax.random.key(5), phase, jnp.zeros(4), images, checkpoint_dir=ckpt, checkpoint_every=8, **kwargs)
    shutil.rmtree(ckpt / "24")  # killed after step 16
    c, resumed, _ = driver.run(jax.random.key(5), phase, jnp.zeros(4), images, checkpoint_dir=ckpt,
                               checkpoint_every=8, resume=True, **kwargs)
    chex.assert_trees_all_equal(c, a)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in history]
