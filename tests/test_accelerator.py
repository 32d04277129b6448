"""The default device (GPU/TPU) computes the annealing step and an Adam step as CPU does.

Skipped where JAX's default backend is CPU (nothing to compare). Run on a GPU machine with
``pip install -e ".[cuda12,test]"`` then ``pytest -m accelerator``.
"""

import jax
import numpy as np
import optax
import pytest

import savae_jax as sv
from savae_jax import annealing as an

pytestmark = pytest.mark.accelerator


def on_device(device, fn, *args):
    """``jax.jit(fn)(*args)`` computed on ``device`` (inputs committed there), fetched to the host."""
    args = jax.device_put(args, device)
    with jax.default_device(device):
        return jax.device_get(jax.jit(fn)(*args))


def problem():
    """A small MLP VAE on 128 binarised digits: (params, loss_fn, batch)."""
    train = sv.load("digits", "train")
    model = sv.MLPVAE(hidden=64, latents=8)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    x = sv.data.binarize(jax.random.key(1), train.images[:128])
    return params, sv.make_loss(model), x


def compare_with_cpu(device) -> None:
    """Assert that one annealing step and one Adam step on ``device`` match CPU's within float32 tolerance."""
    cpu = jax.devices("cpu")[0]
    params, loss_fn, x = problem()
    key = jax.random.key(2)
    # Matmuls at full float32 precision: an accelerator's DEFAULT precision may use TF32 (GPU) or
    # bfloat16 passes (TPU), about 1e-3 relative, which is not what this test is about.
    with jax.default_matmul_precision("float32"):
        sa = an.simulated_annealing(loss_fn, 8, an.low_rank(1e-2), 0.01, an.metropolis())
        (sa_dev, info_dev), (sa_cpu, info_cpu) = (on_device(d, sa.step, key, sa.init(params), x) for d in (device, cpu))
        adam = sv.from_optax(loss_fn, optax.adam(1e-3))
        (adam_dev, _), (adam_cpu, _) = (on_device(d, adam.step, key, adam.init(params), x) for d in (device, cpu))
        grad_dev, grad_cpu = (on_device(d, jax.grad(lambda p: loss_fn(p, key, x)), params) for d in (device, cpu))
    # The random bits are the same on every backend (threefry), so both draw the same proposals and
    # decide alike; the losses differ only by the order of float32 sums (~1e-6 relative of ~50 nats).
    assert bool(info_dev.accepted) == bool(info_cpu.accepted)
    np.testing.assert_allclose(info_dev.loss, info_cpu.loss, rtol=1e-5)
    np.testing.assert_allclose(info_dev.proposal_loss_min, info_cpu.proposal_loss_min, rtol=1e-5)
    # dL is a difference of two ~50-nat losses: its error is absolute, a few ulps of 50 (~4e-6 each).
    np.testing.assert_allclose(info_dev.delta, info_cpu.delta, atol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(sa_dev.params), jax.tree_util.tree_leaves(sa_cpu.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The gradient: float32 sums over the batch in another order, relative to the largest entry.
    for a, b in zip(jax.tree_util.tree_leaves(grad_dev), jax.tree_util.tree_leaves(grad_cpu)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-7)
    # Adam's first update is -lr * g / (|g| + eps): +-lr wherever |g| is well above the gradient's
    # rounding error, and 0 where g is exactly 0 (pixels that are 0 in the whole batch); where |g| is
    # at the rounding level its sign, and so the update, is noise on any device: not compared.
    for a, b, g in zip(jax.tree_util.tree_leaves(adam_dev.params), jax.tree_util.tree_leaves(adam_cpu.params),
                       jax.tree_util.tree_leaves(grad_cpu)):
        clear = (g == 0) | (np.abs(g) > 1e-4 * float(np.abs(g).max()) + 1e-6)
        np.testing.assert_allclose(a[clear], b[clear], rtol=1e-6, atol=1e-6)
        assert clear.mean() > 0.9  # nearly every entry is compared


def test_annealing_and_adam_steps_on_the_default_device_match_cpu():
    if jax.default_backend() == "cpu":
        pytest.skip("no accelerator: JAX's default backend is CPU, nothing to compare "
                    "(on a GPU machine: pip install -e \".[cuda12]\")")
    compare_with_cpu(jax.devices()[0])
