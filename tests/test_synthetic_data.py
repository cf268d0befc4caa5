"""Tests of the synthetic dataset generator: exact Dryad layout, labels, signal shape, determinism.

Run: .venv/bin/python -m pytest tests/test_synthetic_data.py -q
"""

import hashlib
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import dataset as D
import make_synthetic_data as synth
from tests.conftest import REPO_ROOT

N_SESSIONS, N_TRAIN, N_VAL, N_TEST = 3, 6, 3, 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synth.generate_dataset(str(out), n_sessions=N_SESSIONS, n_train_trials=N_TRAIN, n_val_trials=N_VAL,
                           n_test_trials=N_TEST, seed=3, trials_per_block=4)
    return str(out)


def _read_file(path: str) -> dict:
    with h5py.File(path, "r") as f:
        return {key: ({name: f[key][name][()] for name in f[key]}, dict(f[key].attrs)) for key in f}


def test_sessions_and_split_files_follow_the_real_release(tiny_dir):
    sessions = sorted(n for n in os.listdir(tiny_dir) if n.startswith("t15."))
    assert sessions == synth.REAL_SESSIONS[:N_SESSIONS]
    # t15.2023.08.11 has no val/test data in the real release, the others have all three.
    assert sorted(os.listdir(os.path.join(tiny_dir, sessions[0]))) == ["data_train.hdf5"]
    for session in sessions[1:]:
        assert sorted(os.listdir(os.path.join(tiny_dir, session))) == ["data_test.hdf5", "data_train.hdf5", "data_val.hdf5"]


@pytest.mark.parametrize("split,n_trials", [("train", N_TRAIN), ("val", N_VAL)])
def test_labelled_file_layout(tiny_dir, split, n_trials):
    session = synth.REAL_SESSIONS[1]
    trials = _read_file(os.path.join(tiny_dir, session, f"data_{split}.hdf5"))
    assert list(trials) == [f"trial_{i:04d}" for i in range(n_trials)]
    for datasets, attrs in trials.values():
        assert set(datasets) == {"input_features", "seq_class_ids", "transcription"}
        features, ids, chars = datasets["input_features"], datasets["seq_class_ids"], datasets["transcription"]
        assert features.dtype == np.float32 and features.ndim == 2 and features.shape[1] == 512
        assert ids.dtype == np.int32 and ids.shape == (500,)
        assert chars.dtype == np.int32 and chars.shape == (500,)
        assert set(attrs) == {"n_time_steps", "session", "block_num", "trial_num", "seq_len", "sentence_label"}
        assert attrs["n_time_steps"] == features.shape[0] and attrs["session"] == session
        seq_len, label = attrs["seq_len"], attrs["sentence_label"]
        assert (ids[:seq_len] > 0).all() and (ids[seq_len:] == 0).all()
        assert "".join(map(chr, chars[: len(label)])) == label and (chars[len(label):] == 0).all()


def test_test_files_are_unlabelled(tiny_dir):
    trials = _read_file(os.path.join(tiny_dir, synth.REAL_SESSIONS[2], "data_test.hdf5"))
    assert len(trials) == N_TEST
    for datasets, attrs in trials.values():
        assert set(datasets) == {"input_features"}
        assert set(attrs) == {"n_time_steps", "session", "block_num", "trial_num"}
    answers = open(os.path.join(tiny_dir, "test_sentences.csv")).read().splitlines()
    assert answers[0] == "id,session,block_num,trial_num,sentence_label"
    assert len(answers) == 1 + N_TEST * (N_SESSIONS - 1)


