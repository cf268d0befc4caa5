"""Generate a small synthetic stand-in for the Dryad brain-to-text dataset, in the same layout.

    python make_synthetic_data.py --out data/synthetic [--n_sessions 8 --n_train_trials 80
        --n_val_trials 16 --n_test_trials 16 --seed 0 --snr 0.3]

Layout written (identical to the real release, so the loader cannot tell them apart):
    <out>/t15.YYYY.MM.DD/data_train.hdf5, data_val.hdf5, data_test.hdf5
Each file holds groups trial_0000, trial_0001, ... with dataset `input_features` (float32, T x 512)
and attrs n_time_steps, session, block_num, trial_num; train/val trials also hold `seq_class_ids`
and `transcription` (int32, zero-padded to 500) and attrs seq_len, sentence_label. Test trials are
unlabelled; their sentences go to <out>/test_sentences.csv so decoders can still be scored. Sessions
that have no val/test data in the real release are train-only here too.

How the signal is made: sentences come from a small grammar over a few hundred common words
(so a word n-gram LM helps), phonemized with CMUdict. Each phoneme has a latent vector; a
trial's latent trajectory holds each phoneme for ~10 bins (speaking rate varies), is smoothed to
mimic coarticulation and gets latent noise. A per-session linear map, drifting with the number of
days between sessions (a rotation of the latent plus renewed channel tuning, so day-specific input
layers matter), projects the latent onto 512 channels: Poisson threshold-crossing counts
(features 0-255) and log-normal spike-band power (256-511), then each block is z-scored.
`--snr` scales the latent's effect on the channels.

Recording artifacts (all off by default, so the default output does not change): transient
high-amplitude bursts on groups of neighbouring electrodes, dead or saturated electrodes, and slow
baseline shifts, added to the z-scored features of the chosen splits from a random stream of their
own (see `Artifacts`):

    python make_synthetic_data.py --out data/synthetic_artifacts --burst_rate 0.5 --dead_rate 0.02 \
        --saturated_rate 0.01 --baseline_shift_std 0.5 [--artifact_splits train val test]

Held-out sessions, for calibrating a trained decoder to a day it has not seen (calibrate_session.py):
--holdout_sessions N writes N more sessions after the n_sessions training ones, under the next
real session dates, whose drift continues from the last training session; every held-out session
has val and test data. Their names go to <out>/holdout_sessions.txt; train on the others by listing
them (the command prints the override). The training sessions are byte-identical to those written
without the option:

    python make_synthetic_data.py --out data/synthetic_holdout --holdout_sessions 2

A set of the real data's size, for timing what scales with it (index and cache builds, time to
the first step): --full_size writes 45 sessions holding the real split sizes (8,072 train, 1,426
val and 1,450 test trials, spread evenly over the sessions that have each split) with phonemes
held ~41 bins, so that trials are as long as the real ones on average (~875 bins; the longest
reach ~2,400). That is ~20 GB; --unwritten_features declares every input_features dataset at its
shape without writing it (HDF5 reads such a dataset as zeros), giving the same metadata and
trial layout in a few hundred MB, for timing index builds (not feature reads):

    python make_synthetic_data.py --out data/synthetic_full --full_size [--unwritten_features]

--mean_phoneme_bins sets the phoneme hold alone (default 10: ~250-bin trials, quick to train on).

Library use: `from make_synthetic_data import generate_dataset, generate_sentences`.
"""

import argparse
import csv
import dataclasses
import datetime
import os
import time
from collections.abc import Sequence

import h5py
import numpy as np
from scipy.linalg import expm
from scipy.ndimage import gaussian_filter1d

from ctc_loss import ctc_frames_needed
from dataset import N_FEATURES, PHONEMES, SIL_ID, SPLITS, TRANSCRIPTION_LENGTH, load_cmudict
from rnn_model import n_patches

# Every trial must be alignable by the shipped models' patching (14 bins, stride 4).
PATCH_SIZE, PATCH_STRIDE = 14, 4
# Real split sizes (shared/REFERENCE.md) and the phoneme hold that makes the mean trial as long
# as the real ~875 bins: sentences here average 19.4 phoneme-lengths (a word gap counts 0.35)
# at a mean speaking rate of 1.025, plus ~55 bins of rest around them.
REAL_SPLIT_SIZES = {"train": 8072, "val": 1426, "test": 1450}
REAL_LENGTH_PHONEME_BINS = 41.0

