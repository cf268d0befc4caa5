"""launch_tpu_training.py --num_cores: exactly N replicas, or one line naming the devices found.

    python -m pytest tests/test_launcher.py -q

No TPU is needed: the runtime check, the device count and torch_xla.launch are replaced by fakes
(importing the real torch_xla here would swap nn.GRU for the other CPU tests).
"""

import sys
import types

import pytest

import launch_tpu_training
import rnn_trainer
from conftest import REPO_ROOT

CONFIG = str(REPO_ROOT / "rnn_args.yaml")  # num_tpu_cores: 8


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    """A TPU host with 4 devices whose torch_xla.launch records its calls and runs replica 0."""
    calls = []
    trained = []

    def launch(fn, args=(), debug_single_process=False):
        calls.append({"debug_single_process": debug_single_process, "trained": trained})
        fn(0, *args)

    monkeypatch.setitem(sys.modules, "torch_xla", types.SimpleNamespace(launch=launch))
    monkeypatch.setattr(launch_tpu_training, "missing_tpu_runtime", lambda: None)
    monkeypatch.setattr(launch_tpu_training, "local_tpu_devices", lambda: 4)
    monkeypatch.setattr(rnn_trainer, "train", lambda cfg, resume_dir=None: trained.append((cfg, resume_dir)))
    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # main() sets TPU; restored after the test
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
    "argv, single_process",
    [(["--num_cores", "4"], False), (["--num_cores", "1"], True), (["--set", "num_tpu_cores=4"], False),
     (["--set", "num_tpu_cores=1"], True)],
)
def test_one_or_all_devices_launch_with_the_resolved_config(launches, argv, single_process):
    argv = [*argv, "--set", "dataset.batch_size=16", "--resume", "RUN_DIR"]
    assert launch_tpu_training.main(["--config", CONFIG, *argv]) == 0
    assert [call["debug_single_process"] for call in launches] == [single_process]
    ((cfg, resume_dir),) = launches[0]["trained"]
    assert cfg.use_tpu and cfg.dataset.batch_size == 16 and resume_dir == "RUN_DIR"


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


def _is_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _assert_saved_after_sigterm(run_dir) -> None:
    import torch

    step = torch.load(run_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)["step"]
    assert step >= 1
    assert f"SIGTERM: saved checkpoint/last_checkpoint.pt at step {step}, stopping" in (run_dir / "train.log").read_text()


LAUNCHER_SCRIPT = """
import multiprocessing, os, sys
sys.path.insert(0, {repo!r})
import launch_tpu_training


def replica(config_path):  # what each torch_xla.launch replica runs, on the CPU
    os.environ["USE_TORCH_XLA"] = "0"
    import train_model
    train_model.main(["--config_path", config_path])


if __name__ == "__main__":
    launch_tpu_training._forward_stop_signals()
    replicas = [multiprocessing.get_context("spawn").Process(target=replica, args=(path,)) for path in sys.argv[1:]]
    for process in replicas:
        process.start()
    print("PIDS", *[process.pid for process in replicas], flush=True)
    for process in replicas:
        process.join()
    print("EXITCODES", *[process.exitcode for process in replicas], flush=True)
"""


def test_sigterm_to_the_launcher_reaches_every_replica_and_leaves_no_orphans(data_dir, tmp_path):
    """The launcher's handler sends the signal on to its replica processes (torch_xla.launch starts
    them with multiprocessing); each saves after its step in flight and exits 143."""
    import os
    import signal
    import subprocess

    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER_SCRIPT.format(repo=str(REPO_ROOT)))
    run_dirs = [tmp_path / f"replica{i}" for i in range(2)]
    configs = [_long_run_config(data_dir, d, tmp_path / f"replica{i}.yaml") for i, d in enumerate(run_dirs)]
    proc = subprocess.Popen([sys.executable, str(script), *map(str, configs)], cwd=REPO_ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in proc.stdout.readline().split()[1:]]
    try:
        _wait_for_training(run_dirs, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert out.strip().splitlines()[-1].split() == ["EXITCODES", "143", "143"], out[-2000:]
        assert not any(_is_alive(pid) for pid in pids)
    finally:  # a failing run must not leave replicas training on
        for pid in filter(_is_alive, pids):
            os.kill(pid, signal.SIGKILL)
    for run_dir in run_dirs:
        _assert_saved_after_sigterm(run_dir)


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
