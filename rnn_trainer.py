"""Train the CTC phoneme decoders on CPU, CUDA or TPU through HuggingFace Accelerate.

One trainer for every device: Accelerate places the model and wraps it for data parallelism;
gradient accumulation is the trainer's own (one graph per step on XLA, see train_step); the
loss, optimizer groups, learning-rate schedules, validation and checkpoints follow the upstream
baseline (nejm-brain-to-text model_training/). The training step is written for XLA first:
static shapes, no host syncs, no data-dependent Python branches.

Run through the command-line entry point:

    python train_model.py --config_path rnn_args.yaml [--set key=value ...] [--resume RUN_DIR]

Public functions: build_optimizer, build_lr_scheduler, compute_loss, train_step, evaluate, train.
Checkpoint files (writing, reading, random states, the newest one) live in checkpoints.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from tqdm import tqdm

import checkpoints
import rnn_model
import spmd
import storage
from config import Config, ConfigError, OptimizerConfig, config_to_dict, flat_keys, save_config
from ctc_loss import ctc_feasible, ctc_loss
from data_augmentations import augment_batch
from day_adamw import DayAdamW, count_days
from dataset import build_dataloaders, day_sources
from evaluate_model_helpers import count_edits, greedy_ctc_decode

TRACKER_PROJECT = "brain-to-text"  # log_with's project; TensorBoard writes to RUN_DIR/brain-to-text/
# Loss terms that count trials: summed over a step's micro-batches rather than averaged.
_COUNT_TERMS = ("ctc_infeasible",)
DEVICE_KEYS = ("input_features", "n_time_steps", "seq_class_ids", "phone_seq_lens", "day_indices", "row_mask")


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(*, model: nn.Module, cfg_optimizer: OptimizerConfig) -> DayAdamW:
    """AdamW with the upstream parameter groups: biases (no decay), day layers, everything else.

    The day-specific input layers get their own peak lr and weight decay; group_type tells the
    scheduler which warm-up/decay to use. Their group is per_day (each layer stacked day first),
    so DayAdamW leaves the days absent from a step untouched, as upstream's AdamW does (see
    day_adamw.py).
    """
    day_params, bias_params, other_params = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if rnn_model.is_day_parameter(name):
            day_params.append(param)
        elif name.rsplit(".", 1)[-1].startswith("bias"):
            bias_params.append(param)
        else:
            other_params.append(param)
    o = cfg_optimizer
    groups = [
        {"params": bias_params, "weight_decay": 0.0, "group_type": "other"},
        {"params": day_params, "lr": o.lr_max_day, "weight_decay": o.weight_decay_day, "group_type": "day",
         "per_day": True},
        {"params": other_params, "group_type": "other"},
    ]
    return DayAdamW(
        [g for g in groups if g["params"]],
        lr=o.lr_max,
        betas=(o.beta0, o.beta1),
        eps=o.epsilon,
        weight_decay=o.weight_decay,
    )


def _lr_factor(step: int, *, lr_max: float, lr_min: float, warmup_steps: int, decay_steps: int, kind: str) -> float:
    """Multiplier of the peak lr: linear warm-up from 0, cosine/linear decay to lr_min, then flat."""
    min_ratio = lr_min / lr_max if lr_max > 0 else 0.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step < decay_steps:
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return max(min_ratio, min_ratio + (1.0 - min_ratio) * decay)
    return min_ratio


def build_lr_scheduler(
    *, optimizer: torch.optim.Optimizer, cfg_optimizer: OptimizerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR factor per parameter group: day layers follow the *_day schedule."""
    o = cfg_optimizer
    shared = functools.partial(
        _lr_factor, lr_max=o.lr_max, lr_min=o.lr_min, warmup_steps=o.lr_warmup_steps,
        decay_steps=o.lr_decay_steps, kind=o.lr_scheduler_type,
    )
    day = functools.partial(
        _lr_factor, lr_max=o.lr_max_day, lr_min=o.lr_min_day, warmup_steps=o.lr_warmup_steps_day,
        decay_steps=o.lr_decay_steps_day, kind=o.lr_scheduler_type,
    )
    factors = [day if group.get("group_type") == "day" else shared for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


# ----------------------------------------------------------------------------- loss


def _ctc_counted_rows(batch: Mapping[str, Tensor], *, input_lengths: Tensor) -> Tensor:
    """(B,) bool: real trials (row_mask) whose input is long enough for their labels.

    random_cut shortens inputs after the loader's length check, so a trial can become
    infeasible on the device; it is left out of the loss instead of making the step infinite.
    """
    feasible = ctc_feasible(batch["seq_class_ids"], input_lengths=input_lengths, target_lengths=batch["phone_seq_lens"])
    return batch["row_mask"] & feasible


def _per_sample_ctc(
    logits: Tensor, batch: Mapping[str, Tensor], *, input_lengths: Tensor, counted: Tensor, use_dense_ctc: bool
) -> Tensor:
    """CTC negative log likelihood per trial (B,), float32; 0 with zero gradient for the rows that
    `counted` (from _ctc_counted_rows) leaves out: padding rows and infeasible trials."""
    # Rows left out get no labels, so their CTC is finite in both implementations (torch's
    # backward of an infinite loss is NaN even where its gradient is then multiplied by 0).
    target_lengths = torch.where(counted, batch["phone_seq_lens"], torch.zeros_like(batch["phone_seq_lens"]))
    log_probs = logits.float().log_softmax(dim=-1)  # (B, T', C); float32 whatever autocast did
    per_sample = ctc_loss(
        log_probs, batch["seq_class_ids"], input_lengths, target_lengths, blank=0, use_dense=use_dense_ctc
    )
    # where, not multiply: a left-out row's inf/NaN times 0 would still poison the sum.
    return torch.where(counted, per_sample, torch.zeros_like(per_sample))


def _masked_mean(values: Tensor, mask: Tensor, *, n_shards: int = 1) -> Tensor:
    """Mean of values[mask] without indexing by a data-dependent mask (static shapes); with n_shards,
    the mean of the masked means of the batch's n_shards row blocks (replicas' batches, spmd.py)."""
    kept = torch.where(mask, values, torch.zeros_like(values)).reshape(n_shards, -1)  # (B, ...) -> (n, B/n * ...)
    return (kept.sum(dim=1) / mask.reshape(n_shards, -1).sum(dim=1).clamp(min=1)).mean()


def compute_loss(
    *, model: nn.Module, batch: Mapping[str, Tensor], cfg: Config, adversarial_gate: Tensor, use_dense_ctc: bool,
    n_shards: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward pass and the total loss with each term by name.

    total = ctc_clean + gate * (noisy_loss_weight * ctc_noisy + noise_l2_weight * noise_l2)
    Each CTC term is the mean over real trials (row_mask) of per-trial sums, as upstream; trials
    whose (augmented) input is too short for their labels are left out and counted in the
    `ctc_infeasible` term, a device tensor like the others. n_shards: see train_step.
    `adversarial_gate` is a 0/1 device tensor, so switching the adversarial terms on after the
    warm-up changes values, not the traced graph.
    """
    m = cfg.model
    input_lengths = rnn_model.n_patches(  # (B,)
        batch["n_time_steps"], patch_size=m.patch_size, patch_stride=m.patch_stride
    )
    row_mask = batch["row_mask"]
    counted = _ctc_counted_rows(batch, input_lengths=input_lengths)
    outputs = rnn_model.decoder_outputs(
        model, batch["input_features"], batch["day_indices"], use_amp=cfg.use_amp, mode="full",
        grl_lambda=cfg.adversarial.grl_lambda * adversarial_gate, lengths=input_lengths,
    )
    ctc = functools.partial(
        _per_sample_ctc, batch=batch, input_lengths=input_lengths, counted=counted, use_dense_ctc=use_dense_ctc
    )
    ctc_clean = _masked_mean(ctc(outputs[0]), counted, n_shards=n_shards)
    terms = {"ctc_clean": ctc_clean, "ctc_infeasible": (row_mask & ~counted).sum().to(torch.float32)}
    total = ctc_clean
    if len(outputs) == 3:  # the triple model: (clean_logits, noisy_logits, noise)
        _, noisy_logits, noise = outputs
        ctc_noisy = _masked_mean(ctc(noisy_logits), counted, n_shards=n_shards)
        frames = torch.arange(noise.shape[1], device=noise.device)
        frame_mask = (frames[None, :] < input_lengths[:, None]) & row_mask[:, None]  # (B, T')
        noise_l2 = _masked_mean(noise.float().pow(2).mean(dim=-1), frame_mask, n_shards=n_shards)  # (B, T', D) -> (B, T')
        adv = cfg.adversarial
        total = total + adversarial_gate * (adv.noisy_loss_weight * ctc_noisy + adv.noise_l2_weight * noise_l2)
        terms.update(ctc_noisy=ctc_noisy, noise_l2=noise_l2)
    terms["loss"] = total
    return total, terms


# ----------------------------------------------------------------------------- training step


def clip_grad_norm(*, accelerator: Accelerator, model: nn.Module, max_norm: float) -> Tensor:
    """accelerator.clip_grad_norm_ (torch's clip_grad_norm_ after its unscaling and, on XLA, its
    gradient all-reduce); with sparse day-layer gradients (rnn_model.use_sparse_day_gradients),
    which torch's norm does not take, the same clipping over the rows they hold: the total 2-norm
    of every gradient, each scaled by min(1, max_norm / (norm + 1e-6)). Returns the pre-clip norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    accelerator.unscale_gradients()
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # micro-batches' gradients add up uncoalesced
    grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


@torch.no_grad()
def _masked_optimizer_step(
    optimizer: torch.optim.Optimizer, finite: Tensor, days_present: Tensor | None = None
) -> None:
    """optimizer.step() that leaves weights, AdamW moments and step counts untouched when `finite`
    is False, decided on the device (no host sync). With `days_present` ((n_days,) bool), the
    day layers of absent days are left untouched too.

    DayAdamW folds both flags into its update's own scalars (day_adamw.py): the same few tensor
    ops per parameter group whatever they say, one graph on XLA. Any other optimizer steps on
    gradients zeroed when not finite, and its weights and tensor state are then selected with
    torch.where against copies (days_present does not apply).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
    if isinstance(inner, DayAdamW):
        inner.finite = finite
        inner.days_present = days_present
        optimizer.step()
        return
    params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
    for p in params:
        p.grad.masked_fill_(~finite, 0.0)
    old = {p: [p.detach().clone()] for p in params}
    states = {p: {k: v for k, v in inner.state[p].items() if torch.is_tensor(v)} for p in params if p in inner.state}
    old_states = {p: {k: v.clone() for k, v in state.items()} for p, state in states.items()}
    optimizer.step()
    for p in params:
        p.copy_(torch.where(finite, p, old[p][0]))
    for p, state in old_states.items():
        for key, value in state.items():
            inner.state[p][key].copy_(torch.where(finite, inner.state[p][key], value))


def _sum_over_replicas(values: Tensor, *, accelerator: Accelerator) -> Tensor:
    """Sum a device tensor over replicas without leaving the graph being traced.

    accelerator.reduce would cut the XLA graph (mark_step before and after its all-reduce) and
    split a step into several graphs; xm.all_reduce stays in the step's one graph. The gloo and
    NCCL path uses torch.distributed directly.
    """
    if accelerator.distributed_type == DistributedType.XLA:
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM, values)
    summed = values.clone()
    torch.distributed.all_reduce(summed)
    return summed


def train_step(
    *,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Mapping[str, Tensor]],
    cfg: Config,
    step_counter: Tensor,
    n_skipped: Tensor,
    generator: torch.Generator | None,
    use_dense_ctc: bool,
    n_shards: int = 1,
) -> dict[str, Tensor]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches already on the device.

    The micro-batches' losses, each scaled by 1/n, add their gradients up in one traced graph, so
    on XLA the whole step (n forwards and backwards, clipping, update) is one graph: nothing here
    calls Accelerate's `accumulate`, which on a TPU cuts the graph (xm.mark_step) when it opens the
    last micro-batch. Relies on Accelerate 1.x internals (see pyproject.toml): AcceleratedOptimizer
    steps and zeroes only while gradient_state.sync_gradients is True, which only `accumulate`
    changes.
    Returns the loss terms (averaged over micro-batches) and the pre-clip gradient norm as device
    tensors; nothing here reads a value back to the host. `step_counter` and `n_skipped` are
    device scalars updated in place. bf16 autocast needs no grad scaler: bf16 has float32's
    exponent range, so gradients do not underflow the way float16 ones do.
    Under SPMD a micro-batch holds n_shards replicas' batches, one per device (spmd.py): its loss is
    the mean of theirs, as data parallelism's; the partitioner sums gradients over the devices.
    """
    model.train()
    adv_on = float(cfg.adversarial.enabled and cfg.model.type == "triple")
    adversarial_gate = (step_counter >= cfg.adversarial.warmup_steps).to(torch.float32) * adv_on
    finite = torch.ones((), dtype=torch.bool, device=step_counter.device)
    sums: dict[str, Tensor] = {}
    # Trials per day over the whole step, so the optimizer can leave absent days' layers alone.
    n_days = getattr(getattr(optimizer, "optimizer", optimizer), "n_days", 0)
    day_counts = torch.zeros(n_days, device=step_counter.device)
    for i, batch in enumerate(micro_batches):
        day_counts = day_counts + count_days(batch["day_indices"], batch["row_mask"], n_days=n_days)
        # Not accelerator.accumulate: on a TPU it calls xm.mark_step() as it opens the step's last
        # micro-batch, cutting the step into two graphs. Gradients add up in .grad within the one
        # traced graph; DDP (CPU/CUDA processes) all-reduces them in the last backward only. On XLA
        # the model is not DDP-wrapped and no_sync is a no-op.
        is_last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
            # A half-precision trial cache's batches arrive in its dtype (half the bytes sent):
            # widened here, on the device (in the step's graph on XLA), to the float32 values the
            # host would have made; a no-op for float32 batches.
            features, n_time_steps = augment_batch(
                batch["input_features"].float(), batch["n_time_steps"], cfg.dataset.data_transforms,
                training=True, generator=generator, static_shapes=cfg.dataset.static_shapes,
            )
            batch = {**batch, "input_features": features, "n_time_steps": n_time_steps}
            total, terms = compute_loss(
                model=model, batch=batch, cfg=cfg, adversarial_gate=adversarial_gate, use_dense_ctc=use_dense_ctc,
                n_shards=n_shards,
            )
            # 1/n per micro-batch: the summed gradients are those of the step's mean loss. Not
            # accelerator.backward, which divides by the Accelerator's own accumulation count.
            (total / len(micro_batches)).backward()
            finite = finite & torch.isfinite(total)
            for name, value in terms.items():
                share = 1.0 if name in _COUNT_TERMS else 1.0 / len(micro_batches)  # counts add up, losses average
                sums[name] = sums.get(name, 0.0) + value.detach() * share
    # Clip and check without error_if_nonfinite: that option reads the norm on the host.
    # A clip value of 0 means no clipping, as upstream (it clips only when > 0); an infinite max norm
    # still returns the norm and, on XLA, still all-reduces the gradients inside Accelerate.
    max_norm = cfg.optimizer.grad_norm_clip_value or math.inf
    grad_norm = clip_grad_norm(accelerator=accelerator, model=model, max_norm=max_norm)
    finite = finite & torch.isfinite(grad_norm)
    if accelerator.num_processes > 1:
        # Every replica must take the same skip decision, or the weights drift apart; the logged
        # losses become means over replicas, counts sums. One collective, traced into the step's graph.
        # A day present on any replica has gradients on all of them after the gradient all-reduce.
        names = list(sums)
        local = torch.cat([torch.stack([*(sums[name] for name in names), (~finite).to(torch.float32)]), day_counts])
        summed = _sum_over_replicas(local, accelerator=accelerator)
        sums = {name: summed[i] if name in _COUNT_TERMS else summed[i] / accelerator.num_processes
                for i, name in enumerate(names)}
        finite = summed[len(names)] == 0
        day_counts = summed[len(names) + 1 :]
    _masked_optimizer_step(optimizer, finite, days_present=day_counts > 0)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    n_skipped.add_((~finite).to(n_skipped.dtype))
    step_counter.add_(1)
    if accelerator.distributed_type == DistributedType.XLA:
        import torch_xla

        torch_xla.sync()  # cut the graph here: forward + backward + update compile as one step
    return {**sums, "grad_norm": grad_norm.detach()}


# ----------------------------------------------------------------------------- validation


def _sum_across_processes(values: Tensor, accelerator: Accelerator | None) -> Tensor:
    """Sum a host tensor over all processes (a no-op for one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return values
    # float32 on the wire: TPUs have no float64; counts stay exact below 2**24.
    summed = _sum_over_replicas(values.to(device=accelerator.device, dtype=torch.float32), accelerator=accelerator)
    return summed.cpu().to(values.dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    cfg: Config,
    n_days: int,
    use_dense_ctc: bool = False,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Validation CTC loss and greedy-decoding PER, overall and per day.

    Rows whose row_mask is False (padding of a static-shape batch) count nowhere. With several
    processes each sees a shard of the batches and the counts are summed.
    Returns {'per', 'loss', 'per_by_day': {day_index: per}, 'n_trials'}.
    """
    model.eval()
    device = next(model.parameters()).device
    is_xla = device.type == "xla"
    loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of per-trial CTC, number of trials]
    counts = torch.zeros(n_days, 2, dtype=torch.float64)  # per day: [edits, reference phonemes]
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k in DEVICE_KEYS}
        features, n_time_steps = augment_batch(
            batch["input_features"], batch["n_time_steps"], cfg.dataset.data_transforms,
            training=False, generator=None, static_shapes=cfg.dataset.static_shapes,
        )
        batch = {**batch, "input_features": features, "n_time_steps": n_time_steps}
        logits, input_lengths = rnn_model.infer(
            model, features, batch["day_indices"], n_time_steps, use_amp=cfg.use_amp
        )
        counted = _ctc_counted_rows(batch, input_lengths=input_lengths)
        per_sample = _per_sample_ctc(
            logits, batch, input_lengths=input_lengths, counted=counted, use_dense_ctc=use_dense_ctc
        )
        if is_xla:
            import torch_xla

            torch_xla.sync()  # one eval graph per shape; the reads below are plain transfers
        logits, input_lengths, per_sample = logits.float().cpu(), input_lengths.cpu(), per_sample.cpu()
        row_mask = batch["row_mask"].cpu()
        labels, label_lengths = batch["seq_class_ids"].cpu(), batch["phone_seq_lens"].cpu()
        days = batch["day_indices"].cpu()
        hyps = greedy_ctc_decode(logits, input_lengths)
        loss_sum += torch.stack([per_sample[row_mask].double().sum(), row_mask.sum().double()])
        for i in torch.nonzero(row_mask).flatten().tolist():
            ref = labels[i, : int(label_lengths[i])].tolist()
            n_edits, n_ref = count_edits([ref], [hyps[i]])
            counts[int(days[i])] += torch.tensor([n_edits, n_ref], dtype=torch.float64)
    loss_sum = _sum_across_processes(loss_sum, accelerator=accelerator)
    counts = _sum_across_processes(counts, accelerator=accelerator)
    n_edits, n_ref = counts.sum(dim=0).tolist()
    return {
        "per": n_edits / n_ref if n_ref else float("nan"),
        "loss": float(loss_sum[0] / loss_sum[1]) if loss_sum[1] else float("nan"),
        "per_by_day": {day: float(e / r) for day, (e, r) in enumerate(counts.tolist()) if r > 0},
        "n_trials": int(loss_sum[1]),
    }


