"""`savae dual-annealing` from a checkout: `python experiments/dual_annealing.py --help` (the code is savae_jax.experiments.dual_annealing)."""

import sys

from savae_jax.experiments.dual_annealing import main

if __name__ == "__main__":
    main(sys.argv[1:])
