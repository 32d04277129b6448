"""Figures of the experiment layer: learning curves, per-step annealing traces, image grids.

matplotlib is imported inside each function (never by ``import savae_jax``);
the functions return a figure for a notebook, and the ``save_*`` ones write
PNGs with the Agg backend for the subcommands.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

import savae_jax as sv
from savae_jax import checkpoint
from savae_jax.experiments import report
from savae_jax.experiments.report import annealing_steps, read_trace


def running_mean(values, window: int):
    """The mean of the last ``window`` values at every step (fewer at the start): one value per step."""
    values = np.asarray(values, float)
    total = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (total[ends] - total[starts]) / (ends - starts)


def finite_or_nan(values):
    """``values`` with every non-finite entry NaN (not drawn)."""
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

    annealed = {name: steps for name, t in traces.items() if len((steps := annealing_steps(t)).get("step", ()))}
    if not annealed:
        return None
    fig, axes = plt.subplots(len(annealed), 3, figsize=(13, 2.6 * len(annealed)), squeeze=False)
    for (ax_t, ax_a, ax_d), (name, t) in zip(axes, annealed.items()):
        t = _coldest_replica(t)
        x = np.arange(1, len(t["temperature"]) + 1)  # annealing step, counted from the phase's start
        ax_t.set(title=f"{name}: {len(x)} annealing steps", ylabel="temperature (nats)")
        constant = np.unique(t["temperature"])
        if constant.size == 1:  # e.g. ES decides at T = 0: say so rather than draw a flat line
            ax_t.text(0.5, 0.5, f"T = {constant[0]:g} at every step", ha="center", va="center",
                      transform=ax_t.transAxes)
            ax_t.set_yticks([])
        else:
            ax_t.plot(x, t["temperature"], color="C0")
            ax_t.set(yscale="log" if np.all(t["temperature"] > 0) else "linear")
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


def _coldest_replica(trace: dict) -> dict:
    """A replica exchange's trace with its coldest replica's step fields (``replicas.delta_0``, ...)
    under the plain names (``delta``, ...) a single annealer's trace has; other traces unchanged."""
    cold = {k[len("replicas."):-2]: v for k, v in trace.items() if k.startswith("replicas.") and k.endswith("_0")}
    return {**cold, **trace} if cold else trace


def histories_figure(histories: dict, axis: str, log_scale: bool = False):
    """Test -ELBO of each curve against ``axis``: the mean over its runs, a min-to-max band with several.

    Args:
      histories: ``{label: [history, ...]}``, one history (a list of rows with ``axis`` and
        ``"test_neg_elbo"``) per run (seed) of that curve.
      axis: the row field on the horizontal axis ("evals" or "seconds").
      log_scale: a symmetric-log horizontal axis (linear below the first positive value, so
        rows at 0 stay on it).
    Returns:
      the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in histories.items():
        rows = min(len(h) for h in runs)  # equal unless a time budget cut a seed short
        x = np.mean([[row[axis] for row in h[:rows]] for h in runs], axis=0)
        y = np.array([[row["test_neg_elbo"] for row in h[:rows]] for h in runs])
        (line,) = ax.plot(x, y.mean(axis=0), label=name, marker=".")
        if len(runs) > 1:
            ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2)
    label = {"evals": "loss evaluations", "seconds": "training seconds"}[axis]
    if log_scale:
        first = min((row[axis] for runs in histories.values() for h in runs for row in h if row[axis] > 0),
                    default=1)
        ax.set_xscale("symlog", linthresh=first)
        label += " (symmetric log scale)"
    ax.set_xlabel(label)
    ax.set_ylabel("test negative ELBO (nats), last parameters")
    several = len(next(iter(histories.values()))) > 1
    ax.set_title("mean over seeds; band: min to max" if several else "", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves start together
    ax.grid(alpha=0.3)
    return fig


def curves_figure(results: dict, axis: str, log_scale: bool = False):
    """Test -ELBO of every method of a comparison against ``axis`` (:func:`histories_figure` of its seeds).

    Args:
      results: ``compare.run_all``'s results (``{method: {"seeds": {seed: run}}}``).
      axis: "evals" or "seconds".
      log_scale: a symmetric-log horizontal axis; every curve starts at its step-0 row.
    """
    return histories_figure({name: [run["history"] for run in r["seeds"].values()] for name, r in results.items()},
                            axis, log_scale)


def _agg():
    """pyplot on the Agg backend (files, no display): what the subcommands write with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    checkpoint.save_figure(fig, path)
    _agg().close(fig)


