# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # savae_jax tutorial: a VAE trained by Adam, refined by simulated annealing
#
# This notebook is kept as a [jupytext](https://jupytext.readthedocs.io) "percent" script, so its
# diffs stay readable and it holds no outputs. Open it in Jupyter with jupytext installed
# (`pip install -e ".[test]"` brings it), or turn it into a notebook first:
# `jupytext --to notebook docs/tutorial.py`. The test suite runs every cell
# (`tests/test_tutorial.py`): 1 to 2 minutes on 2 CPU cores shared with other jobs.
#
# What it shows:
#
# 1. load the digits, build the VAE and its loss;
# 2. train with Adam;
# 3. refine the Adam optimum with noise-aware annealing, and look at every step it took;
# 4. run many annealing chains at once with `jax.vmap`;
# 5. sweep a hyperparameter with `jax.vmap`;
# 6. checkpoint a run and resume it exactly;
# 7. plot the curves and image grids.

# %%
# Inline figures even where MPLBACKEND names a non-interactive backend (Agg, as on CI machines).
# %matplotlib inline
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import savae_jax as sv
from savae_jax import annealing as an
from savae_jax.experiments import figures, report  # the figures `savae compare` writes

print(jax.default_backend(), jax.devices())

# %% [markdown]
# ## 1. Data, model and loss
#
# `digits` is scikit-learn's 8x8 handwritten digits (embedded: no download). Images are float32
# in [0, 1] with shape (N, H, W, C). One loss, `loss_fn(params, key, x) -> scalar` (the batch's mean
# negative ELBO in nats per example), is shared by every optimizer below.

# %%
train, test = sv.load("digits", "train"), sv.load("digits", "test")
model = sv.MLPVAE(hidden=64, latents=8)
params0 = sv.models.init(jax.random.key(0), model, train.images[:1])
loss_fn = sv.make_loss(model)
batch_fn = sv.data.BatchFn("dynamic")  # a fresh Bernoulli binarisation of every batch
print(train.images.shape, test.images.shape)
untrained = sv.evaluate(loss_fn, params0, test.images, binarize=batch_fn)  # full test set, fixed key
print("untrained test -ELBO:", untrained)

# %% [markdown]
# ## 2. Adam
#
# `sv.fit` runs any Optax transformation (or an annealer) in one compiled loop, with one history row
# per epoch.

# %%
adam_params, adam_history = sv.fit(jax.random.key(1), params0, loss_fn, optax.adam(1e-3), train,
                                   epochs=20, batch_size=100, test=test, binarize=batch_fn)
print("Adam, 20 epochs: test -ELBO", round(adam_history[-1]["test_neg_elbo"], 3))

# %% [markdown]
# ## 3. Refine with noise-aware annealing, and look at every step
#
# The annealer draws K low-rank proposals around the incumbent, picks the best on the step's batch
# (the *selection* batch), then decides on 200 other examples (the *decision* batch): the
# `confident` rule accepts only when a paired t-test says the winner is better. `driver.run` with
# `trace=True` also returns one row per step with everything the step's `info` holds; the rows are
# kept on the device and fetched at each history row, so recording costs no synchronisation.

# %%
sa = an.simulated_annealing(
    loss_fn, num_proposals=16, proposal=an.low_rank(scale=1e-3),
    temperature=an.exponential(t0=5e-3, decay=0.99), acceptance=an.confident(0.05),
    decision=an.decision_batch(100, 200))
refined, sa_history, trace = sv.driver.run(
    jax.random.key(2), [sv.Phase("sa", sa)], adam_params, train.images, batch_size=100,
    eval_every=10, budget_evals=1500, batch_fn=batch_fn, initial_row=True, trace=True,
    evaluate=lambda p: sv.evaluate(loss_fn, p, test.images, binarize=batch_fn))
print(len(trace), "annealing steps; the fields of one:", list(trace[0]))
print("test -ELBO: after Adam", round(sa_history[0]["test_neg_elbo"], 3),
      "after annealing", round(sa_history[-1]["test_neg_elbo"], 3))

# %%
# The same panels as `savae compare`'s sa_traces.png: temperature, acceptance rate, and the decided
# dL with its standard-error band beside the selection batch's dL.
fig = figures.traces_figure({"noise-aware annealing": report.trace_columns(trace)})

# %% [markdown]
# The selection batch's dL (grey) is biased low: it is the minimum of 16 noisy differences. The
# decided dL, measured on other examples, is the honest estimate; the rule accepts only when its
# upper confidence bound is below zero.
#
# ## 4. Many chains in one `jax.vmap`
#
# The key is an argument of `step`, not part of the state, so `jax.vmap(step)` over keys and states
# runs independent chains as one program. Here 8 chains start from the Adam optimum and see the
# same batch at every step.

# %%
chains = 8
plain = an.simulated_annealing(loss_fn, 16, an.low_rank(1e-3), an.exponential(5e-3, 0.99), an.metropolis())
states = jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (chains, *leaf.shape)),
                                plain.init(adam_params))
