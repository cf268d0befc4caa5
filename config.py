"""Typed training configuration: yaml in, dataclasses out, dotted command-line overrides.

Every key of rnn_args.yaml is a field below; an unknown key or a value of the wrong type is
rejected with a message naming the key. Overrides use dotted keys and yaml values:

    python train_model.py --config_path rnn_args.yaml --set dataset.batch_size=8 --set use_amp=false

A config in the published baseline's schema (its rnn_args.yaml, recognised by its top-level
optimizer keys) is mapped onto this one by `from_upstream` and trains the baseline GRUDecoder.
"""

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import storage


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    type: str = "triple"  # 'baseline' (GRUDecoder) or 'triple' (TripleGRUDecoder)
    n_input_features: int = 512
    n_units: int = 768
    n_classes: int = 41
    rnn_dropout: float = 0.4
    input_dropout: float = 0.2
    n_layers: int = 5  # depth of the baseline GRU
    patch_size: int = 14
    patch_stride: int = 4
    n_noise_layers: int = 2
    n_clean_layers: int = 3
    n_noisy_layers: int = 2
    noise_hidden_size: int = 0  # 0: noise GRU as wide as the patched input (the design)
    gru_save_dtype: str = "float32"  # activations the XLA GRU saves for backward: 'float32' or 'bfloat16'
    bidirectional: bool = False  # speech GRUs read the whole trial (offline decoding); false: causal, real-time


@dataclass
class AdversarialConfig:
    enabled: bool = True
    grl_lambda: float = 0.5
    noisy_loss_weight: float = 0.2
    noise_l2_weight: float = 0.0
    warmup_steps: int = 0


@dataclass
class TransformsConfig:
    white_noise_std: float = 1.0
    constant_offset_std: float = 0.2
    random_walk_std: float = 0.0
    random_walk_axis: int = -1
    static_gain_std: float = 0.0
    random_cut: int = 3
    smooth_data: bool = True
    smooth_kernel_size: int = 100
    smooth_kernel_std: float = 2.0
    jitter_max: int = 0


@dataclass
class DatasetConfig:
    dataset_dir: str = "data/hdf5_data_final"
    sessions: list[str] = field(default_factory=list)
    batch_size: int = 64
    days_per_batch: int = 4
    must_include_days: list[int] = field(default_factory=list)
    num_dataloader_workers: int = 0
    loader_seed: int = 1
    val_batch_size: int = 64
    feature_subset: list[int] | None = None
    bad_trials: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    on_bad_trial: str = "error"  # 'error' or 'skip'
    max_seq_elements: int | None = None  # None: longest train/val label, rounded up to 16
    static_shapes: bool = False
    time_buckets: list[int] = field(default_factory=list)
    trial_cache: bool = True  # read features from a memory-mapped cache of the HDF5 files (built on first use)
    trial_cache_dtype: str = "float32"  # 'float32', 'bfloat16' or 'float16': cached features and training batches
    trial_cache_dir: str | None = None  # None: <dataset_dir>/.trial_cache, or the user cache dir when read-only
    data_transforms: TransformsConfig = field(default_factory=TransformsConfig)


@dataclass
class OptimizerConfig:
    lr_max: float = 0.005
    lr_min: float = 0.0001
    lr_decay_steps: int = 120_000
    lr_warmup_steps: int = 1_000
    lr_max_day: float = 0.005
    lr_min_day: float = 0.0001
    lr_decay_steps_day: int = 120_000
    lr_warmup_steps_day: int = 1_000
    beta0: float = 0.9
    beta1: float = 0.999
    epsilon: float = 0.1
    weight_decay: float = 0.001
    weight_decay_day: float = 0.0
    grad_norm_clip_value: float = 10.0
    lr_scheduler_type: str = "cosine"  # 'cosine' or 'linear'


@dataclass
class Config:
    output_dir: str = "trained_models/triple_gru"
    seed: int = 10
    num_training_batches: int = 120_000
    batches_per_train_log: int = 200
    batches_per_val_step: int = 2_000
    save_best_checkpoint: bool = True
    save_final_model: bool = True
    checkpoint_every_steps: int = 300  # periodic last-state checkpoints, independent of validation; 0: none
    keep_checkpoints: int = 2  # periodic checkpoints kept (besides best and last)
    resume: str | None = None  # 'auto': continue output_dir's newest checkpoint when there is one
    early_stopping: bool = False
    early_stopping_val_steps: int = 20
    use_tpu: bool = False
    num_tpu_cores: int = 8
    gradient_accumulation_steps: int = 1
    shard_optimizer_state: bool = True  # under SPMD over N > 1 devices: AdamW moments split N ways (spmd.py)
    use_amp: bool = True
    log_with: str = "none"  # experiment tracker through Accelerate, fed what metrics.jsonl gets
    init_from_checkpoint: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


