"""`savae quantize` from a checkout: `python experiments/quantize.py --help` (the code is savae_jax.experiments.quantized)."""

import sys

from savae_jax.experiments.quantized import main

if __name__ == "__main__":
    main(sys.argv[1:])
