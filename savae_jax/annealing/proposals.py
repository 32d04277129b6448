"""Proposal kernels: how the annealer draws K neighbours of the incumbent.

Protocol (a tiny one, so kernels are pluggable)::

    proposal = Proposal(init, prepare, cost)               # cost: extra evaluations per step
    proposal_state = proposal.init(params)                 # () when stateless
    prep = proposal.prepare(loss_fn, params, key_loss, batch,
                            temperature, radius, proposal_state)
    members = prep.draw(keys) if prep.draw else keys   # all K+1 members, once
    loss_j = prep.loss(members[j], active_j)  # called INSIDE jax.vmap over K+1
    winner = prep.materialize(key_j)        # the accepted proposal's params
    prep.proposal_state                     # carried to the next step

``prepare`` runs once per step outside the vmap: it computes what all
proposals share (a gradient, per-leaf scales, the model's Dense layout) and
returns the functions below, bound to it. ``prep.loss(key, active)`` draws ONE proposal's noise from
its own key and returns ``loss_fn`` at the perturbed parameters with the
step's shared ``key_loss`` and ``batch`` (common random numbers); with
``active=False`` it must return the loss of the unperturbed incumbent (the
kernel evaluates the incumbent as the (K+1)-th member of the same vmap).
Full-rank kernels (gaussian, cauchy, langevin) generate the noise inside the
vmapped function, so nothing outside it holds K copies of the parameters;
they also set ``prep.chunk_size``, so the kernel evaluates them a chunk at a
time and at most ``chunk_bytes()`` of perturbed copies exist at once.
``low_rank``, whose noise is small (O(r (m + n)) per Dense layer), sets
``prep.draw`` instead: the kernel draws every member's noise once, up front,
and passes member j's to ``prep.loss`` in place of its key (see ``draw_all``).
``prep.materialize(key)`` re-generates the same noise from the winner's key
and returns its parameters.

Scales: every kernel's noise standard deviation is ``scale * radius`` where
``radius`` is the annealer's radius schedule value (1.0 by default); with
``scale_by_rms=True`` it is further multiplied, per leaf, by
``max(rms(leaf), rms_floor)`` (the floor keeps zero-initialised biases moving).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from savae_jax import validation
from savae_jax.optimizer import GRAD_COST, checked_loss

tree_map = jax.tree_util.tree_map


class Prepared(NamedTuple):
    """A proposal kernel prepared for one step (see the module docstring).

    Attributes:
      loss: ``(key, active) -> scalar`` loss of one proposal (of the incumbent
        when ``active`` is False); vmapped by the kernel.
      materialize: ``key -> params`` the proposal drawn from ``key``.
      proposal_state: the kernel's state for the next step.
      chunk_size: proposals evaluated at once (``jax.lax.map`` over chunks
        of a vmap); None evaluates all K + 1 in one vmap. Kernels whose
        proposals each hold a full copy of the parameters set it so that a
        step's memory is O(chunk_size * P), independent of K; ``low_rank``
        sets it on CPU so that a chunk's activations stay in cache
        (``member_chunk``).
      draw: None, or ``keys (n,) -> members``: every member's noise drawn
        at once (a pytree with leading axis n); ``loss`` then takes member
        j's slice of it in place of ``keys[j]``. ``materialize`` still takes
        the winner's key.
    """

    loss: Callable[[Any, jax.Array], jax.Array]
    materialize: Callable[[jax.Array], Any]
    proposal_state: Any
    chunk_size: int | None = None
    draw: Callable[[jax.Array], Any] | None = None


class Proposal(NamedTuple):
    """A proposal kernel: ``init(params) -> state`` and ``prepare(...) -> Prepared``.

    Attributes:
      init: ``init(params) -> state``.
      prepare: ``prepare(loss_fn, params, key_loss, batch, temperature,
        radius, state) -> Prepared``.
      cost: loss evaluations ``prepare`` spends per step on top of the K + 1
        members' (``GRAD_COST`` for the one gradient of ``langevin``), so an
        annealer's step costs K + 1 + cost.
    """

    init: Callable[[Any], Any]
    prepare: Callable[..., Prepared]
    cost: int = 0


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _leaf_std(leaf, base, scale_by_rms: bool, rms_floor: float):
    """Noise std of one leaf: base (= scale * radius), times its floored RMS if asked."""
    if not scale_by_rms:
        return base
    rms = jnp.sqrt(jnp.mean(jnp.square(leaf.astype(jnp.float32))))
    return base * jnp.maximum(rms, rms_floor)


def _sample_flat(sampler, key, shapes):
    """One draw of sum(sizes) float32 variates split into ``shapes``.

    A single random call for all leaves: far cheaper to compile (and run)
    than one threefry call per leaf.
    """
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    if total == 0:
        return [jnp.zeros(shape, jnp.float32) for shape in shapes]
    flat = sampler(key, (total,), jnp.float32)
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out


# Bytes of perturbed parameters that full-rank kernels hold at once: chunks of
# about this size keep a step's memory O(P), not O(K * P). None picks it by
# the default backend (``chunk_bytes``); set an int to override it.
CHUNK_BYTES: int | None = None
# On CPU a chunk the size of a core's L2 cache was the fastest (issue 14, 2-core
# EPYC, 2 MiB L2, gaussian step at K = 256: MNIST MLP, P = 3.3 MB, one member
# at a time 0.74 s against 1.71 s for 64 MiB chunks; digits MLP, P = 0.36 MB,
# 138 ms against 389 ms). Accelerators keep the large chunks that batch their
# products (not measured on one here).
CPU_CHUNK_BYTES = 2 * 2**20
ACCELERATOR_CHUNK_BYTES = 64 * 2**20


def chunk_bytes() -> int:
    """Bytes of perturbed parameters a full-rank kernel evaluates at once (``CHUNK_BYTES`` or by backend)."""
    if CHUNK_BYTES is not None:
        return CHUNK_BYTES
    return CPU_CHUNK_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_BYTES


def _chunk_size(leaves) -> int:
    size = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves if _is_float(leaf))
    return max(1, chunk_bytes() // max(size, 1))


def _stateless_init(params):
    return ()


def _full_rank(loss_fn, params, key_loss, batch, sampler, delta, proposal_state) -> Prepared:
    """Members theta' = theta + delta(i, noise_i) on every float leaf i, noise_i = sampler(key).

    ``loss_fn`` is already checked; inactive members (padding) keep theta.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    floats = [i for i, p in enumerate(leaves) if _is_float(p)]

    def moved(key, active):
        noise = _sample_flat(sampler, key, [leaves[i].shape for i in floats])
        out = list(leaves)
        for i, e in zip(floats, noise):
            p = leaves[i]
            out[i] = jnp.where(active, p + delta(i, e).astype(p.dtype), p)
        return jax.tree_util.tree_unflatten(treedef, out)

    def loss(key, active):
        return loss_fn(moved(key, active), key_loss, batch)

    def materialize(key):
        return moved(key, jnp.bool_(True))

    return Prepared(loss, materialize, proposal_state, _chunk_size(leaves))