def test_blocks_are_numbered_and_zscored(tiny_dir):
    trials = _read_file(os.path.join(tiny_dir, synth.REAL_SESSIONS[1], "data_train.hdf5"))
    keys = sorted(trials)
    numbers = [(trials[k][1]["block_num"], trials[k][1]["trial_num"]) for k in keys]
    assert numbers == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    block = np.concatenate([trials[k][0]["input_features"] for k in keys[:4]])
    np.testing.assert_allclose(block.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(block.std(0), 1, atol=1e-3)
    # Threshold crossings are integer counts before z-scoring: few distinct values per channel;
    # spike-band power is continuous: (almost) every bin differs.
    n_distinct_tc = np.mean([len(np.unique(block[:, c])) for c in range(0, 256, 16)])
    n_distinct_sbp = np.mean([len(np.unique(block[:, c])) for c in range(256, 512, 16)])
    assert n_distinct_tc < 20
    assert n_distinct_sbp > 0.9 * len(block)


def test_labels_are_the_cmudict_phonemes_of_the_sentence(tiny_dir):
    trials = _read_file(os.path.join(tiny_dir, synth.REAL_SESSIONS[0], "data_train.hdf5"))
    for datasets, attrs in trials.values():
        words = attrs["sentence_label"].rstrip(".").lower().split()
        ids = datasets["seq_class_ids"][: attrs["seq_len"]].tolist()
        assert ids == synth.phonemize(words)
        assert ids.count(D.SIL_ID) == len(words) and ids[-1] == D.SIL_ID
    assert synth.phonemize(["cat"]) == [synth.PHONEMES.index(p) for p in ("K", "AE", "T")] + [40]


def test_vocabulary_is_in_cmudict_and_large():
    words = {w for slot in synth.WORDS.values() for w in slot}
    words |= {w for template in synth.TEMPLATES for w in template.split() if w not in synth.WORDS}
    assert len(words) >= 200
    missing = [w for w in words if w not in D.load_cmudict()]
    assert missing == []


def test_trials_are_ctc_feasible_with_several_bins_per_phoneme(tiny_dir):
    bins_per_label = []
    for session in synth.REAL_SESSIONS[:N_SESSIONS]:
        for datasets, attrs in _read_file(os.path.join(tiny_dir, session, "data_train.hdf5")).values():
            ids = datasets["seq_class_ids"][: attrs["seq_len"]].tolist()
            repeats = sum(a == b for a, b in zip(ids, ids[1:]))
            assert (attrs["n_time_steps"] - 14) // 4 + 1 >= len(ids) + repeats
            bins_per_label.append(attrs["n_time_steps"] / len(ids))
    assert 8 <= np.mean(bins_per_label) <= 16


def test_generation_is_deterministic_by_seed(tmp_path):
    kwargs = {"n_sessions": 2, "n_train_trials": 3, "n_val_trials": 1, "n_test_trials": 1}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synth.generate_dataset(str(tmp_path / name), seed=seed, **kwargs)
    path = os.path.join(synth.REAL_SESSIONS[1], "data_val.hdf5")
    a, b, c = (_read_file(str(tmp_path / name / path)) for name in "abc")
    for key in a:
        for name in a[key][0]:
            np.testing.assert_array_equal(a[key][0][name], b[key][0][name])
        assert a[key][1] == b[key][1]
    assert not np.array_equal(a["trial_0000"][0]["input_features"][:10], c["trial_0000"][0]["input_features"][:10])


def test_command_line_writes_the_requested_size(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "make_synthetic_data.py", "--out", str(out), "--n_sessions", "2", "--n_train_trials", "2",
         "--n_val_trials", "1", "--n_test_trials", "1", "--seed", "1"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    with h5py.File(out / synth.REAL_SESSIONS[1] / "data_train.hdf5", "r") as f:
        assert len(f) == 2


def test_session_maps_drift_with_the_days_between_sessions():
    models = synth._session_models(synth.REAL_SESSIONS[:8], seed=0)

    def similarity(a, b):
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    to_first = [similarity(models[0].tc_map, m.tc_map) for m in models]
    assert to_first[0] == pytest.approx(1.0)
    assert to_first[1] > to_first[4] > to_first[7]  # further apart in time, less alike
    assert to_first[7] < 0.5  # three weeks later the first day's input layer no longer fits


def _file_hashes(root) -> dict:
    hashes = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def test_artifacts_off_by_default_and_only_in_the_chosen_splits(tmp_path):
    kwargs = {"n_sessions": 2, "n_train_trials": 3, "n_val_trials": 2, "n_test_trials": 1, "seed": 5}
    synth.generate_dataset(str(tmp_path / "default"), **kwargs)
    synth.generate_dataset(str(tmp_path / "zero"), **kwargs, artifacts=synth.Artifacts())
    synth.generate_dataset(str(tmp_path / "val_only"), **kwargs,
                           artifacts=synth.Artifacts(burst_rate=2.0, dead_rate=0.05, splits=("val",)))
    default, zero, val_only = (_file_hashes(tmp_path / name) for name in ("default", "zero", "val_only"))
    assert len(default) == 5 and zero == default  # every rate 0: the same bytes
    changed = sorted(path for path in default if val_only[path] != default[path])
    assert changed == [os.path.join(synth.REAL_SESSIONS[1], "data_val.hdf5")]

    # Artifacts draw from their own stream: labels and trial lengths are those of the clean data.
    path = os.path.join(synth.REAL_SESSIONS[1], "data_val.hdf5")
    clean, noisy = _read_file(str(tmp_path / "default" / path)), _read_file(str(tmp_path / "val_only" / path))
    for key in clean:
        assert clean[key][1] == noisy[key][1]
        np.testing.assert_array_equal(clean[key][0]["seq_class_ids"], noisy[key][0]["seq_class_ids"])
        assert clean[key][0]["input_features"].shape == noisy[key][0]["input_features"].shape


def test_bursts_hit_groups_of_electrodes_at_the_given_rate():
    artifacts = synth.Artifacts(burst_rate=0.5, burst_amplitude=8.0, burst_electrodes=32, burst_bins=5)
    n_time, rng = 5000, np.random.default_rng(0)  # 100 s per trial
    trials = [synth.add_artifacts(np.zeros((n_time, 512), np.float32), artifacts, rng) for _ in range(20)]
    for added in trials:
        hit = added != 0
        # Both features of an electrode (threshold crossings e, spike-band power e + 256) together.
        np.testing.assert_array_equal(hit[:, :256], hit[:, 256:])
        assert (added >= 0).all()
        # In a bin, the hit electrodes form runs of burst_electrodes (or unions of overlapping ones).
        for t in np.flatnonzero(hit.any(axis=1))[:50]:
            electrodes = np.flatnonzero(hit[t, :256])
            runs = np.split(electrodes, np.flatnonzero(np.diff(electrodes) > 1) + 1)
            assert all(len(run) >= 32 for run in runs)
    # Total added value: rate x seconds bursts, each 5 bins x 64 features x amplitude (gains average 1).
    expected = 0.5 * n_time * 0.02 * 5 * 64 * 8.0
    total = np.mean([added.sum() for added in trials])
    assert total == pytest.approx(expected, rel=0.1)


def test_dead_and_saturated_electrodes_are_flat_for_the_trial():
    artifacts = synth.Artifacts(dead_rate=0.1, saturated_rate=0.05, saturation_level=6.0)
    rng = np.random.default_rng(1)
    n_dead, n_saturated, n_trials = 0, 0, 200
    for _ in range(n_trials):
        features = rng.standard_normal((80, 512)).astype(np.float32)
        out = synth.add_artifacts(features, artifacts, rng)
        flat = (out == out[:1]).all(axis=0)  # (512,) features that hold one value
        dead = flat & (out[0] == 0.0)
        saturated = flat & (out[0] == 6.0)
        np.testing.assert_array_equal(dead[:256], dead[256:])
        np.testing.assert_array_equal(saturated[:256], saturated[256:])
        np.testing.assert_array_equal(out[:, ~(dead | saturated)], features[:, ~(dead | saturated)])
        n_dead, n_saturated = n_dead + dead[:256].sum(), n_saturated + saturated[:256].sum()
    assert n_dead / (256 * n_trials) == pytest.approx(0.1, abs=0.01)
    assert n_saturated / (256 * n_trials) == pytest.approx(0.05, abs=0.01)


def test_baseline_shift_is_slow_with_the_given_std():
    artifacts = synth.Artifacts(baseline_shift_std=0.5, baseline_shift_bins=50.0)
    shift = synth.add_artifacts(np.zeros((20000, 512), np.float32), artifacts, np.random.default_rng(2))
    assert shift.std() == pytest.approx(0.5, rel=0.1)
    # Gaussian-smoothed white noise of std s changes by s / (sqrt(2) * sigma) per bin (white noise: sqrt(2) s).
    step_std = np.diff(shift, axis=0).std()
    assert step_std == pytest.approx(0.5 / (np.sqrt(2) * 50.0), rel=0.1)


def test_command_line_artifact_options_reach_the_chosen_split(tmp_path):
    common = ["--n_sessions", "2", "--n_train_trials", "2", "--n_val_trials", "1", "--n_test_trials", "1", "--seed", "1"]
    for name, extra in (("clean", []), ("bursts", ["--burst_rate", "3", "--artifact_splits", "train"])):
        subprocess.run([sys.executable, "make_synthetic_data.py", "--out", str(tmp_path / name), *common, *extra],
                       cwd=REPO_ROOT, check=True, capture_output=True)
    clean, bursts = _file_hashes(tmp_path / "clean"), _file_hashes(tmp_path / "bursts")
    changed = sorted(path for path in clean if clean[path] != bursts[path])
    assert changed == [os.path.join(session, "data_train.hdf5") for session in synth.REAL_SESSIONS[:2]]


def test_holdout_sessions_continue_the_drift_and_leave_the_training_sessions_unchanged(tmp_path):
    kwargs = {"n_sessions": 2, "n_train_trials": 3, "n_val_trials": 2, "n_test_trials": 1, "seed": 5}
    plain = synth.generate_dataset(str(tmp_path / "plain"), **kwargs)
    held = synth.generate_dataset(str(tmp_path / "held"), n_holdout_sessions=2, **kwargs)
    assert plain == synth.REAL_SESSIONS[:2] and held == synth.REAL_SESSIONS[:4]
    plain_files, held_files = _file_hashes(tmp_path / "plain"), _file_hashes(tmp_path / "held")
    assert "holdout_sessions.txt" not in plain_files  # without the option nothing new is written
    for name, digest in plain_files.items():
        if name != "test_sentences.csv":  # which also lists the held-out sessions' test trials
            assert held_files[name] == digest, name
    assert (tmp_path / "held" / "holdout_sessions.txt").read_text().split() == held[2:]
    for session in held[2:]:  # every held-out session can be scored on val
        assert {f"{session}/data_{split}.hdf5" for split in ("train", "val", "test")} <= set(held_files)
    # The held-out days drift on from the last training day: further in time, less alike.
    models = synth._session_models(held, seed=5)
    last = models[1].tc_map

    def similarity(a, b):
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    assert similarity(last, models[2].tc_map) > similarity(last, models[3].tc_map)


def test_command_line_rejects_more_sessions_than_real_dates(tmp_path):
    proc = subprocess.run(
        [sys.executable, "make_synthetic_data.py", "--out", str(tmp_path / "x"), "--n_sessions", "44",
         "--holdout_sessions", "2"], cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "--n_sessions + --holdout_sessions must be in 1..45" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()
