"""driver.run: budgets, phases, resume, the validation gate, and stopping on a non-finite loss."""

import shutil
import chex
import jax
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import annealing, checkpoint, driver

from conftest import nan_after, small_vae, without_seconds


@pytest.fixture(scope="module")
def setup():
    train, test = sv.load("digits", "train"), sv.load("digits", "test")
    model, loss_fn = small_vae(16, 3)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    return train.images, test.images, params, loss_fn


def adam_phase(loss_fn, share=1.0):
    return driver.Phase("adam", sv.from_optax(loss_fn, optax.adam(1e-3)), share)


def run(phases, params, images, test_images, loss_fn, **kwargs):
    """driver.run with the test set's negative ELBO in every row: ``(params, history)``."""
    result = driver.run(jax.random.key(1), phases, params, images,
                        evaluate=lambda p: sv.evaluate(loss_fn, p, test_images), **kwargs)
    return result.params, result.history


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


@pytest.mark.slow  # the README's comparison checks the shared Adam half against its pinned numbers
def test_a_run_started_from_another_runs_phase_end_equals_computing_that_phase_itself(setup):
    """Two refinements with the same Adam half: the second starts from the first's end of phase 0
    (on_phase_end -> start) and equals the second run alone, bitwise: parameters (the gate's), every
    history row but its seconds, the trace. A start that is not this run's phase end is refused."""
    images, _, params, loss_fn = setup
    val = images[:200]
    gate = lambda p: sv.evaluate(loss_fn, p, val)  # noqa: E731
    sa = lambda acceptance: annealing.simulated_annealing(  # noqa: E731
        loss_fn, 4, annealing.gaussian(1e-3), annealing.exponential(0.01, 0.99), acceptance)
    first = driver.refinement(sv.from_optax(loss_fn, optax.adam(3e-3)), sa(annealing.greedy()), share=0.5)
    second = driver.refinement(sv.from_optax(loss_fn, optax.adam(3e-3)), sa(annealing.metropolis()), share=0.5)
    kwargs = dict(batch_size=100, eval_every=4, budget_evals=84, validate=gate, trace=True, initial_row=True)
    ends = []
    driver.run(jax.random.key(1), first, params, images, on_phase_end=ends.append, **kwargs)
    assert [end.phase for end in ends] == [0, 1] and ends[0].position.step == 14  # 42 evals of Adam, 3 each
    alone = driver.run(jax.random.key(1), second, params, images, **kwargs)
    started = driver.run(jax.random.key(1), second, params, images, start=ends[0], **kwargs)
    chex.assert_trees_all_equal(started.params, alone.params)
    assert without_seconds(started.history) == without_seconds(alone.history)
    np.testing.assert_equal(started.trace, alone.trace)  # NaN fields (no decision batch) compare equal
    assert len(started.trace) == 14 + 8  # then 42 evals of annealing, K + 1 = 5 each
    assert [r["phase"] for r in started.history].count("sa") > 0
    # The shared rows are the first run's (its seconds, to the last bit): the Adam half was not run again.
    shared = len(ends[0].history)
    assert [r["seconds"] for r in started.history[:shared]] == [r["seconds"] for r in ends[0].history]
    assert [r["seconds"] for r in alone.history[1:shared]] != [r["seconds"] for r in ends[0].history[1:]]
    assert alone.history != ends[1].history  # the two refinements differ after the shared half
    with pytest.raises(ValueError, match="start: phase 0 .'adam'. ran 14 steps there, but this run's budget gives it 7"):
        driver.run(jax.random.key(1), second, params, images, start=ends[0], **{**kwargs, "budget_evals": 42})
    with pytest.raises(ValueError, match="start: saved with a validation gate, but this run has none"):
        driver.run(jax.random.key(1), second, params, images, start=ends[0], **{**kwargs, "validate": None})
    with pytest.raises(ValueError, match="start must be a driver.PhaseEnd"):
        driver.run(jax.random.key(1), second, params, images, start=ends[0]._asdict(), **kwargs)


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


