"""The config package imports, loads and validates configs without torch (issue 22): tools that
only read configs (docs generation, checks in CI) need no torch, and a config mistake is reported
before torch takes seconds to load."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_loading_and_validating_every_shipped_config_does_not_import_torch() -> None:
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        import adaptive_smoothing.config as c
        import adaptive_smoothing.errors
        configs = sorted(Path("configs").glob("*.yaml"))
        assert configs
        for path in configs:
            config = c.load_config(path)
            c.apply_overrides(config, **{"forward_settings.std_model_type": "rn18",
                                         "randomized_attack_settings.iters_df": 2})
        try:
            c.apply_overrides(config, **{"forward_settings.rob_model_type": "no_such_model"})
        except c.ConfigError as err:
            assert "expected one of" in str(err), err
        else:
            raise AssertionError("an unknown model name was accepted")
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
