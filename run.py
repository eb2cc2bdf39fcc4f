#!/usr/bin/env python3
"""Evaluate (--eval) or train the mixing network (--training) from a config; the same command as
the installed `adaptive-smoothing` (adaptive_smoothing/cli/run.py). Runs from a checkout without
installing, since Python puts this file's folder, the repository root, on sys.path:

    python3 run.py --eval --config configs/demo.yaml
    torchrun --nproc_per_node 4 run.py --training --config configs/cifar10_edm.yaml
"""
from adaptive_smoothing.cli.run import main

if __name__ == "__main__":
    main()
