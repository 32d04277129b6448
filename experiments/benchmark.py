"""`savae bench` from a checkout: `python experiments/benchmark.py --help` (the code is savae_jax.experiments.benchmark)."""

import sys

from savae_jax.experiments.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
