"""Calibrate a trained decoder to a new recording day from a few sentences of that day.

    python calibrate_session.py --model_path trained_models/demo --data_dir data/synthetic_holdout \
        --session t15.2023.09.24 --n_sentences 25 [--steps 200] [--train day|day+head|all] \
        [--init identity|last|nearest] [--sweep 0,5,10,25,50] [--upstream] --out runs/calibrated

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
of --sweep (each calibrated from the same starting model).

Bad input (unknown session, K beyond the session's trials, a model directory without checkpoint,
an unknown --train or --init) ends with one line on stderr and exit status 2, before anything is
written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before the first `import accelerate` (through rnn_trainer): without it, accelerate imports
# torch_xla, which swaps nn.GRU process-wide. Calibration runs on the CPU (or CUDA).
os.environ.setdefault("USE_TORCH_XLA", "0")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import checkpoints  # noqa: E402
import rnn_model  # noqa: E402
import rnn_trainer  # noqa: E402
from config import Config, ConfigError, save_config  # noqa: E402
from data_augmentations import augment_batch  # noqa: E402
from dataset import BrainToTextDataset, DataError, day_sources, session_trial_index  # noqa: E402

TRAIN_MODES = ("day", "day+head", "all")
INITS = ("identity", "last", "nearest")


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
    model: nn.Module, *, train_batches: Sequence[dict[str, Tensor]], cfg: Config, train: str, day: int, lr: float,
    seed: int,
) -> dict[str, float]:
    """Train the parameters `train` selects on the calibration batches, one AdamW step per batch."""
    trainable = select_trainable(model, train=train, day=day, n_classes=cfg.model.n_classes)
    o = cfg.optimizer
    # weight_decay 0: decay would move weights whose gradient is zero (other days' stacked rows).
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, betas=(o.beta0, o.beta1), eps=o.epsilon, weight_decay=0.0)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    adversarial_gate = torch.tensor(float(cfg.adversarial.enabled and cfg.model.type == "triple"), device=device)
    model.train()
    losses = []
    for batch in train_batches:
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
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()
    return {"first_loss": losses[0] if losses else math.nan, "last_loss": losses[-1] if losses else math.nan}


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


def plot_calibration(result: dict[str, Any], path: Path) -> None:
    """PER against K: identity layer, initial layer, after calibration. Skipped without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"{path.name} not written: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["by_k"], key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows[0]["per_identity"] is not None:  # None: a known session, recalibrated from its own layer
        ax.plot(ks, [r["per_identity"] for r in rows], "k--", label="identity day layer, uncalibrated")
    ax.plot(ks, [r["per_init"] for r in rows], marker="s", label=f"{result['init']} day layer, uncalibrated")
    ax.plot(ks, [r["per_after"] for r in rows], marker="o", label=f"after {result['steps']} steps (--train {result['train']})")
    ax.set(xlabel="calibration sentences K", ylabel="val PER", title=f"Calibrating {result['session']}")
    ax.legend()
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
    p.add_argument("--n_sentences", type=int, required=True, help="K: calibrate on the session's first K training sentences")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=8, help="trials per step, drawn with replacement from the K")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the config's lr_max_day)")
    p.add_argument("--train", default="day", help=f"what moves: {' | '.join(TRAIN_MODES)}")
    p.add_argument("--init", default="nearest", help=f"new day layer's start: {' | '.join(INITS)}")
    p.add_argument("--sweep", default=None, help="also calibrate from the same start with each K of this list, e.g. 0,5,10,25,50")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch draw, augmentation and dropout")
    p.add_argument("--out", required=True, help="run directory to write (must not hold a checkpoint yet)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything, calibrate for --n_sentences and each --sweep K, then write --out."""
    if args.train not in TRAIN_MODES:
        raise CalibrationError(f"--train {args.train!r}: expected one of {', '.join(TRAIN_MODES)}")
    if args.init not in INITS:
        raise CalibrationError(f"--init {args.init!r}: expected one of {', '.join(INITS)}")
    if args.n_sentences < 1:
        raise CalibrationError(f"--n_sentences {args.n_sentences}: calibration needs at least one sentence")
    if args.steps < 1 or args.batch_size < 1:
        raise CalibrationError("--steps and --batch_size must be >= 1")
    sweep = _parse_sweep(args.sweep)
    out = Path(args.out)
    if (out / checkpoints.CHECKPOINT_DIR).exists():
        raise CalibrationError(f"{out}: already holds a checkpoint directory; choose a new --out")
    start = load_start(args.model_path, upstream=args.upstream)
    cfg = start.cfg
    known = args.session in start.sessions
    n_days = len(start.sessions) + (0 if known else 1)
    day = start.sessions.index(args.session) if known else len(start.sessions)
    ks = sorted({args.n_sentences, *sweep})
    # Every read checked before any training: the session's folder, K train trials, val trials.
    train_index = session_trial_index(args.data_dir, args.session, "train", day=day, n_trials=max(ks), cfg=cfg)
    val_index = session_trial_index(args.data_dir, args.session, "val", day=day, cfg=cfg)
    if not val_index[day]["trials"]:
        raise DataError(f"{args.data_dir}/{args.session}: no val trials to measure calibration on")
    common = dict(random_seed=args.seed, feature_subset=cfg.dataset.feature_subset, on_bad_trial=cfg.dataset.on_bad_trial)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    val_set = BrainToTextDataset(val_index, 0, "val", cfg.dataset.val_batch_size, 1, **common)
    val_batches = _batches(val_set, device)
    lr = args.lr if args.lr is not None else cfg.optimizer.lr_max_day

    def one_k(k: int) -> tuple[dict[str, Any], nn.Module, list[str]]:
        index = {day: dict(train_index[day], trials=train_index[day]["trials"][:k])}
        calibration_batches = []
        if k > 0:
            # Loss of the K sentences as they are, for choosing the nearest day; then training draws.
            fit_set = BrainToTextDataset(index, 0, "val", cfg.dataset.val_batch_size, 1, **common)
            calibration_batches = _batches(fit_set, device)
        if known:
            init_day, init = day, "own"
        elif args.init == "identity":
            init_day, init = None, "identity"
        elif args.init == "last" or k == 0:
            init_day, init = len(start.sessions) - 1, "last"
        else:
            init_day, init = nearest_day(start, args.session, calibration_batches), "nearest"
        model, sessions, _ = model_for_session(start, args.session, init_day)
        model.to(device)
        per_init, loss_init = session_per(model, val_batches, cfg, n_days)
        began = time.perf_counter()
        losses = {}
        if k > 0:
            train_set = BrainToTextDataset(index, args.steps, "train", args.batch_size, 1, **common)
            losses = calibrate(model, train_batches=_batches(train_set, device), cfg=cfg, train=args.train,
                               day=day, lr=lr, seed=args.seed)
        seconds = time.perf_counter() - began
        per_after, loss_after = session_per(model, val_batches, cfg, n_days)
        row = {"k": k, "init_used": init, "init_day": None if init_day is None else start.sessions[init_day],
               "per_init": per_init, "per_after": per_after, "val_loss_init": loss_init, "val_loss_after": loss_after,
               "seconds": seconds, **losses}
        print(f"K {k:>3} | init {init} ({row['init_day']}) | PER {per_init:.4f} -> {per_after:.4f} | {seconds:.1f} s")
        return row, model, sessions

    identity_model, _, _ = model_for_session(start, args.session, None)
    per_identity = session_per(identity_model.to(device), val_batches, cfg, n_days)[0] if not known else None
    rows, saved = [], None
    for k in ks:
        row, model, sessions = one_k(k)
        row["per_identity"] = per_identity
        rows.append(row)
        if k == args.n_sentences:
            saved = (model, sessions, row)
    model, sessions, row = saved
    save_run(out, model=model.cpu(), cfg=cfg, sessions=sessions, data_dir=args.data_dir, step=start.step,
             val_per=row["per_after"], val_loss=row["val_loss_after"])
    result = {
        "model_path": args.model_path, "source_checkpoint": start.source, "session": args.session,
        "day_index": day, "new_session": not known, "n_sentences": args.n_sentences, "steps": args.steps,
        "batch_size": args.batch_size, "lr": lr, "train": args.train, "init": args.init, "seed": args.seed,
        "n_val_trials": len(val_index[day]["trials"]), "device": str(device), "by_k": rows,
    }
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    plot_calibration(result, out / "calibration.png")
    return result


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
