"""driver.run(trace=True, initial_row=True): one trace row per step, a step-0 history row, exact resume."""

import shutil
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import annealing as an
from savae_jax import checkpoint, driver


@pytest.fixture(scope="module")
def setup():
    train, test = sv.load("digits", "train"), sv.load("digits", "test")
    model = sv.MLPVAE(hidden=16, latents=3)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    loss_fn = sv.make_loss(model)
    return train.images, test.images[:100], params, loss_fn


def refinement(loss_fn):
    """Adam for half the budget, then noise-aware annealing (decision batch of 200)."""
    sa = an.simulated_annealing(loss_fn, 4, an.low_rank(1e-2), an.exponential(0.01, 0.9), an.confident(0.05),
                                decision=an.decision_batch(100, 200))
    return driver.refinement(sv.from_optax(loss_fn, optax.adam(1e-3)), sa, share=0.5)


def run(setup, phases, **kwargs):
    images, test_images, params, loss_fn = setup
    return driver.run(jax.random.key(1), phases, params, images, batch_size=100, eval_every=7,
                      evaluate=lambda p: sv.evaluate(loss_fn, p, test_images), **kwargs)


def same_rows(a: list[dict], b: list[dict]) -> None:
    """Rows equal field by field, NaN equal to NaN (an unmeasured standard error is NaN)."""
    assert len(a) == len(b) and [list(r) for r in a] == [list(r) for r in b]
    for key in a[0]:
        x, y = [r.get(key) for r in a], [r.get(key) for r in b]
        if all(isinstance(v, float) for v in x + y):
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            assert x == y, key


def test_the_trace_has_one_row_per_step_with_the_annealers_diagnostics(setup):
    phases = refinement(setup[3])
    params, history, trace = run(setup, phases, budget_evals=400, trace=True)
    steps = driver.phase_steps(phases, len(setup[0]), 100, 400)
    # 200 // 3 Adam steps; 200 // 11 annealing steps (4 proposals, the incumbent, 2 on the selection
    # batch and 2 * 200 / 100 on the decision batch).
    assert steps == [66, 18]
    assert [r["step"] for r in trace] == list(range(1, sum(steps) + 1))
    assert [r["phase"] for r in trace] == ["adam"] * 66 + ["sa"] * 18
    assert list(trace[0]) == ["phase", "step", "loss"]
    sa_rows = trace[66:]
    assert list(sa_rows[0]) == list(driver.TRACE_FIELDS) + list(an.AnnealInfo._fields)
    # The schedule's value at every step: T_i = 0.01 * 0.9^i for the i-th annealing step (from 0).
    np.testing.assert_allclose([r["temperature"] for r in sa_rows], 0.01 * 0.9 ** np.arange(18), rtol=1e-6)
    # Both batches' dL and standard errors are measured (a decision batch of 200 examples).
    assert all(r["decision_size"] == 200 and r["stderr"] > 0 and r["stderr_selection"] > 0 for r in sa_rows)
    # The cumulative acceptance rate is the running mean of `accepted`; the last equals the history's.
    accepted = np.array([r["accepted"] for r in sa_rows], float)
    np.testing.assert_allclose([r["acceptance_rate"] for r in sa_rows],
                               np.cumsum(accepted) / np.arange(1, 19), rtol=1e-6)
    assert history[-1]["acceptance_rate"] == sa_rows[-1]["acceptance_rate"]
    # Every history row's train_loss is the mean of its steps' traced losses.
    start = 0
    for row in history:
        losses = [r["loss"] for r in trace[start:row["step"]]]
        assert row["train_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
        start = row["step"]
    # Recording changes nothing: the same parameters and history as without it.
    plain = run(setup, phases, budget_evals=400)
    assert isinstance(plain, driver.RunResult) and plain.trace is None  # one return shape, trace or not
    plain_params, plain_history = plain.params, plain.history
    chex.assert_trees_all_equal(params, plain_params)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in plain_history]


# Slow tier: the default keeps the exact resume of the run itself (tests/test_driver.py, the SIGKILL
# sequence of tests/test_faults.py) and the trace's rows above.
@pytest.mark.slow
def test_a_resumed_runs_trace_equals_an_uninterrupted_one(setup, tmp_path):
    phases = refinement(setup[3])
    kwargs = dict(budget_evals=400, trace=True, initial_row=True, checkpoint_every=14)
    _, history, trace = run(setup, phases, **kwargs)
    ckpt = tmp_path / "ckpt"
    run(setup, phases, checkpoint_dir=ckpt, **kwargs)
    saved = checkpoint.RunCheckpointer(ckpt).steps()
    assert saved == [70, 84]
    shutil.rmtree(ckpt / "84")  # killed in the annealing phase after the checkpoint at step 70
    _, resumed_history, resumed_trace = run(setup, phases, checkpoint_dir=ckpt, resume=True, **kwargs)
    same_rows(resumed_trace, trace)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(resumed_history) == untimed(history)
    # A finished run returns at once, with its trace.
    _, _, again = run(setup, phases, checkpoint_dir=ckpt, resume=True, **kwargs)
    same_rows(again, trace)


