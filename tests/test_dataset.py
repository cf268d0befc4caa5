"""Tests of dataset.py: reading the layout, split and batching semantics, static shapes, bad input.

Run: .venv/bin/python -m pytest tests/test_dataset.py -q
"""

import collections
import os
import shutil
import types

import h5py
import numpy as np
import pytest
import torch

import dataset as D
import make_synthetic_data as synth

SESSIONS = synth.REAL_SESSIONS[:4]  # the first is train-only, as in the real release
N_TRAIN, N_VAL, N_TEST = 8, 5, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synth.generate_dataset(str(out), n_sessions=len(SESSIONS), n_train_trials=N_TRAIN, n_val_trials=N_VAL,
                           n_test_trials=N_TEST, seed=1, trials_per_block=4)
    return str(out)


def _index(data_dir: str, split: str = "train", sessions: list[str] = SESSIONS, **kwargs) -> dict:
    paths = D.session_files(data_dir, sessions, split)
    train, test = D.train_test_split_indices(paths, 0 if split == "train" else 1, seed=1, **kwargs)
    return train if split == "train" else test


def _config(data_dir: str, **overrides) -> types.SimpleNamespace:
    dataset = dict(
        dataset_dir=data_dir, sessions=[], batch_size=8, days_per_batch=2, must_include_days=[],
        num_dataloader_workers=0, loader_seed=1, val_batch_size=4, feature_subset=None, bad_trials={},
        on_bad_trial="error", max_seq_elements=500, static_shapes=False, time_buckets=[], trial_cache=True,
        trial_cache_dtype="float32", trial_cache_dir=None,
    )
    dataset.update(overrides)
    model = types.SimpleNamespace(patch_size=14, patch_stride=4)
    return types.SimpleNamespace(dataset=types.SimpleNamespace(**dataset), model=model)


def test_phoneme_classes_match_the_contract():
    assert len(D.PHONEMES) == 41 and D.PHONEMES[0] == "BLANK" and D.PHONEMES[40] == " | "
    assert synth.PHONEMES is D.PHONEMES


def test_sessions_are_discovered_sorted_and_split_files_found(data_dir):
    os.makedirs(os.path.join(data_dir, "not_a_session"), exist_ok=True)
    assert D.discover_sessions(data_dir) == SESSIONS
    val_paths = D.session_files(data_dir, SESSIONS, "val")
    assert val_paths[0] is None and all(p.endswith("data_val.hdf5") for p in val_paths[1:])


def test_split_semantics_and_bad_trials(data_dir):
    paths = D.session_files(data_dir, SESSIONS, "train")
    train, test = D.train_test_split_indices(paths, 0.25, seed=7)
    for day in range(len(SESSIONS)):
        assert len(test[day]["trials"]) == max(1, int(N_TRAIN * 0.25))
        assert sorted(train[day]["trials"] + test[day]["trials"]) == list(range(N_TRAIN))
    assert D.train_test_split_indices(paths, 0.25, seed=7)[1] == test
    assert D.train_test_split_indices(paths, 0.25, seed=8)[1] != test
    # Bad trials are given by session -> block -> trial number (yaml may give str block keys).
    bad = {SESSIONS[1]: {"1": [0, 2]}, SESSIONS[2]: {2: [1]}}
    train, _ = D.train_test_split_indices(paths, 0, seed=1, bad_trials_dict=bad)
    assert train[1]["trials"] == [1, 3, 4, 5, 6, 7] and train[2]["trials"] == [0, 1, 2, 3, 4, 6, 7]


