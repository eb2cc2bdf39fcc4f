#!/usr/bin/env python3
"""`python3 scripts/gpu_check.py` = the installed `adaptive-smoothing-gpu-check`
(adaptive_smoothing/cli/gpu_check.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.gpu_check import main

if __name__ == "__main__":
    main()
