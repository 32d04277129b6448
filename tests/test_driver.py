"""driver.run: budgets, phases, resume, and stopping on a non-finite loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import annealing, checkpoint, driver


@pytest.fixture(scope="module")
def setup():
    train, test = sv.load("digits", "train"), sv.load("digits", "test")
    model = sv.MLPVAE(hidden=16, latents=3)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    return train.images, test.images, params, sv.make_loss(model)


def adam_phase(loss_fn, share=1.0):
    return driver.Phase("adam", sv.from_optax(loss_fn, optax.adam(1e-3)), share)


def run(phases, params, images, test_images, loss_fn, **kwargs):
    """driver.run with the test set's negative ELBO in every row."""
    return driver.run(jax.random.key(1), phases, params, images,
                      evaluate=lambda p: sv.evaluate(loss_fn, p, test_images), **kwargs)


def test_phases_split_the_budget_and_hand_over_parameters(setup):
    images, test_images, params, loss_fn = setup
    sgd = driver.Phase("sgd", sv.from_optax(loss_fn, optax.sgd(1e-2)), 0.4)
    out, history = run([adam_phase(loss_fn, 0.6), sgd], params, images, test_images, loss_fn,
                       batch_size=100, eval_every=7, budget_evals=100)
    # 0.6 * 100 = 60 evals -> 20 Adam steps; 40 evals -> 13 SGD steps (39 evals).
    assert [(r["phase"], r["step"], r["evals"]) for r in history] == [
        ("adam", 7, 21), ("adam", 14, 42), ("adam", 20, 60),
        ("sgd", 21, 63), ("sgd", 28, 84), ("sgd", 33, 99)]
    assert all(np.isfinite(r["test_neg_elbo"]) for r in history)


