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
