"""Replica exchange: exact sampling on a double well, the swap rule, and the run protocol."""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import annealing as an
from savae_jax import driver
from savae_jax.annealing import tempering

TILT = 0.05


def double_well(params, key, batch):
    """U(x) = (x^2 - 1)^2 + 0.05 x: two wells at x ~ -1 and x ~ +1, barrier ~1 between them."""
    x = params[0]
    return (x**2 - 1.0) ** 2 + TILT * x


def exact_left_fraction(temperature: float) -> float:
    """P(x < 0) under exp(-U(x) / T), by the trapezoid rule on a fine grid."""
    x = np.linspace(-3.0, 3.0, 600_001)
    w = np.exp(-((x**2 - 1.0) ** 2 + TILT * x) / temperature)
    return float(np.trapezoid(np.where(x < 0, w, 0.0), x) / np.trapezoid(w, x))


@pytest.mark.slow  # a statistical demonstration over a long chain; the swap rule's formula test stays
def test_the_coldest_replica_samples_the_boltzmann_distribution_of_a_double_well():
    """K = 1 proposal per step makes every replica an exact Metropolis chain; with swaps across a
    ladder 0.1 .. 1.6 the coldest replica crosses a barrier it could not cross alone (height
    ~1 at T = 0.1: exp(-10)) and its occupation of the left well matches the exact value."""
    ladder = tempering.geometric_ladder(0.1, 2.0, 5)
    pt = tempering.replica_exchange(
        lambda t: an.simulated_annealing(double_well, 1, an.gaussian(0.3), t, an.metropolis()),
        ladder, double_well)
    chains, steps, burn_in = 512, 3000, 500
    batch = jnp.zeros((1,))

    def chain(key):
        def body(state, k):
            state, info = pt.step(k, state, batch)
            return state, (state.params[0] < 0, info.swapped)
        state = pt.init(jnp.array([1.0]))  # every chain starts in the less likely (right) well
        state, (left, swapped) = jax.lax.scan(body, state, jax.random.split(key, steps))
        return left[burn_in:].mean(), state.swap_accepts / jnp.maximum(state.swap_attempts, 1)

    left, swap_rates = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(0), chains))
    left = np.asarray(left, np.float64)
    estimate, se = left.mean(), left.std(ddof=1) / np.sqrt(chains)
    exact = exact_left_fraction(0.1)
    # Measured: exact 0.7269, estimate 0.7252 with se 0.0020; pair swap rates 0.72, 0.74, 0.79, 0.85.
    assert 0.6 < exact < 0.8  # the tilt makes the left well the likelier one
    assert abs(estimate - exact) < 4 * se, (estimate, exact, se)
    assert se < 0.01  # the check has power: many crossings per chain
    assert np.all(np.asarray(swap_rates).mean(axis=0) > 0.2)  # every pair of the ladder exchanges
    # The same Metropolis chain at T = 0.1 alone stays where it started (measured: 0.044 left).
    sa = an.simulated_annealing(double_well, 1, an.gaussian(0.3), 0.1, an.metropolis())

    def lone(key):
        def body(state, k):
            state, _ = sa.step(k, state, batch)
            return state, state.params[0] < 0
        return jax.lax.scan(body, sa.init(jnp.array([1.0])), jax.random.split(key, steps))[1][burn_in:].mean()

    assert float(jax.jit(jax.vmap(lone))(jax.random.split(jax.random.key(0), chains)).mean()) < 0.2


@pytest.mark.parametrize("losses, stderrs, temps", [
    ((1.0, 1.3), (0.1, 0.2), (0.5, 1.0)),   # a worse hot replica: p = exp(-0.3 - 0.025) = 0.7225
    ((2.0, 1.0), (0.0, 0.0), (0.5, 1.0)),   # a better hot replica: p = 1
    ((1.0, 1.1), (0.3, 0.3), (0.25, 1.0)),  # a large noise correction: p = exp(-0.3 - 0.81) = 0.33
])
def test_swap_acceptance_matches_its_formula(losses, stderrs, temps):
    losses, stderrs, temps = (jnp.asarray(v, jnp.float32) for v in (losses, stderrs, temps))
    beta = 1 / temps[0] - 1 / temps[1]
    p = float(jnp.minimum(1.0, jnp.exp(beta * (losses[0] - losses[1]) - beta**2 * (stderrs**2).sum() / 2)))
    n = 20_000
    _, proposed, accepted = jax.vmap(lambda k: tempering.exchange(k, losses, stderrs, temps, 0))(
        jax.random.split(jax.random.key(3), n))
    assert bool(jnp.all(proposed))
    rate = float(accepted.mean())
    se = max(np.sqrt(p * (1 - p) / n), 1 / n)
    assert abs(rate - p) <= 4 * se, (rate, p, se)


