"""A whole high-resolution chain (SDEdit or DemoFusion), LinFusion vs SDPA: time and peak memory per stage.

Thin wrapper around :mod:`linfusion.bench.highres` (also ``linfusion bench highres``); run
``python benchmarks/highres.py --help`` for the options. Results land in ``benchmarks/results/``.
"""

import sys

from linfusion.bench.highres import main

if __name__ == "__main__":
    sys.exit(main())
