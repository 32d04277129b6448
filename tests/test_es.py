"""ES recombination: gradient quality, the low-rank assembly, and the step as an optimizer."""

import math
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
from savae_jax.annealing import es, lowrank

DIM = 10_000


def quadratic(params, key, batch):
    """0.5 * sum c_j (w_j - 1)^2 with curvatures c_j in [0.5, 2]: gradient c * (w - 1)."""
    c = jnp.linspace(0.5, 2.0, DIM)
    return 0.5 * jnp.sum(c * jnp.square(params["w"] - 1.0))


def cosine(a, b):
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# Slow tier: a statistical demonstration; the default tier keeps the estimate against materialised
# perturbations.
@pytest.mark.slow
def test_the_search_gradient_on_a_quadratic_matches_antithetic_es_theory():
    """With n = K / 2 antithetic pairs, g = (1/n) sum (grad . eps_i) eps_i exactly (a quadratic's
    even terms cancel in each pair), so E[cos^2(g, grad)] = (n + 2) / (n + D + 1) (derived in
    docs/architecture.md, ES section): the cosine grows like sqrt(K / (K + 2D)). Averaged over 16
    draws (float32 losses of ~1e4 at scale 1e-2 keep the pair differences exact to ~1e-3)."""
    params = {"w": jax.random.normal(jax.random.key(0), (DIM,))}
    true = jax.grad(quadratic)(params, None, None)["w"]
    means = []
    for k in (16, 64, 256):
        n = k // 2
        cosines = [cosine(es.estimate(quadratic, params, jax.random.key(s), None, None, n, 1e-2, noise="gaussian",
                                      shaping="none")[0]["w"], true) for s in range(16)]
        theory = math.sqrt((n + 2) / (n + DIM + 1))
        means.append(np.mean(cosines))
        if k == 256:  # measured means 0.024, 0.054, 0.113 against theory 0.032, 0.058, 0.113
            assert abs(means[-1] - theory) < 0.2 * theory, (means[-1], theory)
    assert means[0] < means[1] < means[2], means



def test_members_in_cache_sized_chunks_give_one_vmaps_losses(vae, monkeypatch):
    """ES members evaluated a chunk at a time (as on CPU) give one vmap's losses up to float32
    reordering: the chunks' smaller products may sum in another order (<= 8 ulps of each loss)."""
    images, params, loss_fn = vae
    x = jnp.asarray(images[:64])

    def losses(budget):
        monkeypatch.setattr(lowrank, "ACTIVATION_BYTES", budget)  # read when traced: one jit per budget
        estimate = jax.jit(lambda p, x: es.estimate(loss_fn, p, jax.random.key(1), jax.random.key(2), x, 5, 0.05)[1])
        return np.asarray(estimate(params, x))

    seen = {}

    def trace(p, x):  # the layout is static: traced (jax.eval_shape compiles nothing), not run
        grad, member_losses, seen["layout"], *_ = es.estimate(loss_fn, p, jax.random.key(1), jax.random.key(2), x, 5, 0.05)
        return member_losses

    jax.eval_shape(trace, params, x)
    layout = seen["layout"]
    whole, chunked = losses(2**30), losses(3 * layout.activation_bytes)  # 10 members in chunks of 3
    assert np.all(np.abs(whole - chunked) <= 8 * np.spacing(whole)), (whole, chunked)


def test_the_low_rank_estimate_equals_the_one_from_materialised_perturbations(vae):
    """sum_k w_k E_k assembled from the factors equals the sum over K explicitly formed
    perturbations (kernels W' - W = coef A B^T), and each member's loss through the layer
    interceptor equals the loss at its materialised parameters."""
    images, params, loss_fn = vae
    x, scale = jnp.asarray(images[:64]), 0.05
    grad, losses, layout, noises, _ = es.estimate(loss_fn, params, jax.random.key(1), jax.random.key(2), x, 4, scale,
                                               rank=2, shaping="z_scores")
    weights = es.shape_fitness(losses, "z_scores")
    moved = []
    for k in range(8):
        noise = jax.tree_util.tree_map(lambda a: a[k], noises)
        out = []
        for i, p in enumerate(layout.leaves):
            if i in layout.kernel_of:
                a_fac, b_fac = noise.factors[layout.kernel_of[i]]
                out.append(layout.layers[layout.kernel_of[i]].coef * (a_fac @ b_fac.T))
            elif i in layout.bias_of:
                out.append(noise.biases[layout.bias_of[i]])
            else:
                out.append(noise.leaves[i])
        moved.append(out)
        at = jax.tree_util.tree_unflatten(layout.treedef, [p + e for p, e in zip(layout.leaves, out)])
        # The interceptor computes x @ W + coef (x @ A) @ B.T, the explicit x @ (W + coef A B^T):
        # float32 reordering of a ~50-nat loss, 1e-5 relative.
        np.testing.assert_allclose(float(losses[k]), float(loss_fn(at, jax.random.key(2), x)), rtol=1e-5)
    explicit = [sum(float(weights[k]) * moved[k][i] for k in range(8)) / (8 * scale**2)
                for i in range(len(layout.leaves))]
    for got, want in zip(jax.tree_util.tree_leaves(grad), explicit):
        # Two summation orders of 8 float32 products: relative 1e-5 of the leaf's scale.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    # Antithetic: member k + 4 is member k's negative.
    a0, b0 = noises.factors[next(iter(noises.factors))]
    np.testing.assert_array_equal(np.asarray(a0[4]), -np.asarray(a0[0]))
    np.testing.assert_array_equal(np.asarray(b0[4]), np.asarray(b0[0]))


