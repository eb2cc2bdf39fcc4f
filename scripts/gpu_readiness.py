#!/usr/bin/env python3
"""`python3 scripts/gpu_readiness.py`: a developer tool, not a console command of the package
(adaptive_smoothing/tools/cli/gpu_readiness.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.tools.cli.gpu_readiness import main

if __name__ == "__main__":
    main()
