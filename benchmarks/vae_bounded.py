"""Bounded-memory exact VAE: plain vs tiled decode and encode per store policy (peak RSS, time, FLOPs).

Thin wrapper around :mod:`linfusion.bench.vae`; run ``python benchmarks/vae_bounded.py --help`` for the
options, ``--cost-16k`` for the cost model's 16K table. Results land in ``benchmarks/results/``.
"""

import sys

from linfusion.bench.vae import main

if __name__ == "__main__":
    sys.exit(main())
