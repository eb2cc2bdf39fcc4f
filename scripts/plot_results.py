#!/usr/bin/env python3
"""`python3 scripts/plot_results.py` = the installed `adaptive-smoothing-plot-results`
(adaptive_smoothing/cli/plot_results.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.plot_results import main

if __name__ == "__main__":
    main()
