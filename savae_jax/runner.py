"""Budgeted, checkpointed runs: one method, possibly in phases, to a fixed cost.

A *method* is a list of ``Phase``s (``sa-refine`` is Adam then annealing).
``run_method`` drives each phase with ``training.iterate`` until its budget
of loss evaluations is spent, records a history row every ``eval_every``
steps, and saves the whole run state at each row, so a run killed at any
point resumes exactly (``resume=True``).

Cost is counted in *evaluations*: one forward pass of the loss on one batch.
A gradient step costs ``GRAD_COST`` evaluations (forward plus a backward pass
of about twice the forward's work); an annealing step with K proposals costs
K + 1 (the proposals and the incumbent).
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from savae_jax import checkpoint, distributed, evaluation, training

GRAD_COST = 3


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped before saving it."""


class Phase(NamedTuple):
    """One stage of a method.

    Attributes:
      name: label in the history (e.g. "adam", "sa").
      algorithm: a ``training.Algorithm``.
      cost: evaluations per step (see the module docstring).
      share: fraction of the method's budgets (evaluations and seconds) this
        phase may spend; the shares of a method sum to 1.
    """

    name: str
    algorithm: training.Algorithm
    cost: int
    share: float = 1.0


class Position(NamedTuple):
    """Where a run is: phase index, steps and seconds in that phase, totals so far."""

    phase: int = 0
    step: int = 0
    phase_seconds: float = 0.0
    total_steps: int = 0
    evals: int = 0
    seconds: float = 0.0


