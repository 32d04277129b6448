"""Low-rank noise: rank-r perturbations of every Dense kernel, drawn up front, never materialised.

The noise shared by the ``low_rank`` proposal (``annealing.proposals``) and
the ES step (``annealing.es``)::

    layout = build_layout(loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor)
    noises = draw_all(layout, keys)                    # every member's Noise, leading axis K
    loss_j = perturbed_loss(layout, loss_fn, key_loss, batch, noise_j, active)
    params_j = materialize(layout, key_j)              # the accepted member's parameters

For each ``flax.linen.Dense`` kernel W (m, n) that ``loss_fn`` calls, a
member draws A ~ N(0, I_{m x r}), B ~ N(0, I_{n x r}); the layer computes
``y = x @ W + b + (s / sqrt(r)) (x @ A) @ B.T (+ s_b e_b)`` through a Flax
method interceptor (:func:`intercept_dense`), so W + (s / sqrt(r)) A B^T is
formed only for the accepted member (:func:`materialize`). Dense biases and
every other floating leaf get plain Gaussian noise of their std.

Also here, because the full-rank kernels share them: the per-leaf std
(:func:`leaf_std`) and the floating-leaf test (:func:`is_float`); one normal draw split over many
shapes is :func:`savae_jax.rng.sample_flat`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from savae_jax import rng


def is_float(x) -> bool:
    """Whether ``x`` is a floating (or complex) leaf, i.e. one that noise perturbs."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def leaf_std(leaf, base, scale_by_rms: bool, rms_floor: float):
    """Noise std of one leaf: base (= scale * radius), times its floored RMS if asked."""
    if not scale_by_rms:
        return base
    rms = jnp.sqrt(jnp.mean(jnp.square(leaf.astype(jnp.float32))))
    return base * jnp.maximum(rms, rms_floor)


class DenseLayer(NamedTuple):
    """An ``nn.Dense`` module the loss calls, located in the flat params leaves.

    Attributes:
      kernel: index of its (m, n) kernel leaf.
      bias: index of its bias leaf, or None.
      coef: s / sqrt(r), the factor of the kernel's update A @ B.T.
    """

    kernel: int
    bias: int | None
    coef: jax.Array


class Layout(NamedTuple):
    """The params as the low-rank noise perturbs them; :func:`build_layout` builds one per step.

    A layout without ``layers`` gives every floating leaf full-rank Gaussian
    noise (the ES step's ``noise="gaussian"``).

    Attributes:
      leaves: the params' flat leaves.
      treedef: their tree structure.
      layers: module path (``('encoder', 'hidden')``) -> :class:`DenseLayer`,
        for every Dense the loss calls, in call order.
      stds: leaf index -> noise std, for every floating leaf, in leaf order.
      rank: r.
      activation_bytes: bytes of every Dense output of one loss call (one
        member); 0 when unknown. It sizes :func:`member_chunk`.
    """

    leaves: list
    treedef: Any
    layers: dict[tuple[str, ...], DenseLayer]
    stds: dict[int, jax.Array]
    rank: int
    activation_bytes: int = 0

    @property
    def kernel_of(self) -> dict[int, tuple[str, ...]]:
        """Kernel leaf index -> its module path."""
        return {layer.kernel: path for path, layer in self.layers.items()}

    @property
    def bias_of(self) -> dict[int, tuple[str, ...]]:
        """Bias leaf index -> its module path."""
        return {layer.bias: path for path, layer in self.layers.items() if layer.bias is not None}


class Noise(NamedTuple):
    """One member's low-rank noise, by what it perturbs.

    Attributes:
      factors: module path -> (A, B), the (m, r) and (n, r) factors of that
        Dense's kernel update.
      biases: module path -> the std-scaled noise of that Dense's bias.
      leaves: leaf index -> the std-scaled noise of every other floating leaf.
    """

    factors: dict[tuple[str, ...], tuple[jax.Array, jax.Array]]
    biases: dict[tuple[str, ...], jax.Array]
    leaves: dict[int, jax.Array]


# Bytes of Dense outputs that low_rank (and ES) members produce at once on CPU:
# chunks whose activations stay in the last-level cache. On the 2-core EPYC (32 MiB
# L3) the MNIST MLP's K = 256 members took 0.14 s in chunks of 16 (15 MB) against
# 0.24 s in one vmap, whose 103 MB logits went through memory three times; chunks
# of 8 to 24 were within 10 % of that (issue 14). None picks it by backend
# (``activation_bytes``); set an int to override it.
ACTIVATION_BYTES: int | None = None
CPU_ACTIVATION_BYTES = 16 * 2**20


