"""Compare simulated annealing, hybrids and Optax baselines at equal budgets.

    python experiments/compare.py                      # digits, every method, ~2 min on 2 CPU cores
    python experiments/compare.py --dataset mnist --data-dir ../shared/data/mnist \
        --budget-evals 300000 --workdir runs/compare-mnist

Every method starts from the same parameters (same init key), sees the same
data order and keys, minimises the same loss and is scored by the same
evaluation (full test set, fixed evaluation key). Budgets are in loss
evaluations (one forward pass of one batch; a gradient step counts 3) and,
with --budget-seconds, in training seconds too.

Methods: adam, rmsprop, sgd (Optax); sa (annealing from the random init);
sa-refine (Adam for a share of the budget, then noise-aware annealing from its
optimum: a paired t-test on an independent decision batch); sa-refine-naive
(the same with the seed's rule, Metropolis on the selection batch);
langevin-sa (annealing with gradient-informed Langevin proposals, deciding on
an independent batch); es (ES recombination of all K evaluations into one Adam
move, from the random init) and es-refine (the same after the Adam half,
decided by the t-test).

With --validation F (default 0.1) a fraction F of the training set is held
out and every method returns its best-validation parameters (the driver's
validation gate); the test set is only reported. With --seeds 0,1,2 every
method runs once per seed and the summary shows mean ± sd.

Outputs in --workdir (each file written atomically): config.json,
results.json ({method: {"seeds": {seed: run}, "summary": {number: {mean, sd,
n}}}}), history_<method>_seed<s>.csv (a row every --eval-every steps, and one
at step 0: the shared initial parameters), trace_<method>_seed<s>.csv (one row
per step: the optimizer's info, e.g. the annealer's temperature, accepted, dL
and its standard errors), summary.md, report.html (the summary and every figure
in one self-contained page), test_neg_elbo_vs_seconds.png,
test_neg_elbo_vs_evals.png (--log-evals: log-scaled), sa_traces.png (per
annealing step, first seed), reconstructions_<method>.png,
samples_<method>.png (first seed); checkpoints/<method>/seed<s>/ (run state,
for --resume) and params/<method>/seed<s>/ (returned parameters).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from importlib import metadata
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import savae_jax as sv  # noqa: E402
from savae_jax import checkpoint, driver  # noqa: E402
from savae_jax import distributed  # noqa: E402

METHODS = ("adam", "rmsprop", "sgd", "sa", "sa-refine", "sa-refine-naive", "langevin-sa", "es", "es-refine")

# Per-method hyperparameters; --config FILE and --set METHOD.KEY=VALUE override them.
METHOD_DEFAULTS = {
    "adam": {"lr": 1e-3},
    "rmsprop": {"lr": 1e-3},
    "sgd": {"lr": 1e-2},
    "sa": {"proposal": "low_rank", "proposals": 64, "scale": 0.01, "t0": 0.01, "decay": 0.995},
    # Noise-aware refinement: select the best of K on the step's batch, accept it only if a paired
    # t-test on 512 other examples (fresh noise) says it is better at level 0.05.
    "sa-refine": {"adam_share": 0.5, "adam_lr": 1e-3, "proposal": "low_rank", "proposals": 64,
                  "scale": 0.001, "t0": 0.005, "decay": 0.995, "acceptance": "confident", "level": 0.05,
                  "decision_size": 512},
    # The seed's rule, for comparison: Metropolis on the batch the winner was selected on.
    "sa-refine-naive": {"adam_share": 0.5, "adam_lr": 1e-3, "proposal": "low_rank", "proposals": 64,
                        "scale": 0.001, "t0": 0.005, "decay": 0.995},
    "langevin-sa": {"proposal": "langevin", "proposals": 16, "langevin_step": 1e-3,
                    "langevin_optimizer": "adam", "langevin_lr": 1e-3, "t0": 0.01, "decay": 0.995,
                    "decision_size": 512},
    # ES recombination of all K = 64 evaluations into one Adam move, decided on 512 other examples:
    # greedily from the random init, by the t-test after the Adam half.
    "es": {"pairs": 32, "scale": 0.01, "es_lr": 1e-3, "acceptance": "greedy", "decision_size": 512},
    "es-refine": {"adam_share": 0.5, "adam_lr": 1e-3, "pairs": 32, "scale": 0.001, "es_lr": 1e-4,
                  "acceptance": "confident", "level": 0.05, "decision_size": 512},
}
REFINEMENTS = ("sa-refine", "sa-refine-naive", "es-refine")

DEFAULTS = {
    "dataset": "digits",
    "data_dir": None,
    "methods": ",".join(METHODS),
    "budget_evals": 15000,
    "budget_seconds": None,
    "seeds": [0],
    "validation": 0.1,
    "batch_size": 128,
    "binarize": "dynamic",
    **common.MODEL_DEFAULTS,
    "eval_iwae": 100,
    "eval_every": 200,
    "checkpoint_every": None,  # None: every 5th evaluation
    "method_config": METHOD_DEFAULTS,
}

# Settings that may differ between a run and its --resume.
NOT_COMPARED = ("resume", "quiet", "workdir", "log_evals")


def set_keys_help() -> str:
    """The --help epilog: the keys --set accepts for each method, with their defaults."""
    lines = ["keys of --set METHOD.KEY=VALUE (and of --config's method_config), per method, with defaults:"]
    for method in METHODS:
        keys = ", ".join(f"{k}={json.dumps(v)}" for k, v in method_keys(method).items())
        lines.append(f"  {method}: {keys}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=set_keys_help(),
                                formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--dataset", help=f"one of {', '.join(sv.data.DATASETS)} (default digits)")
    add("--data-dir", help="folder with MNIST IDX files or a TFDS data dir")
    add("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    add("--budget-evals", type=int, help="loss evaluations per method (default 15000)")
    add("--budget-seconds", type=float, help="training seconds per method (optional)")
    add("--seeds", help="comma-separated seeds, e.g. 0,1,2: every method runs once per seed (init, data "
                       "order, keys); the summary shows mean +- sd (default 0)")
    add("--seed", type=int, help="one seed (the same as --seeds N)")
    add("--validation", type=float, help="fraction of the training set held out for the validation gate "
                                         "(every method returns its best-validation parameters; default 0.1; "
                                         "0: no gate, the last parameters)")
    add("--batch-size", type=int, help="examples per step (default 128)")
    add("--binarize", choices=["dynamic", "static", "none"],
        help="dynamic (a fresh Bernoulli sample per batch), static (one fixed sample per image) or none "
             "(grey levels) (default dynamic)")
    add("--eval-every", type=int, help="steps between test evaluations (default 200)")
    add("--checkpoint-every", type=int, help="steps between checkpoints, a multiple of --eval-every (default 5x --eval-every)")
    add("--config", help="JSON file with any of these settings (flags win over it)")
    add("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="override one method hyperparameter, e.g. --set sa.scale=0.05 (a JSON value, a number or a "
             "bare word; repeat for more; the keys of each method are listed below; default: none)")
    add("--workdir", default="runs/compare", help="folder of every output (refused if it holds a run, "
                                                   "unless --resume)")
    add("--resume", action="store_true", help="continue the run in --workdir from its checkpoints")
    add("--quiet", action="store_true", help="no progress bars")
    add("--log-evals", action="store_true", help="plot test_neg_elbo_vs_evals.png on a log-scaled evaluations "
                                                 "axis (plotting only, not part of the run's config)")
    common.add_model_flags(p)
    common.add_scale_out_flags(p)
    common.show_defaults(p, DEFAULTS)
    return p


def parse_set(item: str) -> tuple[str, str, object]:
    """``--set METHOD.KEY=VALUE`` as ``(method, key, value)``; the value is JSON or a bare word."""
    target, sep, raw = item.partition("=")
    method, dot, name = target.partition(".")
    if not (sep and dot and name):
        raise ValueError(f"--set: expected METHOD.KEY=VALUE, got {item!r}")
    if method not in METHODS:
        raise ValueError(f"--set: unknown method {method!r} in {item!r}; choose from {', '.join(METHODS)}")
    try:
        return method, name, json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return method, name, float(raw)  # a number JSON does not read, such as .05 or 1e-3.
    except ValueError:
        return method, name, raw  # a bare word such as gaussian


def resolve_config(args) -> dict:
    """Defaults, then --config FILE, then flags, then --set; validated. ValueError names the flag."""
    config = json.loads(json.dumps(DEFAULTS))
    if args.config:
        try:
            from_file = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--config: cannot read {args.config}: {err}") from err
        unknown = set(from_file) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"--config: unknown settings {sorted(unknown)}")
        for method, overrides in from_file.pop("method_config", {}).items():
            config["method_config"].setdefault(method, {}).update(overrides)
        config.update(from_file)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and key not in ("method_config", "seeds"):
            config[key] = value
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seed: give either --seed or --seeds")
    if args.seed is not None:
        config["seeds"] = [args.seed]
    elif args.seeds is not None:
        try:
            config["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
    for item in args.set:
        method, name, value = parse_set(item)
        config["method_config"][method][name] = value
    check_config_types(config)

    methods = [m.strip() for m in str(config["methods"]).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    config["methods"] = ",".join(methods)
    seeds = config["seeds"]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ValueError(f"--seeds: must be distinct integers >= 0, at least one, got {seeds!r}")
    fraction = config["validation"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"--validation: must be a fraction in [0, 1) (0: no validation gate), got {fraction!r}")
    if config["dataset"] not in sv.data.DATASETS:
        raise ValueError(f"--dataset: unknown dataset {config['dataset']!r}; choose from "
                         f"{', '.join(sv.data.DATASETS)}")
    if config["checkpoint_every"] is None and isinstance(config["eval_every"], int):
        config["checkpoint_every"] = 5 * config["eval_every"]
    if not (isinstance(config["eval_iwae"], int) and config["eval_iwae"] >= 0):
        raise ValueError(f"--eval-iwae: must be an integer >= 0, got {config['eval_iwae']!r}")
    for key in ("budget_evals", "batch_size", "eval_every", "checkpoint_every"):
        if not (isinstance(config[key], int) and config[key] > 0):
            raise ValueError(f"--{key.replace('_', '-')}: must be a positive integer, got {config[key]!r}")
    if config["checkpoint_every"] % config["eval_every"]:
        raise ValueError(f"--checkpoint-every: must be a multiple of --eval-every "
                         f"({config['eval_every']}), got {config['checkpoint_every']}")
    if config["budget_seconds"] is not None and not config["budget_seconds"] > 0:
        raise ValueError(f"--budget-seconds: must be > 0, got {config['budget_seconds']}")
    if config["binarize"] not in ("dynamic", "static", "none"):
        raise ValueError(f"--binarize: must be dynamic, static or none, got {config['binarize']!r}")
    return config


def check_config_types(config: dict) -> None:
    """Refuse a setting of the wrong type (``--config {"hidden": true}``) or an unknown method in
    ``method_config``, naming the flag (the methods' own keys are checked by ``build_phases``)."""
    for key, default in DEFAULTS.items():
        if key in ("seeds", "method_config", "methods"):
            continue
        optional = default is None or key in common.NONE_KINDS
        config[key] = common.checked_value(common.flag_name("--", key), config[key],
                                           common.kind_of(key, default), optional)
    unknown = set(config["method_config"]) - set(METHODS)
    if unknown:
        raise ValueError(f"--config: unknown method(s) {sorted(unknown)} in method_config; "
                         f"choose from {', '.join(METHODS)}")


def unused_overrides(args, methods) -> list[str]:
    """The methods given a ``--set`` that this run does not run (their settings would do nothing)."""
    return sorted({parse_set(item)[0] for item in args.set} - set(methods))


def method_keys(method: str) -> dict:
    """The settings ``--set METHOD.KEY=VALUE`` accepts for ``method``, with their defaults."""
    if method in ("adam", "rmsprop", "sgd"):
        return dict(METHOD_DEFAULTS[method])
    own = {k: v for k, v in METHOD_DEFAULTS[method].items() if k in ("adam_share", "adam_lr")}
    base = common.ES_DEFAULTS if method in ("es", "es-refine") else common.SA_DEFAULTS
    return own | base | {k: v for k, v in METHOD_DEFAULTS[method].items() if k in base}


def build_phases(method: str, settings: dict, loss_fn, mesh=None, batch_size: int = 128) -> list[driver.Phase]:
    """A method's phases from its settings (ValueError names the offending --set key)."""
    prefix = f"--set {method}."
    if method in ("adam", "rmsprop", "sgd"):
        settings = common.check_settings(settings, METHOD_DEFAULTS[method], prefix, method)
        optimizer = common.make_optimizer(method, settings["lr"], f"{prefix}lr")
        return [driver.Phase(method, sv.from_optax(loss_fn, optimizer))]
    sa_settings = {k: v for k, v in settings.items() if k not in ("adam_share", "adam_lr")}
    if method in ("es", "es-refine"):
        annealer = common.make_es(loss_fn, sa_settings, prefix, batch_size=batch_size)
    else:
        annealer = common.make_annealer(loss_fn, sa_settings, prefix, mesh=mesh, batch_size=batch_size)
    if method not in REFINEMENTS:
        return [driver.Phase("es" if method == "es" else "sa", annealer)]
    own = {k: v for k, v in METHOD_DEFAULTS[method].items() if k in ("adam_share", "adam_lr")}
    settings = settings | common.check_settings(
        {k: v for k, v in settings.items() if k in own}, own, prefix, method)
    share = settings["adam_share"]
    if not 0 < share < 1:
        raise ValueError(f"{prefix}adam_share: must be in (0, 1), got {share}")
    adam = common.make_optimizer("adam", settings["adam_lr"], f"{prefix}adam_lr")
    return driver.refinement(sv.from_optax(loss_fn, adam), annealer, share=share,
                             names=("adam", "es" if method == "es-refine" else "sa"))


def environment() -> dict:
    versions = {name: metadata.version(name) for name in
                ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "savae_jax")}
    return {"versions": versions, "python": sys.version.split()[0], "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind}


def mean_sd(values) -> dict:
    """``{"mean", "sd", "n"}`` of a list of numbers; sd is the sample sd (n - 1), None for one value."""
    n = len(values)
    mean = sum(values) / n
    sd = None if n < 2 else math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "sd": sd, "n": n}


