"""Local polish: L-BFGS on the incumbent every M steps lands in the basin's minimum, never worse."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from savae_jax import annealing as an


def rastrigin(x, key=None, batch=None):
    return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


def test_polish_lands_in_the_minimum_of_the_basin_the_annealer_found():
    """Cold greedy annealing from near a Rastrigin local minimum only creeps toward it (Cauchy
    proposals of scale 0.05); 20 L-BFGS steps every 10 steps put it at the minimum to ~1e-6."""
    sa = an.simulated_annealing(rastrigin, 8, an.cauchy(0.05), 0.0, an.greedy())
    polished = an.local_polish(sa, rastrigin, optax.lbfgs(), 20, 10)
    assert polished.cost == sa.cost + 7  # ceil((3 x 20 + 2) / 10)
    x0 = jnp.array([0.1, -0.2, 1.15, 0.05])  # in the basin of (0, 0, 1, 0), f = 0.995

    def run(opt):
        def body(state, key):
            return opt.step(key, state, None)[0], None
        return jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(0), 30))[0])(opt.init(x0))

    plain, with_polish = run(sa), run(polished)
    target = jnp.array([0.0, 0.0, 0.99496, 0.0])  # the local minimum: x_i = 0 or ~0.995
    assert float(jnp.max(jnp.abs(with_polish.params - target))) < 1e-4
    assert float(with_polish.inner.best_loss) == pytest.approx(float(rastrigin(target)), abs=1e-4)
    assert float(jnp.max(jnp.abs(plain.params - target))) > 1e-3  # without it: still on the way
    assert int(with_polish.num_polished) >= 1


def test_a_polish_that_would_make_things_worse_is_not_kept():
    """Adam with a huge learning rate overshoots: the polish is measured, found worse, dropped."""
    sa = an.simulated_annealing(rastrigin, 4, an.cauchy(1e-3), 0.0, an.greedy())
    polished = an.local_polish(sa, rastrigin, optax.sgd(10.0), 3, 1)
    x0 = jnp.zeros(3)  # the global minimum: any move is worse
    state, _ = jax.jit(polished.step)(jax.random.key(1), polished.init(x0), None)
    np.testing.assert_array_equal(np.asarray(state.params), np.zeros(3))
    assert int(state.num_polished) == 0


def test_bad_polish_settings_are_refused():
    sa = an.simulated_annealing(rastrigin, 4, an.cauchy(1e-3), 0.0, an.greedy())
    for args, needle in (((optax.adam(1e-3), 0, 5), "num_steps"), ((optax.adam(1e-3), 5, 0), "every"),
                         (("lbfgs", 5, 5), "local")):
        with pytest.raises(ValueError, match=needle):
            an.local_polish(sa, rastrigin, *args)
    with pytest.raises(ValueError, match="different loss_fn"):
        an.local_polish(sa, lambda x, k=None, b=None: rastrigin(x), optax.adam(1e-3), 5, 5)


def test_polish_of_a_decision_batch_annealer_sees_the_selection_examples_only():
    """Issue 23: the polish used to run and be judged on all examples, the decision ones included,
    which breaks the independence the decision batch exists for."""
    import savae_jax as sv
    from conftest import small_vae

    model, loss = small_vae(16, 3)
    seen = []

    def spy(params, key, x):  # records the batch size of every trace that evaluates the loss
        seen.append(x.shape[0])
        return loss(params, key, x)

    spy.per_example, spy.model = loss.per_example, model
    sa = an.simulated_annealing(spy, 4, an.gaussian(1e-3), 1e-3, an.confident(0.05),
                                decision=an.decision_batch(16, 32))
    polished = an.local_polish(sa, spy, optax.adam(1e-3), 2, 1)
    assert (polished.examples_per_step, polished.batch_size) == (48, 16)
    images = sv.load("digits", "train").images
    params = sv.models.init(jax.random.key(0), model, images[:1])
    state, _ = jax.jit(polished.step)(jax.random.key(1), polished.init(params), jnp.asarray(images[:48]))
    assert int(state.num_polished) in (0, 1)
    assert seen and set(seen) == {16}, seen
