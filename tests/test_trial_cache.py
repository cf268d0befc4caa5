"""Tests of dataset.py's trial cache: batches from the memory map equal batches read from HDF5, a
stale cache is rebuilt, an interrupted build is never read, and a run with DataLoader workers
survives a SIGTERM to its process group.

Run: .venv/bin/python -m pytest tests/test_trial_cache.py -q
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml

import dataset as D
import make_synthetic_data as synth
from conftest import REPO_ROOT, tiny_config_dict
from test_dataset import N_TRAIN, SESSIONS, _config


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    """A private dataset (each test builds, damages or edits its own cache and files)."""
    synth.generate_dataset(str(tmp_path / "data"), n_sessions=len(SESSIONS), n_train_trials=N_TRAIN, n_val_trials=5,
                           n_test_trials=2, seed=1, trials_per_block=4)
    return str(tmp_path / "data")


def _batches(loader: torch.utils.data.DataLoader) -> list[dict[str, torch.Tensor]]:
    return [batch for item in loader for batch in (item if isinstance(item, list) else [item])]


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _loaders(cfg, **kwargs) -> tuple[list[dict], list[dict], list[dict]]:
    train, val, _ = D.build_dataloaders(cfg, **kwargs)
    return _batches(train), _batches(val), [train.dataset.trial_indices, val.dataset.trial_indices]


CASES = {
    "dynamic": {},
    "static": {"static_shapes": True, "time_buckets": [256, 320, 512], "max_seq_elements": None},
    "feature_subset": {"feature_subset": [0, 5, 300, 511]},
    "bad_trials": {"bad_trials": {SESSIONS[1]: {"1": [0, 2]}}, "on_bad_trial": "skip"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_batches_equal_hdf5_batches(data_dir: str, case: str):
    overrides = dict(CASES[case])
    if case == "bad_trials":  # a malformed trial (skipped with a warning) besides the listed ones
        with h5py.File(os.path.join(data_dir, SESSIONS[2], "data_train.hdf5"), "r+") as f:
            f["trial_0003"].attrs["seq_len"] = 600
    cached = _loaders(_config(data_dir, **overrides), n_steps=6, batches_per_step=2)
    read = _loaders(_config(data_dir, trial_cache=False, **overrides), n_steps=6, batches_per_step=2)
    train_index = cached[2][0]
    assert all(entry.get("cache", "").endswith("train.float32") for entry in train_index.values())
    assert not any("cache" in entry for entry in read[2][0].values())
    _assert_same_batches(cached[0], read[0])
    _assert_same_batches(cached[1], read[1])
    if case == "bad_trials":
        assert train_index[1]["trials"] == [1, 3, 4, 5, 6, 7] and 3 not in train_index[2]["trials"]


def test_resumed_loader_draws_the_same_batches_from_the_cache(data_dir: str):
    full = _batches(D.build_dataloaders(_config(data_dir, trial_cache=False), n_steps=8)[0])
    resumed = _batches(D.build_dataloaders(_config(data_dir), n_steps=8, start_step=5)[0])
    _assert_same_batches(resumed, full[5:])
    with_workers = _batches(D.build_dataloaders(_config(data_dir, num_dataloader_workers=2), n_steps=8, start_step=5)[0])
    _assert_same_batches(with_workers, full[5:])


def test_half_precision_caches_round_the_float32_batches(data_dir: str):
    exact = _batches(D.build_dataloaders(_config(data_dir), n_steps=3)[0])
    for dtype, relative in (("bfloat16", 2**-8), ("float16", 2**-11)):
        train, val, _ = D.build_dataloaders(_config(data_dir, trial_cache_dtype=dtype), n_steps=3)
        assert train.dataset.trial_indices[0]["cache"].endswith(f"train.{dtype}")
        for a, b in zip(_batches(train), exact):
            assert a["input_features"].dtype == getattr(torch, dtype)  # widened by the trainer, on the device
            features = a["input_features"].float()
            assert torch.allclose(features, b["input_features"], rtol=relative, atol=1e-6)
            assert not torch.equal(features, b["input_features"])
            assert torch.equal(a["seq_class_ids"], b["seq_class_ids"])
        assert all(batch["input_features"].dtype == torch.float32 for batch in _batches(val))


class _Float32Batches(D.BrainToTextDataset):
    """The training dataset as it was before half-precision batches: float32 whatever the cache."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "features_dtype": "float32"})