def run_method(
    key: jax.Array,
    phases: list[Phase],
    params,
    images,
    test_images,
    loss_fn,
    *,
    batch_size: int,
    binarize: str | None,
    eval_every: int,
    budget_evals: int,
    checkpoint_every: int | None = None,
    budget_seconds: float | None = None,
    checkpoint_dir=None,
    resume: bool = False,
    eval_key: jax.Array | None = None,
    progress: bool = False,
    desc: str = "",
    log: Callable[[str], None] | None = None,
):
    """Run ``phases`` in order from ``params``; returns ``(params, history)``.

    Args:
      key: the method's key; phase ``p`` uses ``fold_in(key, p)``.
      phases: the method's phases (their budgets are in evaluations).
      params: initial parameters (shared by every method of a comparison).
      images, test_images: validated (N, H, W, C) arrays in [0, 1].
      loss_fn: the shared ``loss_fn(params, key, x)``; also the evaluation.
      batch_size, binarize: as in ``training.iterate``.
      eval_every: steps between history rows.
      checkpoint_every: steps between checkpoints, a multiple of
        ``eval_every`` (checkpoints are taken at rows); None: every row. The
        end of the method is always saved.
      budget_evals: evaluations the method may spend; phase ``p`` gets
        ``share * budget_evals`` and stops before it would exceed that.
      budget_seconds: optional wall-clock budget of training time (evaluation
        and checkpointing excluded), split between phases by share too.
        Time is not reproducible, so a run cut by it resumes exactly only
        up to where the clock stops it. Across processes, process 0's clock
        decides for all (they must take the same steps).
      checkpoint_dir: where to save the run state at every row; None: never.
        Across processes every process passes the same folder (a shared
        file system); Orbax writes it from process 0.
      resume: continue from the newest readable checkpoint in
        ``checkpoint_dir`` (a finished method returns at once).
      eval_key: key of the test evaluation (default: the fixed evaluation key).
      progress: show a tqdm bar; ``desc`` labels it.
      log: called with messages (e.g. a damaged checkpoint skipped).
    Returns:
      ``(params, history)``; each history row has ``phase``, ``step``,
      ``evals``, ``seconds``, ``train_loss``, ``test_neg_elbo`` and the
      algorithm's stats (temperature, radius, acceptance rate for annealing).
    """
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    checkpoint_every = checkpoint_every or eval_every
    if checkpoint_every < 1 or checkpoint_every % eval_every:
        raise ValueError(f"checkpoint_every must be a positive multiple of eval_every={eval_every}, "
                         f"got {checkpoint_every}")
    saver = None if checkpoint_dir is None else checkpoint.RunCheckpointer(checkpoint_dir)
    # Across processes (jax.distributed) the state is made of global arrays:
    # every process evaluates, saves and returns host copies; checkpoint_dir
    # must be one folder that every process sees (Orbax writes it from process 0).
    local = distributed.host_local
    pos, history = Position(), []
    state = phases[0].algorithm.init(params)
    if resume and saver is not None:
        # The state's structure depends on the phase that was saved: rebuild
        # a template from the initial parameters (same shapes) for it.
        restored = saver.restore(lambda meta: phases[meta["position"]["phase"]].algorithm.init(params), log)
        if restored is not None:
            _, state, meta = restored
            pos, history = Position(**meta["position"]), meta["history"]
            if meta["finished"]:
                return local(phases[pos.phase].algorithm.params(state)), history

    def save(finished: bool):
        if saver is not None:
            saver.save(pos.total_steps, local(state), {"position": pos._asdict(), "history": history,
                                                "finished": finished})

    bar = tqdm(total=budget_evals, initial=pos.evals, desc=desc, disable=not progress,
               unit="eval", leave=True)
    steps = None  # one generator (one compiled step) per phase, kept across rows
    while pos.phase < len(phases):
        phase = phases[pos.phase]
        max_steps = int(phase.share * budget_evals) // phase.cost
        max_seconds = None if budget_seconds is None else phase.share * budget_seconds
        if steps is None:
            steps = training.iterate(jax.random.fold_in(key, pos.phase), phase.algorithm, state,
                                     images, batch_size, binarize=binarize, start_step=pos.step)
        loss_sum, count, stats = jnp.zeros(()), 0, {}
        start = time.perf_counter()
        out_of_time = max_seconds is not None and pos.phase_seconds >= max_seconds
        while pos.step + count < max_steps and not out_of_time:
            _, state, loss, stats = next(steps)
            loss_sum, count = loss_sum + loss, count + 1
            if max_seconds is not None:
                loss.block_until_ready()  # time only finished work
                out_of_time = pos.phase_seconds + time.perf_counter() - start >= max_seconds
                out_of_time = distributed.agree(out_of_time)  # process 0's clock decides for all
            if (pos.total_steps + count) % eval_every == 0:
                break
        if count == 0:  # this phase's budget is spent: next phase from its parameters
            if pos.phase + 1 < len(phases):
                state = phases[pos.phase + 1].algorithm.init(phase.algorithm.params(state))
                pos = pos._replace(phase=pos.phase + 1, step=0, phase_seconds=0.0)
                steps = None
                continue
            break
        jax.block_until_ready(state)
        seconds = distributed.agree(time.perf_counter() - start)  # one clock (process 0's) for all
        pos = Position(pos.phase, pos.step + count, pos.phase_seconds + seconds,
                       pos.total_steps + count, pos.evals + phase.cost * count, pos.seconds + seconds)
        train_loss = float(loss_sum) / count
        if not math.isfinite(train_loss):
            # A non-finite incumbent (annealing flags it in info.error) or a
            # diverged gradient step: stop before it reaches a checkpoint.
            last = saver.steps()[-1] if saver is not None and saver.steps() else None
            raise NonFiniteLossError(
                f"{desc or 'run'}: the training loss became {train_loss} between steps "
                f"{pos.total_steps - count} and {pos.total_steps} (phase {phase.name}); "
                + (f"the last good checkpoint is step {last} in {saver.directory}" if last is not None
                   else "no checkpoint was written"))
        row = {"phase": phase.name, "step": pos.total_steps, "evals": pos.evals,
               "seconds": pos.seconds, "train_loss": train_loss,
               "test_neg_elbo": evaluation.evaluate(loss_fn, local(phase.algorithm.params(state)),
                                                    test_images, eval_key, binarize=binarize)}
        row.update({name: float(value) for name, value in stats.items()})
        history.append(row)
        bar.update(phase.cost * count)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("train_loss", "temperature", "acceptance_rate")
                         if k in row})
        if pos.total_steps % checkpoint_every == 0:
            save(finished=False)
    bar.close()
    save(finished=True)
    return local(phases[pos.phase].algorithm.params(state)), history
