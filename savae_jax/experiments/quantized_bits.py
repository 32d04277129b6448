"""The gap each method recovers against the bit width, from ``savae quantize`` runs at several widths.

    savae quantize --bits 2 --seeds 0,1,2 --workdir runs/quantize-2   # and --bits 3, 4, 8 ...
    savae quantize-bits --workdirs runs/quantize-2,runs/quantize-3,runs/quantize-4,runs/quantize-8 \\
        --out runs/quantize-bits

Reads each workdir's config.json and results.json (one bit width each; every other setting must be
the same, so that the widths are comparable) and writes to ``--out``:

- ``gap_by_bits.md``: per bit width, x*, RTN and each method's test -ELBO and the fraction of RTN's
  gap to x* it recovers, mean ± sd over each run's seeds;
- ``gap_by_bits.png``: that fraction against bits, one line per method (error bars: sd over seeds),
  beside each model's test -ELBO minus x*'s in nats (where RTN's gap is tiny, the share is not
  readable: at 8 bits RTN costs about 0.015 nats).

It only reads the runs, so running it again rewrites its two files (atomically) from the same runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from savae_jax import checkpoint
from savae_jax.experiments import figures, flags, report
from savae_jax.experiments.quantized import METHODS

# Settings that may differ between the runs: the width itself, the methods each ran (a method is
# tabulated at the widths that ran it), and where and how each run was written.
PER_RUN = ("bits", "seeds", "methods", "workdir", "resume", "overwrite")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "savae quantize-bits", description=__doc__.split("\n")[0],
                                formatter_class=flags.HelpFormatter)
    p.add_argument("--workdirs", required=True,
                   help="comma-separated workdirs of finished `savae quantize` runs, one bit width each")
    p.add_argument("--out", type=flags.workdir_path, default="runs/quantize-bits",
                   help="folder for gap_by_bits.md and gap_by_bits.png")
    return p


def load_runs(workdirs: list[str]) -> dict[int, dict]:
    """``{bits: {"config": ..., "results": {seed: ...}}}`` of the runs, in increasing bits; ValueError
    naming --workdirs for a folder without a finished run, two runs of one width, or runs whose other
    settings differ (they would not be comparable)."""
    runs, first = {}, None
    for folder in workdirs:
        path = Path(folder)
        try:
            config = json.loads((path / "config.json").read_text())["config"]
            results = json.loads((path / "results.json").read_text())
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--workdirs: {path} holds no finished `savae quantize` run "
                             f"(config.json and results.json): {err}") from None
        if not results:
            raise ValueError(f"--workdirs: {path}'s results.json holds no seed")
        config.setdefault("from_scratch", False)  # runs written before --from-scratch existed
        if config["from_scratch"]:
            raise ValueError(f"--workdirs: {path} is a --from-scratch run: it has no x* and no gap to recover")
        bits = config["bits"]
        if bits in runs:
            raise ValueError(f"--workdirs: two runs at {bits} bits ({runs[bits]['workdir']} and {path}); give one per width")
        shared = {k: v for k, v in config.items() if k not in PER_RUN}
        if first is None:
            first = (path, shared)
        elif shared != first[1]:
            differ = sorted(k for k in shared.keys() | first[1].keys() if shared.get(k) != first[1].get(k))
            raise ValueError(f"--workdirs: {path} and {first[0]} differ in {', '.join(differ)}; "
                             "only the bit width may differ")
        runs[bits] = {"config": config, "results": results, "workdir": str(path)}
    return dict(sorted(runs.items()))


def _over_seeds(runs: dict[int, dict], value) -> dict[int, dict]:
    """``{bits: mean_sd}`` of ``value(seed result)`` over each run's seeds, skipping the seeds where it is
    None (a method the run did not have: "-" in the table, no point in the figure)."""
    out = {}
    for bits, run in runs.items():
        values = [v for v in map(value, run["results"].values()) if v is not None]
        if values:
            out[bits] = report.mean_sd(values)
    return out


def _method(name: str, field: str):
    """``seed result -> its method's field`` (None where the run did not have the method)."""
    return lambda s: s["methods"][name][field] if name in s["methods"] else None


def ran(runs: dict[int, dict]) -> list[str]:
    """The methods some seed of some run has, in ``METHODS``' order."""
    return [m for m in METHODS if any(m in s["methods"] for run in runs.values() for s in run["results"].values())]


def gap_table(runs: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """``{row: {bits: mean_sd}}`` for the rows x*, RTN (test -ELBO) and, per method, its test -ELBO and
    the gap it recovers (in %), over the seeds of each run."""
    table = {"x*": _over_seeds(runs, lambda s: s["x_star"]), "RTN": _over_seeds(runs, lambda s: s["rtn"])}
    for name in ran(runs):
        table[name] = _over_seeds(runs, _method(name, "test_neg_elbo"))
        gap = _method(name, "gap_recovered")
        table[f"{name} gap %"] = _over_seeds(runs, lambda s, gap=gap: None if gap(s) is None else 100 * gap(s))
    return table


def excess_table(runs: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """``{model: {bits: mean_sd}}`` of each model's test -ELBO minus the same seed's float x* (nats), for RTN
    and every method: the figure's second panel, readable where RTN's gap is too small for a share of it
    to mean much (at 8 bits it is about 0.015 nats, and a method that trains on beats x* by more)."""
    table = {"RTN": _over_seeds(runs, lambda s: s["rtn"] - s["x_star"])}
    for name in ran(runs):
        elbo = _method(name, "test_neg_elbo")
        table[name] = _over_seeds(runs, lambda s, elbo=elbo: None if elbo(s) is None else elbo(s) - s["x_star"])
    return table


def summarize(runs: dict[int, dict], table: dict) -> str:
    widths = list(runs)
    config = next(iter(runs.values()))["config"]
    seeds = {bits: ",".join(sorted(run["results"], key=int)) for bits, run in runs.items()}
    lines = [f"# The gap recovered against bits: {config['dataset']}, {config['budget_evals']} evaluations after RTN",
             "", "Seeds per width: " + "; ".join(f"{b} bits: {s}" for b, s in seeds.items()) + ".", "",
             "Test negative ELBO (nats; mean ± sd over seeds) and, per method, the fraction of RTN's gap to the "
             "float x* it recovers.", "",
             "| | " + " | ".join(f"{b} bits" for b in widths) + " |", "|---|" + "---|" * len(widths)]
    for row, cells in table.items():
        fmt = ".0f" if row.endswith("%") else ".3f"
        lines.append(f"| {row} | " + " | ".join(report.format_mean_sd(cells.get(b), fmt) for b in widths) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None, prog: str | None = None) -> dict:
    """``savae quantize-bits``: the runs -> gap_by_bits.md and gap_by_bits.png in --out."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        runs = load_runs(flags.comma_list(args.workdirs, "--workdirs", example="runs/q2,runs/q4"))
    except ValueError as err:
        parser.error(str(err))
    table = gap_table(runs)
    out = Path(args.out)
    with flags.disk_errors(parser.prog, out):
        out.mkdir(parents=True, exist_ok=True)
        summary = summarize(runs, table)
        checkpoint.atomic_write_text(out / "gap_by_bits.md", summary)
        figures.save_gap_by_bits_figure(out, {m: table[f"{m} gap %"] for m in ran(runs)}, excess_table(runs))
    print(summary)
    return table