def _count_new_buffers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Count batch buffers allocated from now on (a shared counter: forked workers count too)."""
    import multiprocessing

    n_new = multiprocessing.Value("i", 0)
    real_new = D._BatchBuffers._new

    def counted_new(self, shape, dtype):
        with n_new.get_lock():
            n_new.value += 1
        return real_new(self, shape, dtype)

    monkeypatch.setattr(D._BatchBuffers, "_new", counted_new)
    return n_new


def _bits(features: torch.Tensor) -> torch.Tensor:
    return features.view(torch.int32)  # float32 bit patterns: -0.0 and 0.0 differ, as NaNs would


@pytest.mark.parametrize("dtype,n_workers,n_shards,static", [
    ("bfloat16", 0, 1, False), ("bfloat16", 0, 1, True), ("bfloat16", 2, 1, True), ("float16", 2, 2, True),
])
def test_half_precision_batches_widen_to_the_float32_batches_of_the_same_cache(
        data_dir: str, dtype: str, n_workers: int, n_shards: int, static: bool, monkeypatch: pytest.MonkeyPatch):
    """A half cache's training batches carry its dtype (half the bytes to copy and send): widened,
    they equal bit for bit the float32 batches the loader made from the same cache, whether built in
    the main process or in workers, in kept buffers refilled in place (static shapes) or not."""
    options = {"trial_cache_dtype": dtype, "feature_subset": None}
    if static:
        options.update(static_shapes=True, time_buckets=[256, 320, 384, 512], max_seq_elements=None)
    kwargs = {"n_steps": 24, "batches_per_step": 2, "n_replicas": n_shards, "n_shards": n_shards}
    with monkeypatch.context() as patched:
        patched.setattr(D, "BrainToTextDataset", _Float32Batches)
        expected = _batches(D.build_dataloaders(_config(data_dir, **options), **kwargs)[0])  # all held
    n_new = _count_new_buffers(monkeypatch)
    train, _, _ = D.build_dataloaders(_config(data_dir, num_dataloader_workers=n_workers, **options), **kwargs)
    n_batches = 0
    for item in train:
        for batch in item:
            want = expected[n_batches]
            assert batch["input_features"].dtype == getattr(torch, dtype) and want["input_features"].dtype == torch.float32
            assert torch.equal(_bits(batch["input_features"].float()), _bits(want["input_features"]))
            _assert_same_batches([{k: v for k, v in batch.items() if k != "input_features"}],
                                 [{k: v for k, v in want.items() if k != "input_features"}])
            n_batches += 1
        del item, batch  # as a training loop lets go of a step's batches
    assert n_batches == len(expected) == 48
    if static:
        assert 0 < n_new.value < n_batches * n_shards // 2, n_new.value  # kept half-precision buffers were refilled


def test_a_run_from_half_precision_batches_trains_the_weights_of_float32_batches(
        data_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The trainer widens a bf16 cache's batches on the device: a short run (augmentation, dropout,
    adversarial terms) ends with the weights and AdamW moments of the run fed float32 batches made
    on the host from the same cache, bit for bit."""
    from accelerate.state import AcceleratorState

    import rnn_trainer
    from config import config_from_dict
    from conftest import assert_same_training_state

    seen: list[torch.dtype] = []
    real_step = rnn_trainer.train_step

    def recording_step(**kwargs):
        seen.extend(batch["input_features"].dtype for batch in kwargs["micro_batches"])
        return real_step(**kwargs)

    monkeypatch.setattr(rnn_trainer, "train_step", recording_step)
    checkpoints = {}
    for route in ("bfloat16", "float32"):
        values = tiny_config_dict(data_dir, str(tmp_path / route))
        values.update({"num_training_batches": 3, "batches_per_val_step": 3, "gradient_accumulation_steps": 2})
        values["dataset"]["trial_cache_dtype"] = "bfloat16"
        with monkeypatch.context() as patched:
            if route == "float32":
                patched.setattr(D, "BrainToTextDataset", _Float32Batches)
            AcceleratorState._reset_state(reset_partial_state=True)
            rnn_trainer.train(config_from_dict(values))
            AcceleratorState._reset_state(reset_partial_state=True)
        checkpoints[route] = torch.load(tmp_path / route / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    assert seen == [torch.bfloat16] * 6 + [torch.float32] * 6
    assert_same_training_state(checkpoints["bfloat16"], checkpoints["float32"])


def test_a_changed_source_file_rebuilds_the_cache(data_dir: str):
    folder = D.build_trial_cache(data_dir, "train")
    assert D.find_trial_cache(data_dir, "train") == folder
    mtime = os.path.getmtime(os.path.join(folder, "manifest.json"))
    assert D.build_trial_cache(data_dir, "train") == folder  # fresh: kept as it is
    assert os.path.getmtime(os.path.join(folder, "manifest.json")) == mtime
    path = os.path.join(data_dir, SESSIONS[1], "data_train.hdf5")
    with h5py.File(path, "r+") as f:  # same size, new content
        f["trial_0002"]["input_features"][0, :3] = [7.0, 8.0, 9.0]
    assert D.find_trial_cache(data_dir, "train") is None
    train, _, _ = D.build_dataloaders(_config(data_dir, days_per_batch=1, sessions=[SESSIONS[1]], batch_size=64), n_steps=1)
    batch = train.dataset[0]
    row = train.dataset.batch_trials(0).index((0, 2))
    assert batch["input_features"][row, 0, :3].tolist() == [7.0, 8.0, 9.0]
    assert D.find_trial_cache(data_dir, "train") == folder
    # A new session folder makes the cache stale too.
    synth.generate_dataset(str(Path(data_dir).parent / "more"), n_sessions=len(SESSIONS) + 1, n_train_trials=2,
                           n_val_trials=1, n_test_trials=1, seed=2)
    shutil.copytree(Path(data_dir).parent / "more" / synth.REAL_SESSIONS[len(SESSIONS)],
                    Path(data_dir) / synth.REAL_SESSIONS[len(SESSIONS)])
    assert D.find_trial_cache(data_dir, "train") is None


def test_an_interrupted_build_leaves_no_cache_that_is_read(data_dir: str, monkeypatch: pytest.MonkeyPatch):
    real, n_written = D._to_storage, []

    def killed_midway(features, dtype, where):
        n_written.append(1)
        if len(n_written) == 5:
            raise KeyboardInterrupt  # as a Ctrl-C would, half-way through the features
        return real(features, dtype, where)

    monkeypatch.setattr(D, "_to_storage", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        D.build_trial_cache(data_dir, "train")
    root = os.path.join(data_dir, ".trial_cache")
    assert [n for n in os.listdir(root) if n.startswith(".building-train")]  # the partial folder
    assert D.find_trial_cache(data_dir, "train") is None and not os.path.exists(os.path.join(root, "train.float32"))
    # Interrupted while replacing a stale cache: the stale one is not read either.
    monkeypatch.setattr(D, "_to_storage", real)
    D.build_trial_cache(data_dir, "train")
    assert not [n for n in os.listdir(root) if n.startswith(".building-")]  # removed by the next build
    with h5py.File(os.path.join(data_dir, SESSIONS[0], "data_train.hdf5"), "r+") as f:
        f["trial_0000"].attrs["block_num"] = 99
    n_written.clear()
    monkeypatch.setattr(D, "_to_storage", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        D.build_trial_cache(data_dir, "train")
    assert D.find_trial_cache(data_dir, "train") is None
    train, _, _ = D.build_dataloaders(_config(data_dir, trial_cache=True), n_steps=1)  # rebuilt on first use (real writer)
    monkeypatch.setattr(D, "_to_storage", real)
    assert train.dataset.trial_indices[0]["meta"][0]["block_num"] == 99


def test_a_read_only_dataset_directory_caches_under_the_user_cache(data_dir: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    Path(data_dir, ".trial_cache").write_text("")  # the folder cannot be created there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    folder = D.build_trial_cache(data_dir, "val", "bfloat16")
    assert folder.startswith(str(tmp_path / "user_cache" / "brain_to_text")) and folder.endswith("val.bfloat16")
    assert D.find_trial_cache(data_dir, "val") == folder
    explicit = D.build_trial_cache(data_dir, "val", "float32", cache_dir=str(tmp_path / "elsewhere"))
    assert explicit.startswith(str(tmp_path / "elsewhere"))


def test_bad_files_and_trials_are_named_only_when_asked_for(data_dir: str):
    truncated = os.path.join(data_dir, SESSIONS[3], "data_train.hdf5")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    nan_file = os.path.join(data_dir, SESSIONS[1], "data_train.hdf5")
    with h5py.File(nan_file, "r+") as f:
        f["trial_0000"]["input_features"][5, 7] = np.nan
    # The cache holds every session; a run that leaves the broken one out never hears of it.
    train, _, _ = D.build_dataloaders(_config(data_dir, sessions=SESSIONS[:3]), n_steps=1)
    assert train.dataset.trial_indices[0]["cache"]
    with pytest.raises(D.DataError, match=f"{truncated}: cannot open HDF5 file"):
        D.build_dataloaders(_config(data_dir), n_steps=1)
    index = D.session_trial_index(data_dir, SESSIONS[1], "train", day=1, cfg=_config(data_dir))
    assert index[1]["cache"]
    ds = D.BrainToTextDataset(index, 1, "train", batch_size=N_TRAIN * 4, days_per_batch=1, random_seed=0)
    with pytest.raises(D.DataError, match=f"{nan_file} trial_0000: input_features contain NaN or inf"):
        ds[0]
    subset = D.BrainToTextDataset(index, 1, "train", batch_size=N_TRAIN * 4, days_per_batch=1, random_seed=0,
                                  feature_subset=[0, 1, 2])
    assert subset[0]["row_mask"].all()  # the NaN sits in a feature the subset leaves out, as with HDF5


def test_evaluation_and_calibration_read_an_existing_cache(data_dir: str):
    direct = D.build_eval_loader(data_dir, SESSIONS, "test", batch_size=3)
    assert not any("cache" in e for e in direct.dataset.trial_indices.values())  # none exists: HDF5
    D.main(["--dataset_dir", data_dir, "--dtype", "bfloat16", "--splits", "test"])
    D.main(["--dataset_dir", data_dir, "--splits", "test"])
    cached = D.build_eval_loader(data_dir, SESSIONS, "test", batch_size=3)
    assert cached.dataset.trial_indices[1]["cache"].endswith("test.float32")  # the most precise one
    _assert_same_batches(_batches(cached), _batches(direct))
    half = D.build_eval_loader(data_dir, SESSIONS, "test", batch_size=3, trial_cache="bfloat16")
    assert half.dataset.trial_indices[1]["cache"].endswith("test.bfloat16")
    index = D.session_trial_index(data_dir, SESSIONS[2], "test", day=5)
    assert index[5]["cache"].endswith("test.float32") and index[5]["trials"] == [0, 1]


def test_build_command_prints_one_line_per_split_and_exits_2_on_bad_input(data_dir: str, tmp_path: Path):
    run = [sys.executable, "dataset.py", "--dataset_dir"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(run + [data_dir], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and [line["split"] for line in lines] == ["train", "val", "test"]
    assert lines[0]["n_trials"] == len(SESSIONS) * N_TRAIN and D.find_trial_cache(data_dir, "test") == lines[2]["cache"]
    proc = subprocess.run(run + [str(tmp_path / "nowhere")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"dataset.py: {tmp_path / 'nowhere'}: dataset directory does not exist"


def test_sigterm_to_the_process_group_of_a_run_with_workers_saves_and_exits_143(data_dir: str, tmp_path: Path):
    """Scheduler-style preemption: every process of the group gets the SIGTERM, the workers too."""
    values = tiny_config_dict(data_dir, str(tmp_path / "run"))
    values.update({"num_training_batches": 100_000, "batches_per_val_step": 100_000, "checkpoint_every_steps": 0})
    values["dataset"]["num_dataloader_workers"] = 2
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "USE_TORCH_XLA": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_model.py", "--config_path", str(config)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = tmp_path / "run" / "train.log"
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"step +4/", log.read_text() if log.exists() else "") and proc.poll() is None:
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-3000:]
    assert (tmp_path / "run" / "checkpoint" / "last_checkpoint.pt").is_file()
    assert "SIGTERM: saved checkpoint/last_checkpoint.pt" in log.read_text()
    time.sleep(1.0)
    with pytest.raises(ProcessLookupError):  # no worker left behind in the group
        os.killpg(proc.pid, 0)


def test_a_process_exits_while_its_loader_workers_ignore_sigterm(data_dir: str):
    """multiprocessing ends daemonic workers at exit with SIGTERM, which they now ignore: the
    loaders' workers are shut down first, or an iterator still referenced at exit would hang it."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import dataset as D\n"
        "from test_dataset import _config\n"
        f"train, _, _ = D.build_dataloaders(_config({data_dir!r}, num_dataloader_workers=2), n_steps=8)\n"
        "steps = iter(train)\n"
        "next(steps)\n"
        "raise SystemExit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]


def test_a_float16_cache_refuses_values_beyond_its_range(data_dir: str):
    path = os.path.join(data_dir, SESSIONS[2], "data_val.hdf5")
    with h5py.File(path, "r+") as f:
        f["trial_0001"]["input_features"][3, 4] = 1e5
    with pytest.raises(D.DataError, match=f"{path} trial_0001: input_features exceed float16's range"):
        D.build_trial_cache(data_dir, "val", "float16")
    assert D.find_trial_cache(data_dir, "val", "float16") is None
    assert D.build_trial_cache(data_dir, "val", "bfloat16").endswith("val.bfloat16")


@pytest.mark.parametrize("n_workers,n_shards", [(0, 1), (2, 1), (2, 2)])
def test_refilled_batch_buffers_give_the_hdf5_batches_and_a_held_batch_is_never_refilled(
        data_dir: str, n_workers: int, n_shards: int, monkeypatch: pytest.MonkeyPatch):
    """Under static shapes each process refills the batch buffers its consumer has let go of (only
    the bins that held data before are zeroed): drawn one step at a time they equal batches read
    from HDF5 and all held, a batch (a view of it) still held is left alone, and buffers are reused."""
    n_new = _count_new_buffers(monkeypatch)
    static = {"static_shapes": True, "time_buckets": [256, 320, 384, 512], "max_seq_elements": None}
    kwargs = {"n_steps": 24, "batches_per_step": 2, "n_replicas": n_shards, "n_shards": n_shards}
    expected = _batches(D.build_dataloaders(_config(data_dir, trial_cache=False, **static), **kwargs)[0])  # all held
    n_new.value = 0
    train, _, _ = D.build_dataloaders(_config(data_dir, num_dataloader_workers=n_workers, **static), **kwargs)
    n_batches, held = 0, None
    for step, item in enumerate(train):
        for batch in item:
            _assert_same_batches([batch], [expected[n_batches]])
            n_batches += 1
        if step == 1:
            held, held_copy = item[0]["input_features"][1:3], item[0]["input_features"][1:3].clone()
        del item, batch  # as a training loop lets go of a step's batches
    assert n_batches == len(expected) == 48
    assert torch.equal(held, held_copy)
    assert n_new.value < n_batches * n_shards // 2, n_new.value  # kept buffers were refilled
