"""`savae plateau` from a checkout: `python experiments/plateau.py --help` (the code is savae_jax.experiments.plateau)."""

import sys

from savae_jax.experiments.plateau import main

if __name__ == "__main__":
    main(sys.argv[1:])
