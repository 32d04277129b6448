"""One run driver for every optimizer: phases, budgets, history rows, checkpoints, progress.

A run is a list of :class:`Phase`\\ s (the seed's refinement recipe is two:
Adam, then annealing from its optimum; see :func:`refinement`). :func:`run`
drives each phase's :class:`~savae_jax.optimizer.Optimizer` with one compiled
step until the phase's budget is spent, records a history row every
``eval_every`` steps, and saves the whole run state at the rows, so a run
killed at any point resumes exactly (``resume=True``). ``training.fit``,
``experiments/train.py`` and ``experiments/compare.py`` all run through it.

Cost is counted in *evaluations*: one forward pass of the loss on one batch
(``Optimizer.cost`` per step: 3 for a gradient step, K + 1 for annealing with
K proposals).

Data order: step ``s`` of a phase uses batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch`` of :func:`epoch_plan` and that batch's key, so every
step is a pure function of the phase's key and its index.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from savae_jax import checkpoint, distributed, models, validation
from savae_jax import data as data_lib
from savae_jax.optimizer import Optimizer, as_optimizer, logged_stats

# The fields of every history row, in order; the optimizer's logged info
# fields (e.g. the annealer's temperature) follow them.
ROW_FIELDS = ("phase", "step", "evals", "seconds", "train_loss", "test_neg_elbo")


# The fields every trace row starts with; the optimizer's info fields follow them.
TRACE_FIELDS = ("phase", "step")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped before saving it.

    Attributes:
      step: the first step (counted over the run, from 1) whose loss was not
        finite, or that an optimizer flagged (``info``'s ``FAULTS``); None if unknown.
      params: the parameters of the last history row whose loss was finite
        (the initial ones if none was), on the host.
      history: the history rows up to that row (all finite).
    """

    def __init__(self, message: str, step: int | None = None, params=None, history=None):
        super().__init__(message)
        self.step, self.params, self.history = step, params, history


class InvalidScheduleError(NonFiniteLossError):
    """A schedule (temperature, radius) returned a negative or non-finite value, or a decision-size
    schedule a NaN, negative or fractional one; the run stopped."""


def _fault_fields(info, prefix: str = ""):
    """``(flag, value field, info)`` of every fault ``info`` can flag: its class's ``FAULTS``, and those
    of the infos it holds (replica exchange stacks its replicas' infos in ``info.replicas``)."""
    out = [(flag, value, info) for flag, value in getattr(type(info), "FAULTS", {}).items()]
    for field in getattr(info, "_fields", ()):
        inner = getattr(info, field)
        if hasattr(inner, "_fields"):
            out += _fault_fields(inner)
    return out


def _faults(info):
    """Whether ``info`` flags a fault its optimizer cannot continue from (see :func:`_fault_fields`)."""
    flags = [jnp.any(getattr(holder, flag)) for flag, _, holder in _fault_fields(info)]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


@jax.jit
def _note_step(loss_sum, first_bad, info, step):
    """A segment's running loss sum with ``info.loss`` added, and ``step`` as ``first_bad`` if it is the
    first (``first_bad`` < 0) with a non-finite loss or a flagged fault.

    Computed on the device with the step's outputs, in one dispatch per step; the driver reads both at
    a row (its fetch point), so no step waits for the host.
    """
    bad = ~jnp.all(jnp.isfinite(info.loss)) | _faults(info)
    return loss_sum + info.loss, jnp.where((first_bad < 0) & bad, step, first_bad)


def _all_finite(tree) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one value fetched)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return bool(jnp.all(jnp.stack(leaves))) if leaves else True


class Phase(NamedTuple):
    """One stage of a run.

    Attributes:
      name: label in the history (e.g. "adam", "sa").
      optimizer: an :class:`~savae_jax.optimizer.Optimizer` (an Optax
        transformation is wrapped with ``from_optax(loss_fn, tx)`` first: the
        driver has no loss of its own).
      share: fraction of the run's budgets (``budget_evals``,
        ``budget_seconds``) this phase may spend, in (0, 1]; None: an equal
        part of what the phases with a share leave (:func:`resolve_shares`).
        Shares summing above 1 are refused: a run never spends more than its budget.
      epochs: this phase's own budget in epochs (None: none).
      key: the phase's key; None: ``fold_in(run key, phase index)``.
    """

    name: str
    optimizer: Any
    share: float | None = None
    epochs: int | None = None
    key: jax.Array | None = None


class PhaseEnd(NamedTuple):
    """A run at the end of one of its phases: what another run whose phases up to that one are the same
    (the same optimizers, shares, keys, data and budgets) starts from instead of computing them again.

    :func:`run` hands one to ``on_phase_end`` as each phase ends and starts from one given as ``start``
    (e.g. ``savae compare``: refinement methods with the same Adam half compute it once per seed).

    Attributes:
      phase: the index of the phase that ended.
      state: the optimizer state at its end.
      position: the run's :class:`Position` there.
      history: the history rows so far (their ``seconds`` are the run's that computed them).
      trace: the trace rows so far (empty without ``trace``).
      best: the validation gate's :class:`Best` so far (None without ``validate``).
    """

    phase: int
    state: Any
    position: Any
    history: list
    trace: list
    best: Any


