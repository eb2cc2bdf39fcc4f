#!/usr/bin/env python3
"""`python3 scripts/pre_attack.py` = the installed `adaptive-smoothing-pre-attack`
(adaptive_smoothing/cli/pre_attack.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.pre_attack import main

if __name__ == "__main__":
    main()
