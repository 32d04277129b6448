"""Where gradients cannot go: refining a VAE rounded to integer weights, at equal evaluations.

    savae quantize --dataset digits --bits 3 --budget-evals 3000 --seeds 0,1,2 --workdir runs/quantize

Per seed:

1. x*: Adam (lr 1e-3) for ``--pretrain-evals`` loss evaluations on the
   training part (a gradient step counts 3), the validation gate keeping its
   best parameters.
2. RTN: x* rounded to per-output-channel int-``bits`` codes
   (``quantize.quantize``, clip "mse"): zero evaluations.
3. From RTN, each method spends ``--budget-evals`` evaluations and keeps the
   integer model its validation gate scores best (RTN itself if none beats it):

   - ``ste-adam``: straight-through Adam on a float shadow of the weights
     started at RTN's values (``quantize.straight_through``), rounded back on
     RTN's scales (``quantize.requantize``);
   - ``adaround``: AdaRound-style learned rounding of x*'s weights on RTN's
     lattice (``quantize.learned_rounding``: each weight rounded down or up
     by a variable Adam trains on the loss plus a regularizer that pushes it
     to a decision), hardened;
   - ``lattice-sa``: annealing on the integer lattice (``annealing.lattice``:
     K = 16 proposals each moving about ``moved`` codes by +-1), deciding by
     the noise-aware confident rule (a paired t-test at level ``level``) on a
     decision batch of 128 other examples;
   - ``lattice-lowrank-sa``: the same annealer with low-rank lattice moves
     (``annealing.lattice_low_rank``, rank 1: each kernel's codes move by the
     rounded outer product of two Gaussian vectors);
   - ``lattice-es``: ES on the lattice (``annealing.lattice_es``: 8
     antithetic pairs of sparse moves, the search gradient times ``lr``
     rounded to whole steps), the same decision rule and batch;
   - ``ste-then-lattice``: the seed's recipe in this regime: ``ste-adam`` for
     half the budget, then ``lattice-sa`` from its rounded result.

   Equal tuning, with the tuning study's sampler (``savae tune``): each
   method declares a search space (:data:`SEARCH_SPACES`; STE's learning
   rate, the codes moved per proposal or ES member, the low-rank scale, the
   confident rule's level, lattice ES's learning rate), and every method gets
   the same ``--trials`` quasi-random trials from it (``tuning.sample_trials``:
   scrambled Sobol, log ranges sampled in log; the same trials for every
   seed), each a run at the full budget, the best on the validation split
   kept. ``ste-then-lattice`` runs the values chosen for ``ste-adam`` and
   ``lattice-sa`` (it has no trials of its own).
4. The test negative ELBO of each kept model, and the fraction of RTN's gap
   to x* it recovers: (RTN - method) / (RTN - x*).

``--from-scratch``: no x*. The random initial parameters are rounded (their
scales fixed from the init, as x*'s are) and every method trains the integer
model from there; the summary gives each method's change from the rounded
init instead of a share of a gap (there is none to recover).

Outputs in --workdir: config.json, results.json (every seed, saved after
each; ``--resume`` keeps the seeds done), summary.md (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import savae_jax as sv
from savae_jax import annealing as A
from savae_jax import checkpoint, driver, quantize
from savae_jax.experiments import flags, registry, report, tuning
from savae_jax.experiments import workdir as workdirs
from savae_jax.experiments.settings import Config
from savae_jax.optimizer import GRAD_COST

METHODS = ("ste-adam", "adaround", "lattice-sa", "lattice-lowrank-sa", "lattice-es", "ste-then-lattice")
# Each tuned method's search space (registry.Dist, as ``savae tune``'s). The ranges are wide on
# purpose: a first grid (lr 1e-4..1e-3, 1..16 codes moved, scale 0.08..0.15) chose its edge at every
# MNIST width and seed. ``moved``: codes moved per proposal (or ES member), about; ``scale``: the
# rank-1 product's sd (0.05 moves about 1.1e-5 of the codes, 9 of the MNIST VAE's 0.81 M; 0.3 about 9 %);
# ``level``: the confident rule's alpha; lattice ES's ``lr`` multiplies the search gradient (in steps);
# adaround's ``reg``: its regularizer's weight in nats (around the 1 to 10 that decided the rounding of
# a small digits VAE in 300 steps), its ``lr`` Adam's on the rounding variables (and the biases).
SEARCH_SPACES = {
    "ste-adam": {"lr": registry.log(3e-5, 3e-3)},
    "adaround": {"lr": registry.log(1e-3, 3e-2), "reg": registry.log(0.1, 10.0)},
    "lattice-sa": {"moved": registry.log(1, 1024), "level": registry.log(0.01, 0.3)},
    "lattice-lowrank-sa": {"scale": registry.log(0.05, 0.3), "level": registry.log(0.01, 0.3)},
    "lattice-es": {"moved": registry.log(1, 1024), "level": registry.log(0.01, 0.3), "lr": registry.log(0.5, 4.0)},
}
TRIALS_SEED = 0  # the sampler's study seed: every experiment seed runs the same trials
NOT_COMPARED = ("resume", "overwrite", "workdir")
OUTPUTS = ("config.json", "results.json", "summary.md")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(Config):
    """The experiment's settings (its flags, one field each)."""

    dataset: str = "digits"
    data_dir: str | None = None
    bits: int = 3
    budget_evals: int = 15000
    trials: int = 4
    methods: str = ",".join(METHODS)
    pretrain_evals: int = 15000
    seeds: str = "0"
    validation: float = 0.1
    batch_size: int = 128
    eval_every: int = 20
    hidden: int = 64
    latents: int = 8
    from_scratch: bool = False
    workdir: str = "runs/quantize"
    resume: bool = False
    overwrite: bool = False


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = QuantizeConfig()
    p = argparse.ArgumentParser(prog=prog or "savae quantize", description=__doc__.split("\n")[0],
                                formatter_class=flags.HelpFormatter)
    p.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(sv.data.DATASETS)}")
    p.add_argument("--data-dir", default=d.data_dir, help="folder with MNIST IDX files or a TFDS data dir")
    p.add_argument("--bits", type=int, default=d.bits, help="bits of the integer codes, 2 to 8")
    p.add_argument("--budget-evals", type=flags.positive(int), default=d.budget_evals,
                   help="loss evaluations each method spends after RTN")
    p.add_argument("--pretrain-evals", type=flags.positive(int), default=d.pretrain_evals,
                   help="loss evaluations of the Adam run that gives x*")
    p.add_argument("--methods", default=d.methods,
                   help="comma-separated, from " + ", ".join(METHODS) + " (ste-then-lattice needs ste-adam and "
                        "lattice-sa: it runs their chosen settings)")
    p.add_argument("--trials", type=flags.positive(int), default=d.trials,
                   help="quasi-random validation trials per tuned method (the same for every method)")
    p.add_argument("--seeds", default=d.seeds, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--from-scratch", action="store_true",
                   help="no x*: round the random initial parameters and train the integer model from there "
                        "(--pretrain-evals is not used)")
    flags.add_gated_run_flags(p, d, "fraction of the training set held out for the gate and the tuning")
    flags.add_workdir_flags(p, d.workdir)
    flags.add_config_flag(p)
    return p