class Best(NamedTuple):
    """The validation gate's choice so far: the lowest validation value, its step, its parameters."""

    value: float
    step: int
    params: Any


class Position(NamedTuple):
    """Where a run is: phase index, steps and seconds in that phase, totals so far."""

    phase: int = 0
    step: int = 0
    phase_seconds: float = 0.0
    total_steps: int = 0
    evals: int = 0
    seconds: float = 0.0


# Shares are floats: sums like 0.1 + 0.2 + 0.7 may exceed 1 by a few ulps of 1.0 (2.2e-16 each).
SHARE_SUM_TOLERANCE = 1e-9


def resolve_shares(phases) -> list[Phase]:
    """``phases`` with every ``share`` set: the given ones checked, the others an equal part of the rest.

    A given share must be a number in (0, 1], and the given shares may sum
    to at most 1; the phases without one split ``1 - sum`` equally (one
    phase alone gets 1). ValueError naming the phases otherwise, e.g. two
    phases with shares 0.6 and 0.6, or phases without a share when the
    others already take the whole budget.
    """
    given = {p.name: p.share for p in phases if p.share is not None}
    for name, share in given.items():
        validation.real(f"share of phase {name!r}", share, lambda v: 0 < v <= 1, "in (0, 1]")
    total = sum(float(v) for v in given.values())
    listed = ", ".join(f"{name} {float(v):g}" for name, v in given.items())
    if total > 1 + SHARE_SUM_TOLERANCE:
        raise ValueError(f"phases: the shares sum to {total:g} ({listed}), above 1; a run never spends more "
                         "than its budget: give shares that sum to at most 1")
    rest = [i for i, p in enumerate(phases) if p.share is None]
    if not rest:
        return list(phases)
    left = max(0.0, 1.0 - total)
    if left <= SHARE_SUM_TOLERANCE:
        raise ValueError(f"phases: the shares ({listed}) take the whole budget, leaving nothing for "
                         f"{', '.join(repr(phases[i].name) for i in rest)}; give every phase a share")
    return [p._replace(share=left / len(rest)) if p.share is None else p for p in phases]


def refinement(gradient, annealer, *, share: float | None = None, epochs: tuple[int, int] | None = None,
               names: tuple[str, str] = ("adam", "sa"), keys=(None, None)) -> list[Phase]:
    """The seed's recipe: a gradient phase, then annealing from its optimum (x0 = x*).

    Give the split either as ``share`` (the gradient phase's fraction of the
    run's budgets, in (0, 1)) or as ``epochs`` (each phase's epochs).

    Args:
      gradient: the gradient optimizer (an Optimizer or Optax transformation).
      annealer: the annealer (``annealing.simulated_annealing(...)``).
      share: the gradient phase's share of ``budget_evals``/``budget_seconds``.
      epochs: ``(gradient_epochs, annealing_epochs)``, each >= 1.
      names: the phases' names in the history.
      keys: the phases' keys (None: derived from the run's key).
    """
    if (share is None) == (epochs is None):
        raise ValueError("refinement needs exactly one of share or epochs")
    if share is not None:
        if not 0 < share < 1:
            raise ValueError(f"share must be in (0, 1), got {share}")
        return [Phase(names[0], gradient, share, key=keys[0]),
                Phase(names[1], annealer, 1 - share, key=keys[1])]
    for name, value in zip(names, epochs):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"epochs of phase {name!r} must be an integer >= 1, got {value!r}")
    return [Phase(names[0], gradient, epochs=epochs[0], key=keys[0]),
            Phase(names[1], annealer, epochs=epochs[1], key=keys[1])]


def epoch_plan(key: jax.Array, epoch: int, num_examples: int, batch_size: int):
    """Batch indices (steps, batch_size) and one key per step for ``epoch``.

    A pure function of ``(key, epoch)``: any step of any epoch can be
    recomputed, which is what makes resuming mid-epoch exact.
    """
    key_perm, key_steps = jax.random.split(jax.random.fold_in(key, epoch))
    idx = data_lib.epoch_indices(key_perm, num_examples, batch_size)
    return idx, jax.random.split(key_steps, idx.shape[0])


# epoch_plan compiled once per (num_examples, batch_size): one dispatch per epoch (eagerly, its
# fold_in, split and permutation were a dozen dispatches, about 20 ms on a 2-core CPU).
_epoch_plan = jax.jit(epoch_plan, static_argnums=(2, 3))


def make_train_step(optimizer: Optimizer, batch_fn: data_lib.BatchFn = data_lib.BatchFn(),
                    mesh=None, axis_name: str | None = None):
    """The per-batch step the driver jits: gather and binarise the batch, then step.

    Returns ``train_step(state, key, images, idx) -> (state, info)``;
    ``images`` stays on the device and ``idx`` selects the batch, so no data
    crosses from the host inside the loop. With a ``mesh``, an optimizer that
    does not shard itself (``optimizer.mesh is None``) runs data parallel:
    the batch is sharded along ``axis_name`` and XLA all-reduces.
    """
    batch_sharding = None
    if mesh is not None and optimizer.mesh is None:
        axis_name = distributed.mesh_axis(mesh, axis_name)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

    def train_step(state, key, images, idx):
        key_batch, key_step = jax.random.split(key)
        x = batch_fn(images, idx, key_batch)
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
        return optimizer.step(key_step, state, x)

    return train_step


