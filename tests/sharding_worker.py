"""The 8-device half of tests/test_sharding.py: every mesh run against the same-key one-device run.

Run by the test as ``python -m sharding_worker PART`` (cwd tests/) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set
before JAX starts; prints one line ``RESULT {json}`` of comparisons. PART ``core`` (the default
run's) compares annealing (two proposals, and a device count that does not divide the members);
``extended`` (the slow tier's) ES, data-parallel Adam, ``fit`` with a sharded annealer, the
noise-aware rules, the lattice optimizers, replica exchange, dual annealing's chains and a tuning
group.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import savae_jax as sv
from savae_jax import annealing as A
from savae_jax import distributed
from savae_jax.experiments import dual_annealing as D
from savae_jax.experiments import problems, registry, tuning


def main(part: str):
    assert part in ("core", "extended"), part
    assert jax.device_count() == 8, jax.devices()
    train = sv.load("digits", "train")
    model = sv.MLPVAE(hidden=32, latents=4)
    params = sv.models.init(jax.random.key(0), model, train.images[:1])
    loss_fn = sv.make_loss(model)
    x = jnp.asarray(train.images[:64])
    mesh8 = distributed.make_mesh()

    def leaves(tree):
        return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]

    def compare(a, b):
        la, lb = leaves(a), leaves(b)
        return {"bitwise": all(np.array_equal(u, v) for u, v in zip(la, lb)),
                "max_abs": max(float(np.max(np.abs(u.astype(float) - v.astype(float))))
                               for u, v in zip(la, lb))}

    def run_steps(algorithm, steps, start=None):
        """``steps`` jitted steps of ``algorithm`` from ``start`` (default ``params``) on ``x``, key i at step i:
        (state, infos)."""
        state, step, infos = algorithm.init(params if start is None else start), jax.jit(algorithm.step), []
        for i in range(steps):
            state, info = step(jax.random.key(i), state, x)
            infos.append(info)
        return state, infos

    def anneal(proposal, k, mesh, steps=3, t0=1.0, acceptance=A.metropolis(), decision=None):
        sa = A.simulated_annealing(loss_fn, k, proposal, A.exponential(t0, 0.9), acceptance,
                                   mesh=mesh, decision=decision)
        assert sa.examples_per_step in (None, x.shape[0]), sa.examples_per_step
        return run_steps(sa, steps)

    out, single = {}, {}
    if part == "core":
        core(out, single, anneal, run_steps, compare, params, loss_fn, train, mesh8)
    else:
        extended(out, anneal, run_steps, compare, params, loss_fn, train, mesh8)
    print("RESULT " + json.dumps(out))


def core(out, single, anneal, run_steps, compare, params, loss_fn, train, mesh8):
    proposals = {"low_rank": A.low_rank(0.05, rank=2), "gaussian": A.gaussian(0.05)}
    # K + 1 = 8 (one member per device) and 11 (padded to 16; 11 on 3 devices below: padded to 12).
    for name, k in [("low_rank", 7), ("gaussian", 10)]:
        proposal = proposals[name]
        a, ia = single[name, k] = anneal(proposal, k, None)
        b, ib = anneal(proposal, k, mesh8)
        out[f"sa/{name}/{k}"] = {
            "params": compare(a.params, b.params),
            "best_params": compare(a.best_params, b.best_params),
            "loss": compare([i.loss for i in ia], [i.loss for i in ib]),
            "accepted": [bool(i.accepted) for i in ia] == [bool(i.accepted) for i in ib],
            "num_nonfinite": [int(i.num_nonfinite) for i in ib],
            "proposal_loss_mean": compare([i.proposal_loss_mean for i in ia],
                                          [i.proposal_loss_mean for i in ib]),
            "num_accepted": int(a.num_accepted),
        }
    # Three devices: 11 members padded to 12.
    a, _ = single["gaussian", 10]
    b, _ = anneal(proposals["gaussian"], 10, distributed.make_mesh(3))
    out["sa/gaussian/10/mesh3"] = {"params": compare(a.params, b.params)}


def extended(out, anneal, run_steps, compare, params, loss_fn, train, mesh8):
    # ES recombination: its 2 x 5 = 10 members sharded over 8 devices (padded to 16); the gradient
    # assembly and the confident decision on the other 32 examples run replicated.
    def run_es(mesh, steps=6):
        es = A.evolution_strategy(loss_fn, 5, 0.05, optimizer=optax.adam(3e-3), acceptance=A.confident(0.05),
                                  decision=A.decision_batch(32, 32), mesh=mesh)
        return run_steps(es, steps)

    a, ia = run_es(None)
    b, ib = run_es(mesh8)
    out["es"] = {"params": compare(a.params, b.params),
                 "accepted": [[bool(i.accepted) for i in infos] for infos in (ia, ib)],
                 "grad_norm": compare([i.grad_norm for i in ia], [i.grad_norm for i in ib]),
                 "member_loss_mean": compare([i.member_loss_mean for i in ia], [i.member_loss_mean for i in ib]),
                 "delta": compare([i.delta for i in ia], [i.delta for i in ib])}

    # Optax, data parallel: one epoch of Adam (23 steps of 64 examples).
    a, ha = sv.fit(jax.random.key(1), params, loss_fn, optax.adam(3e-3), train, 1, 64,
                   binarize="dynamic")
    b, hb = sv.fit(jax.random.key(1), params, loss_fn, optax.adam(3e-3), train, 1, 64,
                   binarize="dynamic", mesh=mesh8)
    out["optax"] = {"params": compare(a, b), "train_loss": [ha[0]["train_loss"], hb[0]["train_loss"]],
                    "replicated": all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(b))}

    # fit(mesh=...) with an annealer built on that mesh: proposals sharded, the batch replicated.
    def sa_on(mesh):
        return A.simulated_annealing(loss_fn, 10, A.low_rank(0.05), A.exponential(1.0, 0.99), A.metropolis(),
                                     mesh=mesh)
    a, ha = sv.fit(jax.random.key(2), params, loss_fn, sa_on(None), train, 1, 64, binarize="dynamic")
    b, hb = sv.fit(jax.random.key(2), params, loss_fn, sa_on(mesh8), train, 1, 64, binarize="dynamic",
                   mesh=mesh8)
    out["fit_sa"] = {"params": compare(a, b), "train_loss": [ha[0]["train_loss"], hb[0]["train_loss"]]}

    # The noise-aware step: select on the first 32 examples of x, decide on the other 32 with
    # fresh noise (the paired differences computed outside the sharded member evaluation).
    # penalty: stochastic, at T0 = 0.3 (at 1.0 it accepted all 6 steps); confident: deterministic,
    # with a growing decision size (24, 28, then 32 = all: the mask path).
    noise_aware = {
        "penalty": (A.low_rank(0.05, rank=2), 0.3, A.penalty(), A.decision_batch(32, 32)),
        "confident": (A.gaussian(0.05), 1.0, A.confident(0.05),
                      A.decision_batch(32, lambda count: 24 + 4 * count, max_size=32)),
    }
    for rule, (proposal, t0, acceptance, decision) in noise_aware.items():
        a, ia = anneal(proposal, 7, None, 6, t0, acceptance, decision)
        b, ib = anneal(proposal, 7, mesh8, 6, t0, acceptance, decision)
        field = lambda infos, name: [getattr(i, name) for i in infos]
        out[f"noise_aware/{rule}"] = {
            "params": compare(a.params, b.params),
            "best_params": compare(a.best_params, b.best_params),
            "accepted": [[bool(v) for v in field(i, "accepted")] for i in (ia, ib)],
            "decision_size": [[int(v) for v in field(i, "decision_size")] for i in (ia, ib)],
            **{name: compare(field(ia, name), field(ib, name))
               for name in ("loss", "delta", "stderr", "delta_selection", "stderr_selection")},
        }

    # Lattice moves of a 3-bit model (issue 25): K = 7 proposals each moving about 4 codes, one member per
    # device, greedy on the step's batch.
    from savae_jax import quantize

    q = quantize.quantize(params, 3)
    lattice = [A.simulated_annealing(loss_fn, 7, A.lattice(4 / q.num_codes), A.exponential(0.1, 0.9), A.greedy(),
                                     mesh=mesh) for mesh in (None, mesh8)]
    (a, ia), (b, ib) = (run_steps(sa, 4, q) for sa in lattice)
    out["lattice"] = {"codes": compare(a.params.codes, b.params.codes),
                      "accepted": [[bool(i.accepted) for i in infos] for infos in (ia, ib)],
                      "valid": bool(quantize.codes_in_range(b.params)),
                      "loss": compare([i.loss for i in ia], [i.loss for i in ib])}

    # ES on the lattice (issue 25): 2 x 5 = 10 members of the 3-bit model sharded over 8 devices (padded
    # to 16); the rounded step and the decision on the other 32 examples run replicated.
    lattice_es = [A.lattice_es(loss_fn, 5, 8 / q.num_codes, decision=A.decision_batch(32, 32), mesh=mesh)
                  for mesh in (None, mesh8)]
    (a, ia), (b, ib) = (run_steps(es, 4, q) for es in lattice_es)
    out["lattice_es"] = {"codes": compare(a.params.codes, b.params.codes),
                         "accepted": [[bool(i.accepted) for i in infos] for infos in (ia, ib)],
                         "valid": bool(quantize.codes_in_range(b.params)),
                         "member_loss_mean": compare([i.member_loss_mean for i in ia], [i.member_loss_mean for i in ib])}

    # Replica exchange: 8 replicas of a K = 3 annealer, one per device, swapping every step.
    def run_pt(mesh, steps=6):
        pt = A.replica_exchange(lambda t: A.simulated_annealing(loss_fn, 3, A.low_rank(0.05), t, A.metropolis()),
                                A.geometric_ladder(0.5, 1.3, 8), loss_fn, mesh=mesh)
        return run_steps(pt, steps)

    a, ia = run_pt(None)
    b, ib = run_pt(mesh8)
    out["replica_exchange"] = {
        "params": compare(a.replicas.params, b.replicas.params),
        "swapped": [[np.asarray(i.swapped).tolist() for i in infos] for infos in (ia, ib)],
        "accepted": [[np.asarray(i.replicas.accepted).tolist() for i in infos] for infos in (ia, ib)],
        "losses": compare([i.losses for i in ia], [i.losses for i in ib])}
    # savae dual-annealing: 16 vmapped chains sharded over the 8 devices.
    args = (problems.PROBLEMS["rastrigin"], 16, 30, 7, 10, 0)
    a, _, _ = D.run_sa(*args)
    b, _, _ = D.run_sa(*args, mesh=mesh8)
    out["dual_annealing"] = {"best": compare(a, b), "values": a.tolist()}
    # savae tune: a trial group (Adam at 3 learning rates) sharded over the devices. 3 trials on one device
    # (one vmap of 3), on 3 devices (one trial each) and on 8 (padded with 5 copies, one trial each).
    tune_train, tune_val = sv.data.split_validation(train, 0.1)
    tune_model = sv.MLPVAE(hidden=16, latents=3)
    work = tuning.Workload(model=tune_model, loss_fn=sv.make_loss(tune_model), train=jnp.asarray(tune_train.images),
                           val=jnp.asarray(tune_val.images), budget_evals=240, batch_size=100, eval_every=10,
                           batch_fn=sv.data.BatchFn("dynamic"), key=jax.random.key(1))
    tune_params = sv.models.init(jax.random.key(0), tune_model, train.images[:1])
    settings = [registry.check_method_settings("adam", {"lr": lr}) for lr in (3e-3, 1e-3, 3e-4)]
    groups = {name: tuning.run_group("adam", settings, work, tune_params, mesh)
              for name, mesh in (("one", None), ("mesh3", distributed.make_mesh(3)), ("mesh8", mesh8))}
    untimed = {name: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
               for name, (rows, _) in groups.items()}
    out["tune"] = {"rows": untimed, "mesh8_vs_one": compare(groups["mesh8"][1], groups["one"][1]),
                   "mesh8_vs_mesh3": compare(groups["mesh8"][1], groups["mesh3"][1]),
                   "kept_shape": list(jax.tree.leaves(groups["mesh8"][1])[0].shape)}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "core")