def test_training_batches_draw_distinct_days_and_must_include_days(data_dir):
    index = _index(data_dir)
    ds = D.BrainToTextDataset(index, 20, "train", batch_size=9, days_per_batch=3, random_seed=4, must_include_days=[-1])
    for i in range(len(ds)):
        batch = ds[i]
        days = collections.Counter(batch["day_indices"].tolist())
        assert len(days) == 3 and 3 in days and sum(days.values()) == 9
        assert batch["row_mask"].all()
    again = D.BrainToTextDataset(index, 20, "train", batch_size=9, days_per_batch=3, random_seed=4, must_include_days=[-1])
    assert torch.equal(ds[5]["input_features"], again[5]["input_features"])  # item i = f(seed, i)
    other = D.BrainToTextDataset(index, 20, "train", batch_size=9, days_per_batch=3, random_seed=5)
    assert any(ds.batch_trials(i) != other.batch_trials(i) for i in range(5))


def test_batch_rows_hold_the_stored_trial(data_dir):
    ds = D.BrainToTextDataset(_index(data_dir), 3, "train", batch_size=6, days_per_batch=2, random_seed=0)
    batch = ds[2]
    assert batch["input_features"].shape[1] == batch["n_time_steps"].max()  # dynamic padding
    assert batch["seq_class_ids"].shape[1] == batch["phone_seq_lens"].max()
    for row, (day, trial) in enumerate(ds.batch_trials(2)):
        with h5py.File(os.path.join(data_dir, SESSIONS[day], "data_train.hdf5"), "r") as f:
            group = f[f"trial_{trial:04d}"]
            n, s = group.attrs["n_time_steps"], group.attrs["seq_len"]
            assert batch["n_time_steps"][row] == n and batch["phone_seq_lens"][row] == s
            np.testing.assert_array_equal(batch["input_features"][row, :n].numpy(), group["input_features"][()])
            assert (batch["input_features"][row, n:] == 0).all()
            np.testing.assert_array_equal(batch["seq_class_ids"][row, :s].numpy(), group["seq_class_ids"][:s])
            assert batch["trial_nums"][row] == group.attrs["trial_num"] and batch["day_indices"][row] == day
            assert batch["transcriptions"].shape[1] == 500


@pytest.mark.parametrize("static_shapes", [False, True])
def test_validation_visits_every_trial_once(data_dir, static_shapes):
    index = _index(data_dir, "val")
    ds = D.BrainToTextDataset(index, 0, "val", batch_size=4, static_shapes=static_shapes, time_buckets=[256, 384, 512])
    seen = []
    for i in range(len(ds)):
        batch = ds[i]
        assert len(set(batch["day_indices"].tolist())) == 1  # one day per batch
        mask = batch["row_mask"]
        assert batch["input_features"].shape[0] == (4 if static_shapes else int(mask.sum()))
        if static_shapes:  # padding rows of a short last batch: masked and CTC-feasible
            assert (batch["phone_seq_lens"][~mask] == 1).all()
            assert (batch["n_time_steps"][~mask] == batch["input_features"].shape[1]).all()
        seen += list(zip(batch["day_indices"][mask].tolist(), batch["block_nums"][mask].tolist(), batch["trial_nums"][mask].tolist()))
    assert len(seen) == len(set(seen)) == N_VAL * (len(SESSIONS) - 1)
    assert not static_shapes or any(not ds[i]["row_mask"].all() for i in range(len(ds)))


def test_static_shapes_use_only_the_configured_buckets(data_dir):
    buckets = [200, 260, 320, 512]
    ds = D.BrainToTextDataset(_index(data_dir), 12, "train", batch_size=4, days_per_batch=2, random_seed=3,
                              static_shapes=True, time_buckets=buckets)
    shapes = set()
    for i in range(len(ds)):
        batch = ds[i]
        n_time = batch["input_features"].shape[1]
        assert n_time == min(b for b in buckets if b >= batch["n_time_steps"].max())
        assert batch["seq_class_ids"].shape == (4, 500)
        shapes.add(n_time)
    assert shapes <= set(buckets) and len(shapes) >= 2


