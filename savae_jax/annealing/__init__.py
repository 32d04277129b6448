"""Simulated annealing for any parameter pytree (blackjax-style, optax-style schedules).

    sa = simulated_annealing(loss_fn, num_proposals=256,
                             proposal=low_rank(scale=1e-3, rank=1),
                             temperature=exponential(t0=1.0, decay=0.999),
                             acceptance=metropolis())
    state = sa.init(params)
    state, info = jax.jit(sa.step)(key, state, batch)

``sa`` is a ``savae_jax.optimizer.Optimizer``; ``sa.cost`` is its loss
evaluations per step (K + 1, plus the proposal's own ``cost``).
"""

from savae_jax.annealing import bounds
from savae_jax.annealing.acceptance import (
    Acceptance,
    confident,
    greedy,
    metropolis,
    needs_stderr,
    penalty,
    threshold,
)
from savae_jax.annealing.bounds import Bounds
from savae_jax.annealing.decision import DecisionBatch, Paired, decision_batch
from savae_jax.annealing.es import ESInfo, ESState, evolution_strategy
from savae_jax.annealing.kernel import (
    AnnealInfo,
    AnnealState,
    ScheduleState,
    build_kernel,
    init,
    simulated_annealing,
)
from savae_jax.annealing.optax import as_optax
from savae_jax.annealing.polish import PolishState, local_polish, polish
from savae_jax.annealing.lattice import lattice, lattice_es, lattice_low_rank
from savae_jax.annealing.proposals import Prepared, Proposal, cauchy, gaussian, langevin, low_rank
from savae_jax.annealing.tempering import (
    ReplicaInfo,
    ReplicaState,
    exchange,
    geometric_ladder,
    replica_exchange,
)
from savae_jax.annealing.schedules import (
    AdaptiveState,
    ReheatState,
    Schedule,
    ScheduleEvent,
    StatefulSchedule,
    adaptive,
    as_stateful,
    constant,
    exponential,
    fast,
    linear,
    logarithmic,
    reheat,
)

__all__ = [
    "Bounds",
    "bounds",
    "PolishState",
    "local_polish",
    "polish",
    "ESInfo",
    "ESState",
    "evolution_strategy",
    "ReplicaInfo",
    "ReplicaState",
    "exchange",
    "geometric_ladder",
    "replica_exchange",
    "Acceptance",
    "AdaptiveState",
    "AnnealInfo",
    "AnnealState",
    "DecisionBatch",
    "Paired",
    "Prepared",
    "Proposal",
    "ReheatState",
    "Schedule",
    "ScheduleEvent",
    "ScheduleState",
    "StatefulSchedule",
    "adaptive",
    "as_optax",
    "as_stateful",
    "build_kernel",
    "cauchy",
    "confident",
    "decision_batch",
    "constant",
    "exponential",
    "fast",
    "gaussian",
    "greedy",
    "init",
    "langevin",
    "linear",
    "logarithmic",
    "lattice",
    "lattice_es",
    "lattice_low_rank",
    "low_rank",
    "metropolis",
    "needs_stderr",
    "penalty",
    "reheat",
    "simulated_annealing",
    "threshold",
]
