"""Linear attention backends vs SDPA: time, memory and the memory-traffic floor.

Thin wrapper around :mod:`linfusion.bench.attention` (also reachable as ``linfusion bench attention``);
run ``python benchmarks/attention.py --help`` for the options. Results land in ``benchmarks/results/``.
"""

import sys

from linfusion.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
