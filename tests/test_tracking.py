"""Experiment tracking (config key log_with): the tracker gets what metrics.jsonl gets.

    python -m pytest tests/test_tracking.py -q

TensorBoard is the optional extra `.[tensorboard]`; its test reads the event file back and
skips only when the tensorboard package is absent.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from accelerate import Accelerator

import rnn_trainer
from config import ConfigError, config_from_dict
from conftest import tiny_config_dict
from test_trainer import fresh_accelerator_state  # noqa: F401 (autouse fixture)

requires_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason='tensorboard is not installed (pip install -e ".[tensorboard]")',
)


def _scalars_of_metrics_jsonl(path: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every number in metrics.jsonl; nested dicts become `key/sub`."""
    scalars = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        for key, value in record.items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            for sub, number in items:
                scalars[(f"{key}/{sub}" if sub else key, step)] = float(number)
    return scalars


@requires_tensorboard
def test_tensorboard_event_file_holds_the_metrics_jsonl_values(data_dir: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = tiny_config_dict(str(data_dir), str(tmp_path / "run"))
    values["log_with"] = "tensorboard"
    rnn_trainer.train(config_from_dict(values))

    expected = _scalars_of_metrics_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {tag for tag, _ in expected} >= {"train/loss", "train/ctc_clean", "train/lr", "val/per", "val/loss"}
    assert any(tag.startswith("val/per_by_day/") for tag, _ in expected)
    events = EventAccumulator(str(tmp_path / "run" / rnn_trainer.TRACKER_PROJECT))
    events.Reload()
    got = {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard stores float32
        both_nan = math.isnan(got[key]) and math.isnan(value)
        assert both_nan or math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), key


@requires_tensorboard
def test_only_the_main_process_writes_to_the_tracker(tmp_path: Path):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    log = rnn_trainer._RunLog(tmp_path, enabled=False, accelerator=accelerator, config={"seed": 1})
    log.record({"step": 1, "train/loss": 2.0})
    log.close()
    assert accelerator.trackers == [] and not (tmp_path / rnn_trainer.TRACKER_PROJECT).exists()


def test_missing_tracker_package_is_a_config_error_before_the_run_directory(tmp_path: Path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    values = tiny_config_dict(str(tmp_path / "data"), str(tmp_path / "run"))
    values["log_with"] = "tensorboard"
    with pytest.raises(ConfigError, match=r"log_with: tensorboard.*pip install"):
        rnn_trainer.train(config_from_dict(values))
    assert not (tmp_path / "run").exists()


def test_log_with_names_a_known_tracker():
    with pytest.raises(ConfigError, match="log_with"):
        config_from_dict({"log_with": "tensorbord"})
