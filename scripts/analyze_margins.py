#!/usr/bin/env python3
"""`python3 scripts/analyze_margins.py` = the installed `adaptive-smoothing-analyze-margins`
(adaptive_smoothing/cli/analyze_margins.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.analyze_margins import main

if __name__ == "__main__":
    main()
