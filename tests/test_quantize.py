"""Integer-weight VAEs (issue 25, part 1): RTN quantization, the quantized loss, lattice moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import savae_jax as sv
from savae_jax import annealing as A
from savae_jax import quantize as Q

from conftest import small_vae


@pytest.fixture(scope="module")
def trained():
    """(model, loss, params after 300 Adam steps, 256 training digits) of the small MLP VAE."""
    import optax

    model, loss = small_vae(16, 3)
    train = sv.load("digits", "train")
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    params, _ = sv.fit(jax.random.key(1), params, loss, optax.adam(3e-3), train, 20, 100, binarize="dynamic")
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


def test_the_quantized_loss_is_the_model_s_loss_at_the_dequantized_weights(trained):
    model, loss, params, x = trained
    key = jax.random.key(3)
    lq = Q.quantized_loss(loss)
    full = float(loss(params, key, x))
    # 8 bits: a step of max|w| / 127 per channel moves this loss by less than 0.05 nats (measured 0.01).
    assert abs(float(lq(Q.quantize(params, 8), key, x)) - full) < 0.05
    # 2 bits: three levels per channel cost nats.
    assert float(lq(Q.quantize(params, 2), key, x)) > full + 1.0
    assert lq.model is model and lq.per_example(Q.quantize(params, 8), key, x).shape == (256,)
    with pytest.raises(ValueError, match="params: a quantized loss takes QuantizedParams"):
        lq(params, key, x)


@pytest.mark.parametrize("call, match", [
    (lambda p: Q.quantize(p, 1), "bits"),
    (lambda p: Q.quantize(p, 9), "bits"),
    (lambda p: Q.quantize(p, 4, clip="min"), "clip must be one of max, mse"),
    (lambda p: Q.quantize({"b": jnp.zeros(3)}, 4), "no Dense or Conv kernel"),
    (lambda p: Q.quantize(jax.tree_util.tree_map(lambda a: a * jnp.nan, p), 4), "non-finite weights"),
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
    lq = Q.quantized_loss(loss)
    ncodes = sum(c.size for c in jax.tree_util.tree_leaves(q0.codes) if c.dtype == jnp.int8)
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