def nan_after(loss_fn, bad_step):
    """Adam whose reported loss turns NaN from step ``bad_step`` on (a fault injection)."""
    adam = sv.from_optax(loss_fn, optax.adam(1e-3))

    def step(key, state, x):
        state, info = adam.step(key, state, x)
        return state, info._replace(loss=jnp.where(state.count >= bad_step, jnp.nan, info.loss))

    return adam._replace(step=step)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    images, test_images, params, loss_fn = setup
    phases = [driver.Phase("adam", nan_after(loss_fn, bad_step=9))]
    kwargs = dict(batch_size=100, eval_every=2, budget_evals=60, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(driver.NonFiniteLossError, match=r"between steps 8 and 10.*last good checkpoint is step 8"):
        run(phases, params, images, test_images, loss_fn, **kwargs)
    saver = checkpoint.RunCheckpointer(tmp_path / "ckpt")
    assert saver.steps() == [6, 8]
    step, state, meta = saver.restore(phases[0].optimizer.init(params))
    assert step == 8 and not meta["finished"] and len(meta["history"]) == 4
    assert all(np.isfinite(r["train_loss"]) for r in meta["history"])
    # The checkpointed parameters equal those of a clean run stopped at step 8.
    clean = [driver.Phase("adam", nan_after(loss_fn, bad_step=10**9))]
    ref, _ = run(clean, params, images, test_images, loss_fn,
                 **{**kwargs, "budget_evals": 24, "checkpoint_dir": None})
    chex.assert_trees_all_equal(state.params, ref)


def test_bad_eval_and_checkpoint_intervals(setup):
    images, test_images, params, loss_fn = setup
    for kwargs, name in (({"eval_every": 0}, "eval_every"), ({"eval_every": 4, "checkpoint_every": 6},
                                                             "checkpoint_every")):
        with pytest.raises(ValueError, match=name):
            run([adam_phase(loss_fn)], params, images, test_images, loss_fn, batch_size=100,
                budget_evals=30, **{"eval_every": 5, **kwargs})


def test_a_budget_that_pays_for_no_step_is_refused_before_anything_runs(setup, tmp_path):
    images, test_images, params, loss_fn = setup
    sa = annealing.simulated_annealing(loss_fn, 8, annealing.gaussian(0.01), 0.01, annealing.greedy())
    assert sa.cost == 9  # K proposals + the incumbent
    with pytest.raises(ValueError, match=r"budget_evals=8 does not pay for one step of phase 'sa' \(9 evaluations"):
        run([driver.Phase("sa", sa)], params, images, test_images, loss_fn, batch_size=100, eval_every=2,
            budget_evals=8, checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match="phase 'adam' has no budget"):
        run([adam_phase(loss_fn)], params, images, test_images, loss_fn, batch_size=100, eval_every=2)


def test_gradient_and_annealing_rows_share_one_schema_and_the_handover_is_exact(setup):
    """refinement(adam, sa): the annealer starts from Adam's last parameters; both phases log
    the same row fields (the annealer adds its LOGGED info fields after them)."""
    images, test_images, params, loss_fn = setup
    sa = annealing.simulated_annealing(loss_fn, 4, annealing.low_rank(1e-3), 1e-3, annealing.greedy())
    adam = sv.from_optax(loss_fn, optax.adam(1e-3))
    phases = driver.refinement(adam, sa, epochs=(1, 1), keys=(jax.random.key(5), jax.random.key(6)))
    _, history = run(phases, params, images, test_images, loss_fn, batch_size=100, eval_every=15)
    assert [(r["phase"], r["step"], r["evals"]) for r in history] == [("adam", 15, 45), ("sa", 30, 120)]
    assert list(history[0]) == list(driver.ROW_FIELDS)
    assert list(history[1]) == list(driver.ROW_FIELDS) + ["temperature", "radius", "acceptance_rate"]
    # The same two phases run as two separate one-phase runs give the same parameters.
    after_adam, _ = run(phases[:1], params, images, test_images, loss_fn, batch_size=100, eval_every=15)
    after_sa, _ = run(phases[1:], after_adam, images, test_images, loss_fn, batch_size=100, eval_every=15)
    both, _ = run(phases, params, images, test_images, loss_fn, batch_size=100, eval_every=15)
    chex.assert_trees_all_equal(both, after_sa)


def test_an_annealer_built_on_another_loss_is_refused(setup):
    images, test_images, params, loss_fn = setup
    other = sv.make_loss(sv.MLPVAE(hidden=16, latents=3), beta=0.5)
    sa = annealing.simulated_annealing(other, 4, annealing.gaussian(0.01), 0.01, annealing.greedy())
    with pytest.raises(ValueError, match="optimizer was built on a different loss_fn"):
        sv.fit(jax.random.key(0), params, loss_fn, sa, images, 1, 100)
    # Its own loss is accepted.
    out, history = sv.fit(jax.random.key(0), params, other, sa, images, 1, 100)
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


def test_refinement_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of share or epochs"):
        driver.refinement(None, None)
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\), got 1.5"):
        driver.refinement(None, None, share=1.5)
    with pytest.raises(ValueError, match="epochs of phase 'sa' must be an integer >= 1, got 0"):
        driver.refinement(None, None, epochs=(1, 0))


def test_one_batch_fn_serves_training_and_the_evaluations(setup):
    """data.BatchFn carries the binarisation (and its static seed) to fit, the driver and the
    evaluations alike: passing it equals passing the mode and the seed separately."""
    images, test_images, params, loss_fn = setup
    batch_fn = sv.data.BatchFn("static", 3)
    by_fn = sv.evaluate(loss_fn, params, test_images, binarize=batch_fn)
    assert by_fn == sv.evaluate(loss_fn, params, test_images, binarize="static", static_seed=3)
    assert by_fn != sv.evaluate(loss_fn, params, test_images, binarize="static", static_seed=0)
    adam = optax.adam(1e-3)
    a, ha = sv.fit(jax.random.key(2), params, loss_fn, adam, images, 1, 100, test_images, binarize=batch_fn)
    b, hb = sv.fit(jax.random.key(2), params, loss_fn, adam, images, 1, 100, test_images, binarize="static",
                   static_seed=3)
    chex.assert_trees_all_equal(a, b)
    assert ha[0]["test_neg_elbo"] == hb[0]["test_neg_elbo"]
    with pytest.raises(ValueError, match="binarize must be one of"):
        sv.data.as_batch_fn("sometimes")