def test_the_initial_row_scores_the_initial_parameters_and_changes_no_result(setup):
    images, test_images, params, loss_fn = setup
    train, val = sv.data.split_validation(sv.data.make_dataset(images, None), 300)
    validate = lambda p: sv.evaluate(loss_fn, p, val.images)  # noqa: E731
    phases = refinement(loss_fn)
    kwargs = dict(budget_evals=400, validate=validate)
    rows_seen = []
    kept, history, _ = driver.run(jax.random.key(1), phases, params, train.images, batch_size=100, eval_every=7,
                               evaluate=lambda p: sv.evaluate(loss_fn, p, test_images), initial_row=True,
                               on_row=rows_seen.append, **kwargs)
    first = history[0]
    assert first == {"phase": "adam", "step": 0, "evals": 0, "seconds": 0.0, "train_loss": None,
                     "test_neg_elbo": sv.evaluate(loss_fn, params, test_images),
                     "val_neg_elbo": validate(params), "best_step": 0}
    assert rows_seen == history
    plain_kept, plain_history, _ = driver.run(jax.random.key(1), phases, params, train.images, batch_size=100,
                                           eval_every=7, evaluate=lambda p: sv.evaluate(loss_fn, p, test_images),
                                           **kwargs)
    chex.assert_trees_all_equal(kept, plain_kept)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(history[1:]) == untimed(plain_history)


class _Inner(NamedTuple):
    accepted: jax.Array


class _Info(NamedTuple):
    loss: jax.Array
    pair_rate: jax.Array
    inner: _Inner
    image: jax.Array


def test_info_columns_name_scalars_vectors_and_nested_fields():
    """Stacked over 3 steps: a scalar field is one column, a (2,) field two, a nested one is prefixed;
    a field of rank 2 per step is left out."""
    stacked = _Info(jnp.arange(3.0), jnp.arange(6.0).reshape(3, 2), _Inner(jnp.array([True, False, True])),
                    jnp.zeros((3, 2, 2)))
    columns = driver.info_columns(jax.device_get(stacked))
    assert list(columns) == ["loss", "pair_rate_0", "pair_rate_1", "inner.accepted"]
    np.testing.assert_array_equal(columns["pair_rate_1"], [1.0, 3.0, 5.0])
    rows = driver.trace_rows("pt", 10, [jax.tree_util.tree_map(lambda x: x[i], stacked) for i in range(3)])
    assert [r["step"] for r in rows] == [11, 12, 13]
    assert rows[1] == {"phase": "pt", "step": 12, "loss": 1.0, "pair_rate_0": 2.0, "pair_rate_1": 3.0,
                       "inner.accepted": False}


def test_a_replica_exchange_trace_has_its_swap_rates_per_step(setup):
    """Replica exchange's info: the swap rate, each pair's rate and swaps, and every replica's own
    annealing diagnostics, one row per step; the swap rates only move at swap rounds (every 2 steps)."""
    from savae_jax.annealing import tempering

    images, test_images, params, loss_fn = setup
    ladder = tempering.geometric_ladder(0.01, 3.0, 3)
    pt = tempering.replica_exchange(
        lambda t: an.simulated_annealing(loss_fn, 4, an.low_rank(1e-2), t, an.metropolis()), ladder, loss_fn,
        swap_every=2)
    _, history, trace = run(setup, [driver.Phase("pt", pt)], budget_evals=17 * 12, trace=True)
    assert [r["step"] for r in trace] == list(range(1, 13))
    assert {"swap_rate", "pair_swap_rate_0", "pair_swap_rate_1", "swapped_0", "swapped_1", "losses_2",
            "replicas.accepted_0", "replicas.temperature_2", "replicas.delta_1"} <= set(trace[0])
    np.testing.assert_allclose([r["replicas.temperature_1"] for r in trace], 0.03, rtol=1e-6)
    assert trace[-1]["swap_rate"] == history[-1]["swap_rate"]
    # Pairs swap only at swap rounds (steps 2, 4, ...), alternating (0, 1) and (1, 2).
    assert not any(r["swapped_0"] or r["swapped_1"] for r in trace if r["step"] % 2)
    rates = [(r["pair_swap_rate_0"], r["pair_swap_rate_1"]) for r in trace]
    assert all(rates[i] == rates[i - 1] for i in range(1, 12) if trace[i]["step"] % 2)
