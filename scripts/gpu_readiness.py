#!/usr/bin/env python3
"""`python3 scripts/gpu_readiness.py` = the installed `adaptive-smoothing-gpu-readiness`
(adaptive_smoothing/cli/gpu_readiness.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.gpu_readiness import main

if __name__ == "__main__":
    main()
