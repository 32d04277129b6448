"""Schedule value tables (jitted), adaptive direction, reheating (issue 3, item 3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax.annealing as an

COUNTS = [0, 1, 2, 10, 100, 1000]

TABLES = {
    "exponential": (an.exponential(2.0, 0.9), lambda k: 2.0 * 0.9**k),
    "linear": (an.linear(1.0, 0.1, 100), lambda k: 1.0 + (0.1 - 1.0) * min(k / 100, 1.0)),
    "logarithmic": (an.logarithmic(3.0), lambda k: 3.0 / math.log(math.e + k)),
    "fast": (an.fast(5.0), lambda k: 5.0 / (1 + k)),
    "constant": (an.constant(0.25), lambda k: 0.25),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_schedule_value_table_jitted(name):
    schedule, reference = TABLES[name]
    values = jax.jit(jax.vmap(schedule))(jnp.array(COUNTS, jnp.int32))
    np.testing.assert_allclose(np.asarray(values), [reference(k) for k in COUNTS], rtol=1e-5, atol=1e-7)


def test_spot_values():
    assert float(jax.jit(an.exponential(1.0, 0.5))(3)) == 0.125
    np.testing.assert_allclose(float(jax.jit(an.linear(1.0, 0.0, 4))(2)), 0.5)
    np.testing.assert_allclose(float(jax.jit(an.logarithmic(1.0))(0)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(an.fast(1.0))(9)), 0.1, rtol=1e-6)


def identity_loss(x, key, batch):
    return x


def shift_proposal(dl):
    def prepare(loss_fn, params, key_loss, batch, temperature, radius, state):
        def loss(key, active):
            return loss_fn(jnp.where(active, params + dl, params), key_loss, batch)

        return an.Prepared(loss, lambda key: params + dl, state)

    return an.Proposal(lambda p: (), prepare)


def run(sa, x0, n):
    step = jax.jit(sa.step)
    state, temps = sa.init(jnp.float32(x0)), []
    for i in range(n):
        state, info = step(jax.random.key(i), state, None)
        temps.append(float(info.temperature))
    return state, np.array(temps)


def test_optax_schedule_accepted_as_temperature_and_radius():
    sa = an.simulated_annealing(
        identity_loss, 2, shift_proposal(-1.0),
        optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5), an.metropolis(),
        radius=optax.linear_schedule(1.0, 0.0, 4),
    )
    step = jax.jit(sa.step)
    state = sa.init(jnp.float32(0.0))
    for k in range(5):
        state, info = step(jax.random.key(k), state, None)
        np.testing.assert_allclose(float(info.temperature), 0.5**k, rtol=1e-6)
        np.testing.assert_allclose(float(info.radius), max(1.0 - k / 4, 0.0), atol=1e-6)


def test_adaptive_moves_temperature_toward_target():
    schedule = an.adaptive(1.0, target_rate=0.3, adapt_rate=0.1, smoothing=0.5)
    # Every step accepted (rate 1 > 0.3): cool down.
    _, temps = run(an.simulated_annealing(identity_loss, 2, shift_proposal(-1.0), schedule, an.metropolis()), 0.0, 20)
    assert temps[0] == 1.0 and np.all(np.diff(temps) < 0) and temps[-1] < 0.3
    # Never accepted (greedy, always worse; rate 0 < 0.3): heat up.
    _, temps = run(an.simulated_annealing(identity_loss, 2, shift_proposal(1.0), schedule, an.greedy()), 0.0, 20)
    assert temps[0] == 1.0 and np.all(np.diff(temps) > 0) and temps[-1] > 1.5
    # Exact first update: rate = 0.5 * 0.3 + 0.5 * 1 = 0.65; log T = 0.1 * (0.3 - 0.65).
    state = schedule.update(schedule.init(), 0, an.ScheduleEvent(jnp.bool_(True), jnp.bool_(True)))
    np.testing.assert_allclose(float(schedule.value(state, 1)), math.exp(-0.035), rtol=1e-6)


def test_reheat_restarts_schedule_after_patience():
    schedule = an.reheat(an.exponential(1.0, 0.5), patience=3)
    # Always worse and greedy: best_loss improves only at step 0 (from +inf).
    state, temps = run(an.simulated_annealing(identity_loss, 2, shift_proposal(1.0), schedule, an.greedy()), 0.0, 9)
    # steps 1, 2, 3 without improvement -> restart before step 4; then every 3 steps.
    np.testing.assert_allclose(temps, [1, 0.5, 0.25, 0.125, 1, 0.5, 0.25, 1, 0.5], rtol=1e-6)
    assert int(state.schedule_state.temperature.num_reheats) == 2
    # An improving search never reheats.
    state, temps = run(an.simulated_annealing(identity_loss, 2, shift_proposal(-1.0), schedule, an.greedy()), 0.0, 6)
    np.testing.assert_allclose(temps, 0.5 ** np.arange(6), rtol=1e-6)
    assert int(state.schedule_state.temperature.num_reheats) == 0


def test_reheat_of_adaptive_and_jit_of_stateful_value():
    schedule = an.reheat(an.adaptive(2.0, 0.5), patience=2)
    state = schedule.init()
    event = an.ScheduleEvent(jnp.bool_(False), jnp.bool_(False))
    update = jax.jit(schedule.update)
    values = []
    for k in range(4):
        values.append(float(jax.jit(schedule.value)(state, k)))
        state = update(state, k, event)
    assert values[0] == 2.0 and values[1] > 2.0 and values[2] == 2.0  # restarted at 2


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: an.exponential(0.0, 0.9), "t0"),
        (lambda: an.exponential(1.0, 1.0), "decay"),
        (lambda: an.exponential(1.0, 0.0), "decay"),
        (lambda: an.linear(-1.0, 0.0, 10), "t0"),
        (lambda: an.linear(1.0, -0.1, 10), "t_end"),
        (lambda: an.linear(1.0, 0.0, 0), "steps"),
        (lambda: an.logarithmic(0.0), "t0"),
        (lambda: an.fast(float("nan")), "t0"),
        (lambda: an.adaptive(1.0, 1.5), "target_rate"),
        (lambda: an.adaptive(1.0, 0.5, adapt_rate=0.0), "adapt_rate"),
        (lambda: an.adaptive(1.0, 0.5, smoothing=1.0), "smoothing"),
        (lambda: an.reheat(an.fast(1.0), 0), "patience"),
        (lambda: an.constant(-1.0), "value"),
    ],
)
def test_bad_schedule_hyperparameters_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make()