def test_exchange_swaps_only_the_pairs_of_the_round_and_permutes_consistently():
    # Even round: both pairs have a better hotter replica (p = 1). Odd round: pair (1, 2) has
    # log ratio 0.25 * (1 - 100) = -24.75, never accepted in float32 uniforms.
    losses = jnp.array([5.0, 1.0, 100.0, 1.0])
    temps = jnp.array([1.0, 2.0, 4.0, 8.0])
    zeros = jnp.zeros(4)
    perm, proposed, accepted = tempering.exchange(jax.random.key(0), losses, zeros, temps, 0)
    assert proposed.tolist() == [True, False, True] and accepted.tolist() == [True, False, True]
    assert perm.tolist() == [1, 0, 3, 2]
    perm, proposed, accepted = tempering.exchange(jax.random.key(0), losses, zeros, temps, 1)
    assert proposed.tolist() == [False, True, False]
    assert accepted.tolist() == [False, False, False] and perm.tolist() == [0, 1, 2, 3]



def tiny_pt(loss_fn, swap_every=2):
    ladder = tempering.geometric_ladder(0.01, 3.0, 3)
    return tempering.replica_exchange(
        lambda t: an.simulated_annealing(loss_fn, 4, an.low_rank(1e-2), t, an.metropolis()), ladder, loss_fn,
        swap_every=swap_every)


def test_replica_exchange_runs_in_the_driver_deterministically_and_resumes_exactly(vae, tmp_path):
    """A replica exchange is an Optimizer like any other: the driver runs it (rows log the coldest
    replica's temperature and the swap rate), the same key gives the same bits, one compile serves
    every step, and a run killed mid-way resumes to the same parameters."""
    images, params, loss_fn = vae
    pt = tiny_pt(loss_fn)
    assert pt.cost == 3 * 5 + 2  # 3 replicas x (4 proposals + incumbent) + 3 shared losses every 2 steps
    kwargs = dict(batch_size=100, eval_every=4, budget_evals=17 * 12)
    a, history, _ = driver.run(jax.random.key(1), [driver.Phase("pt", pt)], params, images, **kwargs)
    b, _, _ = driver.run(jax.random.key(1), [driver.Phase("pt", pt)], params, images, **kwargs)
    chex.assert_trees_all_equal(a, b)
    assert [r["step"] for r in history] == [4, 8, 12]
    assert set(history[-1]) >= {"temperature", "acceptance_rate", "swap_rate"}
    assert history[-1]["temperature"] == pytest.approx(0.01)
    assert 0.0 <= history[-1]["swap_rate"] <= 1.0
    assert jax.tree.structure(a) == jax.tree.structure(params)
    ckpt = tmp_path / "ckpt"
    driver.run(jax.random.key(1), [driver.Phase("pt", pt)], params, images, checkpoint_dir=ckpt, **kwargs)
    shutil.rmtree(ckpt / "12")  # killed after step 8
    c, resumed, _ = driver.run(jax.random.key(1), [driver.Phase("pt", pt)], params, images, checkpoint_dir=ckpt,
                            resume=True, **kwargs)
    chex.assert_trees_all_equal(c, a)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in history]


def test_one_trace_serves_every_step_and_a_swap_moves_parameters_between_slots(vae):
    """Swaps alternate between the pairs (0, 1) and (1, 2); after an accepted swap each slot holds
    the parameters whose shared-batch loss was its neighbour's (checked by re-evaluating them)."""
    images, params, loss_fn = vae
    ladder = tempering.geometric_ladder(1.0, 1.2, 3)  # warm and close: swaps are accepted often
    pt = tempering.replica_exchange(
        lambda t: an.simulated_annealing(loss_fn, 4, an.low_rank(1e-2), t, an.metropolis()), ladder, loss_fn)
    traces = []

    def counted(key, state, x):
        traces.append(1)
        return pt.step(key, state, x)

    step = jax.jit(counted)
    state = pt.init(params)
    x = jnp.asarray(images[:100])
    swaps = 0
    for i in range(12):
        key = jax.random.key(i)
        state, info = step(key, state, x)
        key_loss = jax.random.split(key, 3)[1]  # the step's shared key (see replica_exchange)
        held = jax.vmap(lambda p: loss_fn.per_example(p, key_loss, x).mean())(state.replicas.params)
        s = np.asarray(info.swapped)
        source = np.arange(3)
        for j in np.flatnonzero(s):
            source[j], source[j + 1] = j + 1, j
        # Recomputed outside the step's jit: XLA may sum in another order (seen: 1 float32 ulp of
        # a 47-nat loss); 1e-6 relative is 8 ulps, and the replicas' losses differ by ~1e-2.
        np.testing.assert_allclose(np.asarray(held), np.asarray(info.losses)[source], rtol=1e-6, atol=0)
        swaps += int(s.sum())
    assert len(traces) == 1
    assert state.swap_attempts.tolist() == [6, 6]  # round r proposes pair r % 2
    assert swaps == int(state.swap_accepts.sum()) and swaps >= 3, swaps


