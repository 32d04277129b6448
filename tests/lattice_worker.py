"""A lattice run for tests/test_quantize.py's SIGKILL test: lattice annealing, then lattice ES.

Run as ``python lattice_worker.py DIR [--resume]`` (cwd tests/): ``driver.run`` of :func:`phases`
from :func:`start` on the digits, checkpointing to DIR/checkpoints at every row (every step),
and at the end writes DIR/final.npz (every leaf of the last codes, scales and biases) and
DIR/history.json. The test kills it with SIGKILL while it runs and starts it again with
``--resume``; an uninterrupted launch of the same worker in another folder is the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

import savae_jax as sv
from savae_jax import annealing as A
from savae_jax import driver
from savae_jax import quantize as Q

# The budget: 60 annealing steps' evaluations, split equally between the phases: 30 annealing
# steps (9 evaluations each), then 22 lattice ES steps (12 each: 8 members and the decision batch).
STEPS = 60


def start():
    """``(loss, quantized params at 3 bits, training images)``: the tiny digits VAE, rounded."""
    model = sv.MLPVAE(hidden=16, latents=3)
    train = sv.load("digits", "train")
    q = Q.quantize(sv.models.init(jax.random.key(0), model, train.images[:1]), 3)
    return sv.make_loss(model), q, train.images


def phases(loss, q):
    """Lattice annealing (sparse moves, greedy) for half the steps, then lattice ES (confident rule on
    a decision batch of 100 other examples) for the other half."""
    codes = q.num_codes
    sa = A.simulated_annealing(loss, 8, A.lattice(4 / codes), A.exponential(0.1, 0.99), A.greedy())
    es = A.lattice_es(loss, 4, 8 / codes, acceptance=A.confident(0.2), decision=A.decision_batch(100, 100))
    return [driver.Phase("lattice-sa", sa), driver.Phase("lattice-es", es)], sa.cost * STEPS


def run(checkpoint_dir, resume: bool):
    """The run, to its end: a ``driver.RunResult``."""
    loss, q, images = start()
    run_phases, budget = phases(loss, q)
    return driver.run(jax.random.key(3), run_phases, q, images, batch_size=100, budget_evals=budget, eval_every=1,
                      checkpoint_every=1, checkpoint_dir=checkpoint_dir, resume=resume)


def leaves(params):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(out / "checkpoints", "--resume" in sys.argv[2:])
    np.savez(out / "final.npz", *leaves(result.params))
    (out / "history.json").write_text(json.dumps(
        [{k: r[k] for k in ("step", "evals", "train_loss", "acceptance_rate")} for r in result.history]))