def make_es(loss_fn, **kw):
    return es.evolution_strategy(loss_fn, 8, 0.02, optimizer=optax.adam(3e-3), **kw)


# Slow tier: the default keeps ES's learning on digits in the pinned comparison (es and es-refine,
# tests/test_compare.py) and its cost in the comparison's budget check.
@pytest.mark.slow
def test_es_learns_on_digits_and_counts_its_evaluations(vae):
    images, params, loss_fn = vae
    opt = make_es(loss_fn, acceptance=an.greedy())
    assert opt.cost == 16 + 2  # K members + the paired decision on the selection batch
    noise_aware = make_es(loss_fn, acceptance=an.confident(0.05), decision=an.decision_batch(100, 200))
    assert noise_aware.cost == 16 + 2 + 4 and noise_aware.examples_per_step == 300
    before = sv.evaluate(loss_fn, params, images)
    out, history, _ = driver.run(jax.random.key(1), [driver.Phase("es", opt)], params, images, batch_size=100,
                              eval_every=10, budget_evals=18 * 60)
    after = sv.evaluate(loss_fn, out, images)
    # Measured: 48.2 -> 45.3 nats on the training digits in 60 steps (every candidate accepted).
    assert after < before - 1.0, (before, after)
    assert 0 < history[-1]["acceptance_rate"] <= 1


def test_es_is_deterministic_traces_once_and_resumes_exactly(vae, tmp_path):
    images, params, loss_fn = vae
    opt = make_es(loss_fn, acceptance=an.confident(0.05), decision=an.decision_batch(50, 100))
    traces = []

    def counted(key, state, x):
        traces.append(1)
        return opt.step(key, state, x)

    # The run's 12 steps trace the step once (one program for every step; the driver jits it).
    kwargs = dict(batch_size=50, eval_every=4, budget_evals=opt.cost * 12)
    a, history, _ = driver.run(jax.random.key(3), [driver.Phase("es", opt._replace(step=counted))], params, images,
                               **kwargs)
    assert len(traces) == 1 and history[-1]["step"] == 12
    b, _, _ = driver.run(jax.random.key(3), [driver.Phase("es", opt)], params, images, **kwargs)
    chex.assert_trees_all_equal(a, b)
    ckpt = tmp_path / "ckpt"
    driver.run(jax.random.key(3), [driver.Phase("es", opt)], params, images, checkpoint_dir=ckpt, **kwargs)
    shutil.rmtree(ckpt / "12")
    c, resumed, _ = driver.run(jax.random.key(3), [driver.Phase("es", opt)], params, images, checkpoint_dir=ckpt,
                            resume=True, **kwargs)
    chex.assert_trees_all_equal(c, a)
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in history]


def test_bad_es_settings_are_refused_naming_the_argument(vae):
    _, _, loss_fn = vae
    for kwargs, needle in (({"num_pairs": 0}, "num_pairs"), ({"scale": 0.0}, "scale"),
                           ({"noise": "uniform"}, "noise"), ({"shaping": "ranks"}, "shaping"),
                           ({"optimizer": "adam"}, "optimizer"), ({"rank": 0}, "rank")):
        args = {"num_pairs": 2, "scale": 0.01} | kwargs
        with pytest.raises(ValueError, match=needle):
            es.evolution_strategy(loss_fn, args.pop("num_pairs"), args.pop("scale"), **args)
    with pytest.raises(ValueError, match="per-example"):
        es.evolution_strategy(lambda p, k, x: loss_fn(p, k, x), 2, 0.01, acceptance=an.penalty())