def save_comparison_figures(workdir: Path, results: dict, log_evals: bool = False) -> None:
    """Test -ELBO against evaluations and seconds, and the first seed's per-step annealing traces.

    Writes ``test_neg_elbo_vs_{seconds,evals}.png`` and ``sa_traces.png`` (from the
    ``trace_<method>_seed<s>.csv`` files) into ``workdir``.

    Args:
      workdir: the run's folder (the trace CSVs are read from it, the PNGs written to it).
      results: ``compare.run_all``'s results.
      log_evals: a log-scaled evaluations axis (symmetric-log, so evaluations 0 stays on it).
    """
    _agg()
    for axis in ("seconds", "evals"):
        _save(curves_figure(results, axis, log_evals and axis == "evals"), workdir / f"test_neg_elbo_vs_{axis}.png")
    traces = {}
    for name, r in results.items():
        path = workdir / f"trace_{name}_seed{next(iter(r['seeds']))}.csv"
        if path.exists():
            traces[name] = read_trace(path)
    fig = traces_figure(traces)
    if fig is not None:
        _save(fig, workdir / "sa_traces.png")
    goals = report.targets(results)
    if goals is not None:
        _save(performance_profile_figure(results, goals), workdir / "performance_profile.png")


def performance_profile(results: dict, goals: list[float]) -> dict:
    """Dolan-More performance profiles of evaluations to each target: ``{method: (taus, fractions)}``.

    A problem is one (seed, target) pair; a method's ratio on it is its evaluations to the target
    over the fewest any method needed (inf if it never got there). ``fractions[i]`` is the share
    of problems on which its ratio is <= ``taus[i]``.
    """
    seeds = list(next(iter(results.values()))["seeds"])
    cost = {m: [report.time_to_target(e["seeds"][s]["history"], g)[0] for s in seeds for g in goals]
            for m, e in results.items() if all(s in e["seeds"] for s in seeds)}
    best = [min(c[i] for c in cost.values()) for i in range(len(seeds) * len(goals))]
    ratios = {m: [c[i] / best[i] if math.isfinite(c[i]) and best[i] > 0 else (1.0 if c[i] == best[i] == 0 else
                                                                                 math.inf)
                  for i in range(len(best))] for m, c in cost.items()}
    finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
    taus = np.unique(np.concatenate([[1.0], finite, [max(finite, default=1.0) * 1.05]]))
    return {m: (taus, np.array([np.mean([r <= t for r in rs]) for t in taus])) for m, rs in ratios.items()}


