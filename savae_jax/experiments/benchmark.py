"""Speed benchmarks: SA step vs the inference roofline, vs evosax, fit overhead, scaling.

Everything is measured side by side in ONE process (shared machines are
noisy: absolute times mean little, ratios hold): the functions compared are
compiled first, then run in interleaved rounds and the median of each is kept.

1. ``sa_step``: one annealing step of the MLP VAE 784-500-20 at batch 128 with
   K proposals (``gaussian`` and ``low_rank``) against the inference roofline,
   one jitted ``loss_fn`` (forward pass + ELBO) of the unperturbed model over
   K * 128 examples. ``ratio_to_inference`` = roofline time / step time.
2. ``evosax``: evosax's ``SimulatedAnnealing`` on the identical objective,
   batch and K, run as its docs show (ask, vmap the loss over the population,
   tell), the three jitted together. ``speedup`` = our proposals/s / theirs.
3. ``fit_overhead``: one Adam epoch on MNIST through ``savae_jax.fit`` vs a
   minimal hand-written jitted step loop over the same device arrays.
4. ``scaling``: step time and memory vs K and vs the hidden width.
5. ``efficiency``: every step above (SA ``gaussian`` and ``low_rank``, the ES
   step, the plain forward, an Adam step, and the integer-lattice steps on the
   model quantized to 4 bits: SA with sparse (``lattice``) and low-rank
   (``lattice_low_rank``) lattice moves, ``lattice_es``) against the physical limit: its
   necessary FLOPs, counted analytically (:func:`necessary_flops`), the
   FLOP/s it achieves, and ``efficiency`` = that over the FLOP/s of a plain
   matmul of the model's largest layer shape, ``(rows, hidden) @ (hidden,
   784)`` with the step's own number of rows, timed in the same interleaved
   rounds.
6. ``precision``: the effect of ``--matmul-precision`` (float32, the
   default; tensorfloat32 or bfloat16, which GPUs and TPUs honour and XLA's
   CPU backend ignores) on the loss: the incumbent's loss and one low_rank
   step's accepted loss, compiled at that precision and at float32, their
   difference in nats and in float32 ulps. Every step timed above is compiled
   at the chosen precision.
7. ``sharded`` (only with ``--devices N`` or ``--distributed``): the SA step
   with its K + 1 members sharded over the device mesh against the same step
   on one device, interleaved; ``speedup`` = one-device time / mesh time,
   and whether one step from the same key gives the same parameters.

Memory is the compiled step's ``memory_analysis().temp_size_in_bytes``: the
scratch memory the step allocates beyond its arguments and outputs, i.e. the
"extra" memory of a step (the same number on every backend, so it is
comparable across machines); ``machine.memory_stats`` adds the device's
allocator statistics where the backend has them (GPU/TPU).

    savae bench [--quick] [--out results/benchmark.json] [--devices all]
        [--ks 64 256 1024 4096] [--matmul-precision bfloat16]

Runs unchanged on CPU, GPU or TPU (the default JAX device); on an
accelerator the full run adds K = 4096 to the SA-step and efficiency sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import savae_jax as sv
from savae_jax import annealing as an
from savae_jax import checkpoint, distributed, quantize
from savae_jax.experiments import builders, flags
from savae_jax.experiments.settings import AnnealerConfig, Config
from savae_jax.experiments.timing import MIB, compile_fn, machine_info, memory, peak_mb, time_interleaved

BATCH = 128
LATENTS = 20
HIDDEN = 500
SCALE = 1e-3  # proposal std, ours and evosax's alike



@dataclasses.dataclass(frozen=True)
class BenchmarkConfig(Config):
    """The sizes of a benchmark run (the full run's by default; :data:`QUICK` for --quick)."""

    ks: tuple = (16, 64, 256, 1024)             # K of the SA-step section
    evosax_ks: tuple = (64, 256)                # K compared with evosax
    rounds: int = 3                             # interleaved rounds; the median is kept
    sharded_ks: tuple = (64, 256)               # K of the sharded section (--devices)
    widths: tuple = (125, 250, 500, 1000)       # hidden widths of the scaling section
    width_k: int = 64                           # K of the width scaling
    fit_examples: int | None = None             # examples of the fit-overhead epoch (None: all)
    efficiency_ks: tuple = (64, 256, 1024)      # K of the efficiency section


FULL = BenchmarkConfig()
# On a GPU or TPU the full run goes up to K = 4096 (a 2-core CPU takes minutes per step there).
ACCELERATOR_KS = (16, 64, 256, 1024, 4096)
ACCELERATOR_EFFICIENCY_KS = (64, 256, 1024, 4096)
QUICK = BenchmarkConfig(ks=(16, 64), evosax_ks=(16,), rounds=2, sharded_ks=(16,), widths=(125,), width_k=16,
                        fit_examples=2048, efficiency_ks=(16,))


def make_problem(hidden: int):
    model = sv.models.MLPVAE(hidden=hidden, latents=LATENTS)
    loss_fn = sv.make_loss(model)
    x = jax.random.uniform(jax.random.key(0), (BATCH, 28, 28, 1))
    params = sv.models.init(jax.random.key(1), model, x)
    return loss_fn, params, x


def num_params(params) -> int:
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))


