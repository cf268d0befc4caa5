"""Shared pytest setup: CPU tests keep accelerate off torch_xla; XLA tests get a marker; the tiny
config and the synthetic dataset that the trainer, evaluator and distributed tests share.

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

from config import apply_overrides, config_from_dict  # noqa: E402
from make_synthetic_data import generate_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
requires_xla = pytest.mark.skipif(not HAS_TORCH_XLA, reason="torch_xla is not installed")


def run_xla_script(code: str, timeout: float = 900, n_devices: int = 1) -> str:
    """Run `code` in a fresh Python process on torch_xla's CPU backend with `n_devices` CPU devices
    (CPU_NUM_DEVICES); return its stdout."""
    env = dict(os.environ)
    env.pop("USE_TORCH_XLA", None)
    env["PJRT_DEVICE"] = "CPU"
    env["CPU_NUM_DEVICES"] = str(n_devices)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"XLA subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


# No augmentation, no dropout: runs are then deterministic functions of the weights and data.
QUIET_TRANSFORMS = {
    "white_noise_std": 0.0, "constant_offset_std": 0.0, "random_walk_std": 0.0, "static_gain_std": 0.0,
    "random_cut": 0, "smooth_data": False, "jitter_max": 0,
}


def tiny_config_dict(data_dir: str, output_dir: str) -> dict:
    """A config small enough to train a step in well under a second on one core."""
    return {
        "output_dir": output_dir,
        "seed": 7,
        "num_training_batches": 4,
        "batches_per_train_log": 2,
        "batches_per_val_step": 2,
        "use_amp": False,
        "model": {
            "type": "triple", "n_input_features": 24, "n_units": 16, "rnn_dropout": 0.0, "input_dropout": 0.1,
            "n_layers": 1, "n_noise_layers": 1, "n_clean_layers": 1, "n_noisy_layers": 1, "noise_hidden_size": 16,
        },
        "adversarial": {"warmup_steps": 1},
        "dataset": {
            "dataset_dir": data_dir, "batch_size": 4, "val_batch_size": 4, "days_per_batch": 2,
            "feature_subset": list(range(24)),
            "data_transforms": {**QUIET_TRANSFORMS, "white_noise_std": 0.5},
        },
        "optimizer": {
            "lr_warmup_steps": 0, "lr_warmup_steps_day": 0, "lr_decay_steps": 100, "lr_decay_steps_day": 100,
        },
    }


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same step, weights, AdamW moments and schedule (torch.equal)."""
    import torch

    assert a["step"] == b["step"]
    for name, tensor in a["model_state_dict"].items():
        assert torch.equal(tensor, b["model_state_dict"][name]), name
    for p, state in a["optimizer_state_dict"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer_state_dict"]["state"][p][key]), (p, key)
    assert a["scheduler_state_dict"] == b["scheduler_state_dict"]


def make_config(data_dir: Path, output_dir: Path, *overrides: str):
    """tiny_config_dict as a Config, with dotted `key=value` overrides."""
    return config_from_dict(apply_overrides(tiny_config_dict(str(data_dir), str(output_dir)), overrides))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sessions (the first train-only): 8 train, 4 val and 3 test trials each."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(str(out), n_sessions=3, n_train_trials=8, n_val_trials=4, n_test_trials=3, seed=0)
    return out