# ----------------------------------------------------------------------------- data plumbing


def _barrier(accelerator: Accelerator) -> None:
    """wait_for_everyone only when there is someone to wait for: on XLA it reads a value back. The
    hosts of an SPMD pod slice (one process each, which Accelerate counts as one) meet over gloo."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    if spmd.host_count() > 1:
        torch.distributed.barrier()


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in DEVICE_KEYS}


# ----------------------------------------------------------------------------- run output


def _check_tracker(log_with: str) -> str | None:
    """The Accelerate tracker that cfg.log_with names, or None for 'none'; ConfigError when its
    package is missing (Accelerate would only warn and go on without it)."""
    if log_with == "none":
        return None
    from accelerate.tracking import get_available_trackers

    if log_with not in [str(tracker) for tracker in get_available_trackers()]:
        extra = ' (pip install -e ".[tensorboard]")' if log_with == "tensorboard" else ""
        raise ConfigError(f"log_with: {log_with}: its package is not installed{extra}")
    return log_with


def _flat_scalars(values: Mapping[str, Any], *, sep: str) -> dict[str, Any]:
    """Nested dicts flattened to `a{sep}b` keys; numbers, strings and booleans kept, anything else
    (None, lists) as its string, which every tracker accepts."""
    return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
            for name, value in flat_keys(values, sep=sep).items()}


class _RunLog:
    """Fixed-format lines to stdout (above the progress bar) and train.log, records to metrics.jsonl
    and to the experiment tracker of cfg.log_with (Accelerate's trackers). Main process only.

    Files are opened in append mode so a resumed run keeps what was written before.
    """

    def __init__(
        self, run_dir: str, enabled: bool, accelerator: Accelerator | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.log_file = storage.AppendFile(storage.join(run_dir, "train.log")) if enabled else None
        self.metrics_file = storage.AppendFile(storage.join(run_dir, "metrics.jsonl")) if enabled else None
        self.tracking = enabled and accelerator is not None and bool(accelerator.log_with)
        self.accelerator = accelerator
        if self.tracking:
            accelerator.init_trackers(
                TRACKER_PROJECT, config=_flat_scalars(config or {}, sep="."),
                init_kwargs={"wandb": {"name": storage.name(run_dir)}},
            )

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        tqdm.write(text)
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def record(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl line; the tracker gets the same values (nested ones as `a/b`) at its step."""
        if self.enabled:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.tracking:
            values = {key: value for key, value in record.items() if key != "step"}
            self.accelerator.log(_flat_scalars(values, sep="/"), step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.log_file.close()
            self.metrics_file.close()
        if self.tracking:
            # The trackers' half of accelerator.end_training(); its other half destroys the process
            # group, which the caller of train() may still use.
            for tracker in self.accelerator.trackers:
                tracker.finish()


def _format_train_line(
    *, step: int, n_steps: int, values: Mapping[str, float], lr: float, n_skipped: int, ms: float
) -> str:
    width = len(str(n_steps))
    parts = [f"step {step:>{width}}/{n_steps}", f"loss {values['loss']:.3f}", f"ctc_clean {values['ctc_clean']:.3f}"]
    if "ctc_noisy" in values:
        parts += [f"ctc_noisy {values['ctc_noisy']:.3f}", f"noise_l2 {values['noise_l2']:.3g}"]
    parts += [f"ctc_infeasible {values['ctc_infeasible']:.0f}", f"grad {values['grad_norm']:.3g}", f"lr {lr:.2e}",
              f"skipped {n_skipped}", f"{ms:.0f} ms"]
    return " | ".join(parts)


def _plot_curves(run_dir: str) -> None:
    """training_curves.png: train loss and val PER against step, from the whole metrics.jsonl.

    matplotlib is an optional extra (`.[plots]`); without it the plot is skipped with one line.
    """
    try:
        import matplotlib
    except ImportError:
        tqdm.write("training_curves.png not written: matplotlib is not installed (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Keyed by step: after a resume, steps past the last checkpoint are logged twice; keep the latest.
    train_loss, val_per = {}, {}
    for line in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            train_loss[record["step"]] = record["train/loss"]
        if "val/per" in record:
            val_per[record["step"]] = record["val/per"]
    train_points, val_points = sorted(train_loss.items()), sorted(val_per.items())
    fig, (ax_loss, ax_per) = plt.subplots(1, 2, figsize=(10, 4))
    if train_points:
        ax_loss.plot(*zip(*train_points))
    ax_loss.set(xlabel="step", ylabel="train loss", title="Training loss")
    if val_points:
        ax_per.plot(*zip(*val_points), marker="o")
    ax_per.set(xlabel="step", ylabel="val PER", title="Validation phoneme error rate")
    fig.tight_layout()
    storage.atomic_write(storage.join(run_dir, "training_curves.png"),
                         lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- training loop


def _build_replica_model(
    cfg: Config, *, n_days: int, device: torch.device, rank: int, broadcast: bool, sessions: Sequence[str] | None = None
) -> nn.Module:
    """This replica's model on its device, holding the same weights as every other replica.

    The weights are drawn under one seed for all replicas. On XLA, Accelerate does not wrap the
    model in DDP (whose constructor broadcasts rank 0's weights), so with `broadcast` replica 0's
    parameters and buffers are sent to the others explicitly. Afterwards the global RNG is
    per replica, for dropout and augmentation: replica r > 0 reseeds with seed + r, replica 0
    continues the stream it built with, so a one-process run draws what it always drew.
    `init_from_checkpoint` may name a checkpoint file, a run directory or an upstream model directory;
    its day layers are matched to `sessions` (the run's list, day index = position) by name.
    """
    set_seed(cfg.seed)
    model = rnn_model.build_model(cfg.model, n_days=n_days)
    if cfg.init_from_checkpoint:
        checkpoint = rnn_model.read_checkpoint(cfg.init_from_checkpoint)
        # Day layers follow the session names (a new session starts as identity); a checkpoint
        # that names no sessions (upstream's) is loaded by position.
        sources = day_sources(checkpoint.get("sessions") or sessions, sessions) if sessions else list(range(n_days))
        rnn_model.load_day_mapped(model, checkpoint, sources, source=rnn_model.checkpoint_file(cfg.init_from_checkpoint))
    model.to(device)
    if broadcast:
        import torch_xla.core.xla_model as xm

        xm.broadcast_master_param(model)  # in-graph, then one sync
    if rank > 0:
        set_seed(cfg.seed + rank)
    return model


def _check_xla_precision_environment() -> None:
    """ConfigError when XLA_USE_BF16 or XLA_DOWNCAST_BF16 is set, as Accelerate's bf16 sets them on
    TPU: torch_xla would then hold the weights, AdamW moments and CTC in bf16 too. bf16 here is
    use_amp (autocast on float32 master weights)."""
    for name in ("XLA_USE_BF16", "XLA_DOWNCAST_BF16"):
        if os.environ.get(name, "0") not in ("", "0"):
            raise ConfigError(f"{name}={os.environ[name]} is set (Accelerate's mixed_precision bf16 on TPU): unset it "
                              "and launch with accelerate_config_tpu.yaml (mixed_precision: 'no'); use_amp: true "
                              "is this trainer's bf16")


@dataclass
class _Run:
    """Everything one training run holds between its steps."""

    cfg: Config
    accelerator: Accelerator
    run_dir: str  # a local path or an fsspec URL (storage.py)
    sessions: list[str]
    model: nn.Module  # as prepared by Accelerate (DDP-wrapped with several CUDA/CPU processes)
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator | None
    train_steps: Iterator[list[dict[str, Tensor]]]
    val_batches: Any
    log: _RunLog
    start_step: int = 0
    is_main: bool = True  # the process that writes the run: Accelerate's main one, on the first host
    n_shards: int = 1  # row blocks of a batch, one per device of the SPMD program (spmd.py)
    best_val_per: float = math.inf
    best_val_loss: float = math.inf
    n_bad_vals: int = 0
    last_val: tuple[float, float] = (math.nan, math.nan)  # PER and loss of the latest validation
    n_skipped: Tensor | None = None  # device scalar
    step_counter: Tensor | None = None  # device scalar
    ownership: checkpoints.RunOwnership | None = None  # the run's id and periodic checkpoints
    stop_group: Any = None  # gloo group over the run's processes for agreeing on a stop, None for one

    @property
    def is_xla(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.XLA


def _set_up(cfg: Config, resume_dir: str | None, *, fresh_without_checkpoint: bool = False) -> _Run:
    """Accelerator, data, run directory, model, optimizer and schedule; a resumed run's states.

    With `fresh_without_checkpoint` a `resume_dir` holding no checkpoint starts a fresh run there.
    """
    newest = checkpoints.newest_checkpoint(resume_dir) if resume_dir is not None else None
    if newest is None and resume_dir is not None:
        if not fresh_without_checkpoint:
            raise rnn_model.CheckpointError(f"{storage.join(resume_dir, checkpoints.CHECKPOINT_DIR)}: no checkpoint to resume from")
        resume_dir = None
    ownership = checkpoints.claim_run_dir(cfg, resume_dir or cfg.output_dir, newest=newest, restart=fresh_without_checkpoint)
    # mixed_precision="no": the bf16 autocast is ours (rnn_model.decoder_outputs); Accelerate's bf16
    # on TPU would set XLA_USE_BF16 and turn the master weights bf16 too.
    # cpu=True without CUDA: Accelerate only sets up gloo data parallelism (torchrun) in CPU mode.
    # project_dir: where log_with's local trackers (TensorBoard) write, under the run directory.
    _check_xla_precision_environment()
    # No gradient_accumulation_steps: train_step accumulates itself, so Accelerate's gradient state
    # keeps sync_gradients True and its optimizer wrapper steps and zeroes on every call.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="no", log_with=_check_tracker(cfg.log_with),
        project_dir=resume_dir or cfg.output_dir,
    )
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    is_xla = accelerator.distributed_type == DistributedType.XLA
    n_local = spmd.replicas_of_this_process() if is_xla else 1  # the host's devices under SPMD
    n_hosts, host = spmd.host_count(), spmd.host_index()  # several on an SPMD pod slice
    is_main = accelerator.is_main_process and host == 0

    resumed = None
    if newest is not None:
        resumed = newest[1]
        cfg.output_dir = str(resume_dir)
        # Day indices are positions in the session list, so a resumed run must reuse the list.
        cfg.dataset.sessions = list(resumed["sessions"])
    start_step = resumed["step"] if resumed is not None else 0
    spmd.check_hosts_start_alike(start_step, output_dir=cfg.output_dir)
    # The replicas rank x n_local onward are this process's; rank is Accelerate's process index or,
    # on an SPMD pod slice (one process per host, which Accelerate counts as one), the host's index.
    train_loader, val_loader, sessions = build_dataloaders(
        cfg, n_steps=cfg.num_training_batches, start_step=start_step, batches_per_step=cfg.gradient_accumulation_steps,
        n_replicas=world * n_hosts * n_local, rank=(rank + host) * n_local, pin_memory=device.type == "cuda",
        n_shards=n_local, n_hosts=n_hosts,
    )
    run_dir = cfg.output_dir
    # Only now that the data checks passed: a typo in dataset_dir leaves no empty run directory.
    _barrier(accelerator)  # every replica has looked at the run directory (claim_run_dir) before it is written
    if is_main:
        storage.makedirs(storage.join(run_dir, checkpoints.CHECKPOINT_DIR))
        save_config(cfg, storage.join(run_dir, "config.yaml"))
    _barrier(accelerator)

    model = _build_replica_model(cfg, n_days=len(sessions), sessions=sessions, device=device, rank=rank, broadcast=is_xla and world > 1)
    if device.type == "cpu" and world == 1:
        rnn_model.use_sparse_day_gradients(model)  # no 47 MB dense day-layer gradient per step
    optimizer = build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    # The scheduler stays outside accelerator.prepare: Accelerate would step it once per process.
    scheduler = build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = _Run(
        cfg=cfg, accelerator=accelerator, run_dir=run_dir, sessions=sessions, model=model,
        unwrapped=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
        # Seeded generator for the augmentations; XLA has no device generators, it uses the global RNG.
        generator=None if is_xla else torch.Generator(device=device).manual_seed(cfg.seed + rank),
        train_steps=iter(spmd.device_loader(train_loader, device, shard_rows=n_hosts * n_local > 1)),
        val_batches=spmd.device_loader(val_loader, device), n_shards=n_hosts * n_local, is_main=is_main,
        log=_RunLog(run_dir, enabled=is_main, accelerator=accelerator, config=config_to_dict(cfg)),
        start_step=start_step, ownership=ownership, stop_group=_stop_group(accelerator, n_hosts=n_hosts),
    )
    n_skipped = 0
    if resumed is not None:
        _resume(run, resumed)
        n_skipped = resumed.get("n_skipped_steps", 0)
    if n_local > 1 and cfg.shard_optimizer_state:  # after loading: a loaded state arrives replicated
        if n_hosts == 1:
            saved = spmd.shard_optimizer_state(optimizer)
            run.log.line(f"AdamW moments split over {n_local} devices: {saved / 1e9:.3g} GB less on each")
        else:  # split over the pod, the main host would hold only its shards of the state it writes
            run.log.line(f"AdamW moments replicated: {n_hosts} hosts")
    run.step_counter = torch.tensor(start_step, dtype=torch.int64, device=device)
    run.n_skipped = torch.tensor(n_skipped, dtype=torch.int64, device=device)
    if is_xla:
        import torch_xla

        torch_xla.sync()  # materialise the placed weights in a setup graph of their own
    if resumed is not None:
        # Last: every sync advances XLA's seed, and an uninterrupted run has no sync between the
        # saved step and the next one.
        _restore_rng(run, resumed)
    return run


def _resume(run: _Run, checkpoint: Mapping[str, Any]) -> None:
    """Continue from a run's last checkpoint: weights, optimizer, schedule, best metrics (the random
    states come last, _restore_rng)."""
    checkpoints.restore_checkpoint(checkpoint, model=run.unwrapped, optimizer=run.optimizer, scheduler=run.scheduler)
    run.best_val_per, run.best_val_loss = checkpoint["best_val_per"], checkpoint["best_val_loss"]
    run.n_bad_vals = checkpoint.get("n_bad_vals", 0)
    run.last_val = (checkpoint["val_per"], checkpoint["val_loss"])
    run.log.line(f"resumed {run.run_dir} at step {run.start_step}")


def _restore_rng(run: _Run, checkpoint: Mapping[str, Any]) -> None:
    """This replica's random states from the checkpoint; a replica without its own (another replica
    count, or an older checkpoint with the main process's only) is seeded from (seed, step, rank)."""
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    saved = checkpoints.replica_rng_states(checkpoint)
    states = saved[rank] if len(saved) == world or (rank == 0 and len(saved) == 1) else None
    if states is not None:
        checkpoints.set_rng_states(states, generator=run.generator)
    else:
        set_seed(run.cfg.seed + 1000 * checkpoint["step"] + rank, device_specific=False)
        if run.generator is not None:
            run.generator.manual_seed(run.cfg.seed + 1000 * checkpoint["step"] + rank)
    if len(saved) != world:
        run.log.line(f"the checkpoint holds random states of {len(saved)} replica(s) for {world}: "
                     "replicas without theirs draw from a seed, so this run will not repeat an uninterrupted one")


def _save_state(run: _Run, path: str, *, step: int, with_optimizer: bool = True) -> None:
    """Write the run's state at `step` to `path` from the main process; every replica waits."""
    rng_states = checkpoints.gather_rng_states(accelerator=run.accelerator, generator=run.generator)
    if run.is_main:
        checkpoints.save_checkpoint(
            path, model=run.unwrapped, optimizer=run.optimizer, scheduler=run.scheduler, cfg=run.cfg, step=step,
            best_val_per=run.best_val_per, best_val_loss=run.best_val_loss, val_per=run.last_val[0],
            val_loss=run.last_val[1], sessions=run.sessions, generator=run.generator,
            n_skipped_steps=int(run.n_skipped.cpu()), n_bad_vals=run.n_bad_vals, with_optimizer=with_optimizer,
            rng_states=rng_states, ownership=run.ownership,
        )
    _barrier(run.accelerator)
    if run.is_xla:
        import torch_xla.core.xla_model as xm

        # With several replicas the barrier synced the graph, and each sync advances XLA's seed. Put
        # back the seed the checkpoint holds, so a run goes on drawing as one resumed from it does.
        xm.set_rng_state(rng_states[run.accelerator.process_index]["xla"])


def _save_periodic(run: _Run, *, step: int) -> None:
    """A checkpoint every checkpoint_every_steps, whatever the validation cadence; the oldest
    periodic ones of this run beyond keep_checkpoints are removed once the new one is complete."""
    _save_state(run, checkpoints.periodic_checkpoint_path(run.run_dir, step=step, ownership=run.ownership), step=step)
    if run.is_main:
        checkpoints.prune_periodic_checkpoints(run.run_dir, ownership=run.ownership, keep=run.cfg.keep_checkpoints)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a step; its state was saved at `step`."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    def __reduce__(self) -> tuple[type, tuple[int, int]]:  # re-raised in the launcher from a replica
        return TrainingInterrupted, (self.signum, self.step)


class _StopSignals:
    """Within the block, SIGTERM and SIGINT only set `signum`; the loop stops between steps, when
    `agreed` says so.

    A second signal while the state is being saved changes nothing: the save goes on, and it is
    atomic anyway, so the previous checkpoint stays whole until the new one replaces it.

    With several processes (gloo, NCCL, XLA processes, the hosts of an SPMD pod slice) every one
    must stop after the same step. Each step `agreed` starts an asynchronous max-all-reduce of this
    process's signal number over a gloo group, on the host's CPU, and answers from the one started
    a step earlier, finished since: the vote never waits on a device or on the others' current step.
    All processes read the same answers at the same steps, so they stop together, one step after
    the first signal (at once on the last step, `final`).
    """

    def __init__(self, group: Any = None) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._group = group
        self._votes: list[tuple[Any, Tensor]] = []  # (pending all-reduce, its tensor), oldest first

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, *, final: bool = False) -> int | None:
        """The signal every process stops on after this step, or None."""
        if self._group is None:
            return self.signum
        vote = torch.tensor([self.signum or 0], dtype=torch.int64)
        work = torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True)
        self._votes.append((work, vote))
        answer = 0
        while len(self._votes) > (0 if final else 1):
            work, vote = self._votes.pop(0)
            work.wait()
            answer = max(answer, int(vote[0]))
        return answer or None


def _stop_group(accelerator: Accelerator, *, n_hosts: int) -> Any:
    """The gloo group `_StopSignals.agreed` votes over: None for one process; the hosts' group on an
    SPMD pod slice (spmd.enable); a gloo group of its own beside gloo or NCCL data parallelism; for
    XLA processes a gloo group over torch_xla's xla:// rendezvous."""
    if accelerator.num_processes == 1 and n_hosts == 1:
        return None
    if not torch.distributed.is_initialized():  # XLA processes: Accelerate starts no process group
        import torch_xla.distributed.xla_backend  # noqa: F401  registers the xla:// rendezvous

        torch.distributed.init_process_group("gloo", init_method="xla://")
    return torch.distributed.new_group(backend="gloo")


def _log_train(run: _Run, *, step: int, terms: Mapping[str, Tensor], ms: float) -> None:
    """The training log line and metrics record; the only host reads of training metrics."""
    n_steps = run.cfg.num_training_batches
    values = {name: float(value.cpu()) for name, value in terms.items()}
    skipped = int(run.n_skipped.cpu())
    lr = run.scheduler.get_last_lr()[-1]
    run.log.line(_format_train_line(step=step, n_steps=n_steps, values=values, lr=lr, n_skipped=skipped, ms=ms))
    run.log.record({"step": step, **{f"train/{k}": v for k, v in values.items()},
                    "train/lr": lr, "train/n_skipped": skipped, "train/ms_per_step": ms})


def _validate_and_save(run: _Run, *, step: int) -> bool:
    """Validate, log, write the best and last checkpoints; True when early stopping says stop."""
    cfg, n_steps = run.cfg, run.cfg.num_training_batches
    start = time.perf_counter()
    result = evaluate(run.unwrapped, run.val_batches, cfg=cfg, n_days=len(run.sessions),
                      use_dense_ctc=run.is_xla, accelerator=run.accelerator)
    val_per, val_loss = result["per"], result["loss"]
    improved = (val_per, val_loss) < (run.best_val_per, run.best_val_loss)  # PER first, ties by loss
    if improved:
        run.best_val_per, run.best_val_loss, run.n_bad_vals = val_per, val_loss, 0
    else:
        run.n_bad_vals += 1
    run.last_val = (val_per, val_loss)
    run.log.line(f"val  {step:>{len(str(n_steps))}}/{n_steps} | loss {val_loss:.3f} | per {val_per:.4f} | "
                 f"best {run.best_val_per:.4f} | {result['n_trials']} trials | "
                 f"{1000 * (time.perf_counter() - start):.0f} ms")
    run.log.record({"step": step, "val/loss": val_loss, "val/per": val_per,
                    "val/per_by_day": {str(d): p for d, p in result["per_by_day"].items()}})
    if improved and cfg.save_best_checkpoint:
        _save_state(run, storage.join(run.run_dir, checkpoints.CHECKPOINT_DIR, checkpoints.BEST_CHECKPOINT), step=step, with_optimizer=False)
    if cfg.save_final_model:
        _save_state(run, storage.join(run.run_dir, checkpoints.CHECKPOINT_DIR, checkpoints.LAST_CHECKPOINT), step=step)
    if cfg.early_stopping and run.n_bad_vals >= cfg.early_stopping_val_steps:
        run.log.line(f"early stopping at step {step}: no better val PER in {run.n_bad_vals} validations")
        return True
    return False


def train(cfg: Config, resume_dir: str | None = None) -> dict[str, Any]:
    """Train per `cfg`; with `resume_dir`, continue that run from its newest checkpoint. With
    `resume_dir="auto"` (or `cfg.resume: auto`) continue `cfg.output_dir` when it holds a
    checkpoint and start fresh otherwise, so a restart script can rerun one command.

    Returns {'step', 'best_val_per', 'best_val_loss', 'n_skipped_steps', 'run_dir', 'model'}
    (the unwrapped model). SIGTERM or SIGINT end the run after the step in flight with its state
    in checkpoint/last_checkpoint.pt and raise TrainingInterrupted.
    """
    auto = resume_dir == "auto" or (resume_dir is None and cfg.resume == "auto")
    run = _set_up(cfg, cfg.output_dir if auto else resume_dir, fresh_without_checkpoint=auto)
    accelerator, n_steps = run.accelerator, cfg.num_training_batches
    run.log.line(f"device {accelerator.device} ({accelerator.distributed_type}, {accelerator.num_processes * spmd.host_count()} "
                 f"process(es) x {run.n_shards // spmd.host_count()} device(s)), {len(run.sessions)} sessions")
    run.log.line(rnn_model.format_parameter_summary(rnn_model.parameter_summary(run.unwrapped)))
    progress = tqdm(total=n_steps, initial=run.start_step, disable=not run.is_main,
                    dynamic_ncols=True, desc="train")
    window_start, window_steps = time.perf_counter(), 0
    step = run.start_step
    try:
        with _StopSignals(run.stop_group) as signals:
            for step in range(run.start_step + 1, n_steps + 1):
                micro_batches = next(run.train_steps)
                if not run.is_xla:
                    micro_batches = [_to_device(b, accelerator.device) for b in micro_batches]
                terms = train_step(
                    accelerator=accelerator, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                    micro_batches=micro_batches, cfg=cfg, step_counter=run.step_counter, n_skipped=run.n_skipped,
                    generator=run.generator, use_dense_ctc=run.is_xla,  # torch's CTC falls back to aten on XLA
                    n_shards=run.n_shards,
                )
                progress.update(1)
                window_steps += 1
                if step % cfg.batches_per_train_log == 0 or step == n_steps:
                    _log_train(run, step=step, terms=terms,
                               ms=1000.0 * (time.perf_counter() - window_start) / window_steps)
                    window_start, window_steps = time.perf_counter(), 0
                if step % cfg.batches_per_val_step == 0 or step == n_steps:
                    stop = _validate_and_save(run, step=step)
                    window_start = time.perf_counter()  # validation time is not training time
                    if stop:
                        break
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < n_steps:
                    _save_periodic(run, step=step)
                signum = signals.agreed(final=step == n_steps)
                if signum is not None:
                    _save_state(run, storage.join(run.run_dir, checkpoints.CHECKPOINT_DIR, checkpoints.LAST_CHECKPOINT), step=step)
                    run.log.line(f"{signal.Signals(signum).name}: saved {checkpoints.CHECKPOINT_DIR}/{checkpoints.LAST_CHECKPOINT} "
                                 f"at step {step}, stopping")
                    raise TrainingInterrupted(signum, step)
    finally:
        progress.close()
        run.log.close()
    if run.is_main and storage.isfile(storage.join(run.run_dir, "metrics.jsonl")):
        _plot_curves(run.run_dir)
    return {
        "step": step,
        "best_val_per": run.best_val_per,
        "best_val_loss": run.best_val_loss,
        "n_skipped_steps": int(run.n_skipped.cpu()),
        "run_dir": run.run_dir,
        "model": run.unwrapped,
    }
