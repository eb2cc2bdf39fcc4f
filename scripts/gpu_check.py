#!/usr/bin/env python3
"""`python3 scripts/gpu_check.py`: a developer tool, not a console command of the package
(adaptive_smoothing/tools/cli/gpu_check.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.tools.cli.gpu_check import main

if __name__ == "__main__":
    main()
