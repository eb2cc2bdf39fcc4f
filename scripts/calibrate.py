#!/usr/bin/env python3
"""`python3 scripts/calibrate.py` = the installed `adaptive-smoothing-calibrate`
(adaptive_smoothing/cli/calibrate.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.calibrate import main

if __name__ == "__main__":
    main()
