"""runner.run_method: budgets, phases, resume, and stopping on a non-finite loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import checkpoint, runner, training


@pytest.fixture(scope="module")
def setup():
    train, test = sv.load("digits", "train"), sv.load("digits", "test")
    model = sv.MLPVAE(hidden=16, latents=3)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    return train.images, test.images, params, sv.make_loss(model)


def adam_phase(loss_fn, share=1.0):
    return runner.Phase("adam", training.as_algorithm(loss_fn, optax.adam(1e-3)), runner.GRAD_COST, share)


def test_phases_split_the_budget_and_hand_over_parameters(setup):
    images, test_images, params, loss_fn = setup
    sgd = runner.Phase("sgd", training.as_algorithm(loss_fn, optax.sgd(1e-2)), runner.GRAD_COST, 0.4)
    out, history = runner.run_method(jax.random.key(1), [adam_phase(loss_fn, 0.6), sgd], params, images,
                                     test_images, loss_fn, batch_size=100, binarize=None, eval_every=7,
                                     budget_evals=100)
    # 0.6 * 100 = 60 evals -> 20 Adam steps; 40 evals -> 13 SGD steps (39 evals).
    assert [(r["phase"], r["step"], r["evals"]) for r in history] == [
        ("adam", 7, 21), ("adam", 14, 42), ("adam", 20, 60),
        ("sgd", 21, 63), ("sgd", 28, 84), ("sgd", 33, 99)]
    assert all(np.isfinite(r["test_neg_elbo"]) for r in history)


def nan_after(loss_fn, bad_step):
    """Adam whose reported loss turns NaN from step ``bad_step`` on (a fault injection)."""
    adam = training.as_algorithm(loss_fn, optax.adam(1e-3))

    def init(params):
        return adam.init(params), jnp.zeros((), jnp.int32)

    def step(key, state, x):
        inner, count = state
        inner, loss, stats = adam.step(key, inner, x)
        return (inner, count + 1), jnp.where(count + 1 >= bad_step, jnp.nan, loss), stats

    return training.Algorithm(init, step, lambda state: adam.params(state[0]))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    images, test_images, params, loss_fn = setup
    phases = [runner.Phase("adam", nan_after(loss_fn, bad_step=9), runner.GRAD_COST)]
    kwargs = dict(batch_size=100, binarize=None, eval_every=2, budget_evals=60,
                  checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(runner.NonFiniteLossError, match=r"between steps 8 and 10.*last good checkpoint is step 8"):
        runner.run_method(jax.random.key(1), phases, params, images, test_images, loss_fn, **kwargs)
    saver = checkpoint.RunCheckpointer(tmp_path / "ckpt")
    assert saver.steps() == [6, 8]
    step, state, meta = saver.restore(phases[0].algorithm.init(params))
    assert step == 8 and not meta["finished"] and len(meta["history"]) == 4
    assert all(np.isfinite(r["train_loss"]) for r in meta["history"])
    # The checkpointed parameters equal those of a clean run stopped at step 8.
    clean = [runner.Phase("adam", nan_after(loss_fn, bad_step=10**9), runner.GRAD_COST)]
    ref, _ = runner.run_method(jax.random.key(1), clean, params, images, test_images, loss_fn,
                               **{**kwargs, "budget_evals": 24, "checkpoint_dir": None})
    chex.assert_trees_all_equal(phases[0].algorithm.params(state), ref)


def test_bad_eval_and_checkpoint_intervals(setup):
    images, test_images, params, loss_fn = setup
    for kwargs, name in (({"eval_every": 0}, "eval_every"), ({"eval_every": 4, "checkpoint_every": 6},
                                                             "checkpoint_every")):
        with pytest.raises(ValueError, match=name):
            runner.run_method(jax.random.key(1), [adam_phase(loss_fn)], params, images, test_images,
                              loss_fn, batch_size=100, binarize=None, budget_evals=30,
                              **{"eval_every": 5, **kwargs})