def iterate(key: jax.Array, optimizer: Optimizer, state, images, batch_size: int = 128, *,
            batch_fn: data_lib.BatchFn = data_lib.BatchFn(), start_step: int = 0, mesh=None,
            axis_name: str | None = None):
    """Compile ``optimizer``'s step once, then return an endless iterator of ``(step, state, info)``.

    Step ``s`` (counted from 0) uses batch ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch`` and that batch's key from :func:`epoch_plan`, so
    ``iterate(..., start_step=s)`` from a saved state continues exactly as an
    uninterrupted run would. ``step`` in the output counts the steps done
    (``start_step + 1`` for the first); the caller decides when to stop.

    Args:
      key: the phase's key (the same one for every step; see ``epoch_plan``).
      optimizer: an :class:`~savae_jax.optimizer.Optimizer`.
      state: its state (``optimizer.init(params)`` or a restored one).
      images: (N, H, W, C) float32 array in [0, 1], validated by the caller.
      batch_size: examples per step; the remainder of each epoch is dropped.
      batch_fn: gathers and binarises a batch (:class:`data.BatchFn`).
      start_step: number of steps already done.
      mesh, axis_name: a ``jax.sharding.Mesh`` to run on (docs/distributed.md):
        the state and images are replicated over it and the batch sharded
        along ``axis_name`` unless the optimizer shards itself; an optimizer
        built on another mesh is refused. None: one device.
    """
    images = jnp.asarray(images, jnp.float32)
    steps_per_epoch = data_lib.num_batches(images.shape[0], batch_size)
    if mesh is not None:
        if optimizer.mesh is not None and optimizer.mesh != mesh:
            raise ValueError("mesh: the optimizer was built on another mesh (simulated_annealing(mesh=...)); "
                             "build it on the run's mesh")
        state, images = distributed.replicate((state, images), mesh)
    # Compile ahead of time, here rather than at the first step, so callers
    # that time the steps do not time the compiler.
    idx, step_keys = _epoch_plan(key, start_step // steps_per_epoch, images.shape[0], batch_size)
    step = make_train_step(optimizer, batch_fn, mesh, axis_name)

    def row_step(state, step_keys, images, idx, i):  # the step's row is sliced on the device
        return step(state, step_keys[i], images, idx[i])

    train_step = jax.jit(row_step).lower(state, step_keys, images, idx, np.int32(0)).compile()
    check_step_memory(train_step)
    return _steps(train_step, key, state, images, batch_size, steps_per_epoch, start_step)


# A compiled step needing more than this fraction of the device's memory gets a warning.
MEMORY_WARN_FRACTION = 0.5


def device_memory_bytes(device=None) -> int | None:
    """Memory of ``device`` (default: the first local one): the allocator's limit on an
    accelerator, the machine's physical memory on CPU; None if unknown."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_analysis(compiled):
    """XLA's ``compiled.memory_analysis()`` (argument, output, scratch and alias bytes), or None
    where the backend does not implement it."""
    try:
        return compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None


def step_memory_bytes(compiled) -> int | None:
    """Bytes a compiled step needs at once by XLA's ``memory_analysis()`` (arguments, outputs
    and scratch, less the outputs aliased to arguments); None if the backend does not say."""
    m = memory_analysis(compiled)
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def check_step_memory(compiled, limit: int | None = None) -> int | None:
    """Refuse (ValueError) a compiled step that needs more memory than the device has; warn above half.

    Runs before the first step, so a step too large for the machine (e.g.
    ``num_proposals=10**8`` with ``low_rank``) is refused with the number
    instead of exhausting the memory. Returns the step's bytes (None: unknown).

    Args:
      compiled: ``jax.jit(f).lower(...).compile()``.
      limit: the memory available in bytes; None: :func:`device_memory_bytes`.
    """
    need = step_memory_bytes(compiled)
    limit = device_memory_bytes() if limit is None else limit
    if need is None or not limit:
        return need
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    if need > limit:
        raise ValueError(f"the compiled training step needs about {gib(need)} (XLA memory_analysis: arguments, "
                         f"outputs and scratch) but the device has {gib(limit)}; use fewer proposals "
                         "(num_proposals) or a smaller batch_size")
    if need > MEMORY_WARN_FRACTION * limit:
        warnings.warn(f"the compiled training step needs about {gib(need)} of the device's {gib(limit)}",
                      ResourceWarning, stacklevel=3)
    return need


def _steps(train_step, key, state, images, batch_size, steps_per_epoch, step):
    epoch = None
    while True:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            idx, step_keys = _epoch_plan(key, epoch, images.shape[0], batch_size)
        state, info = train_step(state, step_keys, images, idx, np.int32(step % steps_per_epoch))
        step += 1
        yield step, state, info


# The run's batch size when neither the caller nor a phase's optimizer gives one.
DEFAULT_BATCH_SIZE = 128


def check_batch_size(phases, batch_size: int | None) -> None:
    """Refuse a ``batch_size`` that differs from the one a phase's optimizer was built for (ValueError
    naming both): an annealer with ``decision_batch(selection=64, ...)`` ranks its proposals on 64
    examples, and a run asking for 128 would otherwise silently get 64."""
    if batch_size is not None:
        validation.integer_number("batch_size", batch_size, 1)
    for phase in phases:
        built = getattr(phase.optimizer, "batch_size", None)
        if batch_size is not None and built is not None and built != batch_size:
            raise ValueError(
                f"batch_size={batch_size}, but phase {phase.name!r}'s optimizer was built for batches of "
                f"{built} (its decision batch's selection={built}); pass batch_size={built}, or build it "
                f"with decision_batch(selection={batch_size}, ...)")


def check_examples(phases, num_examples: int, batch_size: int | None) -> None:
    """Refuse a phase that takes more examples per step than there are (ValueError naming the phase,
    and its decision batch when that is what makes the step too large)."""
    for phase in phases:
        per_step = phase_batch_size(phase, batch_size)
        if per_step <= num_examples:
            continue
        selection = getattr(phase.optimizer, "batch_size", None)
        if phase.optimizer.examples_per_step and selection:
            raise ValueError(
                f"phase {phase.name!r} takes {selection} selection + {per_step - selection} decision examples "
                f"per step (decision_size={per_step - selection}), more than the {num_examples} training "
                "examples; use a smaller decision size")
        raise ValueError(f"batch_size={per_step} is larger than the {num_examples} training examples")


def phase_batch_size(phase: Phase, batch_size: int | None) -> int:
    """Examples per step of ``phase``: what its optimizer needs (an annealer with a decision batch takes
    its decision examples on top of its selection), else the run's ``batch_size`` (None: 128)."""
    return phase.optimizer.examples_per_step or batch_size or DEFAULT_BATCH_SIZE


