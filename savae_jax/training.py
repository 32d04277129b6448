"""One training loop for every optimizer: Optax transformations and annealers.

``fit`` turns the optimizer into a pure ``step(key, state, x) -> (state, loss,
stats)``, jit-compiles it once, and drives it over epochs of device-side
batches. Gradient methods and simulated annealing therefore share the data
order, the keys, the loss and the evaluation.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from savae_jax import data as data_lib
from savae_jax.annealing.proposals import checked_loss
from savae_jax import distributed, evaluation


class Algorithm(NamedTuple):
    """An optimizer seen by ``fit``: pure functions over an opaque state.

    Attributes:
      init: ``init(params) -> state``.
      step: ``step(key, state, x) -> (state, loss, stats)``; ``loss`` is the
        training loss on ``x`` and ``stats`` a dict of scalar diagnostics.
      params: ``params(state) -> params`` (the parameters to evaluate).
    """

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, jax.Array, dict]]
    params: Callable[[Any], Any]


def takes_step(loss_fn) -> bool:
    """Whether ``loss_fn`` has a ``step`` parameter (a scheduled loss, e.g. a beta warm-up)."""
    try:
        return "step" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def optax_algorithm(loss_fn, optimizer: optax.GradientTransformation) -> Algorithm:
    """Wrap an Optax transformation: one gradient step per batch.

    ``GradientTransformationExtraArgs`` (``optax.lbfgs``,
    ``annealing.as_optax``) also receive ``value``, ``grad`` and
    ``value_fn(params)``: the loss on this batch with this step's noise.

    If ``loss_fn`` has a ``step`` parameter (``make_loss`` with a beta
    schedule), the state is ``(params, opt_state, count)`` and the loss is
    called with ``step=count``, the number of steps done (0 at the first);
    the count is saved with the state, so a resumed run continues the
    schedule. Otherwise the state is ``(params, opt_state)`` as before.
    """
    if takes_step(loss_fn):
        return _counted_optax_algorithm(loss_fn, optimizer)
    # A non-scalar or integer loss fails here, at the first trace, with a
    # message naming loss_fn rather than deep inside jax.grad.
    loss_fn = checked_loss(loss_fn)
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def init(params):
        return params, optimizer.init(params)

    def step(key, state, x):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, key, x)
        if extra_args:
            updates, opt_state = optimizer.update(
                grads, opt_state, params,
                value=loss, grad=grads, value_fn=lambda p: loss_fn(p, key, x),
            )
        else:
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss, {}

    return Algorithm(init, step, lambda state: state[0])


def _counted_optax_algorithm(loss_fn, optimizer) -> Algorithm:
    """``optax_algorithm`` for a loss with a ``step`` parameter: the state also counts steps."""

    def init(params):
        return params, optimizer.init(params), jnp.zeros((), jnp.int32)

    def step(key, state, x):
        params, opt_state, count = state
        scheduled = optax_algorithm(lambda p, k, b: loss_fn(p, k, b, step=count), optimizer)
        (params, opt_state), loss, stats = scheduled.step(key, (params, opt_state), x)
        return (params, opt_state, count + 1), loss, stats

    return Algorithm(init, step, lambda state: state[0])


def annealing_algorithm(annealer) -> Algorithm:
    """Wrap a ``simulated_annealing(...)`` pair: one annealing step per batch.

    The logged loss is the incumbent's loss on the batch after the step; the
    stats are the temperature, radius and cumulative acceptance rate.
    """

    def step(key, state, x):
        state, info = annealer.step(key, state, x)
        stats = {
            "temperature": info.temperature,
            "radius": info.radius,
            "acceptance_rate": info.acceptance_rate,
        }
        return state, info.loss, stats

    return Algorithm(annealer.init, step, lambda state: state.params)


def as_algorithm(loss_fn, optimizer) -> Algorithm:
    """Turn what users pass as ``optimizer`` into an ``Algorithm``.

    Accepts an ``optax.GradientTransformation``, an annealer (anything with
    ``init`` and ``step``, as returned by ``annealing.simulated_annealing``),
    or an ``Algorithm`` itself.
    """
    if isinstance(optimizer, Algorithm):
        return optimizer
    if isinstance(optimizer, optax.GradientTransformation):
        return optax_algorithm(loss_fn, optimizer)
    if hasattr(optimizer, "init") and hasattr(optimizer, "step"):
        return annealing_algorithm(optimizer)
    raise ValueError(
        "optimizer must be an optax.GradientTransformation or an annealer with "
        f"init/step (savae_jax.annealing.simulated_annealing), got {type(optimizer).__name__}"
    )


def make_train_step(algorithm: Algorithm, binarize: str | None = None, static_seed: int = 0,
                    mesh=None, axis_name: str | None = None):
    """The per-batch step ``fit`` jits: gather and binarise the batch, then step.

    Returns ``train_step(state, key, images, idx) -> (state, loss, stats)``;
    ``images`` stays on the device and ``idx`` selects the batch, so no data
    crosses from the host inside the loop. With a ``mesh`` the batch is
    sharded along ``axis_name`` (data parallel: XLA all-reduces the
    gradients); the state is left to the caller (``iterate`` replicates it).
    """
    batch_sharding = None
    if mesh is not None:
        axis_name = distributed.mesh_axis(mesh, axis_name)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

    def train_step(state, key, images, idx):
        key_batch, key_step = jax.random.split(key)
        x = data_lib.make_batch(images, idx, key_batch, binarize, static_seed)
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
        return algorithm.step(key_step, state, x)

    return train_step


def _images(data, name: str):
    images = data.images if hasattr(data, "images") else data
    data_lib.validate_images(images, name=name)
    return jnp.asarray(images, jnp.float32)


def epoch_plan(key: jax.Array, epoch: int, num_examples: int, batch_size: int):
    """Batch indices (steps, batch_size) and one key per step for ``epoch``.

    A pure function of ``(key, epoch)``: any step of any epoch can be
    recomputed, which is what makes resuming mid-epoch exact.
    """
    key_perm, key_steps = jax.random.split(jax.random.fold_in(key, epoch))
    idx = data_lib.epoch_indices(key_perm, num_examples, batch_size)
    return idx, jax.random.split(key_steps, idx.shape[0])


def iterate(
    key: jax.Array,
    algorithm: Algorithm,
    state,
    images: jax.Array,
    batch_size: int = 128,
    *,
    binarize: str | None = None,
    static_seed: int = 0,
    start_step: int = 0,
    mesh=None,
    axis_name: str | None = None,
):
    """Compile ``algorithm``'s step, then return an iterator of ``(step, state, loss, stats)``.

    Step ``s`` (counted from 0) uses batch ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch`` and that batch's key from ``epoch_plan``, so
    ``iterate(..., start_step=s)`` from a saved state continues exactly as an
    uninterrupted run would. The step is compiled once, before this function
    returns; the iterator never ends: the caller decides when to stop,
    evaluate or save. ``step`` in the output counts the
    steps done so far (``start_step + 1`` for the first).

    Args:
      key: the run's key (the same one for every step; see ``epoch_plan``).
      algorithm: an ``Algorithm`` (see ``as_algorithm``).
      state: its state (``algorithm.init(params)`` or a restored one).
      images: (N, H, W, C) float32 array in [0, 1], validated by the caller.
      batch_size: examples per step; the remainder of each epoch is dropped.
      binarize, static_seed: as in ``data.make_batch``.
      start_step: number of steps already done.
      mesh, axis_name: a ``jax.sharding.Mesh`` to run on (see
        docs/distributed.md): the batch is sharded along ``axis_name`` (None:
        the mesh's only axis), the state and images are replicated, and an
        annealer built without a mesh shards its proposals over it. None:
        one device, or the mesh of an enclosing ``distributed.use_mesh``.
    """
    if mesh is None and distributed.current_mesh() is not None:
        mesh, axis_name = distributed.current_mesh()
    images = jnp.asarray(images, jnp.float32)
    steps_per_epoch = data_lib.num_batches(images.shape[0], batch_size)
    # Compile ahead of time, here rather than at the first step, so callers
    # that time the steps do not time the compiler.
    idx, step_keys = epoch_plan(key, start_step // steps_per_epoch, images.shape[0], batch_size)
    if mesh is None:
        train_step = jax.jit(make_train_step(algorithm, binarize, static_seed)).lower(
            state, step_keys[0], images, idx[0]).compile()
        return _steps(train_step, key, state, images, batch_size, steps_per_epoch, start_step)
    axis_name = distributed.mesh_axis(mesh, axis_name)
    state, images = distributed.replicate((state, images), mesh)
    with distributed.use_mesh(mesh, axis_name):  # annealers built without a mesh use this one
        train_step = jax.jit(make_train_step(algorithm, binarize, static_seed, mesh, axis_name)).lower(
            state, step_keys[0], images, idx[0]).compile()
    return _steps(train_step, key, state, images, batch_size, steps_per_epoch, start_step)


def _steps(train_step, key, state, images, batch_size, steps_per_epoch, step):
    epoch, plan = None, None
    while True:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            plan = epoch_plan(key, epoch, images.shape[0], batch_size)
        idx, step_keys = plan
        i = step % steps_per_epoch
        state, loss, stats = train_step(state, step_keys[i], images, idx[i])
        step += 1
        yield step, state, loss, stats


def fit(
    key: jax.Array,
    params,
    loss_fn,
    optimizer,
    train,
    epochs: int,
    batch_size: int = 128,
    test=None,
    *,
    binarize: str | None = None,
    static_seed: int = 0,
    eval_key: jax.Array | None = None,
    eval_batch_size: int = 1000,
    eval_loss_fn=None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    mesh=None,
):
    """Train ``params`` on ``train`` with any optimizer; one jit compile in all.

    To refine a gradient optimum by annealing (x0 = x*), call ``fit`` twice:
    first with an Optax optimizer, then with an annealer from the result.

    Args:
      key: PRNG key; epoch ``e`` uses ``fold_in(key, e)`` (see ``epoch_plan``),
        so a run is a pure function of ``key``.
      params: initial parameters (e.g. ``models.init(...)``).
      loss_fn: ``loss_fn(params, key, x) -> scalar`` (``make_loss(model)``).
      optimizer: an ``optax.GradientTransformation``, an annealer from
        ``annealing.simulated_annealing``, or an ``Algorithm``.
      train: a ``data.Dataset`` or an (N, H, W, C) array in [0, 1].
      epochs: number of passes over ``train`` (>= 1).
      batch_size: examples per step; the last partial batch is dropped.
      test: optional held-out ``Dataset``/array; its mean loss over every
        example at ``eval_key`` is recorded after each epoch.
      binarize: None, "dynamic" or "static" (see ``data.make_batch``); the test
        set is binarised the same way at the fixed evaluation key.
      static_seed: seed of the "static" binarisation.
      eval_key: evaluation key; default ``jax.random.key(evaluation.EVAL_SEED)``.
      eval_batch_size: chunk size of the test evaluation.
      eval_loss_fn: what the test evaluation averages (default ``loss_fn``);
        pass ``make_loss(model)`` to score the true ELBO when training a
        beta-VAE or with free bits.
      progress: show a tqdm bar with the running loss.
      log: called with one line of text per epoch (e.g. ``print``).
      mesh: a ``jax.sharding.Mesh`` to train on (``iterate``'s ``mesh``):
        Optax steps are data parallel, annealers shard their proposals.
        None: one device (or an enclosing ``distributed.use_mesh``).
    Returns:
      ``(params, history)``: final parameters and a list of per-epoch dicts
      ``{"epoch", "train_loss", "test_neg_elbo", "seconds", **stats}``;
      ``seconds`` is the epoch's training time (evaluation excluded).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if binarize not in data_lib.BINARIZE:
        raise ValueError(f"binarize must be one of {data_lib.BINARIZE}, got {binarize!r}")
    images = _images(train, "train")
    test_images = None if test is None else _images(test, "test")
    steps_per_epoch = data_lib.num_batches(images.shape[0], batch_size)
    algorithm = as_algorithm(loss_fn, optimizer)
    steps = iterate(key, algorithm, algorithm.init(params), images, batch_size,
                    binarize=binarize, static_seed=static_seed, mesh=mesh)
    # Across processes the state is a global array: evaluate and return host copies.
    local = distributed.to_host if jax.process_count() > 1 else (lambda tree: tree)

    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        loss_sum = jnp.zeros(())
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        for i in bar:
            _, state, loss, stats = next(steps)
            loss_sum = loss_sum + loss
            # Reading the loss syncs with the device: only a few times per epoch.
            if progress and (i + 1) % max(1, steps_per_epoch // 20) == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / (i + 1):.3f}")
        train_loss = float(loss_sum) / steps_per_epoch
        seconds = time.perf_counter() - start
        bar.close()
        row = {"epoch": epoch + 1, "train_loss": train_loss, "test_neg_elbo": None,
               "seconds": seconds}
        row.update({name: float(value) for name, value in stats.items()})
        if test_images is not None:
            row["test_neg_elbo"] = evaluation.evaluate(
                eval_loss_fn or loss_fn, local(algorithm.params(state)), test_images, eval_key,
                eval_batch_size, binarize, static_seed,
            )
        history.append(row)
        if log is not None:
            log(format_row(row))
    return local(algorithm.params(state)), history


def format_row(row: dict) -> str:
    """One human-readable log line for a history row."""
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.3f}"]
    if row.get("test_neg_elbo") is not None:
        parts.append(f"test_neg_elbo {row['test_neg_elbo']:.3f}")
    parts.append(f"{row['seconds']:.2f}s")
    parts += [f"{k} {v:.4g}" for k, v in row.items()
              if k not in ("epoch", "train_loss", "test_neg_elbo", "seconds")]
    return "  ".join(parts)