def activation_bytes() -> int | None:
    """Bytes of Dense outputs evaluated at once (``ACTIVATION_BYTES``, or by backend: None = no chunks)."""
    if ACTIVATION_BYTES is not None:
        return ACTIVATION_BYTES
    return CPU_ACTIVATION_BYTES if jax.default_backend() == "cpu" else None


def member_chunk(layout: Layout) -> int | None:
    """Members evaluated at once for ``layout`` (None: all of them in one vmap, as on accelerators)."""
    budget = activation_bytes()
    if budget is None or layout.activation_bytes == 0:
        return None
    return max(1, budget // layout.activation_bytes)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _dense_calls(loss_fn, params, key_loss, batch) -> dict[tuple[str, ...], int]:
    """Module path -> bytes of output, of every nn.Dense called by ``loss_fn`` (abstract trace, no FLOPs)."""
    found: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            path = tuple(context.module.path)
            found[path] = found.get(path, 0) + y.size * y.dtype.itemsize
        return y

    def traced(p, k, b):
        with nn.intercept_methods(record):
            return loss_fn(p, k, b)

    jax.eval_shape(traced, params, key_loss, batch)
    return found


def _dense_leaves(index, leaves, mpath) -> tuple[int, int | None] | None:
    """(kernel index, floating bias index or None) of the Dense at ``mpath``; None if absent.

    Flax keeps module variables under ``params['params']``; a bare variables
    dict (no collection level) is accepted too.
    """
    for prefix in (("params",), ()):
        k = index.get(prefix + mpath + ("kernel",))
        if k is not None and leaves[k].ndim == 2 and is_float(leaves[k]):
            b = index.get(prefix + mpath + ("bias",))
            return k, (b if b is not None and is_float(leaves[b]) else None)
    return None


def build_layout(loss_fn, params, key_loss, batch, rank: int, base, scale_by_rms: bool = False,
                 rms_floor: float = 1e-3) -> Layout:
    """The :class:`Layout` of ``params`` as ``loss_fn`` uses them (ValueError if ``rank`` exceeds a Dense kernel's).

    Args:
      loss_fn: ``loss_fn(params, key, batch) -> scalar``, traced abstractly
        (no FLOPs) to find the Dense layers it calls.
      params, key_loss, batch: the step's arguments of ``loss_fn``.
      rank: r, >= 1.
      base: the noise std s (scale * radius).
      scale_by_rms, rms_floor: per-leaf std scaling (:func:`leaf_std`).
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in with_paths]
    index = {tuple(_key_name(k) for k in path): i for i, (path, _) in enumerate(with_paths)}
    found = {}
    calls = _dense_calls(loss_fn, params, key_loss, batch)
    for mpath in calls:
        entry = _dense_leaves(index, leaves, mpath)
        if entry is None:
            continue  # a Dense whose kernel is not in params: left unperturbed
        m, n = leaves[entry[0]].shape
        if rank > min(m, n):
            raise ValueError(
                f"rank={rank} is larger than the Dense layer {'/'.join(mpath)} allows: its "
                f"kernel is {m}x{n}, so rank must be <= min(m, n) = {min(m, n)}"
            )
        found[mpath] = entry
    stds = {i: leaf_std(p, base, scale_by_rms, rms_floor) for i, p in enumerate(leaves) if is_float(p)}
    layers = {mpath: DenseLayer(kernel=k, bias=b, coef=stds[k] / math.sqrt(rank)) for mpath, (k, b) in found.items()}
    return Layout(leaves=leaves, treedef=treedef, layers=layers, stds=stds, rank=rank,
                  activation_bytes=sum(calls.values()))


def draw(layout: Layout, key) -> Noise:
    """One member's :class:`Noise`: ONE normal draw split over the floating leaves in leaf order."""
    kernel_of, bias_of = layout.kernel_of, layout.bias_of
    shapes = []
    for i in layout.stds:
        if i in kernel_of:
            m, n = layout.leaves[i].shape
            shapes += [(m, layout.rank), (n, layout.rank)]
        else:
            shapes.append(layout.leaves[i].shape)
    flat = iter(rng.sample_flat(jax.random.normal, key, shapes))
    noise = Noise(factors={}, biases={}, leaves={})
    for i, std in layout.stds.items():
        dtype = layout.leaves[i].dtype
        if i in kernel_of:
            noise.factors[kernel_of[i]] = (next(flat).astype(dtype), next(flat).astype(dtype))
        elif i in bias_of:
            noise.biases[bias_of[i]] = (std * next(flat)).astype(dtype)
        else:
            noise.leaves[i] = (std * next(flat)).astype(dtype)
    return noise


def draw_all(layout: Layout, keys) -> Noise:
    """Every member's :class:`Noise` (leading axis ``len(keys)``), each drawn from its own key.

    The draws run in a sequential ``jax.lax.map``, not a vmap, and that is
    the point: XLA does not fuse across a loop, so each normal variate is
    computed once and stored. Drawn inside the members' vmap, XLA's CPU
    fusion instead inlined the sampler (threefry bits, then erfinv's
    polynomial) into every consumer, so a bias's or a factor B's noise was
    recomputed for every example and output element: the low_rank step at
    K = 256 took 0.26 s against 0.21 s drawn up front, with bitwise the same
    losses (issue 14). ``jax.lax.optimization_barrier`` did not stop it (the
    CPU compiler removes barriers before fusion). The noise is small:
    r (m + n) + n floats per Dense layer per member.
    """
    return jax.lax.map(functools.partial(draw, layout), keys)


def check_drawn_memory(draw_fn, keys, what: str) -> None:
    """Refuse noise drawn for every member at once that would not fit in the device's memory.

    ``draw_fn(keys)`` is evaluated abstractly (``jax.eval_shape``: no FLOPs)
    when the step is traced, so ``jax.jit(step)`` at an absurd member count
    fails at once with the number, naming ``what`` (e.g. ``num_proposals``),
    instead of compiling a step that exhausts the memory when it runs. The
    driver checks the whole compiled step as well (``driver.check_step_memory``).
    """
    from savae_jax.driver import device_memory_bytes  # the driver imports nothing of annealing

    need = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(jax.eval_shape(draw_fn, keys)))
    limit = device_memory_bytes()
    if limit and need > limit:
        raise ValueError(f"{what}: the noise of {keys.shape[0]} members, drawn at once, needs about "
                         f"{need / 2**30:.1f} GiB but the device has {limit / 2**30:.1f} GiB; use fewer members")