def make_proposal(name: str):
    """The benchmark's proposal: ``name`` (gaussian or low_rank, rank 1) at scale SCALE."""
    return builders.make_proposal(AnnealerConfig(proposal=name, scale=SCALE, rank=1))


class Cache:
    """Compiled SA steps and rooflines, shared by the sections (compile once)."""

    def __init__(self):
        self.problems: dict[int, tuple] = {}
        self.steps: dict[tuple, tuple] = {}
        self.rooflines: dict[tuple, tuple] = {}

    def problem(self, hidden: int):
        if hidden not in self.problems:
            self.problems[hidden] = make_problem(hidden)
        return self.problems[hidden]

    def step(self, proposal: str, k: int, hidden: int = HIDDEN):
        """(compiled step, args, memory dict) of our SA step."""
        key = (proposal, k, hidden)
        if key not in self.steps:
            loss_fn, params, x = self.problem(hidden)
            sa = an.simulated_annealing(
                loss_fn, k, make_proposal(proposal), an.exponential(1.0, 0.999), an.metropolis())
            self.steps[key] = _compiled_step(sa, jax.random.key(3), params, x)
        return self.steps[key]

    def roofline(self, k: int, hidden: int = HIDDEN):
        """(compiled loss_fn over K * 128 examples, args, memory dict)."""
        key = (k, hidden)
        if key not in self.rooflines:
            loss_fn, params, x = self.problem(hidden)
            xb = jnp.tile(x, (k, 1, 1, 1))
            args = (params, jax.random.key(2), xb)
            compiled, _ = compile_fn(loss_fn, *args)
            self.rooflines[key] = (compiled, args, memory(compiled))
        return self.rooflines[key]

    def drop(self, hidden: int | None = None, k: int | None = None):
        """Free compiled executables (and their arguments) no longer needed."""
        for d in (self.steps, self.rooflines):
            for key in list(d):
                kk, hh = (key[1], key[2]) if len(key) == 3 else key
                if (hidden is None or hh == hidden) and (k is None or kk == k):
                    del d[key]


# --------------------------------------------------------------------------- 1. SA step


def bench_sa_step(cache: Cache, ks, rounds: int) -> list[dict]:
    rows = []
    for k in ks:
        fns = {"inference": cache.roofline(k)[:2]}
        for prop in ("gaussian", "low_rank"):
            fns[prop] = cache.step(prop, k)[:2]
        t = time_interleaved(fns, rounds)
        for prop in ("gaussian", "low_rank"):
            rows.append({
                "proposal": prop, "K": k, "step_s": t[prop],
                "proposals_per_s": k / t[prop],
                "inference_s": t["inference"],
                "ratio_to_inference": t["inference"] / t[prop],
                "temp_mb": cache.step(prop, k)[2]["temp_mb"],
            })
        print(f"  sa_step K={k}: " + "  ".join(f"{n} {s:.3f}s" for n, s in t.items()), flush=True)
    return rows


# --------------------------------------------------------------------------- efficiency


PIXELS = 28 * 28


def layer_flops(hidden: int = HIDDEN, latents: int = LATENTS) -> dict[str, int]:
    """FLOPs of one example through each Dense layer of the MLP VAE (2 m n per layer)."""
    return {"encoder/hidden": 2 * PIXELS * hidden, "encoder/mean": 2 * hidden * latents,
            "encoder/logvar": 2 * hidden * latents, "decoder/hidden": 2 * latents * hidden,
            "decoder/logits": 2 * hidden * PIXELS}


FLOP_KINDS = ("inference", "low_rank", "gaussian", "es", "adam", "lattice", "lattice_low_rank", "lattice_es")
LATTICE_BITS = 4  # the lattice steps run on the benchmark's model quantized to this many bits