# Session names and train-only sessions of the real release (day index = position).
REAL_SESSIONS = [
    "t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18", "t15.2023.08.20", "t15.2023.08.25",
    "t15.2023.08.27", "t15.2023.09.01", "t15.2023.09.03", "t15.2023.09.24", "t15.2023.09.29",
    "t15.2023.10.01", "t15.2023.10.06", "t15.2023.10.08", "t15.2023.10.13", "t15.2023.10.15",
    "t15.2023.10.20", "t15.2023.10.22", "t15.2023.11.03", "t15.2023.11.04", "t15.2023.11.17",
    "t15.2023.11.19", "t15.2023.11.26", "t15.2023.12.03", "t15.2023.12.08", "t15.2023.12.10",
    "t15.2023.12.17", "t15.2023.12.29", "t15.2024.02.25", "t15.2024.03.03", "t15.2024.03.08",
    "t15.2024.03.15", "t15.2024.03.17", "t15.2024.04.25", "t15.2024.04.28", "t15.2024.05.10",
    "t15.2024.06.14", "t15.2024.07.19", "t15.2024.07.21", "t15.2024.07.28", "t15.2025.01.10",
    "t15.2025.01.12", "t15.2025.03.14", "t15.2025.03.16", "t15.2025.03.30", "t15.2025.04.13",
]
TRAIN_ONLY_SESSIONS = {"t15.2023.08.11", "t15.2024.03.03", "t15.2024.04.25", "t15.2024.04.28"}

MAX_SEQ_ELEMENTS = 500  # seq_class_ids are stored zero-padded to this width, as in the release
N_TC = N_FEATURES // 2  # features 0-255 are threshold crossings, 256-511 spike-band power
N_LATENT = 12
BIN_SECONDS = 0.02

# A small grammar: words by role. Every word must be in CMUdict (checked at use).
WORDS = {
    "det": "the a my your his her our their this that every some one".split(),
    "adj": (
        "big small old new good bad hot cold warm long short red blue green black white "
        "happy sad quiet loud fast slow clean dirty soft hard young little dark bright heavy "
        "nice full empty strong funny early late fresh sweet"
    ).split(),
    "noun": (
        "man woman child boy girl dog cat bird horse fish house car door window table chair "
        "book letter phone cup bag box bed room kitchen garden street road city park school "
        "store river tree flower apple bread water coffee tea milk dinner lunch game song "
        "picture doctor nurse teacher friend mother father sister brother baby family team "
        "money paper ball key hat shirt shoe coat watch bike train bus boat ticket computer "
        "radio light bottle plate spoon"
    ).split(),
    "pron": "i you we they he she".split(),
    "verb_past": (
        "saw found took made bought sold opened closed washed cleaned painted lost moved "
        "carried brought wanted liked loved needed used fixed cooked watched heard read "
        "helped called left kept"
    ).split(),
    "verb_base": (
        "see find take make buy sell open close wash clean paint move carry bring use fix "
        "cook watch hear read help call keep get have play eat drink give"
    ).split(),
    "verb_intr": "slept walked talked laughed waited stopped worked smiled left arrived".split(),
    "prep": "in on at near with from under behind for by into".split(),
    "adv": "today yesterday now again quickly slowly here there early later outside".split(),
    "adv_time": "today now again here there later outside".split(),
    "degree": "very really so too quite".split(),
}
TEMPLATES = [
    "pron verb_past det noun",
    "pron verb_past det adj noun",
    "pron verb_past det noun prep det noun",
    "pron verb_past det adj noun adv",
    "det noun verb_intr adv",
    "det adj noun verb_intr prep det noun",
    "i want to verb_base det noun",
    "i want to verb_base det adj noun adv",
    "can you verb_base det noun prep det noun",
    "can you verb_base det noun",
    "please verb_base det noun adv",
    "where is det noun",
    "where is det adj noun",
    "det noun is degree adj",
    "det noun is adj adv_time",
    "it's degree adj adv_time",
    "i don't know where det noun is",
    "do you have det noun",
    "we need det adj noun for det noun",
    "pron verb_intr with det noun",
]


def phonemize(words: list[str]) -> list[int]:
    """Class ids for a word list: first CMUdict pronunciation, stress dropped, SIL_ID after each word."""
    pronunciations = load_cmudict()
    ids = []
    for word in words:
        if word not in pronunciations:
            raise ValueError(f"word {word!r} is not in CMUdict")
        ids += [*pronunciations[word][0], SIL_ID]
    return ids