def noise_phase(loss_fn, scale=0.05):
    """A phase whose every step adds Gaussian noise to the parameters: it only makes them worse."""
    adam = sv.from_optax(loss_fn, optax.adam(1e-3))

    def step(key, state, x):
        noisy = jax.tree.map(lambda p, k: p + scale * jax.random.normal(k, p.shape),
                             state.params, _tree_keys(key, state.params))
        return state._replace(params=noisy), adam.step(key, state, x)[1]

    return driver.Phase("noise", adam._replace(step=step), 0.5)


def _tree_keys(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def validation_split(images, loss_fn):
    train, val = sv.data.split_validation(sv.data.make_dataset(images, None), 300)
    return train.images, lambda p: sv.evaluate(loss_fn, p, val.images)


def test_the_validation_gate_returns_the_best_validation_parameters(setup, tmp_path):
    """Adam improves, then a phase of pure noise makes things worse: with validate= the run returns
    Adam's last parameters (bitwise), the rows name them, and the last row's test score is the
    worse, last parameters'. Resuming the killed run gives the same output."""
    images, test_images, params, loss_fn = setup
    train_images, validate = validation_split(images, loss_fn)
    phases = [adam_phase(loss_fn, 0.5), noise_phase(loss_fn)]
    kwargs = dict(batch_size=100, eval_every=4, budget_evals=60)
    kept, history = run(phases, params, train_images, test_images, loss_fn, validate=validate, **kwargs)
    adam_only, _ = run(phases[:1], params, train_images, test_images, loss_fn,
                       **kwargs)  # the same share of the same budget: 10 steps
    chex.assert_trees_all_equal(kept, adam_only)
    assert [r["best_step"] for r in history] == [4, 8, 10, 10, 10, 10]
    vals = [r["val_neg_elbo"] for r in history]
    assert vals[2] == validate(kept) == min(vals)
    assert history[-1]["val_neg_elbo"] > vals[2] + 1.0  # the noise phase really hurt (nats)
    # A run killed in the noise phase (its newest checkpoint, the finished one, removed) resumes
    # from step 16: the gate's choice (step 10) must come back from the checkpoint.
    ckpt = tmp_path / "ckpt"
    run(phases, params, train_images, test_images, loss_fn, validate=validate, checkpoint_dir=ckpt, **kwargs)
    assert checkpoint.RunCheckpointer(ckpt).steps() == [16, 20]
    shutil.rmtree(ckpt / "20")
    resumed, resumed_history = run(phases, params, train_images, test_images, loss_fn, validate=validate,
                                   checkpoint_dir=ckpt, resume=True, **kwargs)
    chex.assert_trees_all_equal(resumed, kept)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(resumed_history) == untimed(history)


def test_the_validation_gate_keeps_the_initial_parameters_when_nothing_beats_them(setup):
    images, test_images, params, loss_fn = setup
    train_images, validate = validation_split(images, loss_fn)
    kept, history = run([noise_phase(loss_fn)._replace(share=1.0)], params, train_images, test_images, loss_fn,
                        validate=validate, batch_size=100, eval_every=3, budget_evals=30)
    chex.assert_trees_all_equal(kept, params)
    assert all(r["best_step"] == 0 for r in history) and min(r["val_neg_elbo"] for r in history) > validate(params)


def test_split_validation_holds_out_a_fixed_random_subset():
    data = sv.data.make_dataset(np.linspace(0, 1, 10 * 4).reshape(10, 2, 2, 1).astype(np.float32), np.arange(10))
    train, val = sv.data.split_validation(data, 0.3, seed=1)
    assert len(val.labels) == 3 and len(train.labels) == 7
    assert sorted(np.concatenate([train.labels, val.labels]).tolist()) == list(range(10))
    assert np.all(np.diff(train.labels) > 0) and np.all(np.diff(val.labels) > 0)  # order kept
    again, _ = sv.data.split_validation(data, 3, seed=1)[1], None
    np.testing.assert_array_equal(again.labels, val.labels)
    assert not np.array_equal(sv.data.split_validation(data, 3, seed=2)[1].labels, val.labels)
    for bad in (0, 10, 1.0, 2.5, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="validation size must be"):
            sv.data.split_validation(data, bad)
    # Issue 23: the images alone (an array) split the same way, into Datasets without labels.
    train_x, val_x = sv.data.split_validation(data.images, 0.3, seed=1)
    np.testing.assert_array_equal(val_x.images, val.images)
    np.testing.assert_array_equal(train_x.images, train.images)
    assert np.all(val_x.labels == -1) and isinstance(val_x, sv.data.Dataset)


def test_phases_without_a_share_split_what_is_left_and_never_exceed_the_budget(setup):
    """Issue 23: every share used to default to 1.0, so two phases spent twice ``budget_evals``."""
    images, test_images, params, loss_fn = setup
    sgd = driver.Phase("sgd", sv.from_optax(loss_fn, optax.sgd(1e-2)))
    _, history = run([adam_phase(loss_fn, None), sgd], params, images, test_images, loss_fn,
                     batch_size=100, eval_every=50, budget_evals=300)
    # 150 evaluations each: 50 steps of 3.
    assert [(r["phase"], r["step"], r["evals"]) for r in history] == [("adam", 50, 150), ("sgd", 100, 300)]
    # A given share leaves the rest to the others: 0.2 -> 20 Adam steps, the other two 120 evals each.
    third = driver.Phase("sgd2", sv.from_optax(loss_fn, optax.sgd(1e-3)))
    resolved = driver.resolve_shares([adam_phase(loss_fn, 0.2), sgd, third])
    assert [p.share for p in resolved] == pytest.approx([0.2, 0.4, 0.4], abs=1e-15)
    assert driver.phase_steps(resolved, len(images), 100, 300) == [20, 40, 40]
    # Shares that sum to 1 up to float rounding (0.1 + 0.2 + 0.7 = 1.0000000000000002) are accepted.
    tenths = [adam_phase(loss_fn, 0.1), sgd._replace(share=0.2), third._replace(share=0.7)]
    assert sum(driver.phase_steps(tenths, len(images), 100, 300)) * 3 <= 300


def test_a_non_finite_validation_score_later_in_the_run_names_validate_and_the_step(setup):
    """Issue 23: a NaN never compares as better, so the gate silently kept older parameters."""
    images, test_images, params, loss_fn = setup
    calls = []

    def validate(p):
        calls.append(1)
        return float("nan") if len(calls) == 3 else 100.0 - len(calls)

    with pytest.raises(ValueError, match="validate returned nan for the parameters of step 10"):
        driver.run(jax.random.key(0), [adam_phase(loss_fn)], params, images, batch_size=100, eval_every=5,
                   budget_evals=60, validate=validate)


@pytest.mark.slow  # the default tier keeps train's resume with more epochs (test_train_cli.py)
def test_a_run_given_more_epochs_on_resume_continues_exactly(setup, tmp_path):
    """Issue 23: 2 epochs, then the finished run resumed with 3, equals 3 epochs from the start, bitwise."""
    images, _, params, loss_fn = setup
    images = images[:500]
    opts = dict(batch_size=100, eval_every=5)
    phase = lambda epochs: driver.Phase("adam", sv.from_optax(loss_fn, optax.adam(1e-3)), epochs=epochs)  # noqa: E731
    first = driver.run(jax.random.key(0), [phase(2)], params, images, checkpoint_dir=tmp_path / "c", **opts)
    grown = driver.run(jax.random.key(0), [phase(3)], params, images, checkpoint_dir=tmp_path / "c", resume=True,
                       **opts)
    direct = driver.run(jax.random.key(0), [phase(3)], params, images, **opts)
    assert len(first.history) == 2 and len(grown.history) == 3
    chex.assert_trees_all_equal(grown.params, direct.params)
    assert [r["train_loss"] for r in grown.history] == [r["train_loss"] for r in direct.history]
    # Resumed again with the same budget: nothing left to do, the same result at once.
    again = driver.run(jax.random.key(0), [phase(3)], params, images, checkpoint_dir=tmp_path / "c", resume=True,
                       **opts)
    chex.assert_trees_all_equal(again.params, direct.params)
