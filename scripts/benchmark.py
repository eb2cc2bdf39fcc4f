#!/usr/bin/env python3
"""`python3 scripts/benchmark.py` = the installed `adaptive-smoothing-benchmark`
(adaptive_smoothing/cli/benchmark.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.benchmark import main

if __name__ == "__main__":
    main()