def check_methods(config: QuantizeConfig) -> list[str]:
    """The methods of ``--methods``, in :data:`METHODS`' order (ValueError naming the flag)."""
    given = flags.comma_list(config.methods, "--methods", example="ste-adam,lattice-sa")
    unknown = [m for m in given if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if "ste-then-lattice" in given and not {"ste-adam", "lattice-sa"} <= set(given):
        raise ValueError("--methods: ste-then-lattice runs the settings chosen for ste-adam and lattice-sa; "
                         "list them too")
    return [m for m in METHODS if m in given]


def check(config: QuantizeConfig) -> list[int]:
    """The seeds (ValueError naming the flag)."""
    check_methods(config)
    try:
        quantize.check_bits(config.bits)
    except ValueError as err:
        raise ValueError(f"--bits: {err}") from None
    if not 0 < config.validation < 1:
        raise ValueError(f"--validation: must be in (0, 1), got {config.validation}")
    if config.dataset not in sv.data.DATASETS:
        raise ValueError(f"--dataset: unknown dataset {config.dataset!r}; choose from {', '.join(sv.data.DATASETS)}")
    seeds = flags.comma_list(config.seeds, "--seeds", int, "0,1,2")
    if min(seeds) < 0:
        raise ValueError(f"--seeds: must be integers >= 0, got {config.seeds!r}")
    return seeds


@dataclasses.dataclass
class Setup:
    """What every method of a seed runs on."""

    loss: object
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    config: QuantizeConfig
    key: jax.Array
    start: object = None  # the float parameters the lattice rounds (x*, or the init from scratch)
    batch_fn: sv.data.BatchFn = dataclasses.field(default_factory=lambda: sv.data.BatchFn("dynamic"))

    def score(self, params, images) -> float:
        return sv.evaluate(self.loss, params, images, binarize=self.batch_fn)

    def run(self, optimizer, params, budget, validate, name):
        """``driver.run`` of one phase with the gate: ``(kept parameters, best validation score, evals)``."""
        result = driver.run(self.key, [driver.Phase(name, optimizer)], params, self.train,
                            batch_size=self.config.batch_size, budget_evals=budget, eval_every=self.config.eval_every,
                            batch_fn=self.batch_fn, validate=validate)
        best = min(r["val_neg_elbo"] for r in result.history if r.get("val_neg_elbo") is not None)
        return result.params, best, result.history[-1]["evals"]


def ste_adam(setup: Setup, q0, hp: dict, budget: int):
    """Straight-through Adam (learning rate ``hp["lr"]``) from ``q0``'s values;
    ``(integer model, validation score, evals)``."""
    optimizer = sv.from_optax(quantize.straight_through(setup.loss, q0), optax.adam(hp["lr"]))
    shadow, best, evals = setup.run(optimizer, quantize.dequantize(q0), budget,
                                    lambda w: setup.score(quantize.requantize(w, q0), setup.val), "ste-adam")
    return quantize.requantize(shadow, q0), best, evals


def adaround(setup: Setup, q0, hp: dict, budget: int):
    """AdaRound-style learned rounding of ``setup.start`` on ``q0``'s lattice (Adam at ``hp["lr"]``, the
    regularizer's weight ``hp["reg"]``, scheduled over the budget's steps); ``(integer model, validation
    score, evals)``."""
    steps = max(1, budget // GRAD_COST)  # the regularizer's schedule spans the run's gradient steps
    loss, v0, harden = quantize.learned_rounding(setup.loss, q0, setup.start, steps=steps, reg=hp["reg"])
    optimizer = sv.from_optax(loss, optax.adam(hp["lr"]))
    v, best, evals = setup.run(optimizer, v0, budget, lambda v: setup.score(harden(v), setup.val), "adaround")
    return harden(v), best, evals


def _lattice_run(setup: Setup, q0, optimizer, budget: int, name: str):
    return setup.run(optimizer, q0, budget, lambda q: setup.score(q, setup.val), name)


def _decision(setup: Setup):
    """The lattice methods' decision batch: 128 other examples per step."""
    return A.decision_batch(setup.config.batch_size, 128)


def _fraction(q0, moved: float) -> float:
    """The probability that a code moves, for about ``moved`` codes moved of ``q0``'s."""
    return min(1.0, moved / q0.num_codes)


def lattice_sa(setup: Setup, q0, hp: dict, budget: int):
    """Annealing on ``q0``'s lattice, about ``hp["moved"]`` codes per proposal, noise-aware decisions at
    level ``hp["level"]``; ``(integer model, validation score, evals)``."""
    sa = A.simulated_annealing(setup.loss, 16, A.lattice(_fraction(q0, hp["moved"])), A.exponential(1.0, 0.99),
                               A.confident(hp["level"]), decision=_decision(setup))
    return _lattice_run(setup, q0, sa, budget, "lattice-sa")


def lattice_lowrank_sa(setup: Setup, q0, hp: dict, budget: int):
    """Annealing with rank-1 lattice moves of ``hp["scale"]``, decisions at level ``hp["level"]``;
    ``(integer model, validation score, evals)``."""
    sa = A.simulated_annealing(setup.loss, 16, A.lattice_low_rank(hp["scale"]), A.exponential(1.0, 0.99),
                               A.confident(hp["level"]), decision=_decision(setup))
    return _lattice_run(setup, q0, sa, budget, "lattice-lowrank-sa")


def lattice_es(setup: Setup, q0, hp: dict, budget: int):
    """ES on the lattice, 8 pairs each moving about ``hp["moved"]`` codes, learning rate ``hp["lr"]``,
    decisions at level ``hp["level"]``; ``(integer model, validation score, evals)``."""
    es = A.lattice_es(setup.loss, 8, _fraction(q0, hp["moved"]), hp["lr"], acceptance=A.confident(hp["level"]),
                      temperature=A.exponential(1.0, 0.99), decision=_decision(setup))
    return _lattice_run(setup, q0, es, budget, "lattice-es")


def method_trials(method: str, num: int) -> list[dict]:
    """The ``num`` trials of ``method`` (each ``{hyperparameter: value}``): the tuning study's Sobol
    draw from its search space, the same for every experiment seed."""
    return tuning.sample_trials(SEARCH_SPACES[method], num, tuning.method_seed(TRIALS_SEED, method))


def run_seed(seed: int, config: QuantizeConfig, model, data, log) -> dict:
    """x*, RTN and every method for one seed: their test -ELBO and the tuning trials."""
    train, val, test = data
    key_init, key_pre, key_run = jax.random.split(jax.random.key(seed), 3)
    setup = Setup(loss=sv.make_loss(model), train=train, val=val, test=test, config=config, key=key_run)
    params = sv.models.init(key_init, model, train[:1])
    if config.from_scratch:  # the methods train the rounded init
        x_star = params
    else:
        adam = sv.from_optax(setup.loss, optax.adam(1e-3))
        x_star, _, _ = dataclasses.replace(setup, key=key_pre).run(
            adam, params, config.pretrain_evals, lambda p: setup.score(p, val), "adam")
    q0 = quantize.quantize(x_star, config.bits, clip="mse")
    setup = dataclasses.replace(setup, start=x_star)
    methods = check_methods(config)
    out = {"x_star": setup.score(x_star, test), "rtn": setup.score(q0, test), "trials": {}, "methods": {}}
    start = "the random init" if config.from_scratch else "x*"
    log(f"seed {seed}: {start} {out['x_star']:.3f}, RTN at {config.bits} bits {out['rtn']:.3f} (test -ELBO)")
    chosen = {}
    for method, fn in (("ste-adam", ste_adam), ("adaround", adaround), ("lattice-sa", lattice_sa),
                       ("lattice-lowrank-sa", lattice_lowrank_sa), ("lattice-es", lattice_es)):
        if method not in methods:
            continue
        trials = [(hp, *fn(setup, q0, hp, config.budget_evals)) for hp in method_trials(method, config.trials)]
        out["trials"][method] = [{"setting": hp, "val_neg_elbo": best} for hp, _, best, _ in trials]
        hp, kept, best, evals = min(trials, key=lambda t: t[2])  # the best validation score (the first of ties)
        chosen[method] = hp
        out["methods"][method] = {"setting": hp, "val_neg_elbo": best, "evals": evals,
                                  "test_neg_elbo": setup.score(kept, test)}
    if "ste-then-lattice" in methods:
        q1, _, evals1 = ste_adam(setup, q0, chosen["ste-adam"], config.budget_evals // 2)
        kept, best, evals2 = lattice_sa(setup, q1, chosen["lattice-sa"], config.budget_evals - evals1)
        out["methods"]["ste-then-lattice"] = {"setting": [chosen["ste-adam"], chosen["lattice-sa"]],
                                              "val_neg_elbo": best, "evals": evals1 + evals2,
                                              "test_neg_elbo": setup.score(kept, test)}
    # The share of RTN's gap to x* recovered; None (JSON null, "-" in the tables) where there is no gap:
    # from scratch, or RTN no worse than x*.
    gap = None if config.from_scratch or out["rtn"] <= out["x_star"] else out["rtn"] - out["x_star"]
    for method, r in out["methods"].items():
        r["gap_recovered"] = None if gap is None else (out["rtn"] - r["test_neg_elbo"]) / gap
        share = "no gap" if gap is None else f"{100 * r['gap_recovered']:.0f} % of RTN's gap"
        change = r["test_neg_elbo"] - out["rtn"]
        log(f"seed {seed}: {method} {r['test_neg_elbo']:.3f} ({change:+.3f} from RTN, {share})")
    return out


def summarize(results: dict, config: QuantizeConfig) -> str:
    """summary.md: each method's test -ELBO and the share of RTN's gap it recovers (mean ± sd over seeds);
    from scratch, its change from the rounded init instead."""
    def ms(values, fmt=".3f"):
        return report.format_mean_sd(report.mean_sd(values), fmt)

    seeds = sorted(results, key=int)
    methods = [m for m in METHODS if all(m in results[s]["methods"] for s in seeds)]  # a run may have fewer
    if config.from_scratch:
        title = (f"Integer weights trained from scratch on {config.dataset}: {config.bits} bits, "
                 f"{config.budget_evals} evaluations")
        what = "trained from the random init rounded to the lattice, and its change from that rounded init"
        column, start, rounded = "change from the rounded init", "float random init", "rounded init (RTN)"
        last = lambda rows: ms([r["test_neg_elbo"] - results[s]["rtn"] for r, s in zip(rows, seeds)], "+.3f")  # noqa: E731
    else:
        title = f"Integer weights on {config.dataset}: {config.bits} bits, {config.budget_evals} evaluations after RTN"
        what = "and the fraction of RTN's gap to the float x* it recovers"
        column, start, rounded = "gap recovered", "float x*", "RTN"
        last = lambda rows: _share([r["gap_recovered"] for r in rows], ms)  # noqa: E731
    lines = [f"# {title} (seeds {', '.join(seeds)})", "",
             f"Test negative ELBO (nats) of the integer model each method's validation gate kept, {what} "
             "(mean ± sd over seeds).", "",
             f"| model | test -ELBO | {column} |", "|---|---|---|",
             f"| {start} | {ms([results[s]['x_star'] for s in seeds])} | – |",
             f"| {rounded} | {ms([results[s]['rtn'] for s in seeds])} | 0 |"]
    for method in methods:
        rows = [results[s]["methods"][method] for s in seeds]
        lines.append(f"| {method} | {ms([r['test_neg_elbo'] for r in rows])} | {last(rows)} |")
    chained = "; ste-then-lattice runs ste-adam's then lattice-sa's" if "ste-then-lattice" in methods else ""
    lines += ["", f"The settings each seed's validation trials chose ({config.trials} trials per method{chained}).", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(report.format_settings(results[s]["methods"][method]["setting"])
                                                   for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def _share(shares, ms) -> str:
    """The mean ± sd of the shares recovered, in %, over the seeds that had a gap ("-" if none had)."""
    shares = [100 * v for v in shares if v is not None]
    return f"{ms(shares, '.0f')} %" if shares else "-"


def main(argv=None, prog: str | None = None) -> dict:
    """``savae quantize``: flags -> x*, RTN and every method per seed -> results.json, summary.md."""
    parser = build_parser(prog)
    try:
        given = vars(flags.parse_with_config(parser, argv))
        config = QuantizeConfig.from_dict({k: v for k, v in given.items() if k != "config"}, "--", "quantize")
        seeds = check(config)
        model = sv.MLPVAE(hidden=config.hidden, latents=config.latents)
        train = sv.load(config.dataset, "train", config.data_dir)
        test = sv.load(config.dataset, "test", config.data_dir)
        train, val = sv.data.split_validation(train, config.validation)
        workdirs.prepare(Path(config.workdir), config.to_dict(), config, OUTPUTS, NOT_COMPARED,
                         defaults=QuantizeConfig().to_dict())
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    log = lambda line: print(line, flush=True)  # noqa: E731
    workdir = Path(config.workdir)
    results = json.loads((workdir / "results.json").read_text()) if config.resume and (
        workdir / "results.json").is_file() else {}
    left = [seed for seed in seeds if str(seed) not in results]
    if left and any(isinstance(r.get("trials", {}).get("ste-adam"), dict) for r in results.values()):
        # Seeds saved by the first protocol hold their trials as {value: score}: 3 fixed values each.
        parser.error(f"--resume: {workdir}'s seeds were tuned on the first protocol's fixed 3-value grids, "
                     f"the seeds left ({', '.join(map(str, left))}) would be tuned by --trials from the search "
                     "spaces, and the run would mix the two; start a new --workdir")
    data = tuple(jnp.asarray(d.images) for d in (train, val, test))
    with flags.disk_errors(parser.prog, workdir):
        checkpoint.atomic_write_json(workdir / "config.json", {"config": config.to_dict()})
        for seed in seeds:
            if str(seed) not in results:
                results[str(seed)] = run_seed(seed, config, model, data, log)
                checkpoint.atomic_write_json(workdir / "results.json", results)
        summary = summarize(results, config)
        checkpoint.atomic_write_text(workdir / "summary.md", summary)
    print(summary)
    return results
