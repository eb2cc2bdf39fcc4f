#!/usr/bin/env python3
"""`python3 scripts/plot_training.py` = the installed `adaptive-smoothing-plot-training`
(adaptive_smoothing/cli/plot_training.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.plot_training import main

if __name__ == "__main__":
    main()
