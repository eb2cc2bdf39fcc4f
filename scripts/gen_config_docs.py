#!/usr/bin/env python3
"""`python3 scripts/gen_config_docs.py` = the installed `adaptive-smoothing-gen-config-docs`
(adaptive_smoothing/cli/gen_config_docs.py); needs `pip install -e .` (README, "Install")."""
from adaptive_smoothing.cli.gen_config_docs import main

if __name__ == "__main__":
    main()
