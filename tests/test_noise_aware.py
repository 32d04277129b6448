"""Noise-aware annealing steps (issue 12): selection/decision split, paired standard errors, budgets."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import annealing as an
from savae_jax import driver

# ---------------------------------------------------------------- a loss with known selection bias
# Every proposal is truly worse than the incumbent (theta = 0) by DELTA; a proposal's per-example
# loss carries noise N_i(theta) drawn from the loss key and theta's bits, so the K proposals'
# measured differences are independent and the incumbent's is noiseless. The noise scale makes
# one batch's dL have sd 0.1, as in the issue.
DELTA, SD, K, B = 0.05, 0.1, 16, 64
NOISE = SD * math.sqrt(B)


def synthetic_per_example(params, key, x):
    theta = params["theta"]
    moved = (theta != 0.0).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(theta, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, bits), (x.shape[0],))
    return moved * (DELTA + NOISE * noise)


def synthetic_loss(params, key, x):
    return jnp.mean(synthetic_per_example(params, key, x))


synthetic_loss.per_example = synthetic_per_example


def acceptance_rate(acceptance, decision=None, chains=4000):
    """Fraction of ``chains`` vmapped single steps from theta = 0 that accept (T = 1e-6)."""
    sa = an.simulated_annealing(synthetic_loss, K, an.gaussian(0.1), 1e-6, acceptance, decision=decision)
    state = sa.init({"theta": jnp.zeros((), jnp.float32)})
    examples = sa.examples_per_step or B
    x = jnp.zeros((examples, 1))
    keys = jax.random.split(jax.random.key(0), chains)
    _, info = jax.jit(jax.vmap(sa.step, in_axes=(0, None, None)))(keys, state, x)
    return float(jnp.mean(info.accepted)), info


@pytest.mark.slow  # a statistical demonstration over many draws
def test_best_of_k_on_one_batch_is_biased_and_a_decision_batch_removes_it():
    """The issue's synthetic check: same-batch greedy accepts > 90 % of truly worse moves;
    deciding on an independent batch < 40 % (the unbiased rate is P(N(0.05, 0.1) < 0) = 31 %);
    the confidence rule at alpha = 0.05 at most 5 % + 3 standard errors."""
    same, _ = acceptance_rate(an.greedy())
    split, info = acceptance_rate(an.greedy(), an.decision_batch(B, B))
    confident, _ = acceptance_rate(an.confident(0.05), an.decision_batch(B, B))
    se = math.sqrt(0.05 * 0.95 / 4000)
    assert same > 0.90, same
    assert split < 0.40, split
    # The decision batch's estimate is unbiased: its rate is the normal probability, within
    # 4 standard errors of a 4000-draw proportion.
    expected = 0.5 * math.erfc((DELTA / SD) / math.sqrt(2))
    assert abs(split - expected) < 4 * math.sqrt(expected * (1 - expected) / 4000), (split, expected)
    assert confident <= 0.05 + 3 * se, confident
    # info reports both batches: the selection dL is biased low, the decision dL is not.
    assert float(jnp.mean(info.delta_selection)) < 0 < float(jnp.mean(info.delta))
    assert abs(float(jnp.mean(info.delta)) - DELTA) < 4 * SD / math.sqrt(4000)
    # The standard errors estimate the dL's sd (0.1) to the sampling error of a 64-example sd.
    assert float(jnp.mean(info.stderr)) == pytest.approx(SD, rel=0.05)
    assert float(jnp.mean(info.stderr_selection)) == pytest.approx(SD, rel=0.05)
    assert np.all(np.asarray(info.decision_size) == B)


def test_a_rule_or_decision_that_needs_per_example_losses_refuses_a_scalar_loss():
    scalar_only = lambda p, k, x: synthetic_loss(p, k, x)  # noqa: E731  (no .per_example)
    with pytest.raises(ValueError, match="acceptance rule .*penalty.* needs per-example losses"):
        an.simulated_annealing(scalar_only, 4, an.gaussian(0.1), 1.0, an.penalty())
    with pytest.raises(ValueError, match="decision needs per-example losses"):
        an.simulated_annealing(scalar_only, 4, an.gaussian(0.1), 1.0, an.greedy(),
                               decision=an.decision_batch(8, 8))
    with pytest.raises(ValueError, match="free_bits|per-example"):
        model = sv.MLPVAE(hidden=8, latents=2)
        an.simulated_annealing(sv.make_loss(model, free_bits=0.1), 4, an.gaussian(0.1), 1.0, an.penalty())
    # Plain rules keep working with a scalar loss, as before.
    an.simulated_annealing(scalar_only, 4, an.gaussian(0.1), 1.0, an.metropolis())


def test_decision_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="size must be an integer >= 2"):
        an.decision_batch(64, 1)
    with pytest.raises(ValueError, match="max_size must be an integer"):
        an.decision_batch(64, lambda count: 64)  # a schedule needs max_size
    with pytest.raises(ValueError, match="max_size must be an integer >= 128"):
        an.decision_batch(64, 128, max_size=64)
    sa = an.simulated_annealing(synthetic_loss, 4, an.gaussian(0.1), 1.0, an.greedy(),
                                decision=an.decision_batch(8, 8))
    with pytest.raises(ValueError, match="expects batches of 8 selection \\+ 8 decision examples = 16, got 8"):
        sa.step(jax.random.key(0), sa.init({"theta": jnp.zeros(())}), jnp.zeros((8, 1)))


# ---------------------------------------------------------------- on the VAE, through the driver



def counting(loss_fn, counter):
    """``loss_fn`` (and its .per_example) that add the examples they evaluate to ``counter[0]``."""

    def count(params, x):
        # One entry per example, made to depend on the params so that under the kernel's vmap
        # over members (whose batch is shared) the callback sees every member's examples.
        rows = x[:, 0, 0, 0] + 0.0 * jax.tree_util.tree_leaves(params)[0].ravel()[0]
        jax.debug.callback(lambda r: counter.__setitem__(0, counter[0] + r.size), rows)

    def per_example(params, key, x):
        count(params, x)
        return loss_fn.per_example(params, key, x)

    def wrapped(params, key, x):
        count(params, x)
        return loss_fn(params, key, x)

    wrapped.per_example = per_example
    return wrapped


def test_the_budget_counts_the_decision_evaluations(vae):
    """Evaluations are counted in examples through the loss itself: a step spends K + 1 member
    evaluations on the selection batch, 2 for the paired selection comparison and 2 * D / B on
    the decision batch; the driver charges exactly that (2 * D / B is whole here)."""
    images, params, loss_fn = vae
    counter = [0]
    loss = counting(loss_fn, counter)
    sa = an.simulated_annealing(loss, 6, an.gaussian(0.01), 0.01, an.penalty(), decision=an.decision_batch(50, 100))
    assert sa.cost == 6 + 1 + 2 + 4 and sa.examples_per_step == 150
    _, history, _ = driver.run(jax.random.key(1), [driver.Phase("sa", sa)], params, images, batch_size=50,
                            eval_every=5, budget_evals=sa.cost * 10)
    jax.effects_barrier()
    assert history[-1]["evals"] == sa.cost * 10 and history[-1]["step"] == 10
    assert counter[0] == 10 * sa.cost * 50  # every evaluation the loss saw, in selection batches


def test_noise_aware_steps_are_deterministic_compile_once_and_resume_exactly(vae):
    images, params, loss_fn = vae
    sa = an.simulated_annealing(loss_fn, 6, an.gaussian(0.01), an.exponential(0.05, 0.9), an.confident(0.1),
                                decision=an.decision_batch(50, lambda count: 20 + 10 * count, max_size=80))
    traces = []

    def counted(key, state, x):
        traces.append(1)
        return sa.step(key, state, x)

    # Each run goes through the driver's jitted step (one program, shared through the compilation
    # cache); ``sizes`` are the decision sizes of its steps.
    def run(optimizer, state, start, stop):
        sizes = []
        for count, state, info in driver.iterate(jax.random.key(1), optimizer, state, images, sa.examples_per_step,
                                                 start_step=start):
            sizes.append(int(info.decision_size))
            if count == stop:
                return state, sizes

    straight, sizes = run(sa._replace(step=counted), sa.init(params), 0, 12)
    assert len(traces) == 1  # 12 steps, one trace
    assert sizes[:2] == [20, 30]  # the size schedule of count
    again, _ = run(sa, sa.init(params), 0, 12)
    chex.assert_trees_all_equal(straight, again)  # same key, same bits
    # Resume: stopping after 7 steps and continuing from that state (what driver.run does from a
    # checkpoint) equals 12 uninterrupted steps, bitwise.
    halfway, _ = run(sa, sa.init(params), 0, 7)
    resumed, _ = run(sa, halfway, 7, 12)
    chex.assert_trees_all_equal(straight, resumed)
    assert int(straight.num_accepted) > 0  # the comparison covers accepted moves


# Slow tier: a statistical demonstration; the default tier keeps the noise-aware step's determinism
# and budget.
@pytest.mark.slow
def test_refinement_from_an_adam_optimum_with_a_decision_batch_does_not_get_worse(vae):
    """The seed's recipe on the digits: Adam, then annealing from its optimum. Deciding on a
    decision batch with the confidence rule keeps the training-set loss (measured on all 1500
    examples at a fixed key, the quantity both phases minimise) from rising."""
    images, params, loss_fn = vae
    adam = sv.from_optax(loss_fn, optax.adam(3e-3))
    sa = an.simulated_annealing(loss_fn, 16, an.gaussian(0.02, scale_by_rms=True), 1e-3, an.confident(0.05),
                                decision=an.decision_batch(100, 200))
    phases = driver.refinement(adam, sa, epochs=(5, 3))
    score = lambda p: sv.evaluate(loss_fn, p, images)  # noqa: E731
    after_adam, _, _ = driver.run(jax.random.key(2), phases[:1], params, images, batch_size=100, eval_every=15)
    refined, history, _ = driver.run(jax.random.key(2), phases, params, images, batch_size=100, eval_every=15)
    assert score(refined) <= score(after_adam) + 0.05, (score(refined), score(after_adam))
    assert history[-1]["phase"] == "sa"
