"""Reports: statistics over seeds, the comparison's summary table, the self-contained HTML page, trace CSVs."""

from __future__ import annotations

import csv
import math
import sys
from importlib import metadata
from pathlib import Path

import jax

from savae_jax.experiments.registry import REFINEMENTS


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


# Time-to-result targets, fixed before the runs: the reference method's validation -ELBO at its kept
# parameters (the mean over seeds of its best row) plus these nats. The reference is Adam when it runs.
TARGET_OFFSETS = (1.0, 3.0)
TARGET_REFERENCE = "adam"


def time_to_target(history: list[dict], target: float) -> tuple[float, float]:
    """``(evaluations, seconds)`` at the first history row whose validation -ELBO is <= ``target``
    (the step-0 row counts: 0, 0.0); ``(inf, inf)`` if no row reaches it or no row was validated."""
    for row in history:
        value = row.get("val_neg_elbo")
        if value is not None and value <= target:
            return float(row["evals"]), float(row["seconds"])
    return math.inf, math.inf


def targets(results: dict, offsets=TARGET_OFFSETS, reference: str = TARGET_REFERENCE) -> list[float] | None:
    """The validation targets of a comparison: ``reference``'s best validation -ELBO (mean over its
    seeds) plus each offset; None when the reference did not run or had no validation gate."""
    runs = results.get(reference, {}).get("seeds", {})
    best = [min(r["val_neg_elbo"] for r in run["history"] if r.get("val_neg_elbo") is not None)
            for run in runs.values() if any(r.get("val_neg_elbo") is not None for r in run["history"])]
    if not best or len(best) != len(runs):
        return None
    return [sum(best) / len(best) + o for o in offsets]


def median(values) -> float:
    """The median (inf counts as the largest value, so a method that misses on most seeds gets inf)."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def time_to_target_table(results: dict, goals: list[float]) -> list[str]:
    """Markdown: each method's median over seeds of the evaluations and seconds to each target."""
    head = " | ".join(f"evals to {g:.2f} | seconds to {g:.2f}" for g in goals)
    lines = [f"| method | {head} |", "|---|" + "---|---|" * len(goals)]
    for name, entry in results.items():
        cells = []
        for goal in goals:
            hits = [time_to_target(run["history"], goal) for run in entry["seeds"].values()]
            evals, seconds = median([h[0] for h in hits]), median([h[1] for h in hits])
            cells.append(f"{evals:.0f} | {seconds:.1f}" if math.isfinite(evals) else "∞ | ∞")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def format_settings(settings) -> str:
    """Hyperparameters as "name=value, ..." (floats to 3 significant digits); a list of such dicts
    (the phases of a method) joined by " then "; anything else as it is."""
    if isinstance(settings, list):
        return " then ".join(format_settings(s) for s in settings)
    if not isinstance(settings, dict):
        return str(settings)
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def format_mean_sd(stat: dict | None, fmt: str = ".2f") -> str:
    """A :func:`mean_sd` as "mean ± sd" (just the mean for one value; "-" for none)."""
    if stat is None:
        return "-"
    sd_fmt = fmt.replace("+", "")  # a signed mean (a change), an unsigned sd
    return f"{stat['mean']:{fmt}}" + ("" if stat["sd"] is None else f" ± {stat['sd']:{sd_fmt}}")


def summarize(results: dict, config) -> str:
    """summary.md: methods ranked by mean test negative ELBO (mean ± sd over seeds), ratios to Adam."""
    ranked = sorted(results.items(), key=lambda item: item[1]["summary"]["test_neg_elbo"]["mean"])
    ref = results.get("adam", {}).get("summary")
    gate = "best-validation" if config.validation else "last"
    seeds = ",".join(map(str, config.seeds))
    lines = [f"# {config.dataset}: budget {config.budget_evals} evaluations per method"
             + (f", {config.budget_seconds} s" if config.budget_seconds else "")
             + f"; seeds {seeds} (mean ± sd)",
             "",
             f"Test numbers at the {gate} parameters"
             + (f" (validation: {config.validation:g} of the training set)" if config.validation else "")
             + "; 'last' is the last parameters'.",
             "",
             f"| rank | method | test -ELBO (nats) | last test -ELBO | test -IWAE-{config.eval_iwae} "
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
    goals = targets(results)
    if goals is not None:
        lines += ["", f"Time to result: evaluations and training seconds until the validation -ELBO first "
                  f"reaches each target (the {TARGET_REFERENCE} method's best validation value, mean over its "
                  f"seeds, + {' and + '.join(f'{o:g}' for o in TARGET_OFFSETS)} nats; median over seeds; "
                  "∞: not reached).", ""] + time_to_target_table(results, goals)
    return "\n".join(lines + [""] + effective_settings(results, config)) + "\n"


def effective_settings(results: dict, config) -> list[str]:
    """Each method's settings as the run used them (its defaults and --set/--config overrides; every
    other key at the annealer's or ES's default). A refinement's Adam half reads its own ``adam_lr``."""
    lines = ["Settings of each method (its defaults with --set/--config applied; each method has its own keys, "
             "so --set adam.lr does not change the Adam half of a refinement, which reads adam_lr):", ""]
    for name in results:
        settings = getattr(config, "method_config", {}).get(name, {})
        lines.append(f"- {name}: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    return lines


def figure_files(workdir: Path, results: dict) -> list[str]:
    """The run's PNGs that exist, in reading order: the curves, the traces, then each method's grids."""
    names = ["test_neg_elbo_vs_evals.png", "test_neg_elbo_vs_seconds.png", "sa_traces.png", "performance_profile.png"]
    names += [f"{kind}_{m}.png" for m in results for kind in ("reconstructions", "samples")]
    return [n for n in names if (workdir / n).is_file()]


def figures_markdown(figures: list[str]) -> str:
    """summary.md's figures section: the PNGs next to it, linked as images."""
    return "\n## Figures\n\n" + "".join(f"![{n[:-4]}]({n})\n\n" for n in figures) if figures else ""


def markdown_to_html(text: str) -> str:
    """Markdown (the summaries' headings, paragraphs, pipe tables and image links) as HTML, by markdown-it-py."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


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
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>savae compare report</title>"
            f"<style>{style}</style></head><body>\n{markdown_to_html(summary)}\n<h2>Figures</h2>\n{images}\n"
            "</body></html>\n")


def trace_columns(rows: list[dict]) -> dict:
    """Trace rows (``driver.run(..., trace=True)``'s, or a trace CSV's) as columns ``{field: array}``.

    Numbers become floats, True/False 1/0, missing or empty values NaN; ``phase`` stays strings.
    """
    import numpy as np

    def number(value) -> float:
        if value in ("True", "False"):
            return float(value == "True")
        return math.nan if value is None or value == "" else float(value)

    fields = list(dict.fromkeys(k for row in rows for k in row))
    return {k: np.array([r.get(k, "") for r in rows]) if k == "phase" else np.array([number(r.get(k)) for r in rows])
            for k in fields}


def read_trace(path: Path) -> dict:
    """A trace CSV (``trace_<method>_seed<s>.csv``) as columns (:func:`trace_columns`)."""
    with open(path, newline="") as f:
        return trace_columns(list(csv.DictReader(f)))


def annealing_steps(trace: dict) -> dict:
    """The annealing steps of a trace (the rows with a temperature), one entry per step."""
    import numpy as np

    if "temperature" not in trace:
        return {}
    keep = ~np.isnan(trace["temperature"])
    return {k: v[keep] for k, v in trace.items()}


