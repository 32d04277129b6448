"""Why the lattice methods recover little (docs/quantization.md): traces of lattice SA, lattice ES and
STE-Adam from seed 0's RTN model (MNIST, 4 bits, the settings seed 0's 15000-evaluation trials chose),
3000 evaluations each. Usage: python docs/quantize_traces.py /path/to/mnist-idx [out.json]
(about 4 minutes on 2 CPU cores: x* is `savae quantize`'s seed 0, bit for bit)."""
import dataclasses, json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import savae_jax as sv
from savae_jax import annealing as A, quantize, driver
from savae_jax.experiments import quantized as Q

config = Q.QuantizeConfig(dataset="mnist", data_dir=sys.argv[1], bits=4, hidden=500, latents=20)
model = sv.MLPVAE(hidden=500, latents=20)
train = sv.load("mnist", "train", config.data_dir); test = sv.load("mnist", "test", config.data_dir)
train, val = sv.data.split_validation(train, config.validation)
train, val, test = (jnp.asarray(d.images) for d in (train, val, test))
seed = 0
key_init, key_pre, key_run = jax.random.split(jax.random.key(seed), 3)
setup = Q.Setup(loss=sv.make_loss(model), train=train, val=val, test=test, config=config, key=key_run)
params = sv.models.init(key_init, model, train[:1])
t = time.time()
x_star, _, _ = dataclasses.replace(setup, key=key_pre).run(sv.from_optax(setup.loss, optax.adam(1e-3)), params,
                                                          config.pretrain_evals, lambda p: setup.score(p, val), "adam")
q0 = quantize.quantize(x_star, 4, clip="mse")
print(f"x* test {setup.score(x_star, test):.3f}, RTN {setup.score(q0, test):.3f} ({time.time()-t:.0f} s)", flush=True)
setup = dataclasses.replace(setup, start=x_star)
BUDGET = 3000

def traced(name, optimizer, start):
    r = driver.run(setup.key, [driver.Phase(name, optimizer)], start, setup.train, batch_size=config.batch_size,
                   budget_evals=BUDGET, eval_every=config.eval_every, batch_fn=setup.batch_fn, trace=True)
    return r



def codes_changed(q):
    """How many integer codes of ``q`` differ from RTN's (biases, float leaves, not counted)."""
    return sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(q.codes), jax.tree.leaves(q0.codes))
               if a.dtype.kind == "i")


out = {}
sa = A.simulated_annealing(setup.loss, 16, A.lattice(Q._fraction(q0, 17.8)), A.exponential(1.0, 0.99),
                           A.confident(0.0509), decision=Q._decision(setup))
es = A.lattice_es(setup.loss, 8, Q._fraction(q0, 98.0), 0.607, acceptance=A.confident(0.0557),
                  temperature=A.exponential(1.0, 0.99), decision=Q._decision(setup))
for name, opt in (("lattice-sa", sa), ("lattice-es", es)):
    t = time.time()
    r = traced(name, opt, q0)
    rows = r.trace
    keys = sorted(rows[0])
    acc = np.array([bool(row.get("accepted", False)) for row in rows])
    moved = codes_changed(r.params)
    summ = {"steps": len(rows), "keys": keys, "acceptance": float(acc.mean()), "codes_changed": moved,
            "test": setup.score(r.params, test), "seconds": time.time() - t}
    for k in ("delta", "stderr", "loss", "proposal_loss_min", "proposal_loss_mean", "decision_delta", "threshold",
              "member_loss_mean", "step_codes", "num_moved"):
        if k in rows[0]:
            v = np.array([float(row[k]) for row in rows])
            summ[k] = {"first10": v[:10].round(4).tolist(), "mean": float(v.mean()),
                       "mean_accepted": float(v[acc].mean()) if acc.any() else None,
                       "mean_rejected": float(v[~acc].mean()) if (~acc).any() else None}
    out[name] = summ
    print(name, json.dumps(summ, indent=1), flush=True)
t = time.time()
ste = sv.from_optax(quantize.straight_through(setup.loss, q0), optax.adam(3.67e-5))
r = traced("ste-adam", ste, quantize.dequantize(q0))
kept = quantize.requantize(r.params, q0)
moved = codes_changed(kept)
v = np.array([float(row["loss"]) for row in r.trace]) if "loss" in r.trace[0] else None
out["ste-adam"] = {"steps": len(r.trace), "keys": sorted(r.trace[0]), "codes_changed": moved,
                   "test": setup.score(kept, test), "seconds": time.time() - t,
                   "loss_first10": None if v is None else v[:10].round(3).tolist(),
                   "loss_last10_mean": None if v is None else float(v[-10:].mean())}
print("ste-adam", json.dumps(out["ste-adam"], indent=1), flush=True)
if len(sys.argv) > 2:
    json.dump(out, open(sys.argv[2], "w"), indent=1)