_CHOICES = {
    "model.type": ("baseline", "triple"),
    "dataset.on_bad_trial": ("error", "skip"),
    "dataset.trial_cache_dtype": ("float32", "bfloat16", "float16"),
    "optimizer.lr_scheduler_type": ("cosine", "linear"),
    # Accelerate's trackers (accelerate.utils.LoggerType), by name; not imported here because
    # importing accelerate picks the XLA backend before train_model.py can choose.
    "resume": (None, "auto"),
    "log_with": ("none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                 "trackio"),
}


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation` where lossless (int -> float), else raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_value(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[-1]
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {
            _check_value(k, key_type, f"{key}.{k}"): _check_value(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(annotation, value, prefix=f"{key}.")
    # bool is an int subclass in Python; a yaml 'true' must not pass for a number, nor 1 for a flag.
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # PyYAML reads '1e-3' (no dot) as a string; it is still plainly a number.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {annotation.__name__}, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"config key '{key}': expected {annotation.__name__}, got {value!r}")
    choices = _CHOICES.get(key)
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}': must be one of {list(choices)}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}")
    kwargs = {name: _check_value(v, hints[name], f"{prefix}{name}") for name, v in values.items()}
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> Config:
    """Values of the right type that still cannot work."""
    if cfg.optimizer.grad_norm_clip_value < 0:
        raise ConfigError("config key 'optimizer.grad_norm_clip_value': must be >= 0 (0: no clipping), "
                          f"got {cfg.optimizer.grad_norm_clip_value}")
    for key in ("gradient_accumulation_steps", "keep_checkpoints"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, got {getattr(cfg, key)}")
    if cfg.checkpoint_every_steps < 0:
        raise ConfigError(f"config key 'checkpoint_every_steps': must be >= 0 (0: none), got {cfg.checkpoint_every_steps}")
    subset = cfg.dataset.feature_subset
    if subset is not None and len(subset) != cfg.model.n_input_features:
        raise ConfigError(f"config key 'dataset.feature_subset': has {len(subset)} features, "
                          f"model.n_input_features is {cfg.model.n_input_features}")
    return cfg


def config_from_dict(values: dict) -> Config:
    """Build a Config from a nested dict; missing keys take the dataclass defaults."""
    return _check_ranges(_build(Config, values or {}))


def flat_keys(values: Mapping[str, Any], *, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings (a config dict, a metrics record) as one level of `a{sep}b` keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flat_keys(value, sep=sep, prefix=f"{prefix}{key}{sep}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(values: dict, overrides: typing.Iterable[str]) -> dict:
    """Set dotted keys (`dataset.batch_size=8`) in a nested dict; values are parsed as yaml."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' is not of the form key=value")
        dotted, raw = override.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node, cls = values, Config
        for part in parents:
            hints = typing.get_type_hints(cls)
            if part not in hints or not dataclasses.is_dataclass(hints[part]):
                raise ConfigError(f"unknown config key '{dotted}' in override")
            node, cls = node.setdefault(part, {}), hints[part]
        if leaf not in typing.get_type_hints(cls):
            raise ConfigError(f"unknown config key '{dotted}' in override")
        node[leaf] = yaml.safe_load(raw)
    return values


# ----------------------------------------------------------------------------- upstream configs

# The published baseline's rnn_args.yaml (nejm-brain-to-text model_training/), key by key.
# Dotted upstream key -> dotted key here.
_UPSTREAM_KEYS = {
    **{f"model.{k}": f"model.{k}" for k in ("n_input_features", "n_units", "rnn_dropout", "n_layers",
                                             "patch_size", "patch_stride")},
    "model.input_network.input_layer_dropout": "model.input_dropout",
    **{k: k for k in ("output_dir", "seed", "use_amp", "num_training_batches", "batches_per_train_log",
                      "batches_per_val_step", "save_best_checkpoint", "save_final_model", "early_stopping",
                      "early_stopping_val_steps")},
    **{f.name: f"optimizer.{f.name}" for f in dataclasses.fields(OptimizerConfig)},  # top level upstream
    **{f"dataset.data_transforms.{k}": f"dataset.data_transforms.{k}" for k in (
        "white_noise_std", "constant_offset_std", "random_walk_std", "random_walk_axis", "static_gain_std",
        "random_cut", "smooth_data", "smooth_kernel_size", "smooth_kernel_std")},
    **{f"dataset.{k}": f"dataset.{k}" for k in ("dataset_dir", "sessions", "batch_size", "days_per_batch",
                                                 "max_seq_elements", "num_dataloader_workers", "feature_subset")},
    "dataset.n_classes": "model.n_classes",
    "dataset.seed": "dataset.loader_seed",
    "dataset.must_include_days": "dataset.must_include_days",  # upstream's trainer passes None instead
    "dataset.bad_trials_dict": "dataset.bad_trials",  # same nesting: session -> block -> trial numbers
}
# Upstream keys whose published value is what this trainer does; any other value is an error.
_UPSTREAM_FIXED = {
    "mode": "train",
    "model.rnn_trainable": True,
    "model.input_network.input_trainable": True,
    "model.input_network.n_input_layers": 1,
    "save_all_val_steps": False,
    "batches_per_save": 0,
    "dataset.loader_shuffle": False,
}
# Upstream keys not used here: its GPU set-up and its own output files. Listed in one warning line.
_UPSTREAM_UNUSED = (
    "gpu_number",  # Accelerate (or the launcher) picks the devices
    "checkpoint_dir",  # checkpoints go to output_dir/checkpoint
    "save_val_metrics", "save_val_logits", "save_val_data",  # upstream's val_metrics.pkl; metrics.jsonl here
    "log_individual_day_val_PER", "log_val_skip_logs",  # per-day val PER is always in metrics.jsonl
    "dataset.dataset_probability_val",  # its 0s mark the sessions that have no data_val.hdf5
    "dataset.test_percentage",  # upstream's trainer does not read it either
)
# Checked against model.n_input_features, or combined into init_from_checkpoint, below.
_UPSTREAM_SPECIAL = ("model.input_network.input_layer_sizes", "dataset.neural_dim", "init_from_checkpoint",
                     "init_checkpoint_path")
_UPSTREAM_SECTIONS = ("model", "model.input_network", "dataset", "dataset.data_transforms")


def _upstream_only_keys(values: dict) -> list[str]:
    """The top-level keys of `values` that only the upstream schema has (lr_max, gpu_number, ...)."""
    upstream_keys = (*_UPSTREAM_KEYS, *_UPSTREAM_FIXED, *_UPSTREAM_UNUSED, *_UPSTREAM_SPECIAL)
    upstream_top = {key.split(".")[0] for key in upstream_keys}
    return sorted(set(values) & (upstream_top - {f.name for f in dataclasses.fields(Config)}))


def is_upstream_config(values: dict) -> bool:
    """True when `values` is in the upstream rnn_args.yaml schema: it has a key only that schema has."""
    return bool(_upstream_only_keys(values))


def _flatten(values: dict, prefix: str = "") -> dict:
    """Dotted keys of an upstream config, descending only into upstream's sections."""
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in _UPSTREAM_SECTIONS and isinstance(value, dict):
            flat.update(_flatten(value, prefix=dotted + "."))
        else:
            flat[dotted] = value
    return flat


def from_upstream(values: dict) -> tuple[dict, list[str]]:
    """Map a config in the upstream rnn_args.yaml schema onto this schema (model.type baseline).

    Returns the mapped values and the upstream keys present that are not used here (its GPU
    set-up and its own output files). An unknown key, or a value this trainer does not
    implement, is a ConfigError.
    """
    flat = _flatten(values)
    known = {*_UPSTREAM_KEYS, *_UPSTREAM_FIXED, *_UPSTREAM_UNUSED, *_UPSTREAM_SPECIAL}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError("unknown upstream config key(s): " + ", ".join(f"'{k}'" for k in unknown)
                          + f" (read in upstream's schema because of: {', '.join(_upstream_only_keys(values)[:3])})")
    for key, supported in _UPSTREAM_FIXED.items():
        if key in flat and flat[key] != supported:
            raise ConfigError(f"upstream config key '{key}': only {supported!r} is supported here, got {flat[key]!r}")
    n_features = flat.get("model.n_input_features", ModelConfig.n_input_features)
    for key, expected in (("model.input_network.input_layer_sizes", [n_features]), ("dataset.neural_dim", n_features)):
        if key in flat and flat[key] != expected:
            raise ConfigError(f"upstream config key '{key}': must be {expected!r} (model.n_input_features), "
                              f"got {flat[key]!r}")

    ours: dict = {"model": {"type": "baseline"}}

    def put(dotted: str, value: Any) -> None:
        *parents, leaf = dotted.split(".")
        node = ours
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    for key, target in _UPSTREAM_KEYS.items():
        if key in flat:
            put(target, flat[key])
    for key, target, empty in (("dataset.must_include_days", "dataset.must_include_days", []),
                               ("dataset.bad_trials_dict", "dataset.bad_trials", {})):
        if key in flat and flat[key] is None:  # upstream's null: none
            put(target, empty)
    if "dataset.batch_size" in flat:
        put("dataset.val_batch_size", flat["dataset.batch_size"])  # upstream validates at the training batch size
    if flat.get("init_from_checkpoint"):
        path = flat.get("init_checkpoint_path")
        if path in (None, "None", ""):
            raise ConfigError("upstream config: init_from_checkpoint is true but init_checkpoint_path is not set")
        put("init_from_checkpoint", str(path))  # the model weights; --resume continues a run of this trainer
    elif "init_from_checkpoint" in flat:
        put("init_from_checkpoint", None)

    return ours, [key for key in _UPSTREAM_UNUSED if key in flat]


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a yaml config (ours, or upstream's through from_upstream), apply dotted overrides, and
    check every key and type."""
    if not storage.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid yaml ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unused: list[str] = []
    try:
        if is_upstream_config(values):
            values, unused = from_upstream(values)
        cfg = config_from_dict(apply_overrides(values, overrides))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if unused:
        print(f"{path}: upstream rnn_args.yaml schema, trained as model.type baseline; keys not used here "
              f"(GPU set-up, upstream's output files): {', '.join(unused)}", file=sys.stderr)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    storage.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