def test_trial_longer_than_the_largest_bucket(data_dir):
    index = _index(data_dir)
    with pytest.raises(D.DataError, match=r"data_train\.hdf5 trial_\d{4}: \d+ time steps exceed the largest time bucket \(150\)"):
        D.BrainToTextDataset(index, 2, "train", batch_size=4, days_per_batch=2, static_shapes=True, time_buckets=[100, 150])
    with pytest.warns(UserWarning, match=r"skipped \d+ bad trial"):
        ds = D.BrainToTextDataset(index, 2, "train", batch_size=4, days_per_batch=2, static_shapes=True,
                                  time_buckets=[240], on_bad_trial="skip")
    assert (ds[0]["n_time_steps"] <= 240).all()


def test_feature_subset(data_dir):
    subset = [0, 5, 300, 511]
    full = D.BrainToTextDataset(_index(data_dir), 1, "train", batch_size=4, days_per_batch=2, random_seed=2)[0]
    part = D.BrainToTextDataset(_index(data_dir), 1, "train", batch_size=4, days_per_batch=2, random_seed=2, feature_subset=subset)[0]
    assert torch.equal(part["input_features"], full["input_features"][:, :, subset])


def test_build_dataloaders_with_workers_matches_in_process(data_dir):
    train, val, sessions = D.build_dataloaders(_config(data_dir, num_dataloader_workers=1), n_steps=4)
    assert sessions == SESSIONS
    train0, val0, _ = D.build_dataloaders(_config(data_dir), n_steps=4)
    for a, b in zip(train, train0):
        assert torch.equal(a["input_features"], b["input_features"])
    val_days = {int(b["day_indices"][0]) for b in val0}
    assert val_days == {1, 2, 3}  # day index = position in the session list, day 0 has no val data
    assert sum(int(b["row_mask"].sum()) for b in val) == N_VAL * 3
    resumed, _, _ = D.build_dataloaders(_config(data_dir), n_steps=4, start_step=3)
    assert torch.equal(next(iter(resumed))["input_features"], list(train0)[3]["input_features"])


def test_replicas_and_micro_batches_partition_the_batches(data_dir):
    # Batch (step * accumulation + micro) * replicas + rank: each replica's steps hold its own
    # micro-batches, and together the replicas visit every batch once.
    cfg = _config(data_dir)
    whole, _, _ = D.build_dataloaders(cfg, n_steps=8)
    whole = [b["input_features"] for b in whole]
    seen, val_seen = [], []
    for rank in range(2):
        train, val, _ = D.build_dataloaders(cfg, n_steps=2, batches_per_step=2, n_replicas=2, rank=rank)
        for step, micro_batches in enumerate(train):
            assert len(micro_batches) == 2
            for micro, batch in enumerate(micro_batches):
                index = (step * 2 + micro) * 2 + rank
                assert torch.equal(batch["input_features"], whole[index])
                seen.append(index)
        val_seen += list(val.sampler)
    assert sorted(seen) == list(range(8))
    assert sorted(val_seen) == list(range(len(val.dataset)))


def test_eval_loader_visits_every_trial_in_order(data_dir):
    test = D.build_eval_loader(data_dir, SESSIONS, "test", batch_size=3)
    rows = [pair for i in test.sampler for pair in test.dataset.batch_trials(i)]
    assert rows == [(d, i) for d in (1, 2, 3) for i in range(N_TEST)]
    batch = next(iter(test))
    assert "seq_class_ids" not in batch and batch["input_features"].shape[-1] == 512
    val = D.build_eval_loader(data_dir, SESSIONS, "val", batch_size=3)
    batch = next(iter(val))
    day, trial = val.dataset.batch_trials(0)[0]
    assert val.dataset.trial_indices[day]["meta"][trial]["sentence_label"].endswith(".")
    assert int(batch["phone_seq_lens"][0]) <= batch["seq_class_ids"].shape[1]
    # Static shapes: full batches, padded to a training bucket, with a bucket added for longer trials.
    static = D.build_eval_loader(data_dir, SESSIONS, "val", batch_size=4, static_shapes=True, time_buckets=[64])
    lengths = {b["input_features"].shape for b in static}
    assert all(shape[0] == 4 for shape in lengths)
    assert {shape[1] for shape in lengths} <= set(static.dataset.time_buckets) and static.dataset.time_buckets[0] == 64


