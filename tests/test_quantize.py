"""Integer-weight VAEs (issue 25, part 1): RTN quantization, the quantized loss, lattice moves."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import annealing as A
from savae_jax import quantize as Q

from conftest import subprocess_work, subprocess_result, run_script, slow_after_first, small_vae


@pytest.fixture(scope="module")
def trained():
    """(model, loss, params after 8 epochs of Adam (120 steps), 256 training digits) of the small MLP VAE."""
    import optax

    model, loss = small_vae(16, 3)
    train = sv.load("digits", "train")
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    params, _ = sv.fit(jax.random.key(1), params, loss, optax.adam(3e-3), train, 8, 100, binarize="dynamic")
    return model, loss, params, jnp.asarray(train.images[:256])


def _kernels(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in leaves if Q.is_quantized_leaf(p, v)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_lie_in_range_and_round_each_weight_to_its_nearest_level(trained, bits):
    _, _, params, _ = trained
    q = Q.quantize(params, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.qmax == qmax and Q.codes_in_range(q)
    codes = dict(_kernels(q.codes))
    for name, _ in _kernels(params):
        # int8 codes; with "max" each channel's largest weight lands on +-qmax.
        assert codes[name].dtype == np.int8 and np.all(np.abs(codes[name]).max(axis=0) == qmax), name
    deq = dict(_kernels(Q.dequantize(q)))
    flat_scales = {jax.tree_util.keystr(p): np.asarray(v)
                   for p, v in jax.tree_util.tree_flatten_with_path(q.scales)[0]}
    for name, w in _kernels(params):
        s = flat_scales[name]
        assert s.shape == (1, w.shape[-1])  # one scale per output channel
        # Round to nearest: every weight within half a step of its level (float32 rounding of w / s aside).
        assert np.all(np.abs(w - deq[name]) <= s / 2 * (1 + 1e-6)), name
    # Biases are not quantized: the same arrays.
    for (pa, a), (pb, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree_util.tree_flatten_with_path(Q.dequantize(q))[0]):
        if not Q.is_quantized_leaf(pa, a):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_mse_clip_never_rounds_worse_than_max_and_helps_at_few_bits(trained):
    _, _, params, _ = trained
    for bits in (2, 3, 4):
        errors = {}
        for clip in ("max", "mse"):
            deq = dict(_kernels(Q.dequantize(Q.quantize(params, bits, clip))))
            errors[clip] = {name: np.sum((w - deq[name]) ** 2, axis=0) for name, w in _kernels(params)}
        for name in errors["max"]:
            # "mse" tries the max scale (fraction 1.0) among its candidates: per channel never worse
            # (float32 rounding of the scale aside).
            assert np.all(errors["mse"][name] <= errors["max"][name] * (1 + 1e-5) + 1e-12), (bits, name)
        total = {clip: sum(e.sum() for e in errors[clip].values()) for clip in errors}
        assert total["mse"] < 0.9 * total["max"], (bits, total)


def test_make_loss_and_evaluation_take_quantized_parameters(trained):
    model, loss, params, x = trained
    key = jax.random.key(3)
    full = float(loss(params, key, x))
    # 8 bits: a step of max|w| / 127 per channel moves this loss by less than 0.05 nats (measured 0.01).
    assert abs(float(loss(Q.quantize(params, 8), key, x)) - full) < 0.05
    # 2 bits: three levels per channel cost nats.
    q2 = Q.quantize(params, 2)
    assert float(loss(q2, key, x)) > full + 1.0
    assert loss.per_example(q2, key, x).shape == (256,)
    assert sv.evaluate(loss, q2, x) == sv.evaluate(loss, Q.dequantize(q2), x)  # the same program's input
    # Another model's quantized parameters are refused by name, as float ones are.
    other, _ = small_vae(8, 2)
    with pytest.raises(ValueError, match="params do not fit"):
        sv.evaluate(sv.make_loss(other), q2, x)


@pytest.mark.parametrize("clip", ["max", "mse"])
def test_quantizing_a_quantized_model_gives_it_back(trained, clip):
    q = Q.quantize(trained[2], 3, clip)
    assert Q.quantize(q, 3) is q  # already int-3: unchanged
    leaves = lambda t: [np.asarray(a) for a in jax.tree_util.tree_leaves(t)]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(Q.requantize(Q.dequantize(q), q)), leaves(q)))
    # From its float values: the same codes; each scale comes back from max|code * s| / qmax, where
    # code * s was rounded to float32, so it may be the neighbouring float32 (1 ulp).
    again = Q.quantize(Q.dequantize(q), 3, clip)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(again.codes), leaves(q.codes)))
    for a, b in zip(leaves(again.scales), leaves(q.scales)):
        np.testing.assert_allclose(a, b, rtol=np.finfo(np.float32).eps, atol=0)
    assert Q.codes_in_range(Q.quantize(q, 2)) and Q.quantize(q, 2).bits == 2  # fewer bits: re-rounded


def test_the_straight_through_gradient_is_the_float_gradient_at_the_rounded_point(trained):
    """STE: the forward pass is the rounded model's, the gradient the loss's at the rounded point,
    where the true gradient of the rounded model with respect to its float shadow is zero."""
    _, loss, params, x = trained
    q = Q.quantize(params, 3)
    ste = Q.straight_through(loss, q)
    key = jax.random.key(5)
    shadow = jax.tree_util.tree_map(lambda a: a + 1e-3, params)  # off the lattice
    rounded = Q.to_lattice(shadow, q)
    assert float(ste(shadow, key, x)) == float(loss(rounded, key, x))
    g_ste, g_float = jax.grad(ste)(shadow, key, x), jax.grad(loss)(rounded, key, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ste), jax.tree_util.tree_leaves(g_float)):
        # The same gradient program at the same point; XLA may fuse the two differently (a few ulps).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    rounding = jax.grad(lambda w: loss(Q.to_lattice(w, q), key, x))(shadow)
    kernels = [np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(rounding)[0] if Q.is_quantized_leaf(p, g)]
    assert all(np.all(g == 0) for g in kernels) and any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_ste))


def test_straight_through_adam_lowers_the_rounded_model_s_loss(trained):
    import optax

    _, loss, params, x = trained
    q = Q.quantize(params, 2)
    ste = Q.straight_through(loss, q)
    train = sv.load("digits", "train")
    shadow, _ = sv.fit(jax.random.key(6), Q.dequantize(q), ste, optax.adam(1e-3), train, 2, 100, binarize="dynamic")
    after = Q.requantize(shadow, q)
    assert Q.codes_in_range(after) and after.bits == 2
    before_loss, after_loss = (sv.evaluate(loss, p, x) for p in (q, after))
    assert after_loss < before_loss - 0.5, (before_loss, after_loss)


def test_learned_rounding_starts_at_the_float_model_and_hardens_to_round_to_nearest(trained):
    """AdaRound's variables start where the soft model is the float model (clipped to the code range), and
    hardening them gives RTN's codes; without a step the loss is the soft model's, with one past the warm-up
    it adds the regularizer, zero before."""
    _, loss, params, x = trained
    q = Q.quantize(params, 3, clip="mse")  # mse: some weights lie beyond the range and are clipped
    ada, v0, harden = Q.learned_rounding(loss, q, params, steps=100, reg=0.5, warmup=0.2)
    hardened = harden(v0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(hardened.codes),
                                                     jax.tree_util.tree_leaves(q.codes)))
    clipped = jax.tree_util.tree_map(lambda w, c, s: jnp.clip(w / s, -q.qmax, q.qmax) * s if Q.is_code(c) else w,
                                     params, q.codes, q.scales)
    key = jax.random.key(3)
    soft = float(ada(v0, key, x))
    # The soft weights are floor(w / s) + h(v0) times s: w / s rebuilt through logit and sigmoid, a few
    # float32 ulps of each weight; summed into the loss, far below 1e-4 relative.
    np.testing.assert_allclose(soft, float(loss(clipped, key, x)), rtol=1e-4)
    assert float(ada(v0, key, x, step=jnp.int32(19))) == soft  # in the warm-up: no regularizer
    penalty = float(ada(v0, key, x, step=jnp.int32(20))) - soft
    assert 0.01 < penalty <= 0.5  # reg 0.5 times the mean of 1 - |2h - 1|^20: the weights not already at 0 or 1


# Slow tier: the default tier keeps learned rounding in
# test_learned_rounding_starts_at_the_float_model_and_hardens_to_round_to_nearest.
@pytest.mark.slow
def test_learned_rounding_s_regularizer_decides_the_rounding_and_beats_rtn(trained):
    """Adam on AdaRound's variables at 2 bits (300 steps, the regularizer on after 60), with the regularizer
    (reg 1) and without (reg 0, the soft model alone): with it, fewer rounding variables are left between 0
    and 1 (measured 49 % against 77 %) and the hardened model is better than without it (28.2 against 31.1
    nats) and than RTN (33.1)."""
    import optax

    _, loss, params, x = trained
    q = Q.quantize(params, 2)

    def run(reg):
        ada, v0, harden = Q.learned_rounding(loss, q, params, steps=300, reg=reg)
        optimizer = optax.adam(1e-2)

        def step(carry, key):
            v, state, i = carry
            updates, state = optimizer.update(jax.grad(ada)(v, key, x, step=i), state, v)
            return (optax.apply_updates(v, updates), state, i + 1), None

        init = (v0, optimizer.init(v0), jnp.int32(0))
        (v, _, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, jax.random.split(jax.random.key(4), 300)))(init)
        hs = np.concatenate([np.ravel(Q._rectified_sigmoid(a)) for a, c in zip(jax.tree_util.tree_leaves(v),
                             jax.tree_util.tree_leaves(q.codes)) if Q.is_code(c)])
        return np.mean((hs > 0.05) & (hs < 0.95)), harden(v)

    (free_undecided, free), (undecided, hardened) = run(0.0), run(1.0)
    assert undecided < 0.75 * free_undecided, (free_undecided, undecided)
    assert Q.codes_in_range(hardened) and hardened.bits == 2
    rtn_loss, free_loss, loss_after = (sv.evaluate(loss, p, x) for p in (q, free, hardened))
    assert loss_after < free_loss - 1.0 and loss_after < rtn_loss - 2.0, (rtn_loss, free_loss, loss_after)


@pytest.mark.parametrize("call, match", [
    (lambda p: Q.quantize(p, 0), "bits"),
    (lambda p: Q.quantize(p, 1), "bits"),
    (lambda p: Q.quantize(p, 9), "bits"),
    (lambda p: Q.quantize(p, 2.5), "bits"),
    (lambda p: Q.quantize(p, "4"), "bits"),
    (lambda p: Q.quantize(p, 4, clip="min"), "clip must be one of max, mse"),
    (lambda p: Q.quantize({"b": jnp.zeros(3)}, 4), "no Dense or Conv kernel"),
    (lambda p: Q.quantize(jax.tree_util.tree_map(lambda a: a * jnp.nan, p), 4), "non-finite weights"),
    (lambda p: Q.learned_rounding(sv.make_loss(small_vae(16, 3)[0]), Q.quantize(p, 3), p, steps=0), "steps"),
    (lambda p: Q.learned_rounding(sv.make_loss(small_vae(16, 3)[0]), Q.quantize(p, 3), p, steps=10, reg=-1), "reg"),
    (lambda p: Q.learned_rounding(sv.make_loss(small_vae(16, 3)[0]), Q.quantize(p, 3), p, steps=10, warmup=1.0),
     "warmup"),
    (lambda p: Q.learned_rounding(sv.make_loss(small_vae(16, 3)[0]), Q.quantize(p, 3), p, steps=10,
                                  exponent=(2.0, 20.0)), "exponent"),
    (lambda p: Q.learned_rounding(sv.make_loss(small_vae(16, 3)[0]), Q.quantize(p, 3), {"w": p}, steps=10),
     "params: not the tree"),
    (lambda p: A.lattice(0.0), "fraction"),
    (lambda p: A.lattice(0.1, step=0), "step"),
])
def test_bad_quantization_inputs_are_refused_by_name(trained, call, match):
    with pytest.raises(ValueError, match=match):
        call(trained[2])


def test_lattice_moves_keep_every_code_in_range_and_greedy_search_lowers_the_loss(trained):
    """SA on the 3-bit lattice from the RTN codes, on a fixed batch with the greedy rule: it ends
    below RTN's loss (at one evaluation key), every state is a valid 3-bit model, each accepted
    move changes codes by exactly +-1, and the same key gives the same codes."""
    _, loss, params, x = trained
    q0 = Q.quantize(params, 3)
    lq = loss
    ncodes = q0.num_codes
    sa = A.simulated_annealing(lq, 8, A.lattice(4.0 / ncodes), A.exponential(1.0, 0.99), A.greedy())
    step = jax.jit(sa.step)

    def run(key):
        state, losses = sa.init(q0), []
        for k in jax.random.split(key, 60):
            before = state.params
            state, info = step(k, state, x)
            losses.append(float(info.loss))
            moved = [np.asarray(a, np.int32) - np.asarray(b, np.int32)
                     for a, b in zip(jax.tree_util.tree_leaves(state.params.codes),
                                     jax.tree_util.tree_leaves(before.codes)) if a.dtype == jnp.int8]
            assert all(set(np.unique(d)) <= {-1, 0, 1} for d in moved)
            assert Q.codes_in_range(state.params)
        return state, losses

    state, losses = run(jax.random.key(4))
    # Each step scores its proposals with its own key (the ELBO samples z), so compare the start
    # and the end at one evaluation key, on the 256 examples searched on.
    start, end = (float(lq(p, jax.random.key(0), x)) for p in (q0, state.params))
    assert int(state.num_accepted) > 5 and end < start - 0.1, (start, end)
    assert isinstance(state.params, Q.QuantizedParams) and state.params.bits == 3
    again, _ = run(jax.random.key(4))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                      jax.tree_util.tree_leaves(again.params)))


def test_lattice_moves_refuse_float_parameters(trained):
    _, loss, params, x = trained
    sa = A.simulated_annealing(loss, 4, A.lattice(0.01), A.exponential(1.0, 0.99), A.greedy())
    with pytest.raises(ValueError, match="params: lattice moves need quantized parameters"):
        jax.jit(sa.step)(jax.random.key(0), sa.init(params), x)


def test_a_lattice_move_never_copies_the_incumbent(trained):
    """At fraction 1/codes a Bernoulli draw moves no code with probability (1 - 1/N)^N ~ 0.37; such a
    draw moves one code chosen uniformly instead. From all-zero codes (nothing clipped), over 4000
    proposals: every one moves at least one code, 1 + (1 - 1/N)^N codes on average, exactly one in
    P(0) + P(1) = 2 (1 - 1/N)^N ~ 74 % of them, and every layer's codes get moved."""
    _, loss, params, x = trained
    q = Q.quantize(params, 3)
    zero = Q.QuantizedParams(jax.tree_util.tree_map(lambda c: jnp.zeros_like(c) if Q.is_code(c) else c, q.codes),
                             q.scales, q.bits)
    n = zero.num_codes
    prepared = A.lattice(1.0 / n).prepare(loss, zero, jax.random.key(0), x, 1.0, 1.0, ())

    def moved_per_layer(key):
        codes = [c for c in jax.tree_util.tree_leaves(prepared.materialize(key).codes) if Q.is_code(c)]
        return jnp.stack([jnp.sum(c != 0) for c in codes])

    per_layer = np.asarray(jax.jit(jax.vmap(moved_per_layer))(jax.random.split(jax.random.key(1), 4000)))
    moved = per_layer.sum(axis=1)
    p0 = (1 - 1 / n) ** n
    assert moved.min() >= 1
    # Standard errors over 4000 proposals: about 0.02 for the mean (sd about 1), 0.007 for the share; 5 of each.
    assert abs(moved.mean() - (1 + p0)) < 0.1, moved.mean()
    assert abs(np.mean(moved == 1) - 2 * p0) < 0.035, np.mean(moved == 1)
    assert np.all(per_layer.sum(axis=0) > 0)


