"""The ``savae`` console command: one subcommand per experiment, each a thin front of the experiment layer.

    savae --help
    savae compare --workdir runs/compare-digits
    savae train --optimizer sa --epochs 2
    savae bench --quick

Each subcommand parses its own flags (``savae SUBCOMMAND --help``) and calls
``savae_jax.experiments.<module>.main``; the scripts in a checkout's
``experiments/`` folder call the same functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand: (module of savae_jax.experiments, what it does)
SUBCOMMANDS = {
    "compare": ("compare", "every method side by side at equal budgets: tables, curves, traces, report.html"),
    "train": ("train", "train one VAE with one optimizer (Optax or annealing); metrics, params, image grids"),
    "plateau": ("plateau", "Adam to a validation plateau, then Adam, decayed Adam and annealing arms from it"),
    "tune": ("tuning", "equal tuning budgets: N trials per method (random, Optuna or annealing), scored on validation"),
    "quantize": ("quantized", "integer weights: RTN, then straight-through Adam and lattice annealing at equal evaluations"),
    "quantize-bits": ("quantized_bits", "the gap each quantize method recovers against bits, from several quantize runs"),
    "bench": ("benchmark", "speed: the annealing step against inference, a matmul, evosax; fit overhead"),
    "dual-annealing": ("dual_annealing", "annealing chains against scipy's dual_annealing on test functions"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="savae", description="Train VAEs with simulated annealing and compare with Optax.",
        epilog="`savae SUBCOMMAND --help` lists a subcommand's flags.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, description=text, add_help=False)  # its own parser prints --help
    return parser


def main(argv=None) -> int:
    """Run ``savae SUBCOMMAND [flags]``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, _ = parser.parse_known_args(argv[:1])
    module = importlib.import_module(f"savae_jax.experiments.{SUBCOMMANDS[args.command][0]}")
    module.main(argv[1:], prog=f"savae {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
