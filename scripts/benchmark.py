#!/usr/bin/env python3
"""`python3 scripts/benchmark.py`: a developer tool, not a console command of the package
(adaptive_smoothing/tools/cli/benchmark.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.tools.cli.benchmark import main

if __name__ == "__main__":
    main()