# 2 bits by default (qmax 1: a step of 3 clips on every move); 8, 3 and 4 bits in the slow tier.
@pytest.mark.parametrize("bits", slow_after_first([2, 8, 3, 4]))
def test_codes_stay_in_range_under_ten_thousand_random_lattice_moves(trained, bits):
    """At each width, 10^4 lattice moves in a row, every move accepted: sparse steps of 1 and 3
    with each code moving with probability 1/2, and rank-2 low-rank steps of 2 (scale 1): the
    codes reach +-qmax and never leave it. And the move evaluated for a key is the one re-created
    from it, for both kinds."""
    _, loss, params, x = trained
    q = Q.quantize(params, bits)
    moves = [A.lattice(0.5, step=1), A.lattice(0.5, step=3), A.lattice_low_rank(1.0, rank=2, step=2)]

    def peak(p):
        return jnp.max(jnp.array([jnp.max(jnp.abs(c.astype(jnp.int32))) for c in jax.tree_util.tree_leaves(p.codes)
                                  if jnp.issubdtype(c.dtype, jnp.integer)]))

    def walk(q, keys):
        def body(p, key):
            for proposal, k in zip(moves, jax.random.split(key)):
                p = proposal.prepare(loss, p, jax.random.key(0), x, 1.0, 1.0, ()).materialize(k)
            return p, peak(p)
        return jax.lax.scan(body, q, keys)

    keys = jax.random.split(jax.random.key(7), 3_334)  # three moves each: 10 002 moves
    final, peaks = jax.jit(walk)(q, keys)
    assert int(peaks.max()) == q.qmax and int(peaks.min()) <= q.qmax and Q.codes_in_range(final), q.bits
    for move in (moves[0], moves[2]):
        prepared = move.prepare(loss, q, jax.random.key(0), x, 1.0, 1.0, ())
        key = jax.random.key(11)
        assert float(prepared.loss(key, jnp.bool_(True))) == float(loss(prepared.materialize(key), jax.random.key(0), x))
        assert float(prepared.loss(key, jnp.bool_(False))) == float(loss(q, jax.random.key(0), x))