def test_read_labels_returns_every_trials_sentence_and_phonemes(data_dir):
    sentences, labels = D.read_labels(data_dir, SESSIONS, "val")
    assert len(sentences) == len(labels) == N_VAL * 3
    assert all(s.endswith(".") for s in sentences) and all(1 <= p < len(D.PHONEMES) for lab in labels for p in lab)


# --- bad input: one DataError naming the file and trial ---------------------------------------


@pytest.fixture
def bad_dir(data_dir, tmp_path):
    """A private copy of two sessions that a test can damage."""
    for session in SESSIONS[:2]:
        shutil.copytree(os.path.join(data_dir, session), tmp_path / session)
    return str(tmp_path)


def _damage(path: str, trial: int, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f[f"trial_{trial:04d}"])


def _replace(group: h5py.Group, name: str, data: np.ndarray) -> None:
    del group[name]
    group.create_dataset(name, data=data)


def test_missing_directory_and_session(data_dir, tmp_path):
    with pytest.raises(D.DataError, match="nowhere: dataset directory does not exist"):
        D.build_dataloaders(_config(str(tmp_path / "nowhere")), n_steps=1)
    with pytest.raises(D.DataError, match="no session folders"):
        D.discover_sessions(str(tmp_path))
    with pytest.raises(D.DataError, match=r"t15\.2099\.01\.01: session folder does not exist"):
        D.build_dataloaders(_config(data_dir, sessions=[SESSIONS[1], "t15.2099.01.01"]), n_steps=1)


def test_truncated_file(bad_dir):
    path = os.path.join(bad_dir, SESSIONS[1], "data_train.hdf5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(D.DataError, match=f"{path}: cannot open HDF5 file"):
        D.build_dataloaders(_config(bad_dir), n_steps=1)


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda g: _replace(g, "input_features", np.zeros((g.attrs["n_time_steps"], 500), np.float32)), "wrong feature width"),
        (lambda g: g.attrs.__setitem__("seq_len", 600), "seq_len=600 is larger than the stored seq_class_ids array"),
        (lambda g: (_replace(g, "input_features", np.zeros((40, 512), np.float32)), g.attrs.__setitem__("n_time_steps", 40)),
         "label sequence too long for CTC"),
    ],
)
def test_bad_trial_is_named_or_skipped(bad_dir, edit, problem):
    path = os.path.join(bad_dir, SESSIONS[1], "data_train.hdf5")
    _damage(path, 3, edit)
    with pytest.raises(D.DataError, match=f"{path} trial_0003: .*{problem}"):
        D.build_dataloaders(_config(bad_dir), n_steps=1)
    with pytest.warns(UserWarning, match=f"skipped 1 bad trial.*\n  {path} trial_0003: .*{problem}"):
        train, _, _ = D.build_dataloaders(_config(bad_dir, on_bad_trial="skip"), n_steps=1)
    assert 3 not in train.dataset.trial_indices[1]["trials"] and len(train.dataset.trial_indices[1]["trials"]) == N_TRAIN - 1


