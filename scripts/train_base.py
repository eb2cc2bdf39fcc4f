#!/usr/bin/env python3
"""`python3 scripts/train_base.py` = the installed `adaptive-smoothing-train-base`
(adaptive_smoothing/cli/train_base.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.train_base import main

if __name__ == "__main__":
    main()
