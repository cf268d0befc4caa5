"""Calibrate a trained decoder to a new recording day from a few sentences of that day.

    python calibrate_session.py --model_path trained_models/demo --data_dir data/synthetic_holdout \
        --session t15.2023.09.24 --n_sentences 25 [--steps 200] [--train day|day+head|all] \
        [--init identity|last|nearest] [--sweep 0,5,10,25,50] [--upstream] --out runs/calibrated
    python calibrate_session.py --unsupervised [--split train|test] [--objective pseudo|consistency|align] [--align_dims 0] \
        [--rounds 3] --model_path trained_models/demo --data_dir data/synthetic_holdout \
        --session t15.2023.09.24 --n_sentences 50 --out runs/calibrated_unlabelled

Neural signals drift from day to day; the decoder absorbs that in its day-specific input layers.
A session the model has not seen gets a new day layer (added after the model's sessions), which
starts as:
  identity  a pass-through (what training starts every day from);
  last      a copy of the last trained day's layer (the most recent recording, before the new one);
  nearest   a copy of the trained day whose layer fits the new day best: the day under which the
            model's CTC loss on the K calibration sentences (no augmentation, dropout off) is
            lowest. One forward pass per trained day; with K = 0 there is nothing to fit, so it is
            the last day.
A session the model knows is recalibrated from its own layer. Then only the first K (--n_sentences)
training sentences of that session are used, for --steps AdamW steps with the training
augmentations and dropout on and the trainer's loss (rnn_trainer.compute_loss): by default
(--train day) only that session's day layer(s) move (both of the triple model's), every other
weight and every other day's layer stays bit-for-bit as it was; --train day+head also trains the
phoneme output layer(s), --train all every weight except the other days' layers.

--out is a normal run directory (config.yaml with the extended session list, checkpoint/
best_checkpoint.pt and last_checkpoint.pt) that evaluate_model.py, train_model.py --resume and
init_from_checkpoint read like any other; the checkpoint keeps the source run's step, with fresh
optimizer moments. An upstream model directory (--upstream) works as the starting point too.
It also holds calibration.json and calibration.png: PER on the session's val trials with an
identity day layer, with the initial layer and after calibration, for K = --n_sentences and each K
of --sweep (each calibrated from the same starting model); --compare RUN_DIR ... adds earlier
runs' curves to the PNG.

Without labels (--unsupervised): the first N (--n_sentences) trials of the session's --split file
are read as the test split is, features and trial attributes only, so a file without labels works
and a file with labels gives the same weights. Each round decodes them with the current model
through the evaluator's word beam search (evaluate_model.build_word_decoder: lexicon and n-gram LM
of the training sentences of --data_dir's other labelled sessions, or --lm_text / --lm_arpa),
spells each best sentence back into phonemes (each word's first lexicon pronunciation, then a
silence, as the training labels are written) and keeps the most confident --keep_fraction of them,
confidence being exp(-CTC(pseudo-label) / frames): the model's mean per-frame likelihood of the
LM-corrected sentence (the beam's margin between its two best sentences is recorded beside it).
The day layer then trains on those as on labels; --rounds repeats decode-select-train from the
adapted model. `--init nearest` picks, without labels, the trained day whose layer gives the lowest
CTC loss against its own pseudo-labels of the calibration trials. `--objective consistency` trains
without decoding: the model's posteriors on a time-masked, noisy copy of each trial (dropout on)
are pulled towards its posteriors on the trial as validation sees it (KL, no gradient through that
side).
`--objective align` gets its first round's labels without decoding, from the day's neural latent
aligned to a trained day's (the last one; a known session's own), in the spirit of the latent and
distribution alignment methods that stabilise BCIs across days (Degenhart et al. 2020; Dyer et
al. 2017). Each day's frames as the day layer reads them are reduced to their leading principal
components (--align_dims, 0: as many as precede the covariance spectrum's knee) and whitened, so
the two latents differ by one unknown rotation. The model places each phoneme class in the trained
day's latent (posterior-weighted means of its patches, read through that day's own layer) and,
roughly, in the new day's (read through the starting layer); a weighted Procrustes between the two
sets of class means starts the rotation and EM refines it to where the new day's patches are
likeliest under the trained day's class mixture. Each trial's phonemes are then read off its
rotated latent (the nearest class mean per patch, runs merged, blanks dropped) and the day layer
trains on all of them as on labels; rounds 2.. decode and select as `pseudo` does. It assumes the
channels respond about linearly to a low-dimensional latent: it helps where the spectrum has a
knee (the demo data) and not where it has none (README, Calibrating a new day).

Calibration keeps what it starts from unless it measurably improves: --holdout_fraction of the K (or
N) trials are held out of training; their CTC loss (against their labels, or their pseudo-labels
from the round's starting model) is measured at the start and every --check_every steps, and the
day layer of the lowest one, the start included, is what stays (within each round without labels).
Pseudo-labels favour the layer that decoded them, so without labels the layer kept in the end is
chosen among the start and each round's by a score no layer's pseudo-labels enter (keep_better):
lm_agreement, how many of the layer's greedy phonemes of the held-out trials the word beam search
(lexicon and LM) keeps in its best sentence, per frame, each layer decoding for itself; the highest
wins, the start on a tie. calibration.json records the held-out losses, val PER of the last step
and of the layer kept and, without labels, each candidate's agreement and the round kept;
also, per round, the number of trials kept and, only when the file happens to hold labels (read
after the weights are written, never used), the pseudo-labels' PER against them.

Bad input (unknown session, K beyond the session's trials, a model directory without checkpoint,
an unknown --train, --init or --objective, --split test without --unsupervised, no text for the
LM, --align_dims out of range, --objective align without the trained day's train file) ends with one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before the first `import accelerate` (through rnn_trainer): without it, accelerate imports
# torch_xla, which swaps nn.GRU process-wide. Calibration runs on the CPU (or CUDA).
os.environ.setdefault("USE_TORCH_XLA", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import checkpoints  # noqa: E402
import evaluate_model  # noqa: E402
import rnn_model  # noqa: E402
import rnn_trainer  # noqa: E402
from config import Config, ConfigError, save_config  # noqa: E402
from ctc_loss import ctc_frames_needed, ctc_loss  # noqa: E402
from data_augmentations import augment_batch  # noqa: E402
from dataset import (  # noqa: E402
    BLANK_ID, SIL_ID, BrainToTextDataset, DataError, day_sources, session_files, session_trial_index, train_test_split_indices,
)
from evaluate_model_helpers import BeamSearchOptions, Lexicon, WordBeamDecoder, count_edits, greedy_ctc_decode  # noqa: E402

TRAIN_MODES = ("day", "day+head", "all")
INITS = ("identity", "last", "nearest")
OBJECTIVES = ("pseudo", "consistency", "align")
N_TIME_MASKS, MAX_MASK_FRACTION = 2, 0.1  # the consistency objective's student: two spans of up to 10% of a trial


class CalibrationError(ValueError):
    """A command-line value calibration cannot use."""


@dataclass
class Start:
    """The model calibration starts from, with the run it came from."""

    cfg: Config
    sessions: list[str]  # the source model's sessions
    state: dict[str, Tensor]  # its weights
    step: int  # the source run's training step (0 for upstream checkpoints)
    source: str


def load_start(model_path: str, *, upstream: bool) -> Start:
    """The trained model in a run directory (or an upstream model directory), on the CPU."""
    loaded = (rnn_model.load_upstream_model if upstream else rnn_model.load_run_model)(model_path)
    checkpoint = rnn_model.read_checkpoint(loaded.source)
    return Start(cfg=loaded.config, sessions=list(loaded.sessions), state=loaded.model.state_dict(),
                 step=int(checkpoint.get("step", 0)), source=loaded.source)


def model_for_session(start: Start, session: str, init_day: int | None) -> tuple[nn.Module, list[str], int]:
    """(model, its session list, the session's day index): the source model, plus a new day layer
    for an unseen session copied from day `init_day` of the source (None: identity)."""
    sessions = start.sessions if session in start.sessions else [*start.sessions, session]
    sources = day_sources(start.sessions, sessions)
    day = sessions.index(session)
    if sources[day] is None:
        sources[day] = init_day
    model = rnn_model.build_model(start.cfg.model, n_days=len(sessions))
    rnn_model.load_day_mapped(model, start.state, sources, source=start.source)
    return model, sessions, day


def _day_of_parameter(name: str) -> int | None:
    """The day a per-day day-layer parameter holds (`...day_weights.3` -> 3); None for a stacked
    (n_days, ...) one and for every other parameter."""
    last = name.rpartition(".")[2]
    return int(last) if "day_" in name and last.isdigit() else None


def select_trainable(model: nn.Module, *, train: str, day: int, n_classes: int) -> dict[str, nn.Parameter]:
    """Freeze what `train` leaves alone; returns the trainable parameters by name.

    Day-layer parameters are found by name (`day_` in it): one per day, or one stacked
    (n_days, ...) tensor per layer, whose other days' rows mask_other_days zeroes in the gradient.
    The head is every linear layer that outputs the n_classes phoneme logits.
    """
    head = {f"{module_name}.{param_name}".lstrip(".")
            for module_name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.out_features == n_classes
            for param_name, _ in module.named_parameters(recurse=False)}
    trainable = {}
    for name, param in model.named_parameters():
        if "day_" in name:
            use = _day_of_parameter(name) in (day, None)
        else:
            use = train == "all" or (train == "day+head" and name in head)
        param.requires_grad_(use)
        if use:
            trainable[name] = param
    return trainable


def mask_other_days(trainable: dict[str, nn.Parameter], day: int) -> None:
    """Zero the gradient rows of the other days in stacked day-layer parameters, so with no
    weight decay AdamW leaves them exactly as they were (zero moments give a zero update)."""
    for name, param in trainable.items():
        if "day_" in name and _day_of_parameter(name) is None and param.grad is not None:
            keep = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
            keep[day] = True
            param.grad.masked_fill_(~keep.view(-1, *([1] * (param.dim() - 1))), 0.0)


def _batches(dataset: BrainToTextDataset, device: torch.device) -> list[dict[str, Tensor]]:
    return [{k: v.to(device) for k, v in dataset[i].items() if k in rnn_trainer.DEVICE_KEYS} for i in range(len(dataset))]


@torch.no_grad()
def session_loss(model: nn.Module, batches: Sequence[dict[str, Tensor]], cfg: Config) -> float:
    """Mean CTC loss (the trainer's compute_loss, clean term) over batches, no augmentation, dropout off."""
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        features, n_time = augment_batch(batch["input_features"], batch["n_time_steps"], cfg.dataset.data_transforms,
                                         training=False, generator=None, static_shapes=False)
        _, terms = rnn_trainer.compute_loss(
            model=model, batch={**batch, "input_features": features, "n_time_steps": n_time}, cfg=cfg,
            adversarial_gate=torch.zeros(()), use_dense_ctc=False,
        )
        rows = int(batch["row_mask"].sum())
        total, n = total + float(terms["ctc_clean"]) * rows, n + rows
    return total / max(n, 1)


def nearest_day(start: Start, session: str, batches: Sequence[dict[str, Tensor]]) -> int:
    """The source day whose layer, given to the new session, gives the lowest CTC loss on `batches`
    (the K calibration sentences, with the new session's day index)."""
    losses = []
    for source_day in range(len(start.sessions)):
        model, _, _ = model_for_session(start, session, source_day)
        losses.append(session_loss(model, batches, start.cfg))
    return min(range(len(losses)), key=losses.__getitem__)


def session_per(model: nn.Module, val_batches: Sequence[dict[str, Tensor]], cfg: Config, n_days: int) -> tuple[float, float]:
    """(PER, CTC loss) on the session's val trials: the trainer's evaluate (greedy decoding)."""
    result = rnn_trainer.evaluate(model, val_batches, cfg=cfg, n_days=n_days)
    return result["per"], result["loss"]


def calibrate(
    model: nn.Module, *, train_batches: Iterable[dict[str, Tensor]], cfg: Config, train: str, day: int, lr: float,
    seed: int, objective: str = "ctc", holdout_batches: Sequence[dict[str, Tensor]] = (), check_every: int = 10,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Train the parameters `train` selects on the calibration batches, one AdamW step per batch.

    objective 'ctc': the trainer's loss on the batches' labels (or pseudo-labels), with the training
    augmentations; 'consistency': consistency_loss, no labels. With `holdout_batches` their CTC loss
    is measured at the start and every `check_every` steps; returns (figures, the trained
    parameters at the lowest one, the start included), for restore_best. The model is left as
    the last step made it.
    """
    trainable = select_trainable(model, train=train, day=day, n_classes=cfg.model.n_classes)
    o = cfg.optimizer
    # weight_decay 0: decay would move weights whose gradient is zero (other days' stacked rows).
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, betas=(o.beta0, o.beta1), eps=o.epsilon, weight_decay=0.0)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    adversarial_gate = torch.tensor(float(cfg.adversarial.enabled and cfg.model.type == "triple"), device=device)
    checks: list[tuple[float, int]] = []  # (held-out loss, step)
    best: tuple[float, int, dict[str, Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        loss = session_loss(model, holdout_batches, cfg)
        checks.append((loss, step))
        if best is None or loss < best[0]:
            best = (loss, step, {name: p.detach().clone() for name, p in trainable.items()})
        model.train()

    if holdout_batches:
        check(0)
    model.train()
    losses, step = [], 0
    for step, batch in enumerate(train_batches, 1):
        if objective == "consistency":
            total = consistency_loss(model, batch, cfg, generator)
        else:
            features, n_time = augment_batch(batch["input_features"], batch["n_time_steps"], cfg.dataset.data_transforms,
                                             training=True, generator=generator, static_shapes=False)
            total, _ = rnn_trainer.compute_loss(
                model=model, batch={**batch, "input_features": features, "n_time_steps": n_time}, cfg=cfg,
                adversarial_gate=adversarial_gate, use_dense_ctc=False,
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        mask_other_days(trainable, day)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), o.grad_norm_clip_value)
        optimizer.step()
        losses.append(float(total.detach()))
        if holdout_batches and step % check_every == 0:
            check(step)
    if holdout_batches and step % check_every != 0:
        check(step)
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()
    figures: dict[str, Any] = {"first_loss": losses[0] if losses else math.nan, "last_loss": losses[-1] if losses else math.nan,
                               "n_steps": step}
    if best is None:
        return figures, None
    figures.update(holdout_loss_start=checks[0][0], holdout_loss_last=checks[-1][0], holdout_loss_kept=best[0],
                   kept_step=best[1], holdout_checks=[{"step": k, "loss": v} for v, k in checks])
    return figures, best[2]


def restore_best(model: nn.Module, best: dict[str, Tensor] | None) -> None:
    """Put back the trained parameters that calibrate kept (nothing to do without a held-out check)."""
    if best is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in best.items():
                params[name].copy_(value)


def time_mask(features: Tensor, n_time_steps: Tensor, generator: torch.Generator) -> Tensor:
    """Zero N_TIME_MASKS spans per trial, each up to MAX_MASK_FRACTION of the trial (z-scored: its mean).

    features: (B, T, D); n_time_steps: (B,)."""
    n_batch, n_time, _ = features.shape
    frames = torch.arange(n_time, device=features.device)[None, :]  # (1, T)
    keep = torch.ones(n_batch, n_time, dtype=torch.bool, device=features.device)
    for _ in range(N_TIME_MASKS):
        draws = torch.rand(2, n_batch, generator=generator, device=generator.device).to(features.device)
        width = (draws[0] * MAX_MASK_FRACTION * n_time_steps).long()
        begin = (draws[1] * (n_time_steps - width).clamp(min=1)).long()
        keep &= ~((frames >= begin[:, None]) & (frames < (begin + width)[:, None]))
    return features * keep[:, :, None].to(features.dtype)


def consistency_loss(model: nn.Module, batch: dict[str, Tensor], cfg: Config, generator: torch.Generator) -> Tensor:
    """KL(teacher || student) per output frame, averaged over the trials' frames: no label, no decoding.

    The teacher is the model on the trial as validation sees it (dropout off, no gradient); the
    student, dropout on, sees a time-masked copy with the training noise and offsets. Random cut and
    jitter are off, so both read the same frames.
    """
    transforms = dataclasses.replace(cfg.dataset.data_transforms, random_cut=0, jitter_max=0)
    features, n_time = batch["input_features"], batch["n_time_steps"]
    model.eval()
    with torch.no_grad():
        clean, _ = augment_batch(features, n_time, transforms, training=False, generator=None, static_shapes=False)
        teacher, lengths = rnn_model.infer(model, clean, batch["day_indices"], n_time, use_amp=cfg.use_amp)
        teacher = teacher.float().log_softmax(dim=-1)  # (B, T', C)
    model.train()
    noisy, _ = augment_batch(time_mask(features, n_time, generator), n_time, transforms, training=True,
                             generator=generator, static_shapes=False)
    student = rnn_model.decoder_outputs(model, noisy, batch["day_indices"], use_amp=cfg.use_amp, lengths=lengths)[0]
    student = student.float().log_softmax(dim=-1)  # (B, T', C)
    frames = torch.arange(teacher.shape[1], device=teacher.device)[None, :] < lengths[:, None]  # (B, T')
    frames &= batch["row_mask"][:, None]
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)  # (B, T', C) -> (B, T')
    return kl[frames].mean()


# ----------------------------------------------------------------------------- without labels


def unlabelled_trial_index(data_dir: str, session: str, split: str, *, day: int, n_trials: int | None, cfg: Config) -> dict[int, dict]:
    """The first n_trials trials (None: all) of the session's split file, indexed as unlabelled trials
    (features and trial attributes only, whatever else the file holds), under day index `day`."""
    path = session_files(data_dir, [session], split)[0]
    if path is None:
        raise DataError(f"{os.path.join(data_dir, session)}: session has no data_{split}.hdf5")
    index, _ = train_test_split_indices([path], 0, labelled=False, patch_size=cfg.model.patch_size,
                                        patch_stride=cfg.model.patch_stride, on_bad_trial=cfg.dataset.on_bad_trial)
    entry = index[0]
    if n_trials is not None and n_trials > len(entry["trials"]):
        raise DataError(f"{path}: {n_trials} trials asked for, but the session has only {len(entry['trials'])} usable {split} trials")
    trials = entry["trials"][:n_trials]
    return {day: {"trials": trials, "session_path": path, "meta": {t: entry["meta"][t] for t in trials}}}


def load_trials(index: dict[int, dict], cfg: Config, device: torch.device) -> list[Tensor]:
    """Each indexed trial's features (T_i, D) in trial order, read as the test split is read (no labels)."""
    dataset = BrainToTextDataset(index, 0, "test", cfg.dataset.val_batch_size, 1, feature_subset=cfg.dataset.feature_subset,
                                 on_bad_trial=cfg.dataset.on_bad_trial)
    trials = []
    for batch in _batches(dataset, device):
        for i in torch.nonzero(batch["row_mask"]).flatten().tolist():
            trials.append(batch["input_features"][i, : int(batch["n_time_steps"][i])])
    return trials


def stack_trials(trials: Sequence[Tensor], targets: Sequence[Sequence[int]] | None, day: int) -> dict[str, Tensor]:
    """One zero-padded batch of trials (T_i, D) under day index `day`, the loader's keys, with
    phoneme targets as seq_class_ids / phone_seq_lens when given."""
    device = trials[0].device
    batch = {
        "input_features": nn.utils.rnn.pad_sequence(list(trials), batch_first=True),  # [(T_i, D)] -> (B, T, D)
        "n_time_steps": torch.tensor([len(t) for t in trials], device=device),
        "day_indices": torch.full((len(trials),), day, device=device),
        "row_mask": torch.ones(len(trials), dtype=torch.bool, device=device),
    }
    if targets is not None:
        ids = torch.zeros(len(targets), max(len(t) for t in targets), dtype=torch.long)
        for row, target in enumerate(targets):
            ids[row, : len(target)] = torch.tensor(target)
        batch["seq_class_ids"] = ids.to(device)
        batch["phone_seq_lens"] = torch.tensor([len(t) for t in targets], device=device)
    return batch


def draw_batches(trials: Sequence[Tensor], targets: Sequence[Sequence[int]] | None, *, day: int, n_steps: int,
                 batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """n_steps batches of batch_size trials drawn with replacement; batch i is a function of (seed, i)."""
    for step in range(n_steps):
        pick = np.random.default_rng([seed, step]).integers(len(trials), size=batch_size).tolist()
        yield stack_trials([trials[i] for i in pick], None if targets is None else [targets[i] for i in pick], day)


@torch.no_grad()
def trial_logits(model: nn.Module, trials: Sequence[Tensor], cfg: Config, day: int) -> list[Tensor]:
    """Each trial's clean logits (T'_i, C) on the CPU, as validation computes them (no augmentation
    but smoothing, dropout off)."""
    model.eval()
    out = []
    step = cfg.dataset.val_batch_size
    for first in range(0, len(trials), step):
        batch = stack_trials(trials[first : first + step], None, day)
        features, n_time = augment_batch(batch["input_features"], batch["n_time_steps"], cfg.dataset.data_transforms,
                                         training=False, generator=None, static_shapes=False)
        logits, lengths = rnn_model.infer(model, features, batch["day_indices"], n_time, use_amp=cfg.use_amp)
        out += [logits[row, : int(n)].float().cpu() for row, n in enumerate(lengths.tolist())]
    return out


@dataclass
class PseudoLabel:
    """One trial's LM-corrected transcript as the model and the word beam search see it."""

    text: str  # the beam search's best sentence
    target: list[int]  # its phonemes: each word's first lexicon pronunciation, then a silence
    confidence: float  # exp(-CTC(target) / frames): the model's mean per-frame likelihood of the target
    margin: float  # total beam score of the best sentence minus the second's (inf when only one)


def pseudo_labels(model: nn.Module, trials: Sequence[Tensor], decoder: WordBeamDecoder, lexicon: Lexicon, cfg: Config,
                  day: int) -> list[PseudoLabel | None]:
    """Decode each trial through the word beam search; None where it finds no sentence or CTC
    cannot align the sentence to the trial's frames."""
    o = decoder.options
    labels: list[PseudoLabel | None] = []
    for logits in trial_logits(model, trials, cfg, day):
        hypotheses = decoder.decode_nbest(logits, 2)
        words = hypotheses[0].text.split() if hypotheses else []
        target = [p for word in words for p in (*lexicon.pronunciations[word][0], SIL_ID)]
        if not target or ctc_frames_needed(target) > len(logits):
            labels.append(None)
            continue
        nll = ctc_loss(logits.log_softmax(dim=-1)[None], torch.tensor([target]), torch.tensor([len(logits)]),
                       torch.tensor([len(target)]))
        scores = [h.acoustic + o.lm_weight * h.ngram + o.word_score * h.n_words for h in hypotheses]
        margin = scores[0] - scores[1] if len(scores) > 1 else math.inf
        labels.append(PseudoLabel(" ".join(words), target, math.exp(-float(nll) / len(logits)), margin))
    return labels


def _common_subsequence_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of a and b (dynamic programming, O(len(a) len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def lm_agreement(logits: Sequence[Tensor], decoder: WordBeamDecoder) -> dict[str, float]:
    """How many of a day layer's own phonemes the word beam search (lexicon and n-gram LM) confirms,
    per output frame of the unlabelled trials: for each trial, the greedy phonemes (argmax per frame,
    runs merged, blanks dropped) that the phonemes of its best sentence keep (each word followed by a
    silence, as labels are written; their longest common subsequence; none without a sentence).
    Higher is better.

    Each layer is scored by its own decoding, so no layer is favoured for having produced the
    pseudo-labels; counting confirmed phonemes rather than the share confirmed makes a layer that
    reads little (mostly blank frames, as training on poor pseudo-labels leaves it) score low, and
    one that reads much but unlike any sentence of the lexicon and LM score low too.
    logits: each trial's (T'_i, C).
    """
    n_confirmed = n_greedy = n_frames = 0
    for frame_logits in logits:
        greedy = greedy_ctc_decode(frame_logits[None], torch.tensor([len(frame_logits)]), blank=BLANK_ID)[0]
        best = decoder.decode_nbest(frame_logits, 1)
        n_confirmed += _common_subsequence_length(greedy, best[0].phonemes if best else ())
        n_greedy += len(greedy)
        n_frames += len(frame_logits)
    return {"lm_agreement": n_confirmed / max(n_frames, 1), "n_confirmed": n_confirmed, "n_greedy_phonemes": n_greedy,
            "n_frames": n_frames}


def keep_better(candidates: Sequence[dict[str, Any]]) -> int:
    """Position of the candidate layer (the start first, then each round's) with the highest
    lm_agreement on the held-out trials; on a tie the earlier, so the start stays unless beaten."""
    return max(range(len(candidates)), key=lambda i: (candidates[i]["lm_agreement"], -i))


def most_confident(labels: Sequence[PseudoLabel | None], keep_fraction: float) -> list[int]:
    """Positions of the ceil(keep_fraction * n) most confident pseudo-labels (of those there are), in trial order."""
    ranked = sorted((i for i, label in enumerate(labels) if label is not None), key=lambda i: -labels[i].confidence)
    return sorted(ranked[: math.ceil(keep_fraction * len(labels))])


def pseudo_labelled_batches(trials: Sequence[Tensor], labels: Sequence[PseudoLabel | None], cfg: Config,
                            day: int) -> list[dict[str, Tensor]]:
    """The trials that have a pseudo-label, in validation-sized batches with it as their targets."""
    pairs = [(trial, label.target) for trial, label in zip(trials, labels) if label is not None]
    step = cfg.dataset.val_batch_size
    return [stack_trials([t for t, _ in pairs[i : i + step]], [y for _, y in pairs[i : i + step]], day)
            for i in range(0, len(pairs), step)]


def pseudo_label_loss(model: nn.Module, trials: Sequence[Tensor], labels: Sequence[PseudoLabel | None], cfg: Config,
                      day: int) -> float:
    """Mean CTC loss of the trials against their pseudo-labels (those that have one); inf with none."""
    batches = pseudo_labelled_batches(trials, labels, cfg, day)
    return session_loss(model, batches, cfg) if batches else math.inf


def nearest_day_unlabelled(start: Start, session: str, trials: Sequence[Tensor], decoder: WordBeamDecoder,
                           lexicon: Lexicon, device: torch.device) -> tuple[int, list[float]]:
    """The source day whose layer, given to the new session, gives the lowest CTC loss of the trials
    against their own pseudo-labels (decoded under that layer); returns it and each day's loss."""
    losses = []
    for source_day in range(len(start.sessions)):
        model, _, day = model_for_session(start, session, source_day)
        model.to(device)
        labels = pseudo_labels(model, trials, decoder, lexicon, start.cfg, day)
        losses.append(pseudo_label_loss(model, trials, labels, start.cfg, day))
    return min(range(len(losses)), key=losses.__getitem__), losses


# ----------------------------------------------------------------------------- latent alignment

MAX_LATENT_DIMS = 50  # --align_dims 0 looks for the spectrum's knee among this many leading components
EM_ITERATIONS, EM_VARIANCE = 60, (4.0, 0.5)  # the rotation's EM: iterations, variance annealed from/to (whitened units)


@dataclass
class Latent:
    """A day's neural latent: the leading principal components of its frames as the day layer reads them."""

    mean: Tensor  # (D,)
    basis: Tensor  # (D, k) the components
    scales: Tensor  # (k,) their standard deviations
    spectrum: list[float]  # the covariance's leading eigenvalues, for the record


@torch.no_grad()
def read_frames(trials: Sequence[Tensor], cfg: Config) -> list[Tensor]:
    """Each trial's frames (T_i, D) as the day layer reads them (after the validation transforms), float64 on the CPU."""
    frames = []
    for trial in trials:
        features, _ = augment_batch(trial[None], torch.tensor([len(trial)], device=trial.device), cfg.dataset.data_transforms,
                                    training=False, generator=None, static_shapes=False)
        frames.append(features[0].double().cpu())
    return frames


def fit_latent(frames: Sequence[Tensor], dims: int) -> Latent:
    """PCA of the frames; dims 0: as many components as precede the largest ratio between neighbouring
    eigenvalues among the first MAX_LATENT_DIMS (the knee between the latent and the channel noise)."""
    x = torch.cat(list(frames))  # (sum T_i, D)
    mean = x.mean(dim=0)
    centred = x - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / len(x))
    values, vectors = values.flip(0).clamp(min=1e-12), vectors.flip(1)  # descending
    if dims == 0:
        head = values[: MAX_LATENT_DIMS + 1]
        dims = int((head[:-1] / head[1:]).argmax()) + 1
    return Latent(mean, vectors[:, :dims], values[:dims].sqrt(), values[:MAX_LATENT_DIMS].tolist())


def patch_latents(latent: Latent, frames: Sequence[Tensor], patch_size: int, patch_stride: int) -> list[Tensor]:
    """Each trial's whitened latent (T_i, k), averaged over the bins of each of the model's patches: (T'_i, k)."""
    out = []
    for x in frames:
        z = (x - latent.mean) @ latent.basis / latent.scales  # (T, D) -> (T, k)
        n = int(rnn_model.n_patches(len(x), patch_size, patch_stride))
        out.append(z.unfold(0, patch_size, patch_stride)[:n].mean(dim=-1))  # (T', k, P) -> (T', k)
    return out


def class_means(logits: Sequence[Tensor], patches: Sequence[Tensor], n_classes: int) -> tuple[Tensor, Tensor]:
    """(means (C, k), mass (C,)): each class's latent averaged over patches weighted by the model's posterior of it."""
    k = patches[0].shape[1]
    total, mass = torch.zeros(n_classes, k, dtype=torch.float64), torch.zeros(n_classes, dtype=torch.float64)
    for frame_logits, z in zip(logits, patches):
        n = min(len(frame_logits), len(z))
        posterior = frame_logits[:n].double().softmax(dim=-1)  # (T', C)
        total += posterior.T @ z[:n]  # (C, T') @ (T', k) -> (C, k)
        mass += posterior.sum(dim=0)
    return total / mass.clamp(min=1e-9)[:, None], mass


def procrustes(target: Tensor, source: Tensor, weights: Tensor) -> Tensor:
    """The rotation O (k, k) that maximises sum_i weights_i target_i . (O source_i) (orthogonal Procrustes)."""
    u, _, vh = torch.linalg.svd((target * weights[:, None]).T @ source)  # (k, k)
    return u @ vh


def fit_rotation(points: Tensor, means: Tensor, prior: Tensor, rotation: Tensor) -> tuple[Tensor, float]:
    """EM for the rotation under which the points (n, k) are likeliest under the mixture of isotropic
    Gaussians at `means` (C, k) with weights `prior` (C,): responsibilities, then a weighted
    Procrustes step, the variance annealed over EM_VARIANCE; returns it and the final mean log-likelihood."""
    log_prior = prior.clamp(min=1e-9).log()
    for i in range(EM_ITERATIONS):
        variance = EM_VARIANCE[0] * (EM_VARIANCE[1] / EM_VARIANCE[0]) ** (i / (EM_ITERATIONS - 1))
        scores = log_prior - torch.cdist(points @ rotation.T, means).pow(2) / (2 * variance)  # (n, C)
        responsibilities = scores.softmax(dim=-1)
        rotation = procrustes(responsibilities @ means, points, torch.ones(len(points), dtype=points.dtype))
    scores = log_prior - torch.cdist(points @ rotation.T, means).pow(2) / (2 * EM_VARIANCE[1])
    k = points.shape[1]
    return rotation, float(scores.logsumexp(dim=-1).mean()) - k / 2 * math.log(2 * math.pi * EM_VARIANCE[1])


@dataclass
class LatentAlignment:
    """The new day's latent rotated onto a trained day's, where the trained day's phoneme classes sit."""

    new: Latent
    reference: Latent
    means: Tensor  # (C, k) each class's mean in the reference latent
    rotation: Tensor  # (k, k) new whitened latent -> reference whitened latent
    figures: dict[str, Any]

    def labels(self, frames: Sequence[Tensor], patch_size: int, patch_stride: int) -> list[PseudoLabel | None]:
        """Each trial's phonemes read off its rotated latent: the nearest class mean per patch, runs
        merged and blanks dropped (None where that leaves nothing or too many for CTC to align)."""
        labels: list[PseudoLabel | None] = []
        for z in patch_latents(self.new, frames, patch_size, patch_stride):
            nearest = torch.cdist(z @ self.rotation.T, self.means).argmin(dim=-1).tolist()
            target = [c for i, c in enumerate(nearest) if c != BLANK_ID and (i == 0 or c != nearest[i - 1])]
            ok = target and ctc_frames_needed(target) <= len(z)
            labels.append(PseudoLabel("", target, math.nan, math.inf) if ok else None)
        return labels


def align_latents(model: nn.Module, cfg: Config, *, new_trials: Sequence[Tensor], day: int,
                  reference_trials: Sequence[Tensor], reference_day: int, dims: int,
                  seeds: Sequence[nn.Module] = ()) -> LatentAlignment:
    """Align the new day's neural latent to a trained day's, without labels.

    Both days' frames are reduced to their leading principal components and whitened, which leaves
    one rotation between the two latents unknown. The trained day's phoneme classes are placed in
    its latent by the model's own posteriors (class_means, the model reading that day through its
    own layer); the new day's, by the model reading it through its starting layer. A weighted
    Procrustes between the two sets of class means (blank left out) starts the rotation, and EM
    refines it to where the new day's patches are likeliest under the trained day's class mixture.
    Each model of `seeds` (the same model with other layers for the new day) places the new day's
    classes once more and starts EM once more; the likeliest rotation of all is kept.
    """
    p, stride = cfg.model.patch_size, cfg.model.patch_stride
    new_frames, reference_frames = read_frames(new_trials, cfg), read_frames(reference_trials, cfg)
    reference = fit_latent(reference_frames, dims)
    new = fit_latent(new_frames, len(reference.scales))
    reference_patches = patch_latents(reference, reference_frames, p, stride)
    new_patches = patch_latents(new, new_frames, p, stride)
    n_classes = cfg.model.n_classes
    reference_means, reference_mass = class_means(trial_logits(model, reference_trials, cfg, reference_day), reference_patches, n_classes)
    points, prior = torch.cat(new_patches), reference_mass / reference_mass.sum()
    fits = []
    for seed in [model, *seeds]:
        new_means, new_mass = class_means(trial_logits(seed, new_trials, cfg, day), new_patches, n_classes)
        weights = (reference_mass * new_mass).sqrt()
        weights[0] = 0.0  # blank: the resting state as well as every frame between two phonemes' spikes
        start = procrustes(reference_means, new_means, weights)
        fits.append((*fit_rotation(points, reference_means, prior, start), start))
    best = max(range(len(fits)), key=lambda i: fits[i][1])
    rotation, log_likelihood, start = fits[best]
    figures = {"dims": len(reference.scales), "spectrum_reference": reference.spectrum[:20], "spectrum_new": new.spectrum[:20],
               "log_likelihood": log_likelihood, "log_likelihood_by_seed": [f[1] for f in fits], "seed_kept": best,
               "rotation_moved_by_em": float(torch.linalg.matrix_norm(rotation - start))}
    return LatentAlignment(new, reference, reference_means, rotation, figures)


def build_pseudo_label_decoder(args: argparse.Namespace, start: Start, lm_dir: Path) -> tuple[WordBeamDecoder, Lexicon, str]:
    """The evaluator's word beam search (build_word_decoder), its text being the training sentences of
    the model's other sessions under --data_dir (never the calibrated session's), or --lm_text / --lm_arpa."""
    labelled = [s for s in start.sessions
                if s != args.session and os.path.isfile(os.path.join(args.data_dir, s, "data_train.hdf5"))]
    if not labelled and not (args.lm_text or args.lm_arpa):
        raise CalibrationError(f"--unsupervised decodes with an n-gram LM of training sentences, but none of the model's "
                               f"other sessions has a data_train.hdf5 under {args.data_dir}: give --lm_text or --lm_arpa")
    decoder_args = argparse.Namespace(**{**vars(args), "data_dir": args.data_dir if labelled else None})
    decoder, _, info = evaluate_model.build_word_decoder(decoder_args, labelled, lm_dir)
    return decoder, info["lexicon"], info["lm_name"]


def true_labels(data_dir: str, session: str, split: str, trial_ids: Sequence[int], cfg: Config) -> dict[int, list[int]] | None:
    """The phoneme labels of the given trials when the split's file holds labels, else None: for
    scoring pseudo-labels after the fact only."""
    if split == "test":
        return None
    try:
        index = session_trial_index(data_dir, session, split, day=0, cfg=cfg)[0]
    except DataError:
        return None
    chosen = {0: dict(index, trials=list(trial_ids), meta={t: index["meta"][t] for t in trial_ids if t in index["meta"]})}
    if len(chosen[0]["meta"]) != len(trial_ids):
        return None
    dataset = BrainToTextDataset(chosen, 0, "val", cfg.dataset.val_batch_size, 1, on_bad_trial=cfg.dataset.on_bad_trial)
    labels = {}
    for i in range(len(dataset)):
        batch = dataset[i]
        for row, (_, trial) in enumerate(dataset.batch_trials(i)):
            labels[trial] = batch["seq_class_ids"][row, : int(batch["phone_seq_lens"][row])].tolist()
    return labels


def fixed_start(*, known: bool, day: int, init: str, n_trials: int, n_sessions: int) -> tuple[int | None, str] | None:
    """The starting day layer that needs no data: the session's own when the model knows it, identity
    or the last trained day as --init says (the last also when there are no trials to choose with);
    None when --init nearest is to choose from the trials."""
    if known:
        return day, "own"
    if init == "identity":
        return None, "identity"
    if init == "last" or n_trials == 0:
        return n_sessions - 1, "last"
    return None


def n_held_out(n: int, fraction: float) -> int:
    """Trials of n held out for the keep-the-better check: round(fraction * n), at least 1 and
    leaving at least 1 when fraction > 0 and n >= 2."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def save_run(out: Path, *, model: nn.Module, cfg: Config, sessions: list[str], data_dir: str, step: int,
             val_per: float, val_loss: float) -> None:
    """A run directory as the trainer writes it: config.yaml and checkpoint/{best,last}_checkpoint.pt.

    The optimizer is the trainer's (build_optimizer) with fresh moments and the schedule at the
    source run's step, so `train_model.py --resume` continues the source run's schedule.
    """
    cfg.output_dir, cfg.init_from_checkpoint = str(out), None
    cfg.dataset.dataset_dir, cfg.dataset.sessions = data_dir, list(sessions)
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    (out / checkpoints.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    # best_val_* stay inf: these figures are one session's, not the run's validation set.
    saved = dict(model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg, step=step, best_val_per=math.inf,
                 best_val_loss=math.inf, val_per=val_per, val_loss=val_loss, sessions=sessions)
    for name in (checkpoints.BEST_CHECKPOINT, checkpoints.LAST_CHECKPOINT):
        checkpoints.save_checkpoint(out / checkpoints.CHECKPOINT_DIR / name, **saved)


def _curve_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A calibration.json's rows ordered by sentence count, each with 'n' (K labelled or N unlabelled)."""
    rows = [dict(r, n=r.get("k", r.get("n"))) for r in result.get("by_k") or result.get("by_n") or []]
    return sorted(rows, key=lambda r: r["n"])


def _curve_label(result: dict[str, Any]) -> str:
    if result.get("unsupervised"):
        if result["objective"] == "align":
            return f"N unlabelled, latent aligned, then pseudo-labels, {result['rounds']} round(s) x {result['steps']} steps"
        what = "pseudo-labels" if result["objective"] == "pseudo" else "consistency, no decoding"
        return f"N unlabelled, {what}, {result['rounds']} round(s) x {result['steps']} steps"
    return f"K labelled, {result['steps']} steps (--train {result['train']})"


def plot_calibration(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Val PER against the number of calibration sentences (K labelled or N unlabelled): the first
    run's identity and starting layers uncalibrated, then each run after calibration. Skipped without
    matplotlib or without val PER."""
    try:
        import matplotlib
    except ImportError:
        print(f"{path.name} not written: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in _curve_rows(results[0]) if r["per_init"] is not None]
    if not first:
        print(f"{path.name} not written: the session has no val trials to measure PER on")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ns = [r["n"] for r in first]
    if first[0].get("per_identity") is not None:  # None: a known session, recalibrated from its own layer
        ax.plot(ns, [r["per_identity"] for r in first], "k--", label="identity day layer, uncalibrated")
    ax.plot(ns, [r["per_init"] for r in first], "k:", marker="s", label=f"{results[0]['init']} day layer, uncalibrated")
    for result in results:
        rows = [r for r in _curve_rows(result) if r["per_after"] is not None]
        ax.plot([r["n"] for r in rows], [r["per_after"] for r in rows], marker="o", label=_curve_label(result))
    ax.set(xlabel="calibration sentences (K labelled / N unlabelled)", ylabel="val PER",
           title=f"Calibrating {results[0]['session']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse_sweep(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CalibrationError(f"--sweep {text!r}: expected comma-separated sentence counts, e.g. 0,5,10,25,50") from None
    if any(v < 0 for v in values):
        raise CalibrationError(f"--sweep {text!r}: sentence counts must be >= 0")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True, help="run directory to start from (or, with --upstream, an upstream model directory)")
    p.add_argument("--upstream", action="store_true", help="model_path is upstream-format (checkpoint/args.yaml + checkpoint/best_checkpoint)")
    p.add_argument("--data_dir", required=True, help="dataset directory holding the session's folder")
    p.add_argument("--session", required=True, help="session to calibrate to (t15.YYYY.MM.DD)")
    p.add_argument("--n_sentences", type=int, required=True, help="K: calibrate on the session's first K training sentences "
                   "(N: its first N unlabelled trials of --split with --unsupervised)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (per round with --unsupervised)")
    p.add_argument("--batch_size", type=int, default=8, help="trials per step, drawn with replacement from the K")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the config's lr_max_day)")
    p.add_argument("--train", default="day", help=f"what moves: {' | '.join(TRAIN_MODES)}")
    p.add_argument("--init", default="nearest", help=f"new day layer's start: {' | '.join(INITS)}")
    p.add_argument("--sweep", default=None, help="also calibrate from the same start with each K of this list, e.g. 0,5,10,25,50")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch draw, augmentation and dropout")
    p.add_argument("--holdout_fraction", type=float, default=0.2,
                   help="share of the K (or N) trials held out of training; the day layer with their lowest CTC loss, "
                   "the start included, is kept (within each round without labels; then the start's or a round's layer, "
                   "whichever has the most of its greedy phonemes of those trials confirmed by the LM-constrained beam "
                   "search: lm_agreement) (0: train on all, keep the last step)")
    p.add_argument("--check_every", type=int, default=10, help="steps between held-out checks")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="earlier calibration runs whose calibration.json curves are drawn in calibration.png too")
    p.add_argument("--out", required=True, help="run directory to write (must not hold a checkpoint yet)")
    u = p.add_argument_group("without labels (--unsupervised)")
    u.add_argument("--unsupervised", action="store_true", help="adapt from the session's first N trials of --split, reading no label")
    u.add_argument("--split", default=None, help="file the N trials come from: train or test (default train; "
                   "without --unsupervised only train)")
    u.add_argument("--objective", default="pseudo", help=f"{' | '.join(OBJECTIVES)}: train on LM-corrected pseudo-labels, "
                   "or on the consistency of posteriors between a trial and a time-masked noisy copy (no decoding), or "
                   "(align) train round 1 on phonemes read off the new day's neural latent aligned to a trained day's "
                   "(no decoding), later rounds as pseudo")
    u.add_argument("--align_dims", type=int, default=0,
                   help="--objective align: dimension of the neural latent (0: the covariance spectrum's knee)")
    u.add_argument("--rounds", type=int, default=1, help="decode, select, train: this many times")
    u.add_argument("--keep_fraction", type=float, default=0.5, help="share of the trials whose pseudo-labels train the layer, most confident first")
    beam = BeamSearchOptions()  # the evaluator's defaults
    lm = u.add_mutually_exclusive_group()
    lm.add_argument("--lm_text", help="text file, one sentence per line, for the n-gram LM (default: training sentences "
                    "of the model's other sessions under --data_dir)")
    lm.add_argument("--lm_arpa", help="ready ARPA file to use as the LM")
    u.add_argument("--lm_order", type=int, default=3, help="n-gram order of the LM built from text")
    u.add_argument("--lexicon_words", choices=("all", "train"), default="all", help="all of CMUdict, or only its entries for training words")
    u.add_argument("--beam_size", type=int, default=beam.beam_size)
    u.add_argument("--beam_threshold", type=float, default=beam.beam_threshold)
    u.add_argument("--lm_weight", type=float, default=beam.lm_weight)
    u.add_argument("--word_score", type=float, default=beam.word_score)
    u.add_argument("--sil_score", type=float, default=beam.sil_score)
    u.add_argument("--blank_penalty", type=float, default=beam.blank_penalty)
    return p


def check_args(args: argparse.Namespace) -> list[int]:
    """Refuse what cannot work before anything is read or written; returns the sentence counts to run."""
    if args.train not in TRAIN_MODES:
        raise CalibrationError(f"--train {args.train!r}: expected one of {', '.join(TRAIN_MODES)}")
    if args.init not in INITS:
        raise CalibrationError(f"--init {args.init!r}: expected one of {', '.join(INITS)}")
    if args.objective not in OBJECTIVES:
        raise CalibrationError(f"--objective {args.objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if args.split not in (None, "train", "test"):
        raise CalibrationError(f"--split {args.split!r}: expected train or test")
    if args.split == "test" and not args.unsupervised:
        raise CalibrationError("--split test: the test split holds no labels; calibrate from it with --unsupervised")
    if args.n_sentences < 1:
        raise CalibrationError(f"--n_sentences {args.n_sentences}: calibration needs at least one sentence")
    if args.steps < 1 or args.batch_size < 1 or args.rounds < 1 or args.check_every < 1:
        raise CalibrationError("--steps, --batch_size, --rounds and --check_every must be >= 1")
    if not 0 <= args.align_dims <= MAX_LATENT_DIMS:
        raise CalibrationError(f"--align_dims {args.align_dims}: expected 0 (the spectrum's knee) to {MAX_LATENT_DIMS}")
    if not 0 < args.keep_fraction <= 1 or not 0 <= args.holdout_fraction < 1:
        raise CalibrationError("--keep_fraction must be in (0, 1] and --holdout_fraction in [0, 1)")
    return sorted({args.n_sentences, *_parse_sweep(args.sweep)})


def read_compared(run_dirs: Sequence[str]) -> list[dict[str, Any]]:
    results = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "calibration.json"
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise CalibrationError(f"--compare {run_dir}: cannot read its calibration.json ({error})") from None
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything, calibrate for --n_sentences and each --sweep K, then write --out."""
    ks = check_args(args)
    out = Path(args.out)
    if (out / checkpoints.CHECKPOINT_DIR).exists():
        raise CalibrationError(f"{out}: already holds a checkpoint directory; choose a new --out")
    compared = read_compared(args.compare)
    start = load_start(args.model_path, upstream=args.upstream)
    cfg = start.cfg
    known = args.session in start.sessions
    n_days = len(start.sessions) + (0 if known else 1)
    day = start.sessions.index(args.session) if known else len(start.sessions)
    split = args.split or "train"
    # Every read checked before any training: the session's folder, K train trials, val trials.
    if args.unsupervised:
        train_index = unlabelled_trial_index(args.data_dir, args.session, split, day=day, n_trials=max(ks), cfg=cfg)
    else:
        train_index = session_trial_index(args.data_dir, args.session, "train", day=day, n_trials=max(ks), cfg=cfg)
    has_val = session_files(args.data_dir, [args.session], "val")[0] is not None
    if not has_val and not args.unsupervised:
        raise DataError(f"{args.data_dir}/{args.session}: no val trials to measure calibration on")
    val_index = session_trial_index(args.data_dir, args.session, "val", day=day, cfg=cfg) if has_val else None
    if val_index is not None and not val_index[day]["trials"]:
        if not args.unsupervised:
            raise DataError(f"{args.data_dir}/{args.session}: no val trials to measure calibration on")
        val_index = None
    common = dict(random_seed=args.seed, feature_subset=cfg.dataset.feature_subset, on_bad_trial=cfg.dataset.on_bad_trial)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    val_batches = []
    if val_index is not None:
        val_set = BrainToTextDataset(val_index, 0, "val", cfg.dataset.val_batch_size, 1, **common)
        val_batches = _batches(val_set, device)
    lr = args.lr if args.lr is not None else cfg.optimizer.lr_max_day

    def val_per(model: nn.Module) -> tuple[float | None, float | None]:
        return session_per(model, val_batches, cfg, n_days) if val_batches else (None, None)

    def one_k(k: int) -> tuple[dict[str, Any], nn.Module, list[str]]:
        n_hold = n_held_out(k, args.holdout_fraction)
        trials = train_index[day]["trials"]
        index = {day: dict(train_index[day], trials=trials[:k])}
        calibration_batches = []
        if k > 0:
            # Loss of the K sentences as they are, for choosing the nearest day; then training draws.
            fit_set = BrainToTextDataset(index, 0, "val", cfg.dataset.val_batch_size, 1, **common)
            calibration_batches = _batches(fit_set, device)
        fixed = fixed_start(known=known, day=day, init=args.init, n_trials=k, n_sessions=len(start.sessions))
        init_day, init = fixed or (nearest_day(start, args.session, calibration_batches), "nearest")
        model, sessions, _ = model_for_session(start, args.session, init_day)
        model.to(device)
        per_init, loss_init = session_per(model, val_batches, cfg, n_days)
        began = time.perf_counter()
        losses, per_last = {}, None
        if k > 0:
            fit_index = {day: dict(train_index[day], trials=trials[: k - n_hold])}
            held_index = {day: dict(train_index[day], trials=trials[k - n_hold : k])}
            held = _batches(BrainToTextDataset(held_index, 0, "val", cfg.dataset.val_batch_size, 1, **common), device) if n_hold else []
            train_set = BrainToTextDataset(fit_index, args.steps, "train", args.batch_size, 1, **common)
            losses, best = calibrate(model, train_batches=_batches(train_set, device), cfg=cfg, train=args.train,
                                     day=day, lr=lr, seed=args.seed, holdout_batches=held, check_every=args.check_every)
            seconds = time.perf_counter() - began
            if best is not None:
                per_last = session_per(model, val_batches, cfg, n_days)[0]
            restore_best(model, best)
        else:
            seconds = time.perf_counter() - began
        per_after, loss_after = session_per(model, val_batches, cfg, n_days)
        row = {"k": k, "init_used": init, "init_day": None if init_day is None else start.sessions[init_day],
               "per_init": per_init, "per_after": per_after, "val_loss_init": loss_init, "val_loss_after": loss_after,
               "n_train": k - n_hold, "n_holdout": n_hold, "per_last_step": per_last, "seconds": seconds, **losses}
        print(f"K {k:>3} | init {init} ({row['init_day']}) | PER {per_init:.4f} -> {per_after:.4f}"
              + (f" (last step {per_last:.4f}, kept step {losses['kept_step']})" if per_last is not None else "")
              + f" | {seconds:.1f} s")
        return row, model, sessions

    def reference_trials(source_day: int) -> list[Tensor]:
        """A trained day's train trials under --data_dir, read as unlabelled (cached)."""
        if source_day not in references:
            index = unlabelled_trial_index(args.data_dir, start.sessions[source_day], "train", day=source_day, n_trials=None, cfg=cfg)
            references[source_day] = load_trials(index, cfg, device)
        return references[source_day]

    references: dict[int, list[Tensor]] = {}

    def one_n(n: int) -> tuple[dict[str, Any], nn.Module, list[str]]:
        n_hold = n_held_out(n, args.holdout_fraction)
        fit, held = all_trials[: n - n_hold], all_trials[n - n_hold : n]
        began = time.perf_counter()
        day_losses = None
        fixed = fixed_start(known=known, day=day, init=args.init, n_trials=n, n_sessions=len(start.sessions))
        if fixed is not None:
            init_day, init = fixed
        else:
            init_day, day_losses = nearest_day_unlabelled(start, args.session, fit, decoder, lexicon, device)
            init = "nearest"
        model, sessions, _ = model_for_session(start, args.session, init_day)
        model.to(device)
        alignment = None
        if args.objective == "align" and n:
            # The trained day the new one is aligned to: the session's own day when the model knows it, else the last.
            reference_day = day if known else len(start.sessions) - 1
            # EM starts once from the starting layer's reading of the day and once from each trained day's layer's.
            seeds = [] if known else [model_for_session(start, args.session, d)[0].to(device) for d in range(len(start.sessions))]
            alignment = align_latents(model, cfg, new_trials=all_trials[:n], day=day, reference_day=reference_day,
                                      reference_trials=reference_trials(reference_day), dims=args.align_dims, seeds=seeds)
            alignment.figures["reference_day"] = start.sessions[reference_day]
        seconds = time.perf_counter() - began
        per_init, loss_init = val_per(model)
        candidates: list[dict[str, Any]] = []  # the start and each round's layer, for keep_better
        states: list[dict[str, Tensor]] = []

        def add_candidate(r: int, per: float | None) -> None:
            if held and decoder is not None:
                candidates.append({"round": r, **lm_agreement(trial_logits(model, held, cfg, day), decoder), "per": per})
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

        add_candidate(0, per_init)
        rounds = []
        for r in range(args.rounds if n else 0):
            began = time.perf_counter()
            from_latent = alignment is not None and r == 0
            if from_latent:  # the first round's labels are read off the aligned latent, not decoded
                p, stride = cfg.model.patch_size, cfg.model.patch_stride
                fit_labels = alignment.labels(read_frames(fit, cfg), p, stride)
                held_labels = alignment.labels(read_frames(held, cfg), p, stride)
            else:
                fit_labels = pseudo_labels(model, fit, decoder, lexicon, cfg, day)
                held_labels = pseudo_labels(model, held, decoder, lexicon, cfg, day)
            select = args.objective == "pseudo" or (args.objective == "align" and not from_latent)
            if args.objective == "consistency":
                kept = list(range(len(fit)))
            elif select:
                kept = most_confident(fit_labels, args.keep_fraction)
            else:
                kept = [i for i, label in enumerate(fit_labels) if label is not None]
            held_batches = pseudo_labelled_batches(held, held_labels, cfg, day)
            targets = None if args.objective == "consistency" else [fit_labels[i].target for i in kept]
            figures, best = {}, None
            if kept:
                batches = draw_batches([fit[i] for i in kept], targets, day=day, n_steps=args.steps,
                                       batch_size=args.batch_size, seed=args.seed + 1000 * r)
                figures, best = calibrate(model, train_batches=batches, cfg=cfg, train=args.train, day=day, lr=lr,
                                          seed=args.seed + r, objective="consistency" if args.objective == "consistency" else "ctc",
                                          holdout_batches=held_batches, check_every=args.check_every)
            round_seconds = time.perf_counter() - began
            seconds += round_seconds
            per_last = val_per(model)[0] if best is not None else None
            restore_best(model, best)
            per_round = val_per(model)[0]
            add_candidate(r + 1, per_round)
            confident = [fit_labels[i].confidence for i in kept] if select else []
            rounds.append({
                "round": r + 1, "labels": "latent" if from_latent else "beam search" if targets is not None else None,
                "n_decoded": len(fit), "n_pseudo_labelled": sum(x is not None for x in fit_labels),
                "n_kept": len(kept), "confidence_threshold": min(confident) if confident else None,
                "n_holdout_labelled": sum(x is not None for x in held_labels), "per_last_step": per_last,
                "per_after": per_round, "seconds": round_seconds, **figures,
                "_labels": fit_labels, "_kept": kept,
            })
            print(f"N {n:>3} | round {r + 1} | {len(kept)} of {len(fit)} trials train"
                  + (f" | PER {per_round:.4f}" if per_round is not None else "")
                  + (f" (last step {per_last:.4f}, kept step {figures['kept_step']})" if per_last is not None else "")
                  + f" | {round_seconds:.1f} s")
        kept_round = None
        if candidates:
            kept = keep_better(candidates)
            kept_round = candidates[kept]["round"]
            model.load_state_dict(states[kept])
            print(f"N {n:>3} | kept round {kept_round} of 0-{candidates[-1]['round']}: LM-confirmed phonemes of {len(held)} "
                  "held-out trials " + " / ".join(str(c["n_confirmed"]) for c in candidates))
        per_after, loss_after = val_per(model)
        row = {"n": n, "candidates": candidates, "kept_round": kept_round, "init_used": init, "init_day": None if init_day is None else start.sessions[init_day],
               "init_day_losses": day_losses, "n_train": n - n_hold, "n_holdout": n_hold,
               "alignment": None if alignment is None else alignment.figures,
               "per_init": per_init, "per_after": per_after, "val_loss_init": loss_init, "val_loss_after": loss_after,
               "seconds": seconds, "rounds": rounds}
        print(f"N {n:>3} | init {init} ({row['init_day']})"
              + (f" | PER {per_init:.4f} -> {per_after:.4f}" if per_init is not None else "") + f" | {seconds:.1f} s")
        return row, model, sessions

    # The LM is written to a temporary folder (then copied into --out), so a failure writes nothing.
    lm_dir = tempfile.TemporaryDirectory() if args.unsupervised else None
    try:
        lm_name = None
        if lm_dir is not None:
            all_trials = load_trials(train_index, cfg, device)
        # Decoding is needed unless every round is the aligned latent's (align, one round, a fixed
        # start) and no held-out trials are scored (keep_better decodes them).
        decoder = lexicon = None
        if lm_dir is not None and not (args.objective == "align" and args.rounds == 1 and args.init != "nearest"
                                       and args.holdout_fraction == 0):
            decoder, lexicon, lm_name = build_pseudo_label_decoder(args, start, Path(lm_dir.name))
        identity_model, _, _ = model_for_session(start, args.session, None)
        per_identity = val_per(identity_model.to(device))[0] if not known else None
        rows, saved = [], None
        for k in ks:
            row, model, sessions = (one_n if args.unsupervised else one_k)(k)
            row["per_identity"] = per_identity
            rows.append(row)
            if k == args.n_sentences:
                saved = (model, sessions, row)
        model, sessions, row = saved
        save_run(out, model=model.cpu(), cfg=cfg, sessions=sessions, data_dir=args.data_dir, step=start.step,
                 val_per=math.nan if row["per_after"] is None else row["per_after"],
                 val_loss=math.nan if row["val_loss_after"] is None else row["val_loss_after"])
        if lm_dir is not None and (Path(lm_dir.name) / "lm.arpa").is_file():
            shutil.copy(Path(lm_dir.name) / "lm.arpa", out / "lm.arpa")
    finally:
        if lm_dir is not None:
            lm_dir.cleanup()
    result = {
        "model_path": args.model_path, "source_checkpoint": start.source, "session": args.session,
        "day_index": day, "new_session": not known, "n_sentences": args.n_sentences, "steps": args.steps,
        "batch_size": args.batch_size, "lr": lr, "train": args.train, "init": args.init, "seed": args.seed,
        "holdout_fraction": args.holdout_fraction, "check_every": args.check_every,
        "n_val_trials": len(val_index[day]["trials"]) if val_index is not None else 0, "device": str(device),
        "unsupervised": args.unsupervised,
    }
    if args.unsupervised:
        # Scored after the weights are written, from labels the calibration never opened.
        trial_ids = train_index[day]["trials"]
        truth = true_labels(args.data_dir, args.session, split, trial_ids, cfg)
        for row in rows:
            for entry in row["rounds"]:
                _score_round(entry, trial_ids, truth)
        result.update(split=split, objective=args.objective, labels_available=truth is not None, by_n=rows)
        result.update(rounds=args.rounds, keep_fraction=args.keep_fraction, lm=lm_name,
                      keep="of the start (round 0) and each round's layer, the highest lm_agreement on the held-out "
                      "trials: the layer's greedy phonemes that its beam search's best sentence keeps (longest common "
                      "subsequence), per output frame (keep_better)",
                      confidence="exp(-CTC(pseudo-label) / frames), the model's mean per-frame likelihood of the "
                      "beam search's best sentence; the most confident keep_fraction train")
        if args.objective == "align":
            result.update(align_dims=args.align_dims, align="round 1 trains on the phonemes read off the new day's "
                          "latent rotated onto a trained day's (align_latents); later rounds decode as 'pseudo'")
    else:
        result["by_k"] = rows
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    plot_calibration([result, *compared], out / "calibration.png")
    return result


def _score_round(entry: dict[str, Any], trial_ids: Sequence[int], truth: dict[int, list[int]] | None) -> None:
    """Replace a round's pseudo-labels by their figures: per trial confidence, margin, kept and,
    with the true labels, PER (overall, and of the kept ones)."""
    labels, kept = entry.pop("_labels"), set(entry.pop("_kept"))
    trials, edits = [], {"all": [0, 0], "kept": [0, 0]}
    for i, label in enumerate(labels):
        record = {"trial": trial_ids[i], "kept": i in kept, "text": None if label is None else label.text,
                  "confidence": None if label is None or math.isnan(label.confidence) else label.confidence,
                  "margin": None if label is None or math.isinf(label.margin) else label.margin}
        if truth is not None:
            n_edits, n_ref = count_edits([truth[trial_ids[i]]], [[] if label is None else label.target])
            record["per"] = n_edits / n_ref
            for group in ("all", "kept") if i in kept else ("all",):
                edits[group][0] += n_edits
                edits[group][1] += n_ref
        trials.append(record)
    entry["pseudo_per"] = edits["all"][0] / edits["all"][1] if truth is not None and edits["all"][1] else None
    entry["pseudo_per_kept"] = edits["kept"][0] / edits["kept"][1] if truth is not None and edits["kept"][1] else None
    entry["trials"] = trials


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CalibrationError, DataError, ConfigError, rnn_model.CheckpointError) as error:
        print(f"calibrate_session.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