def performance_profile_figure(results: dict, goals: list[float]):
    """The :func:`performance_profile` of every method, a step curve each (log-scaled tau)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (taus, fractions) in performance_profile(results, goals).items():
        ax.step(taus, fractions, where="post", label=name)
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="tau (evaluations to the target / the fewest any method needed)",
           ylabel="fraction of (seed, target) problems",
           title="Performance profile: targets " + ", ".join(f"{g:.2f}" for g in goals))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def grid_figures(key, params, model, images, binarize, label: str | None = None) -> dict:
    """``{"reconstructions": fig, "samples": fig}``: 16 inputs over their reconstructions, 32 prior samples.

    Args:
      key: one key, split for the binarisation, the reconstruction and the prior samples.
      params, model: the VAE.
      images: the inputs (the first 16 are shown); their shape is the samples'.
      binarize: None, or binarise the inputs with a Bernoulli draw (as the model saw in training).
      label: a method's name, put before each title.
    """
    import matplotlib.pyplot as plt

    key_bin, key_rec, key_prior = jax.random.split(key, 3)
    x = images[:16]
    if binarize is not None:
        x = sv.data.binarize(key_bin, x)
    rec = sv.models.reconstruct(key_rec, params, model, x)
    samples = sv.models.sample_prior(key_prior, params, model, 32, images.shape[1:])
    figures = {}
    for kind, shown, title in (
        ("reconstructions", np.concatenate([np.asarray(x), np.asarray(rec)]),
         "test inputs (top two rows) and reconstructions (bottom two)"),
        ("samples", np.asarray(samples), "samples from the prior (likelihood means)"),
    ):
        grid = sv.evaluation.image_grid(shown)
        fig, ax = plt.subplots(figsize=(5, 5 * grid.shape[0] / grid.shape[1]))
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{label}: {title}" if label else title, fontsize=8)
        ax.axis("off")
        figures[kind] = fig
    return figures


def save_grids(workdir, key, params, model, test_images, binarize, label: str | None = None) -> None:
    """Write reconstructions[_label].png and samples[_label].png (:func:`grid_figures`) into ``workdir``."""
    _agg()
    suffix = f"_{label}" if label else ""
    for kind, fig in grid_figures(key, params, model, test_images, binarize, label).items():
        _save(fig, Path(workdir) / f"{kind}{suffix}.png")


def plateau_figure(results: dict, arms):
    """Each arm's test -ELBO minus x*'s against the evaluations after x*, one line per seed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, arm in enumerate(arms):
        for j, r in enumerate(results.values()):
            rows = r["arms"][arm]["history"]
            ax.plot([0] + [row["evals"] for row in rows],
                    [0.0] + [row["test_neg_elbo"] - r["x_star"]["test_neg_elbo"] for row in rows],
                    color=f"C{i}", alpha=0.8, label=arm if j == 0 else None)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set(xlabel="evaluations after x*", ylabel="test -ELBO minus x*'s (nats), last parameters")
    ax.set_title("one line per seed", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def save_plateau_figure(workdir: Path, results: dict, arms) -> None:
    """plateau.png (:func:`plateau_figure`) in ``workdir``."""
    _agg()
    _save(plateau_figure(results, arms), Path(workdir) / "plateau.png")


def tuning_figure(method: str, rows: list[dict], names: list[str]):
    """The validation score of every trial of ``method`` against each hyperparameter (one panel each);
    the default settings' trial in red. Log-scaled axes for values spanning more than a decade."""
    import matplotlib.pyplot as plt

    names = names or ["trial"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        sampled = [r for r in rows if r["trial"] != "default"]
        xs = [r.get(name, r["trial"]) for r in sampled]
        ax.scatter(xs, [r["val_neg_elbo"] for r in sampled], s=14, label="trials")
        for r in rows:
            if r["trial"] == "default":
                ax.scatter([r.get(name, 0)], [r["val_neg_elbo"]], color="C3", marker="x", label="default")
        numbers = [x for x in xs if isinstance(x, (int, float))]
        if numbers and min(numbers) > 0 and max(numbers) / min(numbers) > 10:
            ax.set_xscale("log")
            # Within about one decade matplotlib labels the minor ticks too, and they overlap.
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set(xlabel=name, title=method if name == names[0] else "")
    axes[0][0].set_ylabel("validation -ELBO (nats)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_tuning_figure(workdir, method: str, rows: list[dict], names: list[str]) -> None:
    """tuning_<method>.png (:func:`tuning_figure`) in ``workdir``."""
    _save(tuning_figure(method, rows, names), Path(workdir) / f"tuning_{method}.png")


def gap_by_bits_figure(gaps: dict[str, dict[int, dict]], excess: dict[str, dict[int, dict]] | None = None):
    """Left: the fraction of RTN's gap each method recovers (%) against the bit width, ``gaps`` being
    ``{method: {bits: mean_sd}}`` (0 % is RTN, 100 % the float x*; the axis is cut at -50 % and 200 %,
    where a tiny gap makes the share huge). Right, if ``excess`` (``{model: {bits: mean_sd}}``) is
    given: each model's test -ELBO minus x*'s in nats, on a symmetric log scale. Error bars: sd over seeds."""
    import matplotlib.pyplot as plt

    panels = 2 if excess else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    widths = sorted({b for cells in gaps.values() for b in cells})
    colours = {name: f"C{i}" for i, name in enumerate(["RTN", *gaps])}

    def draw(ax, table):
        for name, cells in table.items():
            bits = sorted(cells)
            ax.errorbar(bits, [cells[b]["mean"] for b in bits], yerr=[cells[b]["sd"] or 0.0 for b in bits],
                        marker="o", capsize=3, color=colours.get(name, "k"), label=name)
        ax.set_xticks(widths)
        ax.grid(alpha=0.3)

    ax = axes[0][0]
    draw(ax, gaps)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axhline(100.0, color="k", lw=0.8, ls="--")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -50.0), min(high, 200.0))
    ax.set(xlabel="bits per weight", ylabel="RTN's gap to x* recovered (%)")
    ax.set_title("0 % = RTN, 100 % = the float x*; mean ± sd over seeds", fontsize=8)
    ax.legend(fontsize=8)
    if excess:
        ax = axes[0][1]
        draw(ax, excess)
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set(xlabel="bits per weight", ylabel="test -ELBO minus the float x*'s (nats)")
        ax.set_title("below 0: better than x*", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_gap_by_bits_figure(folder: Path, gaps: dict[str, dict[int, dict]],
                            excess: dict[str, dict[int, dict]] | None = None) -> None:
    """gap_by_bits.png (:func:`gap_by_bits_figure`) in ``folder``."""
    _agg()
    _save(gap_by_bits_figure(gaps, excess), Path(folder) / "gap_by_bits.png")
