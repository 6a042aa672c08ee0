"""DiT against DC-DiT on the current device (a driver: the benchmark is dcgen.benchmark; its
docstring lists what one run measures and every option).

    python tools/bench.py                     # default CPU/CUDA run, ~8 min on 2 CPU cores
    python tools/bench.py --quick --out /tmp/b
    python tools/bench.py --render            # re-render docs/performance.md from docs/bench/*.json
"""
import sys

from dcgen.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
