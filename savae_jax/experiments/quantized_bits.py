"""The gap each method recovers against the bit width, from ``savae quantize`` runs at several widths.

    savae quantize --bits 2 --seeds 0,1,2 --workdir runs/quantize-2   # and --bits 3, 4, 8 ...
    savae quantize-bits --workdirs runs/quantize-2,runs/quantize-3,runs/quantize-4,runs/quantize-8 \\
        --out runs/quantize-bits

Reads each workdir's config.json and results.json (one bit width each; every other setting must be
the same, so that the widths are comparable) and writes to ``--out``:

- ``gap_by_bits.md``: per bit width, x*, RTN and each method's test -ELBO and the fraction of RTN's
  gap to x* it recovers, mean ± sd over the seeds the runs share;
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

OUTPUTS = ("gap_by_bits.md", "gap_by_bits.png")
# Settings that may differ between the runs: the width itself, and where and how each run was written.
PER_RUN = ("bits", "seeds", "workdir", "resume", "overwrite")


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


def gap_table(runs: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """``{row: {bits: mean_sd}}`` for the rows x*, RTN (test -ELBO) and, per method, its test -ELBO and
    the gap it recovers (in %), over the seeds of each run."""
    table: dict[str, dict[int, dict]] = {"x*": {}, "RTN": {}}
    for method in METHODS:
        table[method], table[f"{method} gap %"] = {}, {}
    for bits, run in runs.items():
        seeds = run["results"].values()
        table["x*"][bits] = report.mean_sd([s["x_star"] for s in seeds])
        table["RTN"][bits] = report.mean_sd([s["rtn"] for s in seeds])
        for method in METHODS:
            rows = [s["methods"][method] for s in seeds if method in s["methods"]]
            if rows:  # (a method the run did not have is left out: "-" in the table, no point in the figure)
                table[method][bits] = report.mean_sd([r["test_neg_elbo"] for r in rows])
                table[f"{method} gap %"][bits] = report.mean_sd([100 * r["gap_recovered"] for r in rows])
    return table


def excess_table(runs: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """``{model: {bits: mean_sd}}`` of each model's test -ELBO minus the same seed's float x* (nats), for RTN
    and every method: the figure's second panel, readable where RTN's gap is too small for a share of it
    to mean much (at 8 bits it is about 0.015 nats, and a method that trains on beats x* by more)."""
    table: dict[str, dict[int, dict]] = {"RTN": {}}
    for bits, run in runs.items():
        seeds = list(run["results"].values())
        table["RTN"][bits] = report.mean_sd([s["rtn"] - s["x_star"] for s in seeds])
        for method in METHODS:
            rows = [(s["methods"][method]["test_neg_elbo"], s["x_star"]) for s in seeds if method in s["methods"]]
            if rows:
                table.setdefault(method, {})[bits] = report.mean_sd([m - x for m, x in rows])
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
        figures.save_gap_by_bits_figure(out, {m: table[f"{m} gap %"] for m in METHODS}, excess_table(runs))
    print(summary)
    return table