def _masked(sampler, fraction: float):
    """``sampler`` whose entries are each kept with probability ``fraction`` and zero otherwise.

    The mask is drawn from its own subkey, so for ``fraction=1`` the noise is
    the unmasked sampler's, bit for bit.
    """
    if fraction == 1.0:
        return sampler

    def masked(key, shape, dtype):
        key_noise, key_mask = jax.random.split(key)
        keep = jax.random.bernoulli(key_mask, fraction, shape)
        return jnp.where(keep, sampler(key_noise, shape, dtype), jnp.zeros((), dtype))

    return masked


def _additive(sampler, scale, scale_by_rms, rms_floor, fraction=1.0) -> Proposal:
    """Full-rank additive noise theta' = theta + std_leaf * sampler(key_leaf), on a ``fraction`` of entries."""
    if validation.is_traced(fraction):  # the mask is built at trace time: fraction cannot be swept
        raise ValueError("fraction must be a Python number, got a traced value")
    validation.real("fraction", fraction, lambda v: 0 < v <= 1, "in (0, 1]")
    sampler = _masked(sampler, float(fraction))

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        base = jnp.asarray(scale, jnp.float32) * radius
        stds = [_leaf_std(p, base, scale_by_rms, rms_floor) if _is_float(p) else None
                for p in jax.tree_util.tree_leaves(params)]
        return _full_rank(checked_loss(loss_fn), params, key_loss, batch, sampler,
                          lambda i, e: stds[i] * e, proposal_state)

    return Proposal(_stateless_init, prepare)


