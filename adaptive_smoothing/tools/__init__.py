"""Developer tooling, apart from the product: speed measurement (``speed.py``, ``busy.py``), the
one fp32-vs-fast-path attack comparison (``precision.py``) and the device checks that use them
(``gpu_check.py`` for ``scripts/gpu_check.sh``, ``readiness.py`` for
``scripts/gpu_readiness.py``). Their commands (``tools/cli/``) are run through ``scripts/``, not
installed as console commands: a user of the package never needs them.
"""
