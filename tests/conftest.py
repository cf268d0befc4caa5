"""Shared pytest setup: CPU tests keep accelerate off torch_xla; XLA tests get a marker.

Importing torch_xla replaces nn.GRU process-wide, so CPU tests must never import it. XLA tests
run their work in a subprocess with PJRT_DEVICE=CPU (see `run_xla_script`).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("USE_TORCH_XLA", "0")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
requires_xla = pytest.mark.skipif(not HAS_TORCH_XLA, reason="torch_xla is not installed")


def run_xla_script(code: str, timeout: float = 900) -> str:
    """Run `code` in a fresh Python process on torch_xla's CPU backend; return its stdout."""
    env = dict(os.environ)
    env.pop("USE_TORCH_XLA", None)
    env["PJRT_DEVICE"] = "CPU"
    env["CPU_NUM_DEVICES"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"XLA subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data in the Dryad layout, 3 sessions of a few trials: the size tiny_config_dict
    (tests/test_trainer.py) trains on."""
    from make_synthetic_data import generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(str(out), n_sessions=3, n_train_trials=8, n_val_trials=4, n_test_trials=1, seed=0)
    return out
