#!/usr/bin/env python3
"""Benchmark a published model with RobustBench; the same command as the installed
`adaptive-smoothing-robustbench` (adaptive_smoothing/cli/robustbench_eval.py). Runs from a checkout
without installing, since Python puts this file's folder, the repository root, on sys.path:

    python3 run_robustbench.py --root_dir models --dataset cifar10 --model_name edm
"""
from adaptive_smoothing.cli.robustbench_eval import main

if __name__ == "__main__":
    main()
