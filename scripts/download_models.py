#!/usr/bin/env python3
"""`python3 scripts/download_models.py` = the installed `adaptive-smoothing-download-models`
(adaptive_smoothing/cli/download_models.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.download_models import main

if __name__ == "__main__":
    main()
