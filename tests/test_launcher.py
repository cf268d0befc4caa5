"""launch_tpu_training.py --num_cores: one process over 1 or all of the host's devices, or one line
naming the devices found; signals through accelerate launch.

    python -m pytest tests/test_launcher.py -q

No TPU is needed: the runtime check, the device count and the trainer are replaced by fakes
(importing the real torch_xla here would swap nn.GRU for the other CPU tests). The launcher's
SPMD run itself, and SIGTERM to it, are tested on XLA's CPU backend in tests/test_spmd.py.
"""

import sys

import pytest

import launch_tpu_training
import spmd
from config import config_from_dict
from conftest import HAS_TORCH_XLA, REPO_ROOT

CONFIG = str(REPO_ROOT / "rnn_args.yaml")  # num_tpu_cores: 8


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    """A TPU host with 4 devices whose trainer records what it was given."""
    calls = []

    def train(config_values, resume_dir, *, n_devices):
        calls.append({"cfg": config_from_dict(config_values), "resume_dir": resume_dir, "n_devices": n_devices})

    monkeypatch.setattr(launch_tpu_training, "missing_tpu_runtime", lambda: None)
    monkeypatch.setattr(spmd, "host_device_count", lambda: 4)
    monkeypatch.setattr(launch_tpu_training, "_train", train)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)  # main() sets TPU; restored after the test
    monkeypatch.setenv("USE_TORCH_XLA", "0")  # main() sets 1
    return calls


@pytest.mark.parametrize("argv", [["--num_cores", "8"], ["--num_cores", "2"], ["--num_cores", "0"], []])
def test_a_count_other_than_1_or_all_devices_stops_with_one_line(launches, capsys, argv):
    assert launch_tpu_training.main(["--config", CONFIG, *argv]) == 2  # [] -> num_tpu_cores: 8
    assert launches == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("launch_tpu_training.py: --num_cores ")
    assert "found 4 TPU device(s) on this host; possible values: 1, 4" in lines[0]


@pytest.mark.parametrize(
    "argv, n_devices",
    [(["--num_cores", "4"], 4), (["--num_cores", "1"], 1), (["--set", "num_tpu_cores=4"], 4),
     (["--set", "num_tpu_cores=1"], 1)],
)
def test_one_or_all_devices_launch_with_the_resolved_config(launches, argv, n_devices):
    argv = [*argv, "--set", "dataset.batch_size=16", "--resume", "RUN_DIR"]
    assert launch_tpu_training.main(["--config", CONFIG, *argv]) == 0
    assert [call["n_devices"] for call in launches] == [n_devices]  # one process, spanning n_devices
    assert launches[0]["cfg"].dataset.batch_size == 16 and launches[0]["resume_dir"] == "RUN_DIR"


def test_pjrt_cpu_needs_no_tpu_runtime(monkeypatch):
    """PJRT_DEVICE=CPU runs the same program over CPU devices; TPU or unset asks for the TPU runtime."""
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    if not HAS_TORCH_XLA:  # the CPU-only environment: torch_xla is all that is missing
        assert launch_tpu_training.missing_tpu_runtime() == "launch_tpu_training.py: torch_xla is not installed"
        return
    assert launch_tpu_training.missing_tpu_runtime() is None
    monkeypatch.delenv("PJRT_DEVICE")
    monkeypatch.setattr(launch_tpu_training, "_n_tpu_chips", lambda: 0)
    assert "no TPU chip is attached" in launch_tpu_training.missing_tpu_runtime()


def test_parser_defaults_num_cores_to_the_config():
    args = launch_tpu_training.build_parser().parse_args(["--config", CONFIG])
    assert args.num_cores is None  # main() then takes num_tpu_cores from the config


@pytest.mark.parametrize("name", ["XLA_USE_BF16", "XLA_DOWNCAST_BF16"])
def test_accelerate_bf16_environment_stops_training_with_one_line(data_dir, tmp_path, monkeypatch, capsys, name):
    import train_model
    from config import save_config
    from conftest import make_config

    monkeypatch.setenv(name, "1")  # what `accelerate launch --mixed_precision bf16` sets on a TPU VM
    config_path = tmp_path / "config.yaml"
    save_config(make_config(data_dir, tmp_path / "run"), config_path)
    with pytest.raises(SystemExit) as exit_info:
        train_model.main(["--config_path", str(config_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{name}=1 is set" in lines[0] and "accelerate_config_tpu.yaml" in lines[0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- signals through launchers


def _long_run_config(data_dir, run_dir, path):
    """A run far longer than the test: only a signal ends it."""
    import yaml
    from conftest import tiny_config_dict

    values = tiny_config_dict(str(data_dir), str(run_dir))
    values.update(num_training_batches=100000, batches_per_train_log=1, batches_per_val_step=100000)
    path.write_text(yaml.safe_dump(values))
    return path


def _wait_for_training(run_dirs, proc, timeout: float = 240) -> None:
    """Until every run has logged a training step (its signal handlers are in place by then)."""
    import time

    deadline = time.monotonic() + timeout
    while not all((d / "train.log").is_file() and "step " in (d / "train.log").read_text() for d in run_dirs):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.5)


def _assert_saved_after_sigterm(run_dir) -> None:
    import torch

    step = torch.load(run_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)["step"]
    assert step >= 1
    assert f"SIGTERM: saved checkpoint/last_checkpoint.pt at step {step}, stopping" in (run_dir / "train.log").read_text()


def test_sigterm_to_accelerate_launch_saves_and_exits_143(data_dir, tmp_path):
    """Accelerate's launcher passes SIGTERM to its training process (and kills it 5 s later)."""
    import os
    import signal
    import subprocess

    run_dir = tmp_path / "run"
    config = _long_run_config(data_dir, run_dir, tmp_path / "run.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / "train_model.py"), "--config_path", str(config)]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, USE_TORCH_XLA="0", OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_training([run_dir], proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    _assert_saved_after_sigterm(run_dir)