def phase_steps(phases, num_examples: int, batch_size: int | None,
                budget_evals: int | None = None) -> list[int]:
    """Steps each phase may take: its share of ``budget_evals`` over its cost, and/or its epochs.

    Shares are resolved first (:func:`resolve_shares`). Raises ValueError
    (naming ``budget_evals`` or the phase) when the shares sum above 1, a
    phase has no budget or its budget does not pay for one step, so callers
    can refuse a run before anything is written.
    """
    out = []
    for phase in resolve_shares(phases):
        limits = []
        if budget_evals is not None:
            limits.append(int(phase.share * budget_evals) // phase.optimizer.cost)
        if phase.epochs is not None:
            limits.append(phase.epochs * data_lib.num_batches(num_examples, phase_batch_size(phase, batch_size)))
        if not limits:
            raise ValueError(f"phase {phase.name!r} has no budget: pass budget_evals or give it epochs")
        if min(limits) < 1:
            raise ValueError(
                f"budget_evals={budget_evals} does not pay for one step of phase {phase.name!r} "
                f"({phase.optimizer.cost} evaluations per step, share {phase.share:g})")
        out.append(min(limits))
    return out


def info_columns(stacked) -> dict:
    """Every field of stacked per-step infos as named 1-D columns (one entry per step).

    Args:
      stacked: an optimizer's info pytree whose leaves have a leading step
        axis (host arrays).
    Returns:
      ``{name: (steps,) array}``: a scalar field keeps its name (``delta``),
      a vector field gets one column per entry (``pair_swap_rate_0``, ...),
      a nested info is prefixed (``replicas.accepted_0``); leaves of higher
      rank are left out.
    """
    columns = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
        name = ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
        leaf = np.asarray(leaf)
        if leaf.ndim == 1:
            columns[name] = leaf
        elif leaf.ndim == 2:
            columns.update({f"{name}_{j}": leaf[:, j] for j in range(leaf.shape[1])})
    return columns


def trace_rows(phase: str, start: int, infos: list) -> list[dict]:
    """One trace row per step of ``infos``: ``phase``, ``step`` (``start + 1``, ...) and the info's fields.

    The infos stay on the device until here: they are stacked there (one
    array per field) and fetched once, so recording costs no host
    round-trip inside the steps.

    Args:
      phase: the phase's name.
      start: the run's step count before the first of ``infos``.
      infos: the steps' info pytrees (device arrays), in order.
    Returns:
      a list of dicts of Python numbers (JSON-ready; bools stay bools).
    """
    if not infos:
        return []
    stacked = distributed.host_local(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *infos))
    columns = info_columns(jax.device_get(stacked))
    return [{"phase": phase, "step": start + i + 1, **{k: v[i].item() for k, v in columns.items()}}
            for i in range(len(infos))]


class RunResult(NamedTuple):
    """What :func:`run` returns, whatever its options.

    Attributes:
      params: the last parameters, or with ``validate`` the best-validation ones.
      history: one row per ``eval_every`` steps (:data:`ROW_FIELDS`, the gate's fields, the
        optimizer's logged info fields).
      trace: with ``trace=True``, one row per step (:data:`TRACE_FIELDS` and every info field);
        None otherwise.
    """

    params: Any
    history: list
    trace: list | None


