"""The published baseline's rnn_args.yaml trains here as the baseline GRUDecoder.

    python -m pytest tests/test_upstream_config.py -q

tests/upstream_rnn_args.yaml is a config in upstream's schema with its published values; the
training test writes the same schema at tiny sizes for the synthetic data.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import rnn_model
from config import ConfigError, load_config
from conftest import REPO_ROOT

UPSTREAM_ARGS = REPO_ROOT / "tests" / "upstream_rnn_args.yaml"
UNUSED_LINE = "keys not used here"


def _upstream_values() -> dict:
    return yaml.safe_load(UPSTREAM_ARGS.read_text())


def _write(values: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_published_config_maps_onto_the_baseline_recipe(capsys):
    cfg = load_config(UPSTREAM_ARGS)
    m, d, o = cfg.model, cfg.dataset, cfg.optimizer
    assert (m.type, m.n_input_features, m.n_units, m.n_layers, m.n_classes) == ("baseline", 512, 768, 5, 41)
    assert (m.rnn_dropout, m.input_dropout, m.patch_size, m.patch_stride) == (0.4, 0.2, 14, 4)
    assert (o.lr_max, o.lr_min, o.lr_warmup_steps, o.lr_decay_steps, o.lr_scheduler_type) == (
        0.005, 0.0001, 1000, 120000, "cosine")
    assert (o.beta0, o.beta1, o.epsilon, o.weight_decay, o.weight_decay_day, o.grad_norm_clip_value) == (
        0.9, 0.999, 0.1, 0.001, 0.0, 10.0)
    assert (d.batch_size, d.val_batch_size, d.days_per_batch, d.max_seq_elements, d.loader_seed) == (64, 64, 4, 500, 1)
    assert (d.num_dataloader_workers, d.must_include_days, d.bad_trials, d.feature_subset) == (4, [], {}, None)
    assert len(d.sessions) == 45 and d.sessions[0] == "t15.2023.08.11"
    t = d.data_transforms
    assert (t.white_noise_std, t.constant_offset_std, t.random_cut, t.smooth_kernel_size, t.smooth_kernel_std) == (
        1.0, 0.2, 3, 100, 2.0)
    assert (cfg.num_training_batches, cfg.batches_per_train_log, cfg.batches_per_val_step, cfg.seed) == (
        120000, 200, 2000, 10)
    assert (cfg.use_amp, cfg.save_final_model, cfg.init_from_checkpoint, cfg.use_tpu) == (True, False, None, False)

    # One warning line naming every key that only concerns upstream's GPU set-up and output files.
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and UNUSED_LINE in lines[0], lines
    for key in ("gpu_number", "checkpoint_dir", "save_val_logits", "dataset.dataset_probability_val"):
        assert key in lines[0]

    # REFERENCE: the baseline has 44,315,177 parameters with 45 days, 11,819,520 of them day-specific.
    with torch.device("meta"):
        summary = rnn_model.parameter_summary(rnn_model.build_model(m, n_days=len(d.sessions)))
    assert (summary["total"], summary["day_specific"]) == (44_315_177, 11_819_520)


def test_overrides_use_this_repositorys_keys():
    cfg = load_config(UPSTREAM_ARGS, ["dataset.batch_size=8", "model.n_units=16", "use_tpu=true"])
    assert (cfg.dataset.batch_size, cfg.model.n_units, cfg.use_tpu) == (8, 16, True)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("dataset", "shuffle_days", True, "unknown upstream config key(s): 'dataset.shuffle_days'"),
        (None, "adversarial", {"enabled": True}, "unknown upstream config key(s): 'adversarial'"),
        ("model", "rnn_trainable", False, "'model.rnn_trainable': only True is supported"),
        (None, "batches_per_save", 500, "'batches_per_save': only 0 is supported"),
        ("dataset", "neural_dim", 256, "'dataset.neural_dim': must be 512"),
        (None, "init_from_checkpoint", True, "init_checkpoint_path is not set"),
    ],
)
def test_unknown_keys_and_unsupported_values_are_errors(tmp_path: Path, capsys, section, key, value, message):
    values = _upstream_values()
    (values[section] if section else values)[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(values, tmp_path / "args.yaml"))
    assert capsys.readouterr().err == ""  # the error alone, no warning line before it


def test_init_checkpoint_path_becomes_init_from_checkpoint(tmp_path: Path):
    values = _upstream_values()
    path = "trained_models/baseline_rnn/checkpoint/best_checkpoint"
    values.update(init_from_checkpoint=True, init_checkpoint_path=path)
    assert load_config(_write(values, tmp_path / "args.yaml")).init_from_checkpoint == path


def test_upstream_config_trains_the_baseline_with_train_model(data_dir: Path, tmp_path: Path):
    values = _upstream_values()
    n_features = 24
    values["model"].update(n_input_features=n_features, n_units=16, n_layers=2)
    values["model"]["input_network"]["input_layer_sizes"] = [n_features]
    sessions = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("t15."))
    values["dataset"].update(
        dataset_dir=str(data_dir), sessions=sessions, dataset_probability_val=[1] * len(sessions),
        neural_dim=n_features, feature_subset=list(range(n_features)), batch_size=4, days_per_batch=2,
        num_dataloader_workers=0,
    )
    run_dir = tmp_path / "baseline_rnn"
    values.update(output_dir=str(run_dir), checkpoint_dir=str(run_dir / "checkpoint"), num_training_batches=2,
                  batches_per_train_log=1, batches_per_val_step=2, use_amp=False, save_final_model=True)
    config_path = _write(values, tmp_path / "rnn_args.yaml")

    env = dict(os.environ, USE_TORCH_XLA="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_model.py", "--config_path", str(config_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sum(UNUSED_LINE in line for line in proc.stderr.splitlines()) == 1, proc.stderr

    cfg = load_config(run_dir / "config.yaml")  # the resolved config, in this repository's schema
    assert (cfg.model.type, cfg.model.n_units, cfg.dataset.sessions) == ("baseline", 16, sessions)
    records = [yaml.safe_load(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert [r["step"] for r in records if "val/per" in r] == [2]
    model = rnn_model.build_model(cfg.model, n_days=len(sessions))
    assert isinstance(model, rnn_model.GRUDecoder)
    checkpoint = torch.load(run_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    rnn_model.load_state_dict_compat(model, checkpoint)  # strict: the trained model is a GRUDecoder