def test_a_rank_one_lattice_move_has_rank_one_signs_and_moves_the_expected_share_of_codes(trained):
    """From all-zero 8-bit codes (nothing clipped): a rank-1 move's signs on each kernel are those of an
    outer product (two rows agree in sign on every column both moved, or disagree on every one), and at scale 0.3 the
    share of codes moved over 200 draws is P(|0.3 a b| > 1/2) for independent standard normals a, b,
    estimated here by 4 x 10^6 numpy draws (0.092)."""
    _, loss, params, x = trained
    q = Q.quantize(params, 8)
    zero = Q.QuantizedParams(jax.tree_util.tree_map(lambda c: jnp.zeros_like(c) if Q.is_code(c) else c, q.codes),
                             q.scales, q.bits)
    prepared = A.lattice_low_rank(0.3, rank=1).prepare(loss, zero, jax.random.key(0), x, 1.0, 1.0, ())
    draw = jax.jit(jax.vmap(lambda k: [c for c in jax.tree_util.tree_leaves(prepared.materialize(k).codes)
                                       if Q.is_code(c)]))
    kernels = [np.asarray(c, np.int32) for c in draw(jax.random.split(jax.random.key(1), 200))]
    for c in kernels:
        s = np.sign(c.reshape(200, -1, c.shape[-1])).astype(np.int8)
        # Rows i and k of a rank-1 sign pattern agree everywhere or disagree everywhere they both moved.
        products = s[:, :, None, :] * s[:, None, :, :]  # (draw, i, k, column)
        assert not np.any(np.any(products == 1, axis=-1) & np.any(products == -1, axis=-1))
    moved = sum(int(np.sum(c != 0)) for c in kernels) / (200 * zero.num_codes)
    rng = np.random.default_rng(0)
    expected = np.mean(np.abs(0.3 * rng.standard_normal(4_000_000) * rng.standard_normal(4_000_000)) > 0.5)
    # The draws of one kernel share their factors, so the share moved varies far more than a binomial's:
    # 200 draws of a 2192-code model gave 0.0933 (measured); 0.015 is about 5 sd of the mean of 200 draws.
    assert abs(moved - expected) < 0.015, (moved, expected)