class RunOptions(NamedTuple):
    """The options of one :func:`run` call that its bookkeeping reads (see :func:`run`'s Args)."""

    batch_size: int
    eval_every: int
    batch_fn: data_lib.BatchFn
    evaluate: Callable[[Any], float] | None
    validate: Callable[[Any], float] | None
    checkpoint_dir: Any
    mesh: Any
    axis_name: str | None
    desc: str
    log: Callable[[str], None] | None
    trace: bool


def uncommitted(tree):
    """``tree``'s arrays as uncommitted arrays on the default device, like a fresh ``optimizer.init``'s.

    Orbax restores arrays committed to their device, and a step lowered for committed
    arguments carries sharding annotations that one lowered for a fresh state does not:
    the same program to XLA, but another compilation-cache key, so every resumed run
    compiled its step again (measured: 3.5 s for a replica-exchange step of ES
    replicas on 2 CPU cores). Uncommitted, the resumed run reuses the uninterrupted
    run's executable. One host copy of the state per resume.
    """
    return jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)), tree)


class _Run:
    """The mutable bookkeeping of one :func:`run` call (position, history, checkpoints)."""

    def __init__(self, key, phases, params, images, options: RunOptions):
        self.key, self.phases, self.params0, self.images, self.o = key, phases, params, images, options
        self.saver = None if options.checkpoint_dir is None else checkpoint.RunCheckpointer(options.checkpoint_dir)
        self.pos, self.history, self.finished = Position(), [], False
        self.trace, self.pending = [], []  # trace rows so far; this row's step infos, on the device
        self.state = phases[0].optimizer.init(params)
        self.best = None if options.validate is None else Best(self.score(params, 0), 0, params)

    def score(self, params, step: int) -> float:
        """``validate(params)`` as a float; ValueError naming ``validate`` unless it is one finite number.

        A NaN would never compare as better, so the gate would keep whatever
        it held (the initial parameters) without a word.
        """
        value = np.asarray(self.o.validate(params))
        if value.shape != () or not np.issubdtype(value.dtype, np.number):
            raise ValueError(f"validate must return one number (the validation loss), got shape {value.shape} "
                             f"and dtype {value.dtype} at step {step}; reduce it, e.g. with .mean()")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"validate returned {value} for the parameters of step {step}; the validation gate "
                             "needs a finite score to compare parameters (a NaN is never better, so the gate "
                             "would silently keep older ones)")
        return value

    def restore(self) -> None:
        """Continue from the newest readable checkpoint, if any."""
        if self.saver is None:
            return
        # The state's structure depends on the phase that was saved: rebuild
        # a template from the initial parameters (same shapes) for it.
        def template(meta):
            state = self.phases[meta["position"]["phase"]].optimizer.init(self.params0)
            return state if self.best is None else (state, self.params0)

        restored = self.saver.restore(template, self.o.log)
        if restored is not None:
            _, saved, meta = restored
            saved = uncommitted(saved)
            self.pos, self.history, self.finished = Position(**meta["position"]), meta["history"], meta["finished"]
            self.trace = meta.get("trace", [])
            if self.best is None:
                self.state = saved
            else:
                self.state, best_params = saved
                self.best = Best(meta["best"]["value"], meta["best"]["step"], best_params)

    def save(self, finished: bool) -> None:
        if self.saver is not None:
            meta = {"position": self.pos._asdict(), "history": self.history, "finished": finished}
            if self.o.trace:
                meta["trace"] = self.trace
            saved = self.state
            if self.best is not None:  # the gate's parameters travel with the state
                meta["best"] = {"value": self.best.value, "step": self.best.step}
                saved = (self.state, self.best.params)
            self.saver.save(self.pos.total_steps, distributed.host_local(saved), meta)

    def params(self):
        return distributed.host_local(self.state.params)

    def result_params(self):
        """The run's output: the best-validation parameters with a gate, else the last ones."""
        return self.params() if self.best is None else distributed.host_local(self.best.params)

    def gate(self, row: dict) -> None:
        """Validate the current parameters, keep them if they beat the best so far, note both in ``row``."""
        value = self.score(self.params(), self.pos.total_steps)
        if value < self.best.value:  # strictly lower: on a tie the earlier parameters stay
            self.best = Best(value, self.pos.total_steps, self.state.params)
        row["val_neg_elbo"], row["best_step"] = value, self.best.step

    def steps(self, phase_index: int):
        phase = self.phases[phase_index]
        key = phase.key if phase.key is not None else jax.random.fold_in(self.key, phase_index)
        return iterate(key, phase.optimizer, self.state, self.images, phase_batch_size(phase, self.o.batch_size),
                       batch_fn=self.o.batch_fn, start_step=self.pos.step, mesh=self.o.mesh,
                       axis_name=self.o.axis_name)

    def phase_end(self) -> PhaseEnd:
        """The run at the end of its current phase (copies of the rows: the caller may keep it)."""
        return PhaseEnd(self.pos.phase, self.state, self.pos, [dict(row) for row in self.history],
                        [dict(row) for row in self.trace], self.best)

    def start_from(self, start: PhaseEnd, max_steps) -> None:
        """Continue from ``start`` (ValueError naming ``start`` where it cannot be this run's phase end)."""
        if not isinstance(start, PhaseEnd):
            raise ValueError(f"start must be a driver.PhaseEnd (from on_phase_end), got {type(start).__name__}")
        names = [phase.name for phase in self.phases]
        if not 0 <= start.phase < len(self.phases) or start.position.phase != start.phase:
            raise ValueError(f"start: the end of phase {start.phase}, but this run has phases {names}")
        if start.position.step != max_steps[start.phase]:
            raise ValueError(f"start: phase {start.phase} ({names[start.phase]!r}) ran {start.position.step} steps "
                             f"there, but this run's budget gives it {max_steps[start.phase]}: not the same phase")
        if (start.best is None) != (self.best is None):
            raise ValueError("start: saved " + ("without" if start.best is None else "with")
                             + " a validation gate, but this run has " + ("one" if self.best is not None else "none"))
        self.state, self.pos, self.best = start.state, start.position, start.best
        self.history, self.trace = [dict(row) for row in start.history], [dict(row) for row in start.trace]

    def budget_left(self, max_steps) -> bool:
        """Whether the budget allows more steps than the run has taken: a finished run resumed with a
        larger budget (more epochs of its last phase) continues exactly as if it had been given it at first."""
        return self.pos.phase < len(self.phases) - 1 or self.pos.step < max_steps[self.pos.phase]

    def next_phase(self) -> bool:
        """Start the next phase from this one's parameters; False after the last."""
        if self.pos.phase + 1 >= len(self.phases):
            return False
        self.state = self.phases[self.pos.phase + 1].optimizer.init(self.state.params)
        self.pos = self.pos._replace(phase=self.pos.phase + 1, step=0, phase_seconds=0.0)
        return True

    def segment(self, steps, max_steps: int, max_seconds: float | None):
        """Steps up to the next row (or the phase's budget): ``(count, loss_sum, info, seconds)``."""
        loss_sum, count, info = jnp.zeros(()), 0, None
        self.row_start, self.first_bad = (self.state, self.history[:]), jnp.full((), -1, jnp.int32)
        start = time.perf_counter()
        out_of_time = max_seconds is not None and self.pos.phase_seconds >= max_seconds
        while self.pos.step + count < max_steps and not out_of_time:
            _, self.state, info = next(steps)
            count += 1
            loss_sum, self.first_bad = _note_step(loss_sum, self.first_bad, info, self.pos.total_steps + count)
            if max_seconds is not None:
                info.loss.block_until_ready()  # time only finished work
                out_of_time = self.pos.phase_seconds + time.perf_counter() - start >= max_seconds
                out_of_time = distributed.agree(out_of_time)  # process 0's clock decides for all
            if self.o.trace:
                self.pending.append(info)  # stays on the device until the row
            if (self.pos.total_steps + count) % self.o.eval_every == 0:
                break
        jax.block_until_ready(self.state)
        return count, loss_sum, info, distributed.agree(time.perf_counter() - start)

    def record(self, count: int, loss_sum, info, seconds: float) -> dict:
        """Advance the position by ``count`` steps and append their history row."""
        phase, pos = self.phases[self.pos.phase], self.pos
        cost = phase.optimizer.cost
        self.pos = Position(pos.phase, pos.step + count, pos.phase_seconds + seconds, pos.total_steps + count,
                            pos.evals + cost * count, pos.seconds + seconds)
        train_loss = float(loss_sum) / count
        if not math.isfinite(train_loss) or int(self.first_bad) >= 0 or not _all_finite(self.state.params):
            self._non_finite(train_loss, count, info)
        evaluate = self.o.evaluate
        row = {"phase": phase.name, "step": self.pos.total_steps, "evals": self.pos.evals,
               "seconds": self.pos.seconds, "train_loss": train_loss,
               "test_neg_elbo": None if evaluate is None else evaluate(self.params())}
        if self.best is not None:
            self.gate(row)
        row.update(logged_stats(info))
        self.history.append(row)
        if self.o.trace:
            self.trace += trace_rows(phase.name, pos.total_steps, self.pending)
            self.pending = []
        return row

    def initial_row(self) -> dict:
        """The step-0 row: the initial parameters' scores at 0 evaluations (no training loss yet)."""
        row = {"phase": self.phases[0].name, "step": 0, "evals": 0, "seconds": 0.0, "train_loss": None,
               "test_neg_elbo": None if self.o.evaluate is None else self.o.evaluate(self.params0)}
        if self.best is not None:  # the gate scored the initial parameters already
            row["val_neg_elbo"], row["best_step"] = self.best.value, 0
        self.history.append(row)
        return row

    def _non_finite(self, train_loss: float, count: int, info):
        # A non-finite incumbent (annealing flags it in info.error), a
        # diverged gradient step or a schedule fault: stop before it reaches a
        # checkpoint, and hand back the last finite row's parameters.
        last = self.saver.steps()[-1] if self.saver is not None and self.saver.steps() else None
        first_bad = int(self.first_bad)
        step = first_bad if first_bad >= 0 else None
        kept_state, kept_history = self.row_start
        where = f"{self.o.desc or 'run'}: "
        span = (f"between steps {self.pos.total_steps - count} and {self.pos.total_steps} "
                f"(phase {self.phases[self.pos.phase].name}"
                + (f", first at step {step})" if step is not None else ")"))
        tail = ("; " + (f"the last good checkpoint is step {last} in {self.saver.directory}" if last is not None
                        else "no checkpoint was written")
                + f"; the parameters of step {self.pos.total_steps - count} (the last finite row) are kept")
        faults = [(flag, value, holder) for flag, value, holder in _fault_fields(info)
                  if bool(jnp.any(getattr(holder, flag)))]
        error = NonFiniteLossError
        if faults:
            error = InvalidScheduleError
            # The first offending value (of the first flagged replica, when vmapped).
            what = ", ".join(
                f"the {value.removesuffix('_requested')} schedule returned "
                f"{float(jnp.ravel(getattr(holder, value))[jnp.argmax(jnp.ravel(getattr(holder, flag)))])!r}"
                for flag, value, holder in faults)
            message = (f"{where}{what} (a negative or non-finite value, or a fractional decision size; the optimizer halted) {span}{tail}")
        elif not math.isfinite(train_loss):
            message = f"{where}the training loss became {train_loss} {span}{tail}"
        else:
            message = (f"{where}a step was flagged (a non-finite loss or parameters, or a schedule's bad value) "
                       f"{span}{tail}")
        raise error(message, step, distributed.host_local(kept_state.params), kept_history)


