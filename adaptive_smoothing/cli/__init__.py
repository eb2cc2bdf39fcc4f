"""The command-line interfaces: one module per command, each a click command ``main`` that only
parses arguments and calls the package. The console entry points of pyproject.toml, run.py,
run_robustbench.py and scripts/*.py all call these functions (README, "Commands")."""