# The per-seed numbers every method's entry summarises over its seeds.
SUMMARISED = ("test_neg_elbo", "last_test_neg_elbo", "test_neg_iwae", "active_units", "evals", "steps", "seconds")


def aggregate(runs: dict) -> dict:
    """One method's entry of results.json: ``{"seeds": {seed: run}, "summary": {number: mean_sd}}``."""
    summary = {k: mean_sd([r[k] for r in runs.values()]) for k in SUMMARISED
               if all(k in r for r in runs.values())}
    return {"seeds": runs, "summary": summary}


def format_mean_sd(stat: dict | None, fmt: str = ".2f") -> str:
    """A :func:`mean_sd` as "mean ± sd" (just the mean for one value; "-" for none)."""
    if stat is None:
        return "-"
    sd_fmt = fmt.replace("+", "")  # a signed mean (a change), an unsigned sd
    return f"{stat['mean']:{fmt}}" + ("" if stat["sd"] is None else f" ± {stat['sd']:{sd_fmt}}")


def summarize(results: dict, config: dict) -> str:
    """summary.md: methods ranked by mean test negative ELBO (mean ± sd over seeds), ratios to Adam."""
    ranked = sorted(results.items(), key=lambda item: item[1]["summary"]["test_neg_elbo"]["mean"])
    ref = results.get("adam", {}).get("summary")
    gate = "best-validation" if config["validation"] else "last"
    seeds = ",".join(map(str, config["seeds"]))
    lines = [f"# {config['dataset']}: budget {config['budget_evals']} evaluations per method"
             + (f", {config['budget_seconds']} s" if config["budget_seconds"] else "")
             + f"; seeds {seeds} (mean ± sd)",
             "",
             f"Test numbers at the {gate} parameters"
             + (f" (validation: {config['validation']:g} of the training set)" if config["validation"] else "")
             + "; 'last' is the last parameters'.",
             "",
             f"| rank | method | test -ELBO (nats) | last test -ELBO | test -IWAE-{config['eval_iwae']} "
             "| active units | evals | steps | seconds | evals / Adam | time / Adam |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rank, (name, r) in enumerate(ranked, 1):
        m = r["summary"]
        ratio = lambda k: f"{m[k]['mean'] / ref[k]['mean']:.2f}" if ref and ref[k]["mean"] else "-"  # noqa: E731
        pm = format_mean_sd
        lines.append(f"| {rank} | {name} | {pm(m['test_neg_elbo'])} | {pm(m['last_test_neg_elbo'])} "
                     f"| {pm(m.get('test_neg_iwae'))} | {pm(m['active_units'], '.1f')} | {m['evals']['mean']:.0f} "
                     f"| {m['steps']['mean']:.0f} | {pm(m['seconds'], '.1f')} | {ratio('evals')} | {ratio('seconds')} |")
    refined = [name for name in results if name in REFINEMENTS]
    if refined:
        lines += ["", "Refinement from the gradient optimum, per seed (test -ELBO, nats): the end of the Adam "
                  "phase, the last annealing parameters, the parameters the validation gate kept.", "",
                  "| method | seed | end of adam | last | kept | last - end of adam |", "|---|---|---|---|---|---|"]
        for name in refined:
            for seed, run in results[name]["seeds"].items():
                start = run["phase_ends"]["adam"]
                lines.append(f"| {name} | {seed} | {start:.2f} | {run['last_test_neg_elbo']:.2f} "
                             f"| {run['test_neg_elbo']:.2f} | {run['last_test_neg_elbo'] - start:+.2f} |")
    return "\n".join(lines) + "\n"


def figure_files(workdir: Path, results: dict) -> list[str]:
    """The run's PNGs that exist, in reading order: the curves, the traces, then each method's grids."""
    names = ["test_neg_elbo_vs_evals.png", "test_neg_elbo_vs_seconds.png", "sa_traces.png"]
    names += [f"{kind}_{m}.png" for m in results for kind in ("reconstructions", "samples")]
    return [n for n in names if (workdir / n).is_file()]


def figures_markdown(figures: list[str]) -> str:
    """summary.md's figures section: the PNGs next to it, linked as images."""
    return "\n## Figures\n\n" + "".join(f"![{n[:-4]}]({n})\n\n" for n in figures) if figures else ""


def markdown_to_html(text: str) -> str:
    """The subset of Markdown summarize() writes (headings, paragraphs, pipe tables) as HTML."""
    import html

    out, table = [], []

    def flush_table():
        if table:
            head, *body = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
                           for line in table if not set(line.strip()) <= set("|-")]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