def _check_options(phases, eval_every, checkpoint_every, budget_seconds) -> int:
    if not phases:
        raise ValueError("phases must not be empty")
    if not (isinstance(eval_every, int) and eval_every >= 1):
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    checkpoint_every = checkpoint_every or eval_every
    if checkpoint_every < 1 or checkpoint_every % eval_every:
        raise ValueError(f"checkpoint_every must be a positive multiple of eval_every={eval_every}, "
                         f"got {checkpoint_every}")
    if budget_seconds is not None:
        validation.positive("budget_seconds", budget_seconds)
    for phase in phases:
        validation.integer(f"epochs of phase {phase.name!r}", phase.epochs, 1, optional=True)
    return checkpoint_every


def run(
    key: jax.Array,
    phases: list[Phase],
    params,
    images,
    *,
    batch_size: int | None = None,
    eval_every: int,
    budget_evals: int | None = None,
    budget_seconds: float | None = None,
    batch_fn: data_lib.BatchFn = data_lib.BatchFn(),
    evaluate: Callable[[Any], float] | None = None,
    validate: Callable[[Any], float] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_dir=None,
    resume: bool = False,
    mesh=None,
    axis_name: str | None = None,
    progress: bool = False,
    desc: str = "",
    log: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    initial_row: bool = False,
    trace: bool = False,
    on_phase_end: Callable[[PhaseEnd], None] | None = None,
    start: PhaseEnd | None = None,
):
    """Run ``phases`` in order from ``params``; returns a :class:`RunResult` ``(params, history, trace)``.

    Args:
      key: the run's key; phase ``p`` uses ``phase.key`` or ``fold_in(key, p)``.
      phases: the run's :class:`Phase`\\ s; each starts from the previous one's params.
      params: initial parameters.
      images: the training images, a validated (N, H, W, C) array in [0, 1].
      batch_size: examples per step (the remainder of each epoch is dropped);
        None: the one a phase's optimizer was built for (a decision batch's
        selection), else 128. A phase whose optimizer needs more
        (``examples_per_step``: its decision examples) gets them; one built
        for another batch size is refused (:func:`check_batch_size`).
      eval_every: steps between history rows (a phase's end also ends a row).
      budget_evals: evaluations the run may spend; phase ``p`` gets
        ``share * budget_evals`` and stops before it would exceed that
        (shares: :func:`resolve_shares`; they never sum above 1).
        Phases with ``epochs`` are limited by those too.
      budget_seconds: optional wall-clock budget of training time (evaluation
        and checkpointing excluded), split between phases by share. Time is
        not reproducible, so a run cut by it resumes exactly only up to where
        the clock stops it. Across processes, process 0's clock decides.
      batch_fn: gathers and binarises each batch (:class:`data.BatchFn`).
      evaluate: ``evaluate(params) -> float``, the row's ``test_neg_elbo``
        (e.g. the test negative ELBO, only reported); None: not evaluated.
      validate: the validation gate, ``validate(params) -> float`` (e.g. the
        negative ELBO of a held-out split of the training data at a fixed
        evaluation key, ``data.split_validation``; never the test set). It
        scores the initial parameters and those at every row; the run then
        returns the lowest-scoring ones (keep-best), so no phase can leave
        the run worse on validation than it found it. Rows get
        ``val_neg_elbo`` and ``best_step`` (the step of the kept
        parameters, 0 for the initial ones). None: the last parameters.
      checkpoint_every: steps between checkpoints, a multiple of
        ``eval_every`` (checkpoints are taken at rows); None: every row. The
        end of the run is always saved.
      checkpoint_dir: where to save the run state; None: never. Across
        processes every process passes the same folder (Orbax writes it from
        process 0).
      resume: continue from the newest readable checkpoint in
        ``checkpoint_dir``. A finished run returns at once, unless its last
        phase is given a larger budget than it ran (e.g. more ``epochs``):
        then it continues, with the same steps as a run given that budget from the start.
      mesh, axis_name: run on a ``jax.sharding.Mesh`` (see :func:`iterate`).
      progress: show a tqdm bar of evaluations; ``desc`` labels it.
      log: called with messages (e.g. a damaged checkpoint skipped).
      on_row: called with every new history row (e.g. to print it).
      initial_row: start the history with a row at step 0: the initial
        parameters' ``test_neg_elbo`` (and the gate's ``val_neg_elbo``) at 0
        evaluations, ``train_loss`` None, no logged info fields; so curves of
        runs from the same parameters begin at the same point.
      trace: also record every step's info: one trace row per step
        (:data:`TRACE_FIELDS`, then every field of the optimizer's info, see
        :func:`info_columns`), kept on the device between rows and fetched
        at each row (:func:`trace_rows`); saved with the checkpoints, so a
        resumed run's trace equals an uninterrupted one's.
      on_phase_end: called with a :class:`PhaseEnd` as each phase's budget is spent.
      start: a :class:`PhaseEnd` of another run whose phases up to ``start.phase``
        are this run's (the same optimizers, shares, keys, data, batches and
        budgets: the caller's promise; a phase of another length, e.g. under
        ``budget_seconds``, or another gate is refused): this run continues
        from there, bitwise as if it had computed those phases itself (their
        rows keep the other run's seconds). A checkpoint to ``resume`` from
        comes first.
    Returns:
      ``RunResult(params, history, trace)``: the last parameters, or with ``validate`` the
      best-validation ones; each history row has the fields :data:`ROW_FIELDS`
      (``seconds`` and ``evals`` cumulative; ``test_neg_elbo`` is the *last*
      parameters' score), the gate's fields with ``validate``, and the
      optimizer's logged info fields (``temperature``, ``radius``,
      ``acceptance_rate`` for annealing); with ``trace``, the trace rows (else None).
    """
    checkpoint_every = _check_options(phases, eval_every, checkpoint_every, budget_seconds)
    if budget_evals is not None:
        validation.integer_number("budget_evals", budget_evals, 1)
    phases = resolve_shares([p._replace(optimizer=as_optimizer(p.optimizer)) for p in phases])
    check_batch_size(phases, batch_size)
    images = data_lib.as_images(images, "images")
    check_examples(phases, images.shape[0], batch_size)
    for phase in phases:
        models.check_loss_params(phase.optimizer.loss_fn, params, images.shape[1:], "images")
    max_steps = phase_steps(phases, images.shape[0], batch_size, budget_evals)
    r = _Run(key, phases, params, images, RunOptions(
        batch_size=batch_size, eval_every=eval_every, batch_fn=batch_fn, evaluate=evaluate, validate=validate,
        checkpoint_dir=checkpoint_dir, mesh=mesh, axis_name=axis_name, desc=desc, log=log, trace=trace))
    outputs = lambda: RunResult(r.result_params(), r.history, r.trace if trace else None)  # noqa: E731
    if resume:
        r.restore()
        if r.finished and not r.budget_left(max_steps):
            return outputs()
    if start is not None and not r.history:
        r.start_from(start, max_steps)
    if initial_row and not r.history:
        row = r.initial_row()
        if on_row is not None:
            on_row(row)
    total = sum(n * p.optimizer.cost for n, p in zip(max_steps, phases))
    with tqdm(total=total, initial=r.pos.evals, desc=desc, disable=not progress, unit="eval", leave=True) as bar:
        _loop(r, max_steps, budget_seconds, checkpoint_every, bar, on_row, on_phase_end)
    r.save(finished=True)
    return outputs()