step = jax.jit(jax.vmap(plain.step, in_axes=(0, 0, None)))
batch_keys = jax.random.split(jax.random.key(3), 30)
losses = []
for i, key in enumerate(batch_keys):
    x = sv.data.make_batch(train.images, jnp.arange(100) + 100 * (i % 15), key, binarize="dynamic")
    states, info = step(jax.random.split(jax.random.fold_in(key, 1), chains), states, x)
    losses.append(np.asarray(info.loss))
print("accepted moves per chain:", np.asarray(states.num_accepted).tolist())
plt.figure(figsize=(5, 3))
plt.plot(np.array(losses))
plt.xlabel("step")
plt.ylabel("incumbent's loss on the batch (nats)")
plt.title(f"{chains} chains, one vmap")
plt.show()

# %% [markdown]
# ## 5. A hyperparameter sweep in one `jax.vmap`
#
# Build the annealer inside a function of the swept value and vmap that function: the proposal
# scale below is traced as an array, and every member of the sweep runs 20 steps on the same
# batches (`jax.lax.scan`), all in one compiled program.

# %%
x_sweep = sv.data.make_batch(train.images, jnp.arange(100), jax.random.key(4), binarize="dynamic")


def anneal_with_scale(scale):
    """20 annealing steps from the Adam optimum with proposal scale ``scale``; the final state."""
    sa_s = an.simulated_annealing(loss_fn, 16, an.low_rank(scale), an.exponential(5e-3, 0.99), an.metropolis())

    def body(state, key):
        return sa_s.step(key, state, x_sweep)[0], None

    return jax.lax.scan(body, sa_s.init(adam_params), jax.random.split(jax.random.key(5), 20))[0]


scales = jnp.array([1e-4, 1e-3, 1e-2, 1e-1])
swept = jax.jit(jax.vmap(anneal_with_scale))(scales)
for s, best, accepted in zip(scales.tolist(), np.asarray(swept.best_loss), np.asarray(swept.num_accepted)):
    print(f"scale {s:g}: best loss {best:.3f} nats, {accepted} of 20 moves accepted")

# %% [markdown]
# ## 6. Checkpoint and resume
#
# With `checkpoint_dir`, `driver.run` saves the whole run state (optimizer state, position, history,
# trace) at its rows. Here the newest checkpoint is deleted, as if the process had been killed just
# before writing it, and `resume=True` continues from the one before: the result equals the
# uninterrupted run's, bitwise.

# %%
workdir = Path(tempfile.mkdtemp())
run_kwargs = dict(batch_size=100, eval_every=10, budget_evals=600, batch_fn=batch_fn, trace=True)
full, full_history, full_trace = sv.driver.run(jax.random.key(6), [sv.Phase("sa", sa)], adam_params,
                                               train.images, checkpoint_dir=workdir / "ckpt", **run_kwargs)
saved = sv.checkpoint.RunCheckpointer(workdir / "ckpt").steps()
print("checkpoints at steps", saved)
shutil.rmtree(workdir / "ckpt" / str(saved[-1]))
resumed, resumed_history, resumed_trace = sv.driver.run(
    jax.random.key(6), [sv.Phase("sa", sa)], adam_params, train.images, checkpoint_dir=workdir / "ckpt",
    resume=True, **run_kwargs)
same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves(full),
                                                      jax.tree_util.tree_leaves(resumed)))
print("resumed parameters equal the uninterrupted run's:", same)
print("resumed trace has", len(resumed_trace), "steps; accept decisions equal:",
      [r["accepted"] for r in resumed_trace] == [r["accepted"] for r in full_trace])
assert same

# %% [markdown]
# Parameters alone are saved and loaded with `sv.checkpoint.save_params` / `load_params`:

# %%
sv.checkpoint.save_params(workdir / "params", refined)
loaded = sv.checkpoint.load_params(workdir / "params", like=refined)
print("reloaded test -ELBO:", sv.evaluate(loss_fn, loaded, test.images, binarize=batch_fn))

# %% [markdown]
# ## 7. Curves and image grids
#
# Adam's rows are per epoch; the annealing run started with a row at step 0 (`initial_row=True`),
# so its curve begins where Adam's ended. Then test digits over their reconstructions, and
# samples from the prior.

# %%
adam_evals = [3 * r["step"] for r in adam_history]  # a gradient step costs 3 evaluations
curves = {  # one history (rows with "evals" and "test_neg_elbo") per curve
    "adam": [[{"evals": 0, "test_neg_elbo": untrained}]
             + [{"evals": e, "test_neg_elbo": r["test_neg_elbo"]} for e, r in zip(adam_evals, adam_history)]],
    "noise-aware annealing": [[{"evals": adam_evals[-1] + r["evals"], "test_neg_elbo": r["test_neg_elbo"]}
                               for r in sa_history]],
}
fig = figures.histories_figure(curves, "evals", log_scale=True)

# %%
grids = figures.grid_figures(jax.random.key(7), refined, model, test.images, binarize="dynamic")
