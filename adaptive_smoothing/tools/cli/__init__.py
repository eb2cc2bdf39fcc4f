"""The developer tools' commands: one click command ``main`` per module, run through the files
of ``scripts/`` (``scripts/benchmark.py``, ``scripts/gpu_check.sh``, ...) or
``python3 -m adaptive_smoothing.tools.cli.<name>``; not console commands of the package."""