def report_html(summary: str, workdir: Path, figures: list[str]) -> str:
    """report.html: the summary's tables and every figure, embedded as base64 PNGs (one self-contained page)."""
    import base64
    import html

    images = "\n".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
        f'{base64.b64encode((workdir / n).read_bytes()).decode()}"><figcaption>{html.escape(n)}</figcaption></figure>'
        for n in figures)
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}figure{display:inline-block;margin:8px}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>compare.py report</title>"
            f"<style>{style}</style></head><body>\n{markdown_to_html(summary)}\n<h2>Figures</h2>\n{images}\n"
            "</body></html>\n")


def read_trace(path: Path) -> dict:
    """A trace CSV as columns: ``{field: array}`` (numbers as float, True/False as 1/0, empty as NaN;
    ``phase`` as strings)."""
    import numpy as np

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}

    def number(text: str) -> float:
        if text in ("True", "False"):
            return float(text == "True")
        return float(text) if text else math.nan

    return {k: np.array([r[k] for r in rows]) if k == "phase" else np.array([number(r[k]) for r in rows])
            for k in rows[0]}


def annealing_steps(trace: dict) -> dict:
    """The annealing steps of a trace (the rows with a temperature), one entry per step."""
    import numpy as np

    if "temperature" not in trace:
        return {}
    keep = ~np.isnan(trace["temperature"])
    return {k: v[keep] for k, v in trace.items()}


