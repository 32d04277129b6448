"""``fit``: train for some epochs with any optimizer, Optax or annealing.

A thin wrapper of ``driver.run`` (one phase, an epoch budget, one history
row per epoch): gradient methods and simulated annealing therefore share the
data order, the keys, the loss, the evaluation and the one compiled loop.
"""

from __future__ import annotations

from typing import Callable

import jax

from savae_jax import data as data_lib
from savae_jax import driver, evaluation, models
from savae_jax import validation as checks  # not `validation`: fit has an argument of that name
from savae_jax.optimizer import as_optimizer


def _images(data, name: str):
    return data_lib.as_images(data, name)


def check_params_fit(loss_fn, params, images, name: str) -> None:
    """Refuse ``params`` that do not fit ``images`` (ValueError naming both), when ``loss_fn`` says its model.

    ``make_loss(model)`` carries ``loss_fn.model``; the parameters are then
    compared with the model's for these images once, before training, instead
    of failing inside the first compiled step (or, for a test set of another
    shape, after an epoch). A loss without ``.model`` is not checked.
    """
    models.check_loss_params(loss_fn, params, images.shape[1:], name)


def fit(
    key: jax.Array,
    params,
    loss_fn,
    optimizer,
    train,
    epochs: int,
    batch_size: int | None = None,
    test=None,
    *,
    validation=None,
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

    To refine a gradient optimum by annealing (x0 = x*) in one resumable
    run, use ``driver.run`` with ``driver.refinement(...)`` phases.

    Args:
      key: PRNG key; epoch ``e`` uses ``fold_in(key, e)`` (see
        ``driver.epoch_plan``), so a run is a pure function of ``key``.
      params: initial parameters (e.g. ``models.init(...)``).
      loss_fn: ``loss_fn(params, key, x) -> scalar`` (``make_loss(model)``).
      optimizer: an ``optax.GradientTransformation`` or an ``Optimizer``
        (e.g. ``annealing.simulated_annealing(loss_fn, ...)``, which must be
        built on this ``loss_fn``: another one is refused).
      train: a ``data.Dataset`` or an (N, H, W, C) array in [0, 1].
      epochs: number of passes over ``train`` (>= 1).
      batch_size: examples per step; the last partial batch is dropped.
        None: the one the optimizer was built for (an annealer with a
        decision batch: its selection), else 128; another one than the
        optimizer's is refused, naming both.
      test: optional held-out ``Dataset``/array; its mean loss over every
        example at ``eval_key`` is recorded after each epoch.
      validation: optional held-out split of the *training* data
        (``data.split_validation``), scored like ``test`` after each epoch
        (``val_neg_elbo``); ``fit`` then returns the parameters of the best
        epoch (or the initial ones if no epoch beats them) instead of the
        last (``driver.run``'s validation gate).
      binarize: None, "dynamic" or "static" (see ``data.make_batch``), or a
        ``data.BatchFn``; the test set is binarised the same way at the fixed
        evaluation key.
      static_seed: seed of the "static" binarisation.
      eval_key: evaluation key; default ``jax.random.key(evaluation.EVAL_SEED)``.
      eval_batch_size: chunk size of the test evaluation.
      eval_loss_fn: what the test evaluation averages (default ``loss_fn``);
        pass ``make_loss(model)`` to score the true ELBO when training a
        beta-VAE or with free bits.
      progress: show a tqdm bar of evaluations with the running loss.
      log: called with one line of text per epoch (e.g. ``print``).
      mesh: a ``jax.sharding.Mesh`` to train on (``driver.iterate``'s
        ``mesh``): Optax steps run data parallel; an annealer shards its
        proposals only if it was built with ``mesh=`` (docs/distributed.md).
    Returns:
      ``(params, history)``: final (with ``validation``: best-validation)
      parameters and one ``driver.run`` history
      row per epoch, plus its ``epoch`` (1, 2, ...); ``seconds`` is the
      cumulative training time (evaluation excluded).
    Raises:
      ValueError: a bad argument, named (images not in [0, 1], ``params``
        that do not fit them, a non-integer ``batch_size``, ...).
      driver.NonFiniteLossError: the training loss (or the parameters) became
        non-finite; the message names the first such step, and the error
        carries the last finite epoch's ``params`` and ``history``.
        ``driver.InvalidScheduleError`` (a subclass) when an annealer's
        temperature or radius schedule returned a negative or non-finite value.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if batch_size is not None:
        checks.integer_number("batch_size", batch_size, 1)
    checks.integer_number("eval_batch_size", eval_batch_size, 1)
    batch_fn = data_lib.as_batch_fn(binarize, static_seed)
    images = _images(train, "train")
    check_params_fit(loss_fn, params, images, "train")
    eval_loss = eval_loss_fn or loss_fn

    def scorer(data, name):
        if data is None:
            return None
        held_out = _images(data, name)
        check_params_fit(eval_loss, params, held_out, name)
        return lambda p: evaluation.evaluate(eval_loss, p, held_out, eval_key, eval_batch_size, batch_fn)

    evaluate, validate = scorer(test, "test"), scorer(validation, "validation")
    phase = driver.Phase("fit", as_optimizer(optimizer, loss_fn), epochs=epochs, key=key)
    # An annealer with a decision batch takes more examples per step: fewer steps per epoch.
    steps_per_epoch = data_lib.num_batches(images.shape[0], driver.phase_batch_size(phase, batch_size))
    result = driver.run(key, [phase], params, images, batch_size=batch_size, eval_every=steps_per_epoch,
                        batch_fn=batch_fn, evaluate=evaluate, validate=validate, mesh=mesh, progress=progress,
                        on_row=epoch_rows([phase], images.shape[0], batch_size, log))
    return result.params, result.history


def epoch_rows(phases, num_examples: int, batch_size: int, log: Callable[[str], None] | None = None):
    """An ``on_row`` for ``driver.run`` over epoch-budgeted ``phases``: adds the row's ``epoch``, logs it.

    ``epoch`` counts the epochs completed by the row's step, over all phases
    so far: each phase's steps per epoch follow from its own examples per
    step (``driver.phase_batch_size``), so a phase with a decision batch
    counts its epochs right. A stateless function of the row's step, so
    rows after a resume are labelled alike.
    """
    bounds, start, epochs_before = [], 0, 0
    for phase, steps in zip(phases, driver.phase_steps(phases, num_examples, batch_size)):
        per_epoch = data_lib.num_batches(num_examples, driver.phase_batch_size(phase, batch_size))
        bounds.append((start + steps, start, per_epoch, epochs_before))
        start, epochs_before = start + steps, epochs_before + phase.epochs

    def on_row(row: dict) -> None:
        end, start, per_epoch, before = next(b for b in bounds if row["step"] <= b[0])
        row["epoch"] = before + (row["step"] - start) // per_epoch
        if log is not None:
            log(format_row(row))

    return on_row


def format_row(row: dict) -> str:
    """One human-readable log line for a history row."""
    parts = [f"epoch {row['epoch']}" if "epoch" in row else f"step {row['step']}", str(row["phase"]),
             f"train_loss {row['train_loss']:.3f}"]
    if row.get("test_neg_elbo") is not None:
        parts.append(f"test_neg_elbo {row['test_neg_elbo']:.3f}")
    parts.append(f"{row['seconds']:.2f}s")
    parts += [f"{k} {v:.4g}" for k, v in row.items() if k not in driver.ROW_FIELDS + ("epoch",)]
    return "  ".join(parts)