def test_bad_ladders_and_settings_are_refused_naming_the_argument(vae):
    _, _, loss_fn = vae
    build = lambda t: an.simulated_annealing(loss_fn, 2, an.gaussian(0.01), t, an.metropolis())  # noqa: E731
    for ladder, needle in (([0.1], "at least 2"), ([0.2, 0.1], "increasing"), ([0.0, 1.0], "> 0"),
                           ([0.1, float("nan")], "finite")):
        with pytest.raises(ValueError, match=f"temperatures must .*{needle}"):
            tempering.replica_exchange(build, ladder, loss_fn)
    with pytest.raises(ValueError, match="swap_every"):
        tempering.replica_exchange(build, [0.1, 0.2], loss_fn, swap_every=0)
    with pytest.raises(ValueError, match="different loss_fn"):
        tempering.replica_exchange(build, [0.1, 0.2], sv.make_loss(sv.MLPVAE(hidden=16, latents=3), beta=0.5))
    with pytest.raises(ValueError, match="ratio must be a number > 1"):
        tempering.geometric_ladder(0.1, 1.0, 4)
    with pytest.raises(ValueError, match="num_replicas"):
        tempering.geometric_ladder(0.1, 2.0, 1)


def test_replicas_may_be_wrapped_optimizers_such_as_a_polished_annealer():
    """Swaps reach through wrappers (optimizer.replace_params): replicas of local_polish(annealer)
    exchange their incumbents like bare annealers do."""
    build = lambda t: an.local_polish(  # noqa: E731
        an.simulated_annealing(double_well, 1, an.gaussian(0.3), t, an.metropolis()), double_well,
        optax.sgd(0.01), 2, 5)
    pt = tempering.replica_exchange(build, tempering.geometric_ladder(0.1, 2.0, 4), double_well)
    state = pt.init(jnp.array([1.0]))
    step = jax.jit(pt.step)
    for i in range(40):
        state, info = step(jax.random.key(i), state, jnp.zeros((1,)))
    assert int(state.swap_accepts.sum()) > 0 and int(state.replicas.num_polished.sum()) > 0
    np.testing.assert_array_equal(np.asarray(state.params), np.asarray(state.replicas.inner.params[0]))
    with pytest.raises(TypeError, match="neither a params field"):
        sv.optimizer.replace_params((1, 2), 0)


# Slow tier: ES replicas; the exchange's driver run, determinism and resume stay in the default run
# (SA replicas).
@pytest.mark.slow
def test_replicas_may_be_es_steps_and_the_exchange_resumes_exactly(vae, tmp_path):
    """R = 3 ES recombination steps on a ladder (temperature is the ES rule's T): the driver runs
    them like any optimizer, the coldest replica learns, the same key gives the same bits, and a
    run killed mid-way resumes to the same parameters and losses."""
    images, params, loss_fn = vae
    build = lambda t: an.evolution_strategy(loss_fn, 4, 1e-2, optimizer=optax.adam(1e-2),  # noqa: E731
                                            temperature=t)
    # A warm, close ladder, so that swaps are accepted (measured swap rate 1.0 at the last row).
    pt = tempering.replica_exchange(build, tempering.geometric_ladder(0.3, 1.5, 3), loss_fn, swap_every=2)
    assert pt.cost == 3 * build(0.3).cost + 2  # R members' steps + the shared swap losses, every 2nd step
    kwargs = dict(batch_size=100, eval_every=5, budget_evals=pt.cost * 15)
    a, history, _ = driver.run(jax.random.key(3), [driver.Phase("pt-es", pt)], params, images, **kwargs)
    b, _, _ = driver.run(jax.random.key(3), [driver.Phase("pt-es", pt)], params, images, **kwargs)
    chex.assert_trees_all_equal(a, b)
    x = jnp.asarray(images[:500])
    before, after = (float(loss_fn(p, jax.random.key(9), x)) for p in (params, a))
    assert after < before - 1.0, (before, after)  # 15 ES steps, Adam at lr 1e-2: measured 47.77 -> 45.96
    assert 0.0 < history[-1]["swap_rate"] <= 1.0
    ckpt = tmp_path / "ckpt"
    driver.run(jax.random.key(3), [driver.Phase("pt-es", pt)], params, images, checkpoint_dir=ckpt, **kwargs)
    shutil.rmtree(ckpt / "15")  # killed after step 10
    c, resumed, _ = driver.run(jax.random.key(3), [driver.Phase("pt-es", pt)], params, images,
                            checkpoint_dir=ckpt, resume=True, **kwargs)
    chex.assert_trees_all_equal(c, a)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in history]


def test_replica_exchange_runs_with_jax_enable_x64():
    """Issue 23: with x64 on, the swap round's two branches had float32 and float64 outputs
    (``cond branches must have equal output types``). The double well in float64 parameters."""
    jax.config.update("jax_enable_x64", True)
    try:
        pt = an.replica_exchange(
            lambda t: an.simulated_annealing(double_well, 4, an.gaussian(0.3), t, an.metropolis()),
            an.geometric_ladder(0.1, 3.0, 3), double_well, swap_every=1)
        opt = sv.optimizer.as_optimizer(pt)
        state = opt.init(jnp.array([1.0], jnp.float64))
        step = jax.jit(opt.step)
        for i in range(20):
            state, info = step(jax.random.key(i), state, None)
        assert state.params.dtype == jnp.float64
        assert info.losses.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(info.losses)))
        assert int(state.swap_attempts.sum()) == 20  # one pair per round on 3 replicas, every step
    finally:
        jax.config.update("jax_enable_x64", False)