def test_lattice_es_steps_each_moved_code_towards_the_target_of_a_separable_loss():
    """On loss(c) = sum (c - t)^2 over one 3-bit kernel's codes, from c = 0, one lattice_es step of 64
    pairs, each code moving with probability 1/4: every code the candidate moves goes one step towards
    its target (a code with t = 0 is at its minimum and may move either way), the codes whose target is
    3 steps away all move, and the candidate is accepted (it lowers the loss)."""
    target = np.array([[-3, -1, 0, 1, 3, 2], [3, 0, -2, -3, 1, -1]], np.int32)
    q = Q.QuantizedParams({"kernel": jnp.zeros(target.shape, jnp.int8)},
                          {"kernel": jnp.ones((1, target.shape[1]), jnp.float32)}, 3)

    def loss(p, key, batch):
        return jnp.sum(jnp.square(p.codes["kernel"].astype(jnp.float32) - target))

    es = A.lattice_es(loss, 64, 0.25)
    state, info = jax.jit(es.step)(jax.random.key(0), es.init(q), None)
    moved = np.asarray(state.params.codes["kernel"], np.int32)
    assert bool(info.accepted) and float(info.delta) < 0
    assert np.all(np.abs(moved) <= 1)
    towards = np.sign(moved) == np.sign(target)
    assert np.all(towards | (moved == 0) | (target == 0)), moved
    assert np.all(moved[np.abs(target) == 3] != 0), moved


def test_lattice_es_refuses_float_parameters_and_a_step_beyond_int8(trained):
    _, loss, params, x = trained
    with pytest.raises(ValueError, match="params: lattice moves need quantized parameters"):
        A.lattice_es(loss, 4, 0.01).init(params)
    with pytest.raises(ValueError, match=r"step must be an integer in \[1, 127\], got 128"):
        A.lattice_es(loss, 4, 0.01, step=128)
    with pytest.raises(ValueError, match="scale"):
        A.lattice_low_rank(0.0)


# lattice-es in the slow tier: its checkpoint and resume are those of lattice-sa (the same
# QuantizedParams state), and `savae quantize --resume` (quantize_runs) resumes it in the default run.
@pytest.mark.parametrize("method", slow_after_first(["lattice-sa", "lattice-es"]))
def test_lattice_annealing_runs_in_the_driver_deterministically_and_resumes_exactly(tmp_path, method):
    """driver.run with a lattice annealer and with lattice ES (noise-aware decisions on a decision
    batch): quantized parameters are checkpointed (Orbax) and restored; a run stopped at 10 steps
    and resumed to 20 (a new run of the same key from a checkpoint) equals one run of 20, bitwise."""
    from savae_jax import driver

    model, loss = small_vae(16, 3)
    train = sv.load("digits", "train")
    q = Q.quantize(sv.models.init(jax.random.key(0), model, train.images[:1]), 3)
    codes = q.num_codes
    sa = (A.simulated_annealing(loss, 8, A.lattice(4 / codes), A.exponential(0.1, 0.99), A.greedy())
          if method == "lattice-sa" else
          A.lattice_es(loss, 4, 8 / codes, acceptance=A.confident(0.2), decision=A.decision_batch(100, 100)))

    def run(folder, steps, resume=False):
        return driver.run(jax.random.key(3), [driver.Phase("sa", sa)], q, train.images, batch_size=100,
                          budget_evals=steps * sa.cost, checkpoint_every=5, checkpoint_dir=tmp_path / folder,
                          resume=resume, eval_every=5)

    full = run("full", 20)
    run("part", 10)
    resumed = run("part", 20, resume=True)
    leaves = lambda r: [np.asarray(a) for a in jax.tree_util.tree_leaves(r.params)]  # noqa: E731
    assert isinstance(resumed.params, Q.QuantizedParams) and full.history[-1]["step"] == 20
    assert Q.codes_in_range(full.params) and full.params.bits == 3
    assert all(np.array_equal(a, b) for a, b in zip(leaves(full), leaves(resumed)))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert any(r["acceptance_rate"] > 0 for r in full.history[1:])  # the codes moved


