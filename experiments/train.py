"""`savae train` from a checkout: `python experiments/train.py --help` (the code is savae_jax.experiments.train)."""

import sys

from savae_jax.experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