def test_nan_features_found_when_loaded(bad_dir):
    path = os.path.join(bad_dir, SESSIONS[1], "data_train.hdf5")
    _damage(path, 0, lambda g: g["input_features"].__setitem__((5, 7), np.nan))
    index = _index(bad_dir, sessions=SESSIONS[:2])
    ds = D.BrainToTextDataset({1: index[1]}, 1, "train", batch_size=N_TRAIN * 4, days_per_batch=1, random_seed=0)
    with pytest.raises(D.DataError, match=f"{path} trial_0000: input_features contain NaN or inf"):
        ds[0]
    ds = D.BrainToTextDataset({1: index[1]}, 1, "train", batch_size=N_TRAIN * 4, days_per_batch=1, random_seed=0, on_bad_trial="skip")
    with pytest.warns(UserWarning, match="trial_0000: input_features contain NaN"):
        batch = ds[0]
    assert not batch["row_mask"].all() and torch.isfinite(batch["input_features"]).all()


def test_empty_split(data_dir):
    bad = {s: {b: list(range(10)) for b in range(1, 10)} for s in SESSIONS}
    with pytest.raises(D.DataError, match="the train split is empty"):
        D.build_dataloaders(_config(data_dir, bad_trials=bad), n_steps=1)
    with pytest.raises(D.DataError, match="the val split is empty"):
        D.build_dataloaders(_config(data_dir, sessions=SESSIONS[:1], days_per_batch=1), n_steps=1)


def _stored_label_lengths(data_dir: str, split: str) -> list[int]:
    lengths = []
    for path in D.session_files(data_dir, SESSIONS, split):
        if path is not None:
            with h5py.File(path, "r") as f:
                lengths += [int(f[key].attrs["seq_len"]) for key in f]
    return lengths


def test_label_padding_is_derived_from_both_splits():
    def index(*seq_lens):
        return {0: {"trials": list(range(len(seq_lens))), "meta": {i: {"seq_len": s} for i, s in enumerate(seq_lens)}}}

    assert D.derived_label_padding(index(3, 17), index(5)) == 32
    assert D.derived_label_padding(index(3, 17), index(33)) == 48  # the val split's longest label counts
    assert D.derived_label_padding(index(16)) == 16


def test_static_label_width_is_the_same_for_train_and_val(data_dir):
    longest = max(_stored_label_lengths(data_dir, "train") + _stored_label_lengths(data_dir, "val"))
    expected = -(-longest // 16) * 16
    assert expected < 500
    train_loader, val_loader, _ = D.build_dataloaders(_config(data_dir, max_seq_elements=None, static_shapes=True), n_steps=4)
    widths = {loader.dataset[i]["seq_class_ids"].shape[1] for loader in (train_loader, val_loader)
              for i in range(len(loader.dataset))}
    assert widths == {expected}
    # An int still fixes the width, as upstream's 500.
    train_loader, val_loader, _ = D.build_dataloaders(_config(data_dir, max_seq_elements=200, static_shapes=True), n_steps=1)
    assert train_loader.dataset[0]["seq_class_ids"].shape[1] == val_loader.dataset[0]["seq_class_ids"].shape[1] == 200


def test_a_steps_micro_batches_share_their_largest_bucket(data_dir):
    """Under static shapes a step's micro-batches are built at the largest of their buckets (one
    graph per bucket, not per combination): each equals its own batch zero-padded to that length."""
    cfg = _config(data_dir, static_shapes=True, time_buckets=[200, 260, 320, 512])
    singles = list(D.build_dataloaders(cfg, n_steps=8)[0])
    n_mixed = 0
    for step, micro_batches in enumerate(D.build_dataloaders(cfg, n_steps=4, batches_per_step=2)[0]):
        own = [singles[2 * step + k] for k in range(2)]
        lengths = [batch["input_features"].shape[1] for batch in own]
        n_mixed += lengths[0] != lengths[1]
        for batch, single in zip(micro_batches, own):
            padded = torch.nn.functional.pad(single["input_features"], (0, 0, 0, max(lengths) - single["input_features"].shape[1]))
            assert torch.equal(batch["input_features"], padded)
            for key in ("seq_class_ids", "n_time_steps", "phone_seq_lens", "day_indices", "row_mask"):
                assert torch.equal(batch[key], single[key]), key
    assert n_mixed > 0  # some step did mix buckets