def gaussian(scale: float, scale_by_rms: bool = False, rms_floor: float = 1e-3,
             fraction: float = 1.0) -> Proposal:
    """Isotropic Gaussian neighbourhood: theta' = theta + scale * r * xi, xi ~ N(0, I).

    Args:
      scale: noise standard deviation (before the radius schedule), > 0.
      scale_by_rms: multiply the std per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
      fraction: probability that an entry moves, in (0, 1]; each proposal
        perturbs an independent Bernoulli(fraction) subset of the entries
        (block-coordinate moves; see :func:`cauchy`). 1.0 moves them all.
    """
    validation.positive("scale", scale)
    validation.positive("rms_floor", rms_floor)
    return _additive(jax.random.normal, scale, scale_by_rms, rms_floor, fraction)


def cauchy(scale: float, scale_by_rms: bool = False, rms_floor: float = 1e-3,
           fraction: float = 1.0) -> Proposal:
    """Heavy-tailed neighbourhood: theta' = theta + scale * r * c, c ~ Cauchy(0, 1) per entry.

    Args:
      scale: Cauchy scale (before the radius schedule), > 0.
      scale_by_rms: multiply the scale per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
      fraction: probability that an entry moves, in (0, 1]. With
        ``fraction = 1/D`` a proposal moves about one of D coordinates, as
        the second half of scipy's ``dual_annealing`` visiting loop does: on a
        (nearly) separable landscape (Rastrigin, Ackley) a long jump of one
        coordinate into a better basin is not undone by the other D - 1
        coordinates' jumps, which is what makes full moves fail in many
        dimensions. A proposal that draws no entry equals the incumbent
        (probability (1 - fraction)^D). 1.0 moves every entry.
    """
    validation.positive("scale", scale)
    validation.positive("rms_floor", rms_floor)
    return _additive(jax.random.cauchy, scale, scale_by_rms, rms_floor, fraction)


def langevin(step_size: float, optimizer=None) -> Proposal:
    """Gradient-informed proposals (unadjusted Langevin), one gradient per step.

    theta'_j = theta - step_size * g + r * sqrt(2 * step_size * T) * xi_j,
    xi_j ~ N(0, I), where g = grad loss_fn(theta, key_loss, batch) is computed
    once per step with the step's loss key. With ``optimizer`` (any optax
    GradientTransformation, e.g. ``optax.adam(1e-3)``) the drift
    ``-step_size * g`` is replaced by the optimizer's update of g; its state is
    the proposal state and is updated once per step (accepted or not).

    Args:
      step_size: Langevin step, > 0 (also sets the noise scale).
      optimizer: optional optax GradientTransformation giving the drift.
    """
    validation.positive("step_size", step_size)
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")

    def init(params):
        return () if optimizer is None else optimizer.init(params)

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        loss_fn = checked_loss(loss_fn)
        grads = jax.grad(loss_fn)(params, key_loss, batch)
        if optimizer is None:
            drift = tree_map(lambda g: -step_size * g, grads)
            new_state = proposal_state
        else:
            drift, new_state = optimizer.update(grads, proposal_state, params)
        std = radius * jnp.sqrt(2.0 * step_size * jnp.maximum(temperature, 0.0))
        drifts = jax.tree_util.tree_structure(params).flatten_up_to(drift)
        return _full_rank(loss_fn, params, key_loss, batch, jax.random.normal,
                          lambda i, e: drifts[i] + std * e, new_state)

    return Proposal(init, prepare, GRAD_COST)


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