def generate_sentences(n: int, rng: np.random.Generator) -> list[str]:
    """Sample `n` lowercase sentences (words separated by spaces) from the grammar."""
    sentences = []
    for _ in range(n):
        template = TEMPLATES[rng.integers(len(TEMPLATES))].split()
        words = [WORDS[slot][rng.integers(len(WORDS[slot]))] if slot in WORDS else slot for slot in template]
        # Article agreement so the text reads as English ("a apple" -> "an apple").
        words = ["an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w for i, w in enumerate(words)]
        sentences.append(" ".join(words))
    return sentences


def _sentence_label(sentence: str) -> str:
    """Written form as in the real labels: capitalised, ending with a period ("i" stays "I")."""
    words = ["I" if w == "i" else ("I" + w[1:] if w.startswith("i'") else w) for w in sentence.split()]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


class _SessionModel:
    """Per-session projection from the latent to 512 channels, plus per-channel baselines."""

    def __init__(self, tc_map: np.ndarray, sbp_map: np.ndarray, tc_base: np.ndarray, sbp_base: np.ndarray):
        self.tc_map, self.sbp_map = tc_map, sbp_map  # (256, N_LATENT) each
        self.tc_base, self.sbp_base = tc_base, sbp_base  # (256,) log rate / log power


def _session_models(sessions: list[str], seed: int, drift_angle: float = 1.0) -> list[_SessionModel]:
    """Drifting maps, changing more the more days separate two sessions.

    Two kinds of drift: a rotation of the latent within the same neural subspace (the same
    channel pattern comes to mean a different phoneme, so one shared input layer cannot serve
    every day; a day-specific layer can undo it), and a partial renewal of each channel's tuning.
    drift_angle is the rotation in radians, per plane, over a week.
    """
    rng = np.random.default_rng([seed, 1])
    # Channel tuning strength: some electrodes carry little speech information, as in the array.
    tuning = rng.gamma(2.0, 0.5, size=N_FEATURES)
    tc_map = rng.standard_normal((N_TC, N_LATENT)) / np.sqrt(N_LATENT)
    # Spike-band power shares most of its tuning with the same electrode's threshold crossings.
    sbp_map = 0.7 * tc_map + 0.3 * rng.standard_normal((N_TC, N_LATENT)) / np.sqrt(N_LATENT)
    tc_base = np.log(rng.uniform(0.3, 3.0, size=N_TC))
    sbp_base = rng.normal(2.0, 0.5, size=N_TC)
    rotation = np.eye(N_LATENT)
    models = []
    prev_date = None
    for name in sessions:
        date = datetime.date(*map(int, name.split(".")[1:]))
        if prev_date is not None:
            n_days = (date - prev_date).days
            skew = rng.standard_normal((N_LATENT, N_LATENT))
            skew = (skew - skew.T) / 2
            skew /= np.abs(np.linalg.eigvals(skew)).max()  # the fastest plane turns by the full angle
            rotation = rotation @ expm(drift_angle * np.sqrt(n_days / 7.0) * skew)
            # Fraction of each channel's tuning that is renewed: ~25% after a week.
            rho = 1.0 - np.exp(-n_days / 25.0)
            keep, fresh = np.sqrt(1 - rho), np.sqrt(rho)
            tc_map = keep * tc_map + fresh * rng.standard_normal(tc_map.shape) / np.sqrt(N_LATENT)
            sbp_map = keep * sbp_map + fresh * rng.standard_normal(sbp_map.shape) / np.sqrt(N_LATENT)
            tc_base = tc_base + rng.normal(0, 0.2, size=N_TC)
            sbp_base = sbp_base + rng.normal(0, 0.2, size=N_TC)
        prev_date = date
        models.append(_SessionModel(
            (tc_map @ rotation) * tuning[:N_TC, None],  # (256, L) @ (L, L) -> (256, L)
            (sbp_map @ rotation) * tuning[N_TC:, None],
            tc_base.copy(),
            sbp_base.copy(),
        ))
    return models


def _phoneme_latents(seed: int) -> np.ndarray:
    """(41, N_LATENT) latent per class; row 0 (blank) is the resting state between sentences."""
    rng = np.random.default_rng([seed, 2])
    latents = rng.standard_normal((len(PHONEMES), N_LATENT))
    latents[0] = 0.0
    latents[SIL_ID] *= 0.5  # the word-boundary pause sits closer to rest
    return latents


def _trial_states(class_ids: list[int], mean_bins: float, rng: np.random.Generator) -> np.ndarray:
    """(T,) the class held in each bin: rest, the sentence's phonemes at a per-trial rate, rest."""
    rate = rng.uniform(0.8, 1.25)  # per-trial speaking rate
    durations = []
    for c in class_ids:
        mean = (0.35 if c == SIL_ID else 1.0) * mean_bins * rate
        durations.append(max(2 if c == SIL_ID else 5, int(round(rng.gamma(8.0, mean / 8.0)))))
    lead, trail = rng.integers(15, 40), rng.integers(15, 40)
    return np.concatenate([[0] * lead, np.repeat(class_ids, durations), [0] * trail]).astype(np.int64)


def _synthesize_trial(
    class_ids: list[int], model: _SessionModel, latents: np.ndarray, snr: float, mean_bins: float, rng: np.random.Generator
) -> np.ndarray:
    """(T, 512) raw (not yet z-scored) features for one sentence."""
    states = _trial_states(class_ids, mean_bins, rng)
    # Temporally smoothed latent noise looks like slow, shared neural variability.
    noise = rng.standard_normal((len(states), N_LATENT))
    noise = gaussian_filter1d(noise, 3.0, axis=0) * 2.0
    # Smoothing the piecewise-constant trajectory mimics coarticulation between phonemes.
    latent = gaussian_filter1d(latents[states], 2.0, axis=0) + 0.5 * noise
    # einsum without BLAS: tiny products, and a multithreaded BLAS on a busy machine is 50x slower.
    drive_tc = snr * 0.5 * np.einsum("tl,cl->tc", latent, model.tc_map, optimize=False)  # (T, L) -> (T, 256)
    drive_sbp = snr * 0.5 * np.einsum("tl,cl->tc", latent, model.sbp_map, optimize=False)
    counts = rng.poisson(np.exp(np.clip(model.tc_base + drive_tc, -5, 4)))
    power = np.exp(model.sbp_base + drive_sbp + 0.4 * rng.standard_normal(drive_sbp.shape))
    return np.concatenate([counts, power], axis=1).astype(np.float32)


def _option(default: object, help: str) -> object:
    """A dataclass field that carries its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """Recording artifacts added to the z-scored features of `splits`; every rate and std 0 (the
    default) adds none. Times are in 20 ms bins, amplitudes in standard deviations of the block.

    An electrode is a pair of features: threshold crossings (e) and spike-band power (e + 256); an
    artifact hits both. Per trial, in this order: a slow baseline shift of every feature, bursts,
    then dead and saturated electrodes, which hold one value for the whole trial.
    """

    burst_rate: float = _option(0.0, "bursts per second of recording (Poisson)")
    burst_amplitude: float = _option(8.0, "mean value a burst adds; each of its features draws 0.5x-1.5x of it")
    burst_electrodes: int = _option(32, "neighbouring electrodes one burst covers")
    burst_bins: int = _option(5, "length of a burst in bins")
    dead_rate: float = _option(0.0, "per trial and electrode: probability it is dead (flat at 0, the block mean)")
    saturated_rate: float = _option(0.0, "per trial and electrode: probability it is saturated (flat)")
    saturation_level: float = _option(6.0, "value of a saturated electrode's features")
    baseline_shift_std: float = _option(0.0, "std of the slow baseline shift of each feature")
    baseline_shift_bins: float = _option(100.0, "time scale of the shift: std in bins of the Gaussian smoothing")
    splits: tuple[str, ...] = _option(("train", "val", "test"), "splits that get the artifacts")

    def active(self) -> bool:
        return self.burst_rate > 0 or self.dead_rate > 0 or self.saturated_rate > 0 or self.baseline_shift_std > 0


def add_artifacts(features: np.ndarray, artifacts: Artifacts, rng: np.random.Generator) -> np.ndarray:
    """(T, 512) z-scored features of one trial -> the same with `artifacts` added (float32)."""
    a = artifacts
    n_time = len(features)
    out = features.astype(np.float32, copy=True)
    if a.baseline_shift_std > 0:
        # Smoothed white noise, scaled by the smoothed process's std (1 / sqrt(2 sqrt(pi) sigma))
        # so that baseline_shift_std is its std whatever the time scale. Drawn on a grid of one
        # point per tenth of the time scale and interpolated linearly: as slow, and 10x fewer taps.
        stride = max(1, int(a.baseline_shift_bins // 10))
        sigma = a.baseline_shift_bins / stride
        white = rng.standard_normal(((n_time - 1) // stride + 2, N_FEATURES))
        coarse = gaussian_filter1d(white, sigma, axis=0, mode="reflect") * np.sqrt(2 * np.sqrt(np.pi) * sigma)
        position = np.arange(n_time) / stride
        index = position.astype(int)
        weight = (position - index)[:, None]
        drift = coarse[index] * (1 - weight) + coarse[index + 1] * weight  # (T', 512) -> (T, 512)
        out += (drift * a.baseline_shift_std).astype(np.float32)
    if a.burst_rate > 0:
        n_bursts = rng.poisson(a.burst_rate * n_time * BIN_SECONDS)
        n_group = min(a.burst_electrodes, N_TC)
        for _ in range(n_bursts):
            start = rng.integers(n_time)
            first = rng.integers(N_TC - n_group + 1)
            gains = rng.uniform(0.5, 1.5, size=2 * n_group).astype(np.float32)
            channels = np.r_[first : first + n_group, N_TC + first : N_TC + first + n_group]
            out[start : start + a.burst_bins, channels] += a.burst_amplitude * gains
    if a.dead_rate > 0 or a.saturated_rate > 0:
        draw = rng.random(N_TC)
        dead = draw < a.dead_rate
        saturated = ~dead & (draw < a.dead_rate + a.saturated_rate)
        out[:, np.r_[dead, dead]] = 0.0
        out[:, np.r_[saturated, saturated]] = a.saturation_level
    return out


def _write_split(
    path: str, session: str, trials: list[dict], first_block: int, trials_per_block: int, labelled: bool,
    artifacts: Artifacts | None = None, rng: np.random.Generator | None = None,
) -> list[tuple[int, int]]:
    """Z-score each block and write one HDF5 file; returns (block_num, trial_num) per trial.

    With an `rng`, `artifacts` drawn from it are added to each trial after z-scoring. A trial
    whose "features" is an int (its length) gets an input_features dataset declared, not written.
    """
    numbers = []
    with h5py.File(path, "w") as f:
        for start in range(0, len(trials), trials_per_block):
            block = trials[start : start + trials_per_block]
            block_num = first_block + start // trials_per_block
            written = [t["features"] for t in block if not isinstance(t["features"], int)]
            if written:
                stacked = np.concatenate(written, axis=0)
                mean, std = stacked.mean(axis=0), stacked.std(axis=0) + 1e-6
            for k, trial in enumerate(block):
                index = start + k
                g = f.create_group(f"trial_{index:04d}")
                if isinstance(trial["features"], int):  # chunked and never written: no storage, reads as zeros
                    n_time = trial["features"]
                    g.create_dataset("input_features", shape=(n_time, N_FEATURES), dtype=np.float32,
                                     chunks=(min(n_time, 256), N_FEATURES))
                else:
                    n_time = trial["features"].shape[0]
                    features = ((trial["features"] - mean) / std).astype(np.float32)
                    if rng is not None:
                        features = add_artifacts(features, artifacts, rng)
                    g.create_dataset("input_features", data=features)
                g.attrs["n_time_steps"] = np.int64(n_time)
                g.attrs["session"] = session
                g.attrs["block_num"] = np.int64(block_num)
                g.attrs["trial_num"] = np.int64(k)
                numbers.append((block_num, k))
                if labelled:
                    ids = np.zeros(MAX_SEQ_ELEMENTS, dtype=np.int32)
                    ids[: len(trial["class_ids"])] = trial["class_ids"]
                    chars = np.zeros(TRANSCRIPTION_LENGTH, dtype=np.int32)
                    codes = [ord(ch) for ch in trial["label"]]
                    chars[: len(codes)] = codes
                    g.create_dataset("seq_class_ids", data=ids)
                    g.create_dataset("transcription", data=chars)
                    g.attrs["seq_len"] = np.int64(len(trial["class_ids"]))
                    g.attrs["sentence_label"] = trial["label"]
    return numbers


def generate_dataset(
    out_dir: str,
    n_sessions: int = 8,
    n_train_trials: int | Sequence[int] = 80,
    n_val_trials: int | Sequence[int] = 16,
    n_test_trials: int | Sequence[int] = 16,
    seed: int = 0,
    snr: float = 0.3,
    mean_phoneme_bins: float = 10.0,
    trials_per_block: int = 20,
    artifacts: Artifacts | None = None,
    n_holdout_sessions: int = 0,
    write_features: bool = True,
) -> list[str]:
    """Write a synthetic dataset under `out_dir`; returns the session names (day order), the
    `n_holdout_sessions` held-out ones last (also listed in <out_dir>/holdout_sessions.txt).

    Deterministic in `seed`; a session's data depends only on (seed, its position), so adding
    sessions does not change the earlier ones. `artifacts` draw from a random stream of their own,
    so the same seed gives the same signal and labels with and without them. A trial count may be
    one per session (real_split_sizes gives the real release's); write_features False declares
    each input_features dataset without writing it (metadata-only sets for timing index builds).
    """
    if not 1 <= n_sessions <= len(REAL_SESSIONS):
        raise ValueError(f"n_sessions must be in 1..{len(REAL_SESSIONS)}, got {n_sessions}")
    if not 0 <= n_holdout_sessions <= len(REAL_SESSIONS) - n_sessions:
        raise ValueError(f"n_sessions + holdout_sessions must be at most {len(REAL_SESSIONS)} (the real session dates), "
                         f"got {n_sessions} + {n_holdout_sessions}")
    counts = {}
    for split, n in (("train", n_train_trials), ("val", n_val_trials), ("test", n_test_trials)):
        counts[split] = [n] * (n_sessions + n_holdout_sessions) if isinstance(n, int) else list(n)
        if len(counts[split]) != n_sessions + n_holdout_sessions:
            raise ValueError(f"{len(counts[split])} {split} trial counts for {n_sessions + n_holdout_sessions} sessions")
    if min(counts["train"]) < 1:
        raise ValueError(f"n_train_trials must be >= 1, got {min(counts['train'])}")
    # Held-out sessions take the next dates: one drifting sequence, so their drift continues.
    sessions = REAL_SESSIONS[: n_sessions + n_holdout_sessions]
    holdout = set(sessions[n_sessions:])
    models = _session_models(sessions, seed)
    latents = _phoneme_latents(seed)
    artifact_splits = set(artifacts.splits) if artifacts is not None and artifacts.active() else set()
    answer_rows = []
    for day, (session, model) in enumerate(zip(sessions, models)):
        folder = os.path.join(out_dir, session)
        os.makedirs(folder, exist_ok=True)
        splits = [("train", counts["train"][day], True)]
        if session not in TRAIN_ONLY_SESSIONS or session in holdout:  # calibration is scored on val
            splits += [("val", counts["val"][day], True), ("test", counts["test"][day], False)]
        block = 1
        for split_code, (split, n_trials, labelled) in enumerate(splits):
            path = os.path.join(folder, f"data_{split}.hdf5")
            if n_trials < 1:
                continue
            rng = np.random.default_rng([seed, 3, day, split_code])
            trials = []
            for sentence in generate_sentences(n_trials, rng):
                class_ids = phonemize(sentence.split())
                while True:  # redraw durations in the rare case CTC could not align the labels
                    if write_features:
                        features = _synthesize_trial(class_ids, model, latents, snr, mean_phoneme_bins, rng)
                    else:
                        features = len(_trial_states(class_ids, mean_phoneme_bins, rng))
                    n_time = features if isinstance(features, int) else len(features)
                    if n_patches(n_time, PATCH_SIZE, PATCH_STRIDE) >= ctc_frames_needed(class_ids):
                        break
                trials.append({"features": features, "class_ids": class_ids, "label": _sentence_label(sentence)})
            artifact_rng = np.random.default_rng([seed, 4, day, split_code]) if split in artifact_splits else None
            numbers = _write_split(path, session, trials, block, trials_per_block, labelled, artifacts, artifact_rng)
            block = numbers[-1][0] + 1
            if split == "test":
                answer_rows += [(session, *nums, trial["label"]) for nums, trial in zip(numbers, trials)]
    with open(os.path.join(out_dir, "test_sentences.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "session", "block_num", "trial_num", "sentence_label"])
        for i, row in enumerate(answer_rows):
            writer.writerow([i, *row])
    if n_holdout_sessions:
        with open(os.path.join(out_dir, "holdout_sessions.txt"), "w") as f:
            f.write("".join(name + "\n" for name in sessions[n_sessions:]))
    return sessions


def real_split_sizes(sessions: Sequence[str] = REAL_SESSIONS) -> dict[str, list[int]]:
    """Trials per session of each split, the real totals spread as evenly as they go over the
    sessions that have the split (train-only sessions get no val or test trials)."""
    sizes = {}
    for split, total in REAL_SPLIT_SIZES.items():
        holders = [s for s in sessions if split == "train" or s not in TRAIN_ONLY_SESSIONS]
        base, extra = divmod(total, len(holders))
        share = {s: base + (i < extra) for i, s in enumerate(holders)}
        sizes[split] = [share.get(s, 0) for s in sessions]
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/synthetic", help="output dataset directory")
    parser.add_argument("--n_sessions", type=int, default=8)
    parser.add_argument("--n_train_trials", type=int, default=80, help="train trials per session")
    parser.add_argument("--n_val_trials", type=int, default=16, help="val trials per session that has val data")
    parser.add_argument("--n_test_trials", type=int, default=16, help="test trials per session that has test data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr", type=float, default=0.3, help="scale of the speech signal on the channels")
    parser.add_argument("--mean_phoneme_bins", type=float, default=None,
                        help=f"mean bins a phoneme is held (default 10; {REAL_LENGTH_PHONEME_BINS:g} with --full_size)")
    parser.add_argument("--full_size", action="store_true",
                        help="45 sessions with the real split sizes and trial lengths (overrides the counts above)")
    parser.add_argument("--unwritten_features", action="store_true",
                        help="declare input_features without writing them (metadata-only set, for timing index builds)")
    parser.add_argument("--holdout_sessions", type=int, default=0,
                        help="extra sessions after the training ones, for calibration (listed in holdout_sessions.txt)")
    artifacts = parser.add_argument_group("artifacts, all off by default (amplitudes in block stds, 20 ms bins)")
    artifact_fields = [f for f in dataclasses.fields(Artifacts) if f.name != "splits"]
    for f in artifact_fields:
        artifacts.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                               help=f"{f.metadata['help']} (default {f.default})")
    artifacts.add_argument("--artifact_splits", nargs="+", default=list(Artifacts.splits), choices=Artifacts.splits,
                           help="splits that get the artifacts (default: all)")
    args = parser.parse_args()
    if args.holdout_sessions < 0 or args.n_sessions + args.holdout_sessions > len(REAL_SESSIONS):
        parser.error(f"--n_sessions + --holdout_sessions must be in 1..{len(REAL_SESSIONS)} (the real session dates)")
    counts: tuple = (args.n_train_trials, args.n_val_trials, args.n_test_trials)
    mean_phoneme_bins = args.mean_phoneme_bins or 10.0
    if args.full_size:
        if args.holdout_sessions:
            parser.error("--full_size uses all 45 real session dates: no room for --holdout_sessions")
        args.n_sessions = len(REAL_SESSIONS)
        sizes = real_split_sizes()
        counts = (sizes["train"], sizes["val"], sizes["test"])
        mean_phoneme_bins = args.mean_phoneme_bins or REAL_LENGTH_PHONEME_BINS
    start = time.time()
    sessions = generate_dataset(
        args.out, args.n_sessions, *counts, args.seed, args.snr, mean_phoneme_bins=mean_phoneme_bins,
        artifacts=Artifacts(
            **{f.name: getattr(args, f.name) for f in artifact_fields}, splits=tuple(args.artifact_splits)
        ),
        n_holdout_sessions=args.holdout_sessions, write_features=not args.unwritten_features,
    )
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(sessions)} sessions to {args.out} ({size / 1e6:.0f} MB) in {time.time() - start:.1f} s")
    lengths = []
    for session in sessions:
        for split in SPLITS:
            path = os.path.join(args.out, session, f"data_{split}.hdf5")
            if os.path.exists(path):
                with h5py.File(path, "r") as f:
                    lengths += [int(f[key].attrs["n_time_steps"]) for key in f]
    print(f"{len(lengths)} trials; length in bins: mean {np.mean(lengths):.0f}, median {np.median(lengths):.0f}, "
          f"max {max(lengths)}")
    if args.holdout_sessions:
        training = sessions[: args.n_sessions]
        print(f"held out {', '.join(sessions[args.n_sessions:])}; train on the others with "
              f"--set dataset.sessions=[{','.join(training)}]")


if __name__ == "__main__":
    main()