def necessary_flops(kind: str, k: int, batch: int = BATCH, hidden: int = HIDDEN) -> int:
    """The FLOPs a step cannot avoid, counting the Dense layers' products only.

    - ``inference``: a forward pass over k * batch examples.
    - ``low_rank``: the K proposals and the incumbent share the first layer's
      input (the batch) and its kernel W, so x @ W is needed once; every other
      layer once per member and example: (K + 1) members.
    - ``gaussian``: every member has its own first-layer kernel: (K + 1) full
      forward passes.
    - ``es``: K members sharing x @ W as in ``low_rank``, then the candidate
      (its own W) and the incumbent on the same batch.
    - ``adam``: forward and backward over ``batch`` examples, 3x the forward
      (the backward pass costs two products per layer).
    The rank-r products of ``low_rank``/``es`` (r (m + n) per row) are not
    counted: they are the method's overhead, not necessary work.
    """
    per = layer_flops(hidden)
    full, first = sum(per.values()), per["encoder/hidden"]
    rest = full - first
    if kind == "inference":
        return k * batch * full
    if kind == "low_rank":
        return batch * first + (k + 1) * batch * rest
    if kind in ("gaussian", "lattice", "lattice_low_rank"):
        return (k + 1) * batch * full
    if kind == "lattice_es":
        return (k + 2) * batch * full
    if kind == "es":
        return batch * first + k * batch * rest + 2 * batch * full
    if kind == "adam":
        return 3 * batch * full
    raise ValueError(f"kind must be one of {', '.join(FLOP_KINDS)}, got {kind!r}")


def _matmul(rows: int, hidden: int = HIDDEN):
    """(compiled (rows, hidden) @ (hidden, 784) float32 matmul, args): the hardware's reference."""
    a = jax.random.normal(jax.random.key(5), (rows, hidden), jnp.float32)
    b = jax.random.normal(jax.random.key(6), (hidden, PIXELS), jnp.float32)
    return compile_fn(jnp.dot, a, b)[0], (a, b)


def _compiled_step(optimizer, key, params, x):
    """(compiled ``optimizer.step`` from ``optimizer.init(params)`` on batch ``x``, args, memory dict)."""
    args = (key, optimizer.init(params), x)
    compiled, _ = compile_fn(optimizer.step, *args)
    return compiled, args, memory(compiled)