def member_chunk(layout: "Layout") -> int | None:
    """Members evaluated at once for ``layout`` (None: all of them in one vmap, as on accelerators)."""
    budget = activation_bytes()
    if budget is None or layout.activation_bytes == 0:
        return None
    return max(1, budget // layout.activation_bytes)


def map_members(fn, *members, chunk: int | None = None):
    """``fn`` over the leading axis of ``members``: one vmap, or ``jax.lax.map`` over vmapped chunks of ``chunk``."""
    num = jax.tree_util.tree_leaves(members)[0].shape[0]
    if chunk is None or chunk >= num:
        return jax.vmap(fn)(*members)
    return jax.lax.map(lambda m: fn(*m), members, batch_size=int(chunk))


def low_rank(
    scale: float, rank: int = 1, scale_by_rms: bool = False, rms_floor: float = 1e-3
) -> Proposal:
    """EGGROLL-style rank-r perturbations of every Dense kernel, never materialised.

    For each ``flax.linen.Dense`` kernel W of shape (m, n), proposal j draws
    A ~ N(0, I_{m x r}), B ~ N(0, I_{n x r}) and the layer computes

        y = x @ W + b + (s / sqrt(r)) * (x @ A) @ B.T  (+ s_b * e_b)

    i.e. W' = W + (s / sqrt(r)) A B^T, whose entries have variance s^2 (the
    1/sqrt(r) normalisation makes ``scale`` comparable with ``gaussian``).
    Here s = scale * radius (times the kernel's floored RMS with
    ``scale_by_rms``). The shared product x @ W is one large matmul; each
    proposal adds O(r (m + n)) per row. Every ``nn.Dense.__call__`` inside
    ``loss_fn`` is intercepted with ``flax.linen.intercept_methods``, so
    ``loss_fn`` is used unchanged; a Dense module is matched to its params
    leaves by its module path (``('encoder', 'hidden')`` <->
    ``params['params']['encoder']['hidden']['kernel']``). Dense biases and all
    other floating leaves get plain Gaussian noise. Only the accepted
    proposal is materialised: ``materialize`` re-draws its A, B from its key
    and forms W + (s / sqrt(r)) A @ B.T once.

    Args:
      scale: per-entry noise std s (before the radius schedule), > 0.
      rank: r, >= 1.
      scale_by_rms: multiply s per leaf by max(rms(leaf), rms_floor).
      rms_floor: floor on the RMS, > 0.
    """
    validation.positive("scale", scale)
    validation.positive("rms_floor", rms_floor)
    validation.integer("rank", rank, 1)
    rank = int(rank)

    def prepare(loss_fn, params, key_loss, batch, temperature, radius, proposal_state):
        loss_fn = checked_loss(loss_fn)
        base = jnp.asarray(scale, jnp.float32) * radius
        layout = _layout(loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor)
        loss = functools.partial(_low_rank_loss, layout, loss_fn, key_loss, batch)
        return Prepared(loss, functools.partial(_low_rank_materialize, layout), proposal_state,
                        chunk_size=member_chunk(layout), draw=functools.partial(draw_all, layout))

    return Proposal(_stateless_init, prepare)


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
    """The params as ``low_rank`` perturbs them; ``prepare`` builds one per step.

    Attributes:
      leaves: the params' flat leaves.
      treedef: their tree structure.
      layers: module path (``('encoder', 'hidden')``) -> :class:`DenseLayer`,
        for every Dense the loss calls, in call order.
      stds: leaf index -> noise std, for every floating leaf, in leaf order.
      rank: r.
      activation_bytes: bytes of every Dense output of one loss call (one
        member); 0 when unknown. It sizes ``member_chunk``.
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
    """One low-rank proposal's noise, by what it perturbs.

    Attributes:
      factors: module path -> (A, B), the (m, r) and (n, r) factors of that
        Dense's kernel update.
      biases: module path -> the std-scaled noise of that Dense's bias.
      leaves: leaf index -> the std-scaled noise of every other floating leaf.
    """

    factors: dict[tuple[str, ...], tuple[jax.Array, jax.Array]]
    biases: dict[tuple[str, ...], jax.Array]
    leaves: dict[int, jax.Array]


def _dense_leaves(index, leaves, mpath) -> tuple[int, int | None] | None:
    """(kernel index, floating bias index or None) of the Dense at ``mpath``; None if absent.

    Flax keeps module variables under ``params['params']``; a bare variables
    dict (no collection level) is accepted too.
    """
    for prefix in (("params",), ()):
        k = index.get(prefix + mpath + ("kernel",))
        if k is not None and leaves[k].ndim == 2 and _is_float(leaves[k]):
            b = index.get(prefix + mpath + ("bias",))
            return k, (b if b is not None and _is_float(leaves[b]) else None)
    return None


def _layout(loss_fn, params, key_loss, batch, rank, base, scale_by_rms, rms_floor) -> Layout:
    """The :class:`Layout` of ``params`` (ValueError if ``rank`` exceeds a Dense kernel's)."""
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
    stds = {i: _leaf_std(p, base, scale_by_rms, rms_floor) for i, p in enumerate(leaves) if _is_float(p)}
    layers = {mpath: DenseLayer(k, b, stds[k] / math.sqrt(rank)) for mpath, (k, b) in found.items()}
    return Layout(leaves, treedef, layers, stds, rank, sum(calls.values()))


def _draw(layout: Layout, key) -> Noise:
    """One proposal's :class:`Noise`: ONE normal draw split over the floating leaves in leaf order."""
    kernel_of, bias_of = layout.kernel_of, layout.bias_of
    shapes = []
    for i in layout.stds:
        if i in kernel_of:
            m, n = layout.leaves[i].shape
            shapes += [(m, layout.rank), (n, layout.rank)]
        else:
            shapes.append(layout.leaves[i].shape)
    flat = iter(_sample_flat(jax.random.normal, key, shapes))
    noise = Noise({}, {}, {})
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
    return jax.lax.map(functools.partial(_draw, layout), keys)


def _intercept_dense(layout: Layout, noise: Noise, active, next_fun, args, kwargs, context):
    """Flax method interceptor: a Dense layer's output plus its proposal's low-rank and bias noise.

    (x @ A) @ B.T costs O(r (m + n)) per row where forming W + A @ B.T
    would cost O(m n) per proposal.
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


def _low_rank_loss(layout: Layout, loss_fn, key_loss, batch, noise: Noise, active):
    """The loss of the proposal with ``noise`` (one member of :func:`draw_all`; the incumbent when not ``active``)."""
    # Dense kernels and biases stay as they are: the interceptor perturbs those layers' outputs.
    leaves = [jnp.where(active, p + noise.leaves[i], p) if i in noise.leaves else p
              for i, p in enumerate(layout.leaves)]
    params = jax.tree_util.tree_unflatten(layout.treedef, leaves)
    with nn.intercept_methods(functools.partial(_intercept_dense, layout, noise, active)):
        return loss_fn(params, key_loss, batch)


def _low_rank_materialize(layout: Layout, key):
    """The params of the proposal drawn from ``key``: W + coef * A @ B.T formed once."""
    noise = _draw(layout, key)
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
