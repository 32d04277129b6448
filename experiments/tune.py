"""`savae tune` from a checkout: `python experiments/tune.py --help` (the code is savae_jax.experiments.tuning)."""

import sys

from savae_jax.experiments.tuning import main

if __name__ == "__main__":
    main(sys.argv[1:])