def lattice_steps(loss_fn, params, x, k: int) -> dict[str, tuple]:
    """The integer-lattice steps on ``params`` rounded to LATTICE_BITS bits, compiled with K members:
    SA with sparse moves (each code +-1 with probability 1e-3, about 400 of the 0.4 M codes) and
    with rank-1 lattice moves (scale 0.1, ``savae quantize``'s middle trial), both Metropolis, and
    lattice ES with K / 2 pairs of sparse moves. What a step costs depends little on these
    values: every member is a full forward pass on its own codes."""
    q = quantize.quantize(params, LATTICE_BITS)
    schedule = an.exponential(1.0, 0.999)
    optimizers = {
        "lattice": an.simulated_annealing(loss_fn, k, an.lattice(1e-3), schedule, an.metropolis()),
        "lattice_low_rank": an.simulated_annealing(loss_fn, k, an.lattice_low_rank(0.1, rank=1), schedule,
                                                   an.metropolis()),
        "lattice_es": an.lattice_es(loss_fn, k // 2, 1e-3),
    }
    return {name: _compiled_step(opt, jax.random.key(9), q, x) for name, opt in optimizers.items()}


def bench_efficiency(cache: Cache, ks, rounds: int) -> list[dict]:
    """Achieved FLOP/s of every step over a same-shape matmul's, timed side by side."""
    rows = []
    loss_fn, params, x = cache.problem(HIDDEN)
    adam = _compiled_step(sv.optimizer.from_optax(loss_fn, optax.adam(1e-3)), jax.random.key(8), params, x)
    for k in ks:
        es = _compiled_step(an.evolution_strategy(loss_fn, k // 2, SCALE), jax.random.key(7), params, x)
        steps = {"inference": cache.roofline(k), "gaussian": cache.step("gaussian", k),
                 "low_rank": cache.step("low_rank", k), "es": es, "adam": adam,
                 **lattice_steps(loss_fn, params, x, k)}
        fns = {name: step[:2] for name, step in steps.items()}
        # The reference matmul has the step's own row count: one batch for Adam, K batches for the rest.
        fns["matmul"] = _matmul(k * BATCH)
        fns["matmul_batch"] = _matmul(BATCH)
        t = time_interleaved(fns, rounds)
        for name, step in steps.items():
            ref, ref_rows = ("matmul_batch", BATCH) if name == "adam" else ("matmul", k * BATCH)
            matmul_rate = 2 * ref_rows * HIDDEN * PIXELS / t[ref]
            flops = necessary_flops(name, k)
            rows.append({
                "step": name, "K": k, "step_s": t[name], "necessary_gflop": flops / 1e9,
                "gflop_per_s": flops / t[name] / 1e9, "matmul_rows": ref_rows,
                "matmul_gflop_per_s": matmul_rate / 1e9,
                "efficiency": (flops / t[name]) / matmul_rate,
                "temp_mb": step[2]["temp_mb"],
            })
        print(f"  efficiency K={k}: " + "  ".join(f"{n} {s:.3f}s" for n, s in t.items()), flush=True)
        del es, fns, steps
    return rows


# --------------------------------------------------------------------------- precision


# The names jax.default_matmul_precision takes for float32 inputs, fastest last.
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")


def float32_ulp(value: float) -> float:
    """The spacing of float32 numbers at ``value`` (one unit in the last place)."""
    return float(np.spacing(np.float32(abs(value))))


def precision_effect(loss_fn, params, x, precision: str, k: int = 64) -> dict:
    """The loss at ``precision`` against float32: the incumbent's loss and one low_rank step's.

    Each is compiled twice from the same key and batch, once under
    ``jax.default_matmul_precision(precision)`` and once at float32, and the
    two values are compared, in nats and in float32 ulps of the float32 value.
    On XLA's CPU backend the precision setting has no effect on float32 dots
    (both are float32), so the difference there is 0; GPUs (TF32, bf16) and
    TPUs (bf16 passes) honour it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    sa = an.simulated_annealing(loss_fn, k, make_proposal("low_rank"), an.exponential(1.0, 0.999),
                                an.metropolis())
    step_args = (jax.random.key(3), sa.init(params), x)
    loss_args = (params, jax.random.key(2), x)
    out = {"precision": precision, "K": k}
    for name, fn, args, pick in (("incumbent_loss", loss_fn, loss_args, lambda v: v),
                                 ("low_rank_step_loss", sa.step, step_args, lambda v: v[1].loss)):
        values = {}
        for prec in ("float32", precision):
            with jax.default_matmul_precision(prec):
                compiled = jax.jit(fn).lower(*args).compile()
            values[prec] = float(pick(compiled(*args)))
        diff = values[precision] - values["float32"]
        out[name] = {"float32": values["float32"], precision: values[precision], "diff_nats": diff,
                     "diff_float32_ulps": abs(diff) / float32_ulp(values["float32"])}
    return out


# --------------------------------------------------------------------------- 2. evosax


def evosax_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("evosax")
    except Exception:
        return None


def evosax_step(k: int, loss_fn, params, x):
    """evosax's SimulatedAnnealing on our objective: (compiled step, args)."""
    from evosax.algorithms import SimulatedAnnealing

    es = SimulatedAnnealing(
        population_size=k, solution=params, std_schedule=optax.constant_schedule(SCALE))
    es_params = es.default_params
    state = es.init(jax.random.key(0), params, es_params)

    def step(key, state, x):
        key_ask, key_loss, key_tell = jax.random.split(key, 3)
        population, state = es.ask(key_ask, state, es_params)
        # The same loss key for the whole population: common random numbers, as ours.
        fitness = jax.vmap(loss_fn, in_axes=(0, None, None))(population, key_loss, x)
        state, metrics = es.tell(key_tell, population, fitness, state, es_params)
        return state, metrics["best_fitness"]

    args = (jax.random.key(4), state, x)
    compiled, _ = compile_fn(step, *args)
    return compiled, args


def bench_evosax(cache: Cache, ks, rounds: int, hidden: int = HIDDEN):
    """Our SA step (gaussian and low_rank) against evosax's SimulatedAnnealing, same objective, batch
    and K: ``(rows, evosax version)``, or ``({"error": ...}, version)`` where evosax is missing or fails."""
    version = evosax_version()
    if version is None:
        return {"error": "evosax is not installed (pip install 'savae_jax[bench]')"}, None
    rows = []
    try:
        loss_fn, params, x = cache.problem(hidden)
        for k in ks:
            theirs, theirs_args = evosax_step(k, loss_fn, params, x)
            fns = {"evosax": (theirs, theirs_args)}
            for prop in ("gaussian", "low_rank"):
                fns[prop] = cache.step(prop, k, hidden)[:2]
            t = time_interleaved(fns, rounds)
            theirs_mem = memory(theirs)["temp_mb"]
            for prop in ("gaussian", "low_rank"):
                rows.append({
                    "proposal": prop, "K": k,
                    "speedup": t["evosax"] / t[prop],
                    "ours_step_s": t[prop], "theirs_step_s": t["evosax"],
                    "ours_mem_mb": cache.step(prop, k, hidden)[2]["temp_mb"],
                    "theirs_mem_mb": theirs_mem,
                })
            print(f"  evosax K={k}: " + "  ".join(f"{n} {s:.3f}s" for n, s in t.items()), flush=True)
            del theirs, theirs_args, fns
    except Exception as err:  # evosax API drift or an incompatible jax: report, do not crash
        return {"error": f"evosax {version}: {type(err).__name__}: {err}", "version": version}, version
    return rows, version


# --------------------------------------------------------------------------- 3. fit overhead


def load_fit_data(examples: int | None):
    """``(name, images)`` of the fit-overhead section: MNIST from ``$SAVAE_DATA_DIR`` if it holds it, else digits."""
    data_dir = os.environ.get("SAVAE_DATA_DIR")
    try:
        if not data_dir:
            raise FileNotFoundError("$SAVAE_DATA_DIR is not set")
        data, name = sv.data.load("mnist", "train", data_dir=data_dir), "mnist"
    except (FileNotFoundError, ValueError, OSError):
        data, name = sv.data.load("digits", "train"), "digits"
    images = np.asarray(data.images, np.float32)
    if examples is not None:
        images = images[:examples]
    return name, images


def minimal_epoch(loss_fn, optimizer, params, images, key, batch_size: int):
    """The hand-written baseline: returns ``run() -> (params, mean loss)`` for one epoch, compiled."""
    n = images.shape[0]
    steps = n // batch_size

    def step(params, opt_state, key, images, idx):
        loss, grads = jax.value_and_grad(loss_fn)(params, key, images[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    key_perm, key_steps = jax.random.split(key)
    idx = jax.random.permutation(key_perm, n)[: steps * batch_size].reshape(steps, batch_size)
    keys = jax.random.split(key_steps, steps)
    compiled, _ = compile_fn(step, params, opt_state, keys[0], images, idx[0])

    def run():
        p, s, total = params, opt_state, 0.0
        for i in range(steps):
            p, s, loss = compiled(p, s, keys[i], images, idx[i])
            total = total + loss
        return p, float(total) / steps

    return run


def bench_fit(examples: int | None, rounds: int) -> dict:
    name, images_np = load_fit_data(examples)
    # Initialised for the images actually loaded: MNIST, or digits (8x8) on a
    # machine without the MNIST files.
    model = sv.models.MLPVAE(hidden=HIDDEN, latents=LATENTS)
    loss_fn = sv.make_loss(model)
    params = sv.models.init(jax.random.key(1), model, images_np[:1])
    optimizer = optax.adam(1e-3)
    images = jnp.asarray(images_np)
    minimal = minimal_epoch(loss_fn, optimizer, params, images, jax.random.key(5), BATCH)

    fit_epoch, fit_total, min_epoch = [], [], []
    minimal()  # warm-up (the compile happened in minimal_epoch)
    sv.fit(jax.random.key(5), params, loss_fn, optimizer, images, epochs=1, batch_size=BATCH)
    for _ in range(rounds):
        start = time.perf_counter()
        _, history = sv.fit(jax.random.key(5), params, loss_fn, optimizer, images,
                            epochs=1, batch_size=BATCH)
        fit_total.append(time.perf_counter() - start)
        fit_epoch.append(history[0]["seconds"])
        start = time.perf_counter()
        minimal()
        min_epoch.append(time.perf_counter() - start)
    fit_s, minimal_s = statistics.median(fit_epoch), statistics.median(min_epoch)
    print(f"  fit {fit_s:.3f}s  minimal {minimal_s:.3f}s  ({name}, {images.shape[0]} examples)", flush=True)
    return {
        "fit_s": fit_s, "minimal_s": minimal_s, "ratio": fit_s / minimal_s,
        "fit_call_s": statistics.median(fit_total),
        "dataset": name, "examples": int(images.shape[0]),
        "steps": int(images.shape[0] // BATCH), "optimizer": "adam(1e-3)",
        "note": "fit_s: the epoch time fit reports (its step is compiled before it); "
                "fit_call_s: the whole fit() call, compile and setup included",
    }


# --------------------------------------------------------------------------- 4. scaling


def bench_scaling(cache: Cache, sa_rows: list[dict], widths, width_k: int, rounds: int) -> list[dict]:
    rows = []
    # vs K: from the sa_step measurements (same run); linearity = time per
    # proposal relative to the smallest K (1.0 = linear; > 1 = superlinear).
    for prop in ("gaussian", "low_rank"):
        mine = sorted((r for r in sa_rows if r["proposal"] == prop), key=lambda r: r["K"])
        base = mine[0]["step_s"] / mine[0]["K"]
        for r in mine:
            rows.append({
                "axis": "K", "proposal": prop, "K": r["K"], "hidden": HIDDEN,
                "params": num_params(cache.problem(HIDDEN)[1]),
                "step_s": r["step_s"], "proposals_per_s": r["proposals_per_s"],
                "per_proposal_ms": 1e3 * r["step_s"] / r["K"],
                "linearity": (r["step_s"] / r["K"]) / base,
                "temp_mb": r["temp_mb"],
                "inference_temp_mb": cache.roofline(r["K"])[2]["temp_mb"],
            })
    # vs width at fixed K.
    for hidden in widths:
        fns = {"inference": cache.roofline(width_k, hidden)[:2]}
        for prop in ("gaussian", "low_rank"):
            fns[prop] = cache.step(prop, width_k, hidden)[:2]
        t = time_interleaved(fns, rounds)
        for prop in ("gaussian", "low_rank"):
            rows.append({
                "axis": "hidden", "proposal": prop, "K": width_k, "hidden": hidden,
                "params": num_params(cache.problem(hidden)[1]),
                "step_s": t[prop], "proposals_per_s": width_k / t[prop],
                "per_proposal_ms": 1e3 * t[prop] / width_k,
                "ratio_to_inference": t["inference"] / t[prop],
                "temp_mb": cache.step(prop, width_k, hidden)[2]["temp_mb"],
                "inference_temp_mb": cache.roofline(width_k, hidden)[2]["temp_mb"],
            })
        print(f"  width {hidden}: " + "  ".join(f"{n} {s:.3f}s" for n, s in t.items()), flush=True)
        if hidden != HIDDEN:
            cache.drop(hidden=hidden)
    return rows


# --------------------------------------------------------------------------- targets & output


# --------------------------------------------------------------------------- 5. sharded


def bench_sharded(cache: Cache, mesh, ks, rounds: int) -> list[dict]:
    """The SA step on ``mesh`` vs on one device, same K, same key, interleaved."""
    rows = []
    loss_fn, params, x = cache.problem(HIDDEN)
    for k in ks:
        for prop in ("gaussian", "low_rank"):
            single, single_args, _ = cache.step(prop, k)
            sa = an.simulated_annealing(loss_fn, k, make_proposal(prop), an.exponential(1.0, 0.999),
                                        an.metropolis(), mesh=mesh)
            args = distributed.replicate(single_args, mesh)
            sharded, _ = compile_fn(sa.step, *args)
            t = time_interleaved({"single": (single, single_args), "sharded": (sharded, args)}, rounds)
            a = jax.tree_util.tree_leaves(single(*single_args)[0].params)
            b = jax.tree_util.tree_leaves(distributed.host_local(sharded(*args)[0].params))
            rows.append({
                "proposal": prop, "K": k, "devices": mesh.size,
                "members_per_device": -(-(k + 1) // mesh.size),
                "single_s": t["single"], "sharded_s": t["sharded"],
                "speedup": t["single"] / t["sharded"],
                "same_params": all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b)),
            })
            print(f"  sharded {prop} K={k}: one device {t['single']:.3f}s, "
                  f"{mesh.size} devices {t['sharded']:.3f}s", flush=True)
    return rows


def _slope(xs, ys):
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else float("nan")


def targets(result: dict, param_mb: float) -> dict:
    out = {}
    lr = [r for r in result["sa_step"] if r["proposal"] == "low_rank" and r["K"] >= 256]
    if lr:
        worst = min(r["ratio_to_inference"] for r in lr)
        out["low_rank_ratio_to_inference_K>=256"] = {"target": ">= 0.8", "value": worst, "met": worst >= 0.8}
    eff = [r for r in result.get("efficiency", []) if r["step"] == "low_rank" and r["K"] >= 256]
    if eff:
        worst = min(r["efficiency"] for r in eff)
        out["low_rank_efficiency_vs_matmul_K>=256"] = {"target": ">= 0.6", "value": worst, "met": worst >= 0.6}
    if isinstance(result["evosax"], list) and result["evosax"]:
        for prop, goal in (("low_rank", 10.0), ("gaussian", 2.0)):
            vals = [r["speedup"] for r in result["evosax"] if r["proposal"] == prop]
            worst = min(vals)
            out[f"evosax_speedup_{prop}"] = {"target": f">= {goal}", "value": worst, "met": worst >= goal}
    g = [r for r in result["sa_step"] if r["proposal"] == "gaussian"]
    if len(g) > 1:
        # Extra memory per extra proposal, in units of the parameter size P:
        # O(K * P) materialisation shows as ~1 or more, O(P) as ~0.
        slope = _slope([r["K"] for r in g], [r["temp_mb"] for r in g]) / param_mb
        out["gaussian_extra_memory_per_proposal_in_P"] = {
            "target": "O(P): << 1 copy of the params per extra proposal",
            "value": slope, "met": slope < 0.1,
            "temp_mb_by_K": {str(r["K"]): r["temp_mb"] for r in g},
        }
    ratio = result["fit_overhead"]["ratio"]
    out["fit_overhead_ratio"] = {"target": "<= 1.10", "value": ratio, "met": ratio <= 1.10}
    return out


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\nmachine: {m['backend']} / {m['device_kind']} x{m['device_count']}, "
          f"{m['cpu_count']} CPUs, jax {m['jax']}, evosax {result.get('evosax_version')}")
    print("\nSA step vs inference roofline (MLP VAE 784-500-20, batch 128)")
    print(f"{'proposal':<10}{'K':>6}{'step s':>10}{'prop/s':>10}{'infer s':>10}{'ratio':>8}{'temp MiB':>10}")
    for r in result["sa_step"]:
        print(f"{r['proposal']:<10}{r['K']:>6}{r['step_s']:>10.4f}{r['proposals_per_s']:>10.1f}"
              f"{r['inference_s']:>10.4f}{r['ratio_to_inference']:>8.2f}{r['temp_mb']:>10.1f}")
    if result.get("efficiency"):
        print("\nefficiency: necessary FLOPs per step vs a same-shape matmul, same run")
        print(f"{'step':<18}{'K':>6}{'step s':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'matmul GFLOP/s':>16}"
              f"{'efficiency':>11}{'temp MiB':>10}")
        for r in result["efficiency"]:
            print(f"{r['step']:<18}{r['K']:>6}{r['step_s']:>10.4f}{r['necessary_gflop']:>9.2f}"
                  f"{r['gflop_per_s']:>9.1f}{r['matmul_gflop_per_s']:>16.1f}{r['efficiency']:>11.2f}"
                  f"{r['temp_mb']:>10.1f}")
    print("\nvs evosax SimulatedAnnealing (same objective, batch, K)")
    if isinstance(result["evosax"], dict):
        print(f"  {result['evosax']['error']}")
    else:
        print(f"{'proposal':<10}{'K':>6}{'speedup':>9}{'ours s':>10}{'theirs s':>10}{'ours MiB':>10}{'theirs MiB':>11}")
        for r in result["evosax"]:
            print(f"{r['proposal']:<10}{r['K']:>6}{r['speedup']:>9.2f}{r['ours_step_s']:>10.4f}"
                  f"{r['theirs_step_s']:>10.4f}{r['ours_mem_mb']:>10.1f}{r['theirs_mem_mb']:>11.1f}")
    _print_rest(result)


def _print_rest(result: dict) -> None:
    """The tables after the evosax one: fit overhead, scaling, precision, sharded, targets."""
    f = result["fit_overhead"]
    print(f"\nfit overhead (one Adam epoch, {f['dataset']}, {f['examples']} examples): "
          f"fit {f['fit_s']:.3f}s  minimal {f['minimal_s']:.3f}s  ratio {f['ratio']:.3f}")
    print("\nscaling")
    print(f"{'axis':<7}{'proposal':<10}{'K':>6}{'hidden':>7}{'params':>9}{'step s':>10}"
          f"{'ms/prop':>9}{'lin/ratio':>10}{'temp MiB':>10}{'infer MiB':>10}")
    for r in result["scaling"]:
        extra = r["linearity"] if r["axis"] == "K" else r["ratio_to_inference"]
        print(f"{r['axis']:<7}{r['proposal']:<10}{r['K']:>6}{r['hidden']:>7}{r['params']:>9}"
              f"{r['step_s']:>10.4f}{r['per_proposal_ms']:>9.3f}{extra:>10.2f}{r['temp_mb']:>10.1f}"
              f"{r['inference_temp_mb']:>10.1f}")
    p = result["precision"]
    print(f"\nmatmul precision {p['precision']} against float32 (the timed steps ran at {p['precision']})")
    for name in ("incumbent_loss", "low_rank_step_loss"):
        q = p[name]
        print(f"  {name}: float32 {q['float32']:.6f}  {p['precision']} {q[p['precision']]:.6f}  "
              f"diff {q['diff_nats']:+.3g} nats ({q['diff_float32_ulps']:.0f} float32 ulps)")
    if result.get("sharded"):
        print("\nSA step sharded over the mesh vs one device")
        print(f"{'proposal':<10}{'K':>6}{'devices':>8}{'one dev s':>11}{'mesh s':>9}{'speedup':>9}{'same':>6}")
        for r in result["sharded"]:
            print(f"{r['proposal']:<10}{r['K']:>6}{r['devices']:>8}{r['single_s']:>11.4f}"
                  f"{r['sharded_s']:>9.4f}{r['speedup']:>9.2f}{str(r['same_params']):>6}")
    print("\ntargets")
    for name, t in result["targets"].items():
        print(f"  {'MET ' if t['met'] else 'MISS'} {name}: {t['value']:.3f} (target {t['target']})")


def config(quick: bool, ks=None) -> BenchmarkConfig:
    """The run's sizes: QUICK or FULL (up to K = 4096 on an accelerator); ``ks`` overrides the K
    of the SA-step and efficiency sections."""
    cfg = QUICK if quick else FULL
    if not quick and jax.default_backend() != "cpu":
        cfg = cfg.replace(ks=ACCELERATOR_KS, efficiency_ks=ACCELERATOR_EFFICIENCY_KS)
    if ks:
        cfg = cfg.replace(ks=tuple(ks), efficiency_ks=tuple(ks))
    return cfg


def run(quick: bool, mesh=None, ks=None, precision: str = "float32") -> dict:
    """Every section, each step compiled at ``precision`` (see :func:`precision_effect`)."""
    with jax.default_matmul_precision(precision):
        return _run(config(quick, ks), quick, mesh, precision)


def _run(cfg: BenchmarkConfig, quick: bool, mesh, precision: str) -> dict:
    start = time.perf_counter()
    cache = Cache()
    result: dict[str, Any] = {"machine": machine_info(), "quick": quick, "matmul_precision": precision,
                              "config": cfg.to_dict()}
    print("sa_step", flush=True)
    result["sa_step"] = bench_sa_step(cache, cfg.ks, cfg.rounds)
    print("efficiency", flush=True)
    result["efficiency"] = bench_efficiency(cache, cfg.efficiency_ks, cfg.rounds)
    print("evosax", flush=True)
    for k in cfg.ks:
        if k not in cfg.evosax_ks:
            cache.drop(hidden=HIDDEN, k=k) if k > max(cfg.evosax_ks + (cfg.width_k,)) else None
    result["evosax"], result["evosax_version"] = bench_evosax(cache, cfg.evosax_ks, cfg.rounds)
    print("fit_overhead", flush=True)
    result["fit_overhead"] = bench_fit(cfg.fit_examples, cfg.rounds)
    print("scaling", flush=True)
    result["scaling"] = bench_scaling(cache, result["sa_step"], cfg.widths, cfg.width_k, cfg.rounds)
    print("precision", flush=True)
    result["precision"] = precision_effect(*cache.problem(HIDDEN), precision, k=min(cfg.ks))
    if mesh is not None:
        print("sharded", flush=True)
        result["sharded"] = bench_sharded(cache, mesh, cfg.sharded_ks, cfg.rounds)
    param_mb = num_params(cache.problem(HIDDEN)[1]) * 4 / MIB
    result["targets"] = targets(result, param_mb)
    peak = peak_mb()
    if peak is not None:
        result["machine"]["peak_bytes_in_use_mb"] = peak
    result["seconds"] = time.perf_counter() - start
    return result


def _even_k(text: str) -> int:
    """A --ks value: an even K >= 2 (the ES step has K / 2 antithetic pairs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(f"must be an even integer >= 2 (the ES step evaluates K / 2 "
                                         f"antithetic pairs), got {text!r}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "savae bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small K and data: a smoke run (1-2 min on 2 CPU cores)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--ks", type=_even_k, nargs="+", default=None, metavar="K",
                        help="numbers of proposals of the SA-step and efficiency sections (default: "
                             "16 64 256 1024 on CPU, up to 4096 on an accelerator; --quick: 16 64)")
    parser.add_argument("--matmul-precision", choices=PRECISIONS, default="float32",
                        help="jax.default_matmul_precision of every timed step; the loss it gives is "
                             "compared with float32's (default: float32)")
    flags.add_scale_out_flags(parser)
    flags.add_config_flag(parser)
    return parser


def main(argv=None, prog: str | None = None) -> int:
    """``savae bench``: every section in one process; prints the tables, --out writes the JSON."""
    parser = build_parser(prog)
    args, mesh = flags.parse_args(parser, argv, config_file=True)
    if distributed.is_primary():
        print(flags.backend_line(), flush=True)
    result = run(args.quick, mesh, ks=args.ks, precision=args.matmul_precision)
    if not distributed.is_primary():  # across processes, process 0 reports
        return 0
    print_table(result)
    print(f"\ntotal {result['seconds']:.1f}s")
    if args.out:
        checkpoint.atomic_write_text(args.out, json.dumps(result, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0
