"""Config schema: both yaml files are complete and commented, overrides are checked by key and type."""

import dataclasses
import re

import pytest
import yaml

from conftest import REPO_ROOT
from config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config

CONFIG_FILES = ["rnn_args.yaml", "rnn_args_demo.yaml"]


def _field_paths(cls, prefix=""):
    paths = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            paths |= _field_paths(type(default), prefix + f.name + ".")
        else:
            paths.add(prefix + f.name)
    return paths


def _dict_paths(values, prefix=""):
    paths = set()
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("bad_trials",):
            paths |= _dict_paths(value, prefix + key + ".")
        else:
            paths.add(prefix + key)
    return paths


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_yaml_sets_every_field_and_comments_every_key(name):
    text = (REPO_ROOT / name).read_text()
    assert _dict_paths(yaml.safe_load(text)) == _field_paths(Config)
    key_lines = [line for line in text.splitlines() if re.match(r"^\s*[a-z_0-9]+:", line)]
    uncommented = [line for line in key_lines if "#" not in line]
    assert not uncommented, uncommented
    load_config(REPO_ROOT / name)


def test_full_config_matches_the_design():
    cfg = load_config(REPO_ROOT / "rnn_args.yaml")
    assert len(cfg.dataset.sessions) == 45
    assert cfg.dataset.sessions[0] == "t15.2023.08.11" and cfg.dataset.sessions[-1] == "t15.2025.04.13"
    assert (cfg.adversarial.grl_lambda, cfg.adversarial.noisy_loss_weight) == (0.5, 0.2)
    assert (cfg.use_tpu, cfg.num_tpu_cores, cfg.gradient_accumulation_steps) == (True, 8, 2)
    assert cfg.dataset.batch_size == 32 and cfg.dataset.static_shapes
    assert max(cfg.dataset.time_buckets) >= 2475


def test_overrides_set_dotted_keys_with_yaml_types(tmp_path):
    cfg = load_config(REPO_ROOT / "rnn_args_demo.yaml",
                      ["dataset.batch_size=8", "use_amp=true", "optimizer.lr_max=1e-3", "dataset.sessions=[a, b]"])
    assert cfg.dataset.batch_size == 8 and cfg.use_amp is True
    assert cfg.optimizer.lr_max == pytest.approx(1e-3) and cfg.dataset.sessions == ["a", "b"]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.batchsize=8", "dataset.batchsize"),
        ("nosuch.key=1", "nosuch.key"),
        ("dataset.batch_size=eight", "dataset.batch_size"),
        ("use_amp=1", "use_amp"),
        ("model.n_units=1.5", "model.n_units"),
        ("model.type=lstm", "model.type"),
        ("dataset.batch_size", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO_ROOT / "rnn_args_demo.yaml", [override])


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset:\n  batch_size: 4\n  shuffle: true\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'dataset.shuffle'"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