# The SIGKILL test of the lattice optimizers: tests/lattice_worker.py (lattice annealing for 30 steps,
# then lattice ES for 22, a checkpoint at every step) killed once in each phase, then resumed to its
# end, against an uninterrupted run of the same worker (subprocess work, see conftest.py); in the slow tier (`pytest -m slow`): four launches, each compiling both phases' steps.
LATTICE_KILL_AT = (10, 38)  # kill once the newest checkpoint is at this step or later: SA's 10th, ES's 8th


def _newest_step(folder) -> int:
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=0)


@subprocess_work("lattice_kill_runs")
def _lattice_kill_runs(tmp):
    """``(uninterrupted run's folder, killed-and-resumed run's folder, steps at which each launch was killed)``."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import popen

    tests = Path(__file__).resolve().parent

    def launch(folder, *flags):
        return popen([sys.executable, "lattice_worker.py", str(folder), *flags], cwd=tests,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc):
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-4000:]

    reference, killed = tmp / "reference", tmp / "killed"
    reference.mkdir(), killed.mkdir()
    finish(launch(reference))
    killed_at = []
    for i, step in enumerate(LATTICE_KILL_AT):
        proc = launch(killed, *(["--resume"] if i else []))
        deadline = time.time() + 600
        while proc.poll() is None and _newest_step(killed / "checkpoints") < step and time.time() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[0][-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(_newest_step(killed / "checkpoints"))
    finish(launch(killed, "--resume"))
    return reference, killed, killed_at


@pytest.fixture(scope="module")
def lattice_kill_runs(request):
    return subprocess_result(request)


@pytest.mark.slow
def test_lattice_runs_killed_in_each_phase_resume_to_the_uninterrupted_codes(lattice_kill_runs):
    """Exact resume after SIGKILL: lattice annealing killed at its 10th step or later, resumed, then
    killed again inside lattice ES, resumed to the end: the same codes, scales and biases bitwise, and
    the same history (steps, evaluations, training losses, acceptance rates), as a run never stopped."""
    reference, killed, killed_at = lattice_kill_runs
    assert 10 <= killed_at[0] < 30 and 38 <= killed_at[1] < 52, killed_at  # one kill inside each phase
    a, b = np.load(reference / "final.npz"), np.load(killed / "final.npz")
    # 5 Dense layers: codes, biases, and the scales tree (a scale per channel; 1.0 for each bias)
    assert len(a.files) == len(b.files) == 20
    assert all(np.array_equal(a[name], b[name]) for name in a.files)
    history = json.loads((reference / "history.json").read_text())
    assert json.loads((killed / "history.json").read_text()) == history
    assert [r["step"] for r in history] == list(range(1, 53)) and history[-1]["evals"] == 534
    codes = [a[name] for name in a.files if a[name].dtype == np.int8]
    assert len(codes) == 5 and all(np.abs(c).max() <= 3 for c in codes)  # a valid 3-bit model


# `savae quantize` at a tiny scale, run twice (the second with --resume) in a subprocess (subprocess
# work, see conftest.py): about 40 s of one core.
QUANTIZE_FLAGS = ["--bits", "2", "--budget-evals", "150", "--pretrain-evals", "300", "--seeds", "0", "--hidden", "16",
                  "--latents", "3", "--batch-size", "100", "--eval-every", "5", "--trials", "2"]


@subprocess_work("quantize_runs")
def _quantize_runs(tmp):
    """``(results.json of the run, summary.md, results.json after --resume, the resumed run's output)``."""
    workdir = tmp / "w"
    run_script("-m", "savae_jax.cli", "quantize", *QUANTIZE_FLAGS, "--workdir", workdir)
    results, summary = json.loads((workdir / "results.json").read_text()), (workdir / "summary.md").read_text()
    log = run_script("-m", "savae_jax.cli", "quantize", *QUANTIZE_FLAGS, "--workdir", workdir, "--resume")
    scratch = tmp / "scratch"
    run_script("-m", "savae_jax.cli", "quantize", *QUANTIZE_FLAGS, "--from-scratch", "--workdir", scratch)
    from savae_jax.experiments import quantized, workdir as workdir_lib

    for folder in (workdir, scratch):  # every file written is its own (those --overwrite may delete)
        assert workdir_lib.foreign_files(folder, quantized.OUTPUTS) == [], folder
    from_scratch = json.loads((scratch / "results.json").read_text()), (scratch / "summary.md").read_text()
    return results, summary, json.loads((workdir / "results.json").read_text()), log, from_scratch


@pytest.fixture(scope="module")
def quantize_runs(request):
    return subprocess_result(request)


@pytest.mark.slow
def test_savae_quantize_runs_every_method_at_its_budget_and_resumes(quantize_runs):
    """`savae quantize` at a tiny scale: x*, RTN at 2 bits, every method (STE, lattice SA with sparse
    and low-rank moves, lattice ES, STE then lattice SA) with its 2 trials within the budget, the
    table, and --resume keeping the seed done (not run again)."""
    from savae_jax.experiments import quantized

    results, summary, resumed, resumed_log, _ = quantize_runs
    r = results["0"]
    assert r["rtn"] > r["x_star"] + 0.5  # two bits cost nats
    assert sorted(r["methods"]) == sorted(quantized.METHODS)
    for method, trials in r["trials"].items():  # the sampler's 2 trials, each run, the best kept
        assert [t["setting"] for t in trials] == quantized.method_trials(method, 2), method
        assert r["methods"][method]["val_neg_elbo"] == min(t["val_neg_elbo"] for t in trials), method
    for method, m in r["methods"].items():
        assert 0 < m["evals"] <= 150, method
        # The gate keeps RTN's codes unless a step beats them on validation: the kept model is never
        # far above RTN on test (validation and test are different examples).
        assert m["test_neg_elbo"] < r["rtn"] + 1.0, (method, m, r["rtn"])
    assert all(f"| {method} |" in summary for method in ("RTN", *quantized.METHODS))
    assert resumed == results and "seed 0:" not in resumed_log  # the seed done is kept, not rerun


@pytest.mark.slow
def test_savae_quantize_from_scratch_trains_the_rounded_init(quantize_runs):
    """`savae quantize --from-scratch` at a tiny scale: the same random init as the run above (seed 0), rounded
    to 2 bits, trained by every method within its budget; straight-through Adam lowers the test -ELBO."""
    results, _, _, _, (scratch, summary) = quantize_runs
    r = scratch["0"]
    assert r["x_star"] > results["0"]["x_star"] + 5  # the untrained init, far above the trained x*
    for method, m in r["methods"].items():
        assert 0 < m["evals"] <= 150 and m["gap_recovered"] is None, method
        assert m["test_neg_elbo"] < r["rtn"] + 1.0, (method, m, r["rtn"])  # the gate keeps RTN unless beaten
    assert r["methods"]["ste-adam"]["test_neg_elbo"] < r["rtn"] - 1.0  # 50 STE steps train the integer model
    assert "trained from scratch" in summary and "| rounded init (RTN) |" in summary


@pytest.mark.parametrize("flag, value, message", [
    ("--bits", "9", "--bits: bits must be an integer from 2 to 8"),
    ("--methods", "ste-adam,adam", "--methods: unknown method 'adam'"),
    ("--methods", "ste-adam,ste-adam", "--methods: ste-adam given more than once"),
    ("--methods", "lattice-sa,ste-then-lattice", "--methods: ste-then-lattice runs the settings chosen for ste-adam"),
    ("--trials", "0", "--trials"),
])
def test_savae_quantize_refuses_bad_flags_before_writing(tmp_path, capsys, flag, value, message):
    from savae_jax.experiments import quantized

    with pytest.raises(SystemExit):
        quantized.main([*QUANTIZE_FLAGS[2:], flag, value, "--workdir", str(tmp_path / "other")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def _quantize_run(folder, bits, seeds, hidden=16, from_scratch=False):
    """A finished `savae quantize` workdir written by hand: x* 100 + seed, RTN 110 + seed + (4 - bits), and
    every method at RTN minus (seed + 1) nats (so it recovers (seed + 1) / (10 + 4 - bits) of the gap).
    ``from_scratch=None``: a run written before the flag existed (no such key in its config.json)."""
    from savae_jax.experiments import quantized

    folder.mkdir(parents=True)
    config = {**quantized.QuantizeConfig(bits=bits, seeds=",".join(map(str, seeds)), hidden=hidden,
                                         workdir=str(folder), from_scratch=bool(from_scratch)).to_dict()}
    if from_scratch is None:
        del config["from_scratch"]
    (folder / "config.json").write_text(json.dumps({"config": config}))
    results = {}
    for s in seeds:
        x_star, rtn = 100.0 + s, 110.0 + s + (4 - bits)
        results[str(s)] = {"x_star": x_star, "rtn": rtn, "methods": {
            m: {"test_neg_elbo": rtn - (s + 1), "gap_recovered": (s + 1) / (rtn - x_star), "setting": {"lr": 1e-3}}
            for m in quantized.METHODS}}
    (folder / "results.json").write_text(json.dumps(results))


def test_quantize_bits_tabulates_and_plots_the_gap_over_the_runs(tmp_path, capsys):
    """`savae quantize-bits` reads runs at 2 and 4 bits (given out of order) and writes the table, per width,
    with the mean ± sd over seeds, and the figure; run again, it rewrites the same table."""
    from savae_jax.experiments import quantized, quantized_bits

    _quantize_run(tmp_path / "q4", 4, [0, 1])
    _quantize_run(tmp_path / "q2", 2, [0, 1, 2], from_scratch=None)  # written before --from-scratch: comparable
    argv = ["--workdirs", f"{tmp_path / 'q4'},{tmp_path / 'q2'}", "--out", str(tmp_path / "out")]
    table = quantized_bits.main(argv)
    assert list(table["RTN"]) == [2, 4]
    # 2 bits: RTN 112, 113, 114 (mean 113, sd 1); gaps recovered 1/12, 2/12, 3/12 -> 16.7 % ± 8.3 %.
    assert table["RTN"][2]["mean"] == pytest.approx(113.0) and table["RTN"][2]["sd"] == pytest.approx(1.0)
    gap = table["lattice-sa gap %"][2]
    assert gap["mean"] == pytest.approx(100 * 2 / 12) and gap["sd"] == pytest.approx(100 / 12) and gap["n"] == 3
    assert table["ste-adam gap %"][4]["mean"] == pytest.approx(100 * 1.5 / 10) and table["x*"][4]["n"] == 2
    summary = (tmp_path / "out" / "gap_by_bits.md").read_text()
    assert "| | 2 bits | 4 bits |" in summary and "| RTN | 113.000 ± 1.000 | 110.500 ± 0.707 |" in summary
    assert all(f"| {m} gap % |" in summary for m in quantized.METHODS)
    assert (tmp_path / "out" / "gap_by_bits.png").read_bytes()[:4] == b"\x89PNG"
    # The figure's second panel: test -ELBO minus the seed's x*. At 2 bits RTN is 12 nats above x* on every
    # seed; a method 11, 10 and 9 above (mean 10, sd 1).
    excess = quantized_bits.excess_table(quantized_bits.load_runs([str(tmp_path / "q2")]))
    assert excess["RTN"][2]["mean"] == pytest.approx(12.0) and excess["RTN"][2]["sd"] == pytest.approx(0.0)
    assert excess["lattice-es"][2]["mean"] == pytest.approx(10.0) and excess["lattice-es"][2]["sd"] == pytest.approx(1.0)
    quantized_bits.main(argv)
    assert (tmp_path / "out" / "gap_by_bits.md").read_text() == summary


@pytest.mark.parametrize("runs, needle", [
    ([("q2", 2, 16), ("q2b", 2, 16)], "--workdirs: two runs at 2 bits"),
    ([("q2", 2, 16), ("q4", 4, 32)], "differ in hidden; only the bit width may differ"),
    ([("q2", 2, 16), ("missing", None, None)], "holds no finished `savae quantize` run"),
    ([("q2", 2, 16), ("scratch", 4, 16)], "is a --from-scratch run: it has no x* and no gap to recover"),
])
def test_quantize_bits_refuses_runs_it_cannot_compare(tmp_path, capsys, runs, needle):
    from savae_jax.experiments import quantized_bits

    for name, bits, hidden in runs:
        if bits is not None:
            _quantize_run(tmp_path / name, bits, [0], hidden, from_scratch=name == "scratch")
    with pytest.raises(SystemExit) as exit_info:
        quantized_bits.main(["--workdirs", ",".join(str(tmp_path / name) for name, _, _ in runs),
                             "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def _run_seeds_with_stand_ins(monkeypatch, stand_in, config, seeds=(0,)):
    """``run_seed`` on small digits splits (800 training, 200 validation, 200 test examples) with each tuned
    method's function replaced by ``stand_in(name)``: ``(one result per seed, the model, the images)``."""
    from savae_jax.experiments import quantized

    for method in quantized.SEARCH_SPACES:  # each tuned method is the function of its name
        name = method.replace("-", "_")
        monkeypatch.setattr(quantized, name, stand_in(name))
    model = sv.MLPVAE(hidden=16, latents=3)
    images = jnp.asarray(sv.load("digits", "train").images)
    data = (images[:800], images[800:1000], images[1000:1200])
    return [quantized.run_seed(seed, config, model, data, lambda line: None) for seed in seeds], model, images


def test_from_scratch_rounds_the_random_init_and_reports_each_method_s_change_from_it(monkeypatch):
    """--from-scratch: no Adam run gives x*; the methods start from the random init rounded to the lattice
    (its own scales), and the summary gives each method's change from that rounded init. The methods are
    replaced by stand-ins that move one code (the real ones run in the slow tier's `savae quantize`)."""
    from savae_jax.experiments import quantized

    def moved_one(setup, q0, value, budget):  # one code changed: a valid integer model, scored like a method
        codes = jax.tree_util.tree_map(lambda c: c.at[(0,) * c.ndim].set(0) if Q.is_code(c) else c, q0.codes)
        q = q0.replace(codes=codes)
        return q, setup.score(q, setup.val), budget

    monkeypatch.setattr(quantized.Setup, "run", lambda *a, **k: pytest.fail("from scratch runs no Adam for x*"))
    config = quantized.QuantizeConfig(bits=4, hidden=16, latents=3, budget_evals=100, from_scratch=True)
    (out,), model, images = _run_seeds_with_stand_ins(monkeypatch, lambda name: moved_one, config)

    key_init = jax.random.split(jax.random.key(0), 3)[0]  # run_seed's split: the init's key comes first
    init = sv.models.init(key_init, model, images[:1])
    loss = sv.make_loss(model)
    score = lambda p: sv.evaluate(loss, p, images[1000:1200], binarize=sv.data.BatchFn("dynamic"))  # noqa: E731
    assert out["x_star"] == score(init)  # the float random init itself, the same evaluation bitwise
    assert out["rtn"] == score(Q.quantize(init, 4, clip="mse"))
    assert all(m["gap_recovered"] is None for m in out["methods"].values())  # no gap: JSON null
    summary = quantized.summarize({"0": out, "1": out}, config)
    assert "trained from scratch on digits: 4 bits" in summary and "gap recovered" not in summary
    change = out["methods"]["lattice-es"]["test_neg_elbo"] - out["rtn"]
    assert f"| lattice-es | {out['methods']['lattice-es']['test_neg_elbo']:.3f} ± 0.000 | {change:+.3f} ± 0.000 |" \
        in summary


def test_each_method_runs_the_same_sobol_trials_on_every_seed_and_keeps_its_best_on_validation(monkeypatch):
    """Equal tuning with the study's sampler: every tuned method runs its ``--trials`` trials from its search
    space (the same on every seed, inside the bounds), each at the full budget; the trial with the lowest
    validation score is kept, and ste-then-lattice runs ste-adam's then lattice-sa's chosen settings, half
    the budget each. The methods are stand-ins whose validation score is a known function of the settings
    (their distance in log from a point inside each space), so the right choice is known."""
    from savae_jax.experiments import quantized

    target = {"lr": 3e-4, "moved": 30.0, "level": 0.05, "scale": 0.1, "reg": 1.0}
    calls = []

    def stand_in(name):
        def run(setup, q0, hp, budget):
            calls.append((name, hp, budget))
            score = sum(abs(np.log(v / target.get(k, 1.0))) for k, v in hp.items())
            return q0, float(score), budget
        return run

    config = quantized.QuantizeConfig(bits=4, hidden=16, latents=3, budget_evals=100, trials=5, from_scratch=True)
    runs, _, _ = _run_seeds_with_stand_ins(monkeypatch, stand_in, config, seeds=(0, 1))
    for method, space in quantized.SEARCH_SPACES.items():
        trials = quantized.method_trials(method, 5)
        assert len(trials) == 5 and len({tuple(t.values()) for t in trials}) == 5, method
        for t in trials:
            assert sorted(t) == sorted(space) and all(space[k].low <= v <= space[k].high for k, v in t.items())
        scores = [sum(abs(np.log(v / target.get(k, 1.0))) for k, v in t.items()) for t in trials]
        for out in runs:  # the same trials on both seeds, the lowest validation score kept
            assert [t["setting"] for t in out["trials"][method]] == trials
            assert out["methods"][method]["setting"] == trials[int(np.argmin(scores))]
    for method in quantized.SEARCH_SPACES:  # 5 trials per seed at the full budget
        fn = method.replace("-", "_")
        assert sum(1 for name, _, budget in calls if name == fn and budget == 100) == 2 * 5
    chosen = runs[0]["methods"]
    assert calls[25:27] == [("ste_adam", chosen["ste-adam"]["setting"], 50),
                            ("lattice_sa", chosen["lattice-sa"]["setting"], 50)]  # seed 0's ste-then-lattice
    assert runs[0]["methods"]["ste-then-lattice"]["setting"] == [chosen["ste-adam"]["setting"],
                                                                chosen["lattice-sa"]["setting"]]


def test_resume_refuses_to_mix_the_first_protocol_s_grid_with_the_sampled_trials(tmp_path, capsys):
    """A run whose saved seeds were tuned on the first protocol's fixed grids ({value: score}) resumes when every
    seed is done (the summary is rewritten); stopped with a seed left to tune, it is refused, naming --resume,
    and its results.json is left as it was."""
    from savae_jax.experiments import quantized

    folder = tmp_path / "old"
    _quantize_run(folder, 2, [0, 1])
    results = json.loads((folder / "results.json").read_text())
    for r in results.values():
        r["trials"] = {"ste-adam": {"0.0001": 30.1, "0.0003": 29.8, "0.001": 30.4}}
    (folder / "results.json").write_text(json.dumps(results))
    argv = ["--bits", "2", "--hidden", "16", "--seeds", "0,1", "--workdir", str(folder), "--resume"]
    assert list(quantized.main(argv)) == ["0", "1"]  # every seed done: nothing to tune
    del results["1"]  # as if the run had stopped after seed 0
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit):
        quantized.main(argv)
    err = capsys.readouterr().err
    assert "--resume: " in err and "fixed 3-value grids" in err and "seeds left (1)" in err
    assert json.loads((folder / "results.json").read_text()) == results


def test_methods_runs_only_the_methods_it_names(monkeypatch):
    """--methods adaround,lattice-es: only those two are tuned and run (their trials, at the full budget),
    and the summary has only their rows."""
    from savae_jax.experiments import quantized

    calls = []

    def stand_in(name):
        def run(setup, q0, hp, budget):
            calls.append(name)
            return q0, 1.0, budget
        return run

    config = quantized.QuantizeConfig(bits=4, hidden=16, latents=3, budget_evals=100, trials=3, from_scratch=True,
                                      methods="lattice-es,adaround")
    (out,), _, _ = _run_seeds_with_stand_ins(monkeypatch, stand_in, config)
    assert calls == ["adaround"] * 3 + ["lattice_es"] * 3
    assert list(out["methods"]) == list(out["trials"]) == ["adaround", "lattice-es"]
    summary = quantized.summarize({"0": out}, config)
    assert "| adaround |" in summary and "| lattice-es |" in summary and "| ste-adam |" not in summary
    assert "(3 trials per method)." in summary and "ste-then-lattice" not in summary  # not run, not explained


def test_the_search_spaces_in_the_docs_are_the_code_s():
    from savae_jax.experiments import quantized, tuning

    doc = (Path(__file__).parent.parent / "docs" / "quantization.md").read_text()
    assert tuning.space_table(quantized.SEARCH_SPACES) in doc, \
        "docs/quantization.md is out of date: paste tuning.space_table(quantized.SEARCH_SPACES) into it"


def test_the_summary_averages_the_share_over_the_seeds_that_had_a_gap():
    """A seed whose RTN is no worse than x* (possible at 8 bits) has no share of a gap (None, JSON null): the
    table averages the other seeds' shares, and shows "-" when no seed had a gap."""
    from savae_jax.experiments import quantized

    def seed(rtn, share):
        return {"x_star": 100.0, "rtn": rtn,
                "methods": {m: {"test_neg_elbo": 100.5, "gap_recovered": share, "setting": {"moved": 4.0}}
                            for m in quantized.METHODS}}

    config = quantized.QuantizeConfig(bits=8)
    summary = quantized.summarize({"0": seed(101.0, 0.5), "1": seed(102.0, 0.75), "2": seed(99.9, None)}, config)
    assert "| ste-adam | 100.500 ± 0.000 | 62 ± 18 % |" in summary  # 50 % and 75 %: mean 62.5, sd 17.7
    assert "(4 trials per method; ste-then-lattice runs ste-adam's then lattice-sa's)." in summary
    summary = quantized.summarize({"0": seed(99.9, None)}, config)
    assert "| lattice-es | 100.500 | - |" in summary


def test_resume_of_a_run_saved_before_a_setting_existed_takes_its_default(tmp_path, capsys):
    """A quantize run whose config.json predates --from-scratch resumes (the missing setting counts as its
    default, False); asked to resume it --from-scratch, it is refused, naming the setting."""
    from savae_jax.experiments import quantized

    folder = tmp_path / "old"
    _quantize_run(folder, 2, [0], from_scratch=None)  # finished, config.json without from_scratch
    config = json.loads((folder / "config.json").read_text())["config"]
    argv = ["--bits", "2", "--seeds", "0", "--hidden", "16", "--workdir", str(folder), "--resume"]
    assert {k: config[k] for k in ("bits", "seeds", "hidden")} == {"bits": 2, "seeds": "0", "hidden": 16}
    results = quantized.main(argv)  # every seed done: nothing runs, the summary is written again
    assert list(results) == ["0"] and "| lattice-es |" in (folder / "summary.md").read_text()
    with pytest.raises(SystemExit):
        quantized.main([*argv, "--from-scratch"])
    assert "from_scratch: saved False, now True" in capsys.readouterr().err
