"""`savae compare` from a checkout: `python experiments/compare.py --help` (the code is savae_jax.experiments.compare)."""

import sys

from savae_jax.experiments.compare import main

if __name__ == "__main__":
    main(sys.argv[1:])