def _loop(r: _Run, max_steps, budget_seconds, checkpoint_every: int, bar, on_row, on_phase_end=None) -> None:
    """:func:`run`'s loop: segments of steps to the next row, a row each, phases in turn, checkpoints."""
    steps = None  # one generator (one compiled step) per phase, kept across rows
    while True:
        phase = r.phases[r.pos.phase]
        max_seconds = None if budget_seconds is None else phase.share * budget_seconds
        count = 0
        if r.pos.step < max_steps[r.pos.phase]:  # not compiled for a phase already done (a run's start)
            steps = steps or r.steps(r.pos.phase)
            count, loss_sum, info, seconds = r.segment(steps, max_steps[r.pos.phase], max_seconds)
        if count == 0:  # this phase's budget is spent: the next starts from its parameters
            steps = None
            if on_phase_end is not None:
                on_phase_end(r.phase_end())
            if r.next_phase():
                continue
            return
        row = r.record(count, loss_sum, info, seconds)
        bar.update(phase.optimizer.cost * count)
        shown = ("train_loss", *getattr(type(info), "LOGGED", ()))  # what the optimizer's info logs
        bar.set_postfix({k: f"{row[k]:.3g}" for k in shown if k in row})
        if on_row is not None:
            on_row(row)
        if r.pos.total_steps % checkpoint_every == 0:
            r.save(finished=False)