def negate(noise: Noise) -> Noise:
    """The antithetic partner of a draw: -E (for a kernel, -A B^T: negate A only)."""
    return Noise(factors={p: (-a, b) for p, (a, b) in noise.factors.items()},
                 biases={p: -b for p, b in noise.biases.items()},
                 leaves={i: -v for i, v in noise.leaves.items()})


def intercept_dense(layout: Layout, noise: Noise, active, next_fun, args, kwargs, context):
    """Flax method interceptor: a Dense layer's output plus its member's low-rank and bias noise.

    (x @ A) @ B.T costs O(r (m + n)) per row where forming W + A @ B.T
    would cost O(m n) per member. ``active`` False leaves the output as it is.
    """
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
        return y
    path = tuple(context.module.path)
    layer = layout.layers.get(path)
    if layer is None:
        return y
    x = args[0] if args else kwargs["inputs"]
    a_fac, b_fac = noise.factors[path]
    delta = (layer.coef * ((x @ a_fac) @ b_fac.T)).astype(y.dtype)
    if path in noise.biases:
        delta = delta + noise.biases[path].astype(y.dtype)
    return jnp.where(active, y + delta, y)


def perturbed_loss(layout: Layout, loss_fn, key_loss, batch, noise: Noise, active):
    """The loss of the member with ``noise`` (one member of :func:`draw_all`; the incumbent when not ``active``)."""
    # Dense kernels and biases stay as they are: the interceptor perturbs those layers' outputs.
    leaves = [jnp.where(active, p + noise.leaves[i], p) if i in noise.leaves else p
              for i, p in enumerate(layout.leaves)]
    params = jax.tree_util.tree_unflatten(layout.treedef, leaves)
    with nn.intercept_methods(functools.partial(intercept_dense, layout, noise, active)):
        return loss_fn(params, key_loss, batch)


def materialize(layout: Layout, key):
    """The params of the member drawn from ``key``: W + coef * A @ B.T formed once."""
    return apply_noise(layout, draw(layout, key))


def apply_noise(layout: Layout, noise: Noise):
    """The params theta + E of the member with ``noise`` (one member of :func:`draw_all`), materialised."""
    kernel_of, bias_of = layout.kernel_of, layout.bias_of
    out = []
    for i, p in enumerate(layout.leaves):
        if i in kernel_of:
            a_fac, b_fac = noise.factors[kernel_of[i]]
            coef = layout.layers[kernel_of[i]].coef
            out.append(p + (coef * (a_fac @ b_fac.T)).astype(p.dtype))
        elif i in bias_of:
            out.append(p + noise.biases[bias_of[i]])
        elif i in noise.leaves:
            out.append(p + noise.leaves[i])
        else:
            out.append(p)
    return jax.tree_util.tree_unflatten(layout.treedef, out)