def running_mean(values, window: int):
    """The mean of the last ``window`` values at every step (fewer at the start): one value per step."""
    import numpy as np

    values = np.asarray(values, float)
    total = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (total[ends] - total[starts]) / (ends - starts)


def finite_or_nan(values):
    """``values`` with every non-finite entry NaN (not drawn)."""
    import numpy as np

    return np.where(np.isfinite(values), values, np.nan)


def traces_figure(traces: dict):
    """One row of panels per annealing method, one point per annealing step: the temperature, the
    acceptance rate (running over 25 steps, and cumulative), dL with its standard error band.

    Args:
      traces: ``{method: read_trace(...) columns}``; methods without annealing steps are skipped.
    Returns:
      the matplotlib figure, or None when no method anneals.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    annealed = {name: steps for name, t in traces.items() if len((steps := annealing_steps(t)).get("step", ()))}
    if not annealed:
        return None
    fig, axes = plt.subplots(len(annealed), 3, figsize=(13, 2.6 * len(annealed)), squeeze=False)
    for (ax_t, ax_a, ax_d), (name, t) in zip(axes, annealed.items()):
        x = np.arange(1, len(t["temperature"]) + 1)  # annealing step, counted from the phase's start
        ax_t.plot(x, t["temperature"], color="C0")
        ax_t.set(yscale="log" if np.all(t["temperature"] > 0) else "linear",  # greedy rules run at T = 0
                 ylabel="temperature (nats)", title=f"{name}: {len(x)} annealing steps")
        ax_a.plot(x, running_mean(t["accepted"], 25), color="C1", label="last 25 steps")
        ax_a.plot(x, t["acceptance_rate"], color="C1", ls="--", alpha=0.6, label="cumulative")
        if "swap_rate" in t:
            ax_a.plot(x, t["swap_rate"], color="C2", label="swap rate")
        ax_a.set(ylim=(-0.05, 1.05), ylabel="acceptance rate")
        ax_a.legend(fontsize=7, loc="best")
        delta = finite_or_nan(t["delta"])  # +inf: no finite proposal at that step
        stderr = t.get("stderr", np.full_like(delta, np.nan))
        label = "decided dL" if np.any(np.isfinite(stderr)) else "dL"
        ax_d.plot(x, delta, color="C3", lw=0.8, label=label)
        if np.any(np.isfinite(stderr)):
            ax_d.fill_between(x, delta - stderr, delta + stderr, color="C3", alpha=0.25, label="+- 1 standard error")
        selection = finite_or_nan(t.get("delta_selection", t["delta"]))
        if not np.array_equal(selection, delta, equal_nan=True):
            ax_d.plot(x, selection, color="C7", lw=0.6, alpha=0.7, label="dL on the selection batch")
        ax_d.axhline(0.0, color="k", lw=0.5)
        shown = np.concatenate([delta, selection])
        finite = shown[np.isfinite(shown)]
        if finite.size:  # a few outlying steps should not flatten the rest
            low, high = np.percentile(finite, [1, 99])
            pad = 0.1 * (high - low) + 1e-6
            ax_d.set_ylim(low - pad, high + pad)
        ax_d.set(ylabel="dL (nats)")
        ax_d.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("annealing step")
    fig.tight_layout()
    return fig


def curves_figure(results: dict, axis: str, log_scale: bool = False):
    """Test -ELBO of every method against ``axis`` ("evals" or "seconds"): the mean over seeds, a
    min-to-max band with several seeds; every curve starts at its step-0 row.

    Args:
      results: ``run_all``'s results.
      axis: the history field on the horizontal axis.
      log_scale: a symmetric-log horizontal axis (linear below the first positive value, so the
        step-0 rows at 0 stay on it).
    Returns:
      the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        histories = [run["history"] for run in r["seeds"].values()]
        rows = min(len(h) for h in histories)  # equal unless a time budget cut a seed short
        x = np.mean([[row[axis] for row in h[:rows]] for h in histories], axis=0)
        y = np.array([[row["test_neg_elbo"] for row in h[:rows]] for h in histories])
        (line,) = ax.plot(x, y.mean(axis=0), label=name, marker=".")
        if len(histories) > 1:
            ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2)
    label = {"evals": "loss evaluations", "seconds": "training seconds"}[axis]
    if log_scale:
        first = min((row[axis] for r in results.values() for run in r["seeds"].values()
                     for row in run["history"] if row[axis] > 0), default=1)
        ax.set_xscale("symlog", linthresh=first)
        label += " (symmetric log scale)"
    ax.set_xlabel(label)
    ax.set_ylabel("test negative ELBO (nats), last parameters")
    ax.set_title("mean over seeds; band: min to max" if len(next(iter(results.values()))["seeds"]) > 1
                 else "", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves start together
    ax.grid(alpha=0.3)
    return fig


def plot(workdir: Path, results: dict, log_evals: bool = False) -> None:
    """Test -ELBO against evaluations and seconds (mean over seeds, band: min to max; every curve
    starts at the step-0 row of the shared initial parameters), and the first seed's per-step
    annealing traces (``sa_traces.png``, from the ``trace_<method>_seed<s>.csv`` files).

    Args:
      workdir: the run's folder (the trace CSVs are read from it, the PNGs written to it).
      results: ``run_all``'s results.
      log_evals: a log-scaled evaluations axis (symmetric-log, so evaluations 0 stays on it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis in ("seconds", "evals"):
        fig = curves_figure(results, axis, log_evals and axis == "evals")
        checkpoint.save_figure(fig, workdir / f"test_neg_elbo_vs_{axis}.png")
        plt.close(fig)
    traces = {}
    for name, r in results.items():
        path = workdir / f"trace_{name}_seed{next(iter(r['seeds']))}.csv"
        if path.exists():
            traces[name] = read_trace(path)
    fig = traces_figure(traces)
    if fig is not None:
        checkpoint.save_figure(fig, workdir / "sa_traces.png")
        plt.close(fig)


def validate(args, mesh) -> tuple:
    """Everything main needs, checked before any file is written (ValueError names the flag)."""
    config = resolve_config(args)
    model = common.make_model(config)
    train_loss = common.make_training_loss(model, config)
    methods = {m: build_phases(m, config["method_config"][m], train_loss, mesh, config["batch_size"])
               for m in config["methods"].split(",")}
    for m in unused_overrides(args, methods):  # checked like the others, then reported as doing nothing
        build_phases(m, config["method_config"][m], train_loss, mesh, config["batch_size"])
        print(f"compare.py: warning: --set {m}.* has no effect: {m} is not in --methods", file=sys.stderr)
    train = sv.load(config["dataset"], "train", config["data_dir"])
    test = sv.load(config["dataset"], "test", config["data_dir"])
    val = None
    if config["validation"]:
        try:
            train, val = sv.data.split_validation(train, config["validation"])
        except ValueError as err:
            raise ValueError(f"--validation: {err}") from err
    sv.data.num_batches(len(train.images), config["batch_size"])
    probe_params = sv.models.init(jax.random.key(0), model, train.images[:1])
    for name, phases in methods.items():
        try:
            driver.phase_steps(phases, len(train.images), config["batch_size"], config["budget_evals"])
        except ValueError as err:
            raise ValueError(f"--budget-evals: {err}") from err
        for phase in phases:  # e.g. a rank larger than a layer: before any file
            sv.data.num_batches(len(train.images), driver.phase_batch_size(phase, config["batch_size"]))
            if phase.name in ("sa", "es"):
                try:
                    common.probe_step(phase.optimizer, probe_params, train.images.shape[1:], config["batch_size"])
                except ValueError as err:
                    raise ValueError(f"--set {name}.*: {err}") from err
    return config, model, methods, train, val, test


def main(argv=None) -> dict:
    parser = build_parser()
    args, mesh = common.parse_args(parser, argv)
    workdir = Path(args.workdir)
    try:
        config, model, methods, train, val, test = validate(args, mesh)
        common.check_same_workdir(workdir)
        common.check_workdir(workdir, config, args.resume, NOT_COMPARED)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err).replace("batch_size", "--batch-size"))

    # Across processes (--distributed) every process runs the same computation
    # on the same --workdir; process 0 alone prints and writes the files (the
    # checkpoints and params/ are Orbax's collective saves, written by it too).
    primary = distributed.is_primary()
    distributed.barrier("compare.py: workdir checked")  # before process 0 writes config.json
    log = common.make_log()
    log(common.backend_line())
    if primary and not (workdir / "config.json").exists():
        checkpoint.atomic_write_json(workdir / "config.json", {"config": config, **environment()})
    log(f"{config['dataset']}: {len(train.images)} train / {0 if val is None else len(val.images)} validation / "
        f"{len(test.images)} test, budget {config['budget_evals']} evals per method, seeds "
        f"{','.join(map(str, config['seeds']))}, backend {jax.default_backend()}")
    try:
        results = run_all(methods, config, args, workdir, model, (train, val, test), mesh, log)
    except driver.NonFiniteLossError as err:
        sys.exit(f"compare.py: stopped: {err}. Results of finished methods are in {workdir}.")
    except OSError as err:
        sys.exit(f"compare.py: cannot write to --workdir {workdir}: {err}. "
                 "Files written before this error are intact; fix the disk and rerun with --resume.")
    summary = summarize(results, config)
    if primary:
        plot(workdir, results, args.log_evals)
        figures = figure_files(workdir, results)
        checkpoint.atomic_write_text(workdir / "summary.md", summary + figures_markdown(figures))
        checkpoint.atomic_write_text(workdir / "report.html", report_html(summary, workdir, figures))
        print(summary)
    return results


def run_all(methods, config, args, workdir, model, data, mesh, log) -> dict:
    """Run every method on every seed; results.json grows after each run.

    Seed ``s`` fixes the initial parameters, the data order and every
    method's keys, so all methods of one seed start from the same point and
    see the same batches. Every method is scored by the true ELBO (beta = 1)
    whatever it trained on; the validation split (if any) chooses the kept
    parameters, the test set is only reported.
    """
    train, val, test = data
    binarize = None if config["binarize"] == "none" else config["binarize"]
    batch_fn = sv.data.BatchFn(binarize)  # one batch function for training and evaluation
    eval_loss = sv.make_loss(model)
    evaluate = lambda p: sv.evaluation.evaluate(eval_loss, p, test.images, binarize=batch_fn)  # noqa: E731
    validate = None if val is None else (
        lambda p: sv.evaluation.evaluate(eval_loss, p, val.images, binarize=batch_fn))  # noqa: E731
    results = {}
    for name, phases in methods.items():
        runs = {}
        for index, seed in enumerate(config["seeds"]):
            key_init, key_run, key_grid = jax.random.split(jax.random.key(seed), 3)
            params0 = sv.models.init(key_init, model, train.images[:1])
            tag = f"{name}/seed{seed}"
            params, history, trace = driver.run(
                key_run, phases, params0, train.images, batch_size=config["batch_size"],
                eval_every=config["eval_every"], budget_evals=config["budget_evals"],
                budget_seconds=config["budget_seconds"], batch_fn=batch_fn, evaluate=evaluate, validate=validate,
                checkpoint_every=config["checkpoint_every"], checkpoint_dir=workdir / "checkpoints" / tag,
                resume=args.resume, mesh=mesh, progress=not args.quiet and distributed.is_primary(), desc=tag,
                log=log, initial_row=True, trace=True)
            runs[str(seed)] = run = method_result(history, sv.evaluation.report(
                model, params, test.images, binarize=batch_fn, iwae_samples=config["eval_iwae"]))
            log(f"{tag}: test negative ELBO {run['test_neg_elbo']:.3f} nats (last parameters "
                f"{run['last_test_neg_elbo']:.3f}) after {run['evals']} evals, {run['seconds']:.1f} s")
            checkpoint.save_params(workdir / "params" / tag, params)  # collective: every process
            if distributed.is_primary():
                common.write_csv(workdir / f"history_{name}_seed{seed}.csv", history)
                common.write_csv(workdir / f"trace_{name}_seed{seed}.csv", trace)  # one row per step
                if index == 0:
                    common.save_grids(workdir, key_grid, params, model, test.images, binarize, label=name)
            results[name] = aggregate(runs)  # results.json grows after every run
            if distributed.is_primary():
                checkpoint.atomic_write_json(workdir / "results.json", checkpoint.json_safe(results))
    return results


def method_result(history: list[dict], report: dict) -> dict:
    """One run's numbers: test scores of the returned and the last parameters, costs, diagnostics, history.

    ``test_neg_elbo`` and the IWAE are the returned parameters' (the
    best-validation ones with a validation split, else the last);
    ``last_test_neg_elbo`` is the last row's; ``phase_ends`` the test
    -ELBO at the end of each phase (e.g. the Adam half of a refinement).
    """
    last = history[-1]
    out = {
        "test_neg_elbo": report["test_neg_elbo"],
        "last_test_neg_elbo": last["test_neg_elbo"],
        **{k: report[k] for k in ("test_neg_iwae", "elbo_iwae_gap", "bits_per_dim") if k in report},
        "active_units": report["diagnostics"]["active_units"],
        "evals": last["evals"], "steps": last["step"], "seconds": last["seconds"],
        "phase_ends": {row["phase"]: row["test_neg_elbo"] for row in history},  # the last row of each phase
    }
    if "best_step" in last:
        out["best_step"] = last["best_step"]  # the step of the kept parameters (0: the initial ones)
    return out | {"diagnostics": report["diagnostics"], "history": history}


if __name__ == "__main__":
    main(sys.argv[1:])
