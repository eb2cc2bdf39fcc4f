#!/usr/bin/env python3
"""`python3 scripts/benchmark_busy.py` = the installed `adaptive-smoothing-benchmark-busy`
(adaptive_smoothing/cli/benchmark_busy.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.benchmark_busy import main

if __name__ == "__main__":
    main()
