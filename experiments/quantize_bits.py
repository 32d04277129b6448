"""`savae quantize-bits` from a checkout: `python experiments/quantize_bits.py --help` (the code is
savae_jax.experiments.quantized_bits)."""

import sys

from savae_jax.experiments.quantized_bits import main

if __name__ == "__main__":
    main(sys.argv[1:])
