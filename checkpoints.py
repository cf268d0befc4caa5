"""Checkpoints of a training run: one self-describing dict per file, written atomically (storage.py),
every replica's random states in it, and the choice of the checkpoint a run continues from.

A run directory holds `checkpoint/best_checkpoint.pt` (weights only), `checkpoint/last_checkpoint.pt`
and the periodic `checkpoint/step_XXXXXXXX.pt`. Runs never mix in one directory (claim_run_dir): a
fresh run refuses a directory that holds a run, a resumed one must be the same run (model shape
and seed), and a run prunes only the periodic checkpoints it wrote itself. Used by rnn_trainer.py
(saving, resuming), evaluate_model.py and calibrate_session.py (reading); nothing to run on its own.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
import uuid
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

import rnn_model
import storage
from config import Config, ConfigError, config_to_dict, flat_keys

CHECKPOINT_DIR = "checkpoint"
BEST_CHECKPOINT = "best_checkpoint.pt"
LAST_CHECKPOINT = "last_checkpoint.pt"
PERIODIC_CHECKPOINT = "step_{step:08d}.pt"  # every checkpoint_every_steps, the newest keep_checkpoints kept
RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl")  # besides checkpoint/*.pt
# What makes a checkpoint another run's rather than this one's earlier state: the weights' shapes
# (every model key but these three) and the seed. num_training_batches, schedules, logging and
# the like may change when a run is continued.
_NOT_RUN_IDENTITY = ("model.rnn_dropout", "model.input_dropout", "model.gru_save_dtype")


class RunDirectoryError(ConfigError):
    """An output_dir that holds another run: a fresh run would mix its files with that run's."""


@dataclass
class RunOwnership:
    """The files of a run directory that belong to the run in progress: its id (in every checkpoint
    it writes) and the names of the periodic checkpoints it wrote, oldest first, which travel in
    its checkpoints so that a resumed run still knows them. Only these are ever pruned."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    periodic: list[str] = field(default_factory=list)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "periodic_checkpoints": list(self.periodic)}


def to_cpu(obj: Any) -> Any:
    """Deep copy of nested dicts/lists with every tensor moved to the CPU (XLA tensors included)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _rng_states(generator: torch.Generator | None) -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["augmentation"] = generator.get_state()
    if "torch_xla" in sys.modules:
        import torch_xla.core.xla_model as xm

        states["xla"] = xm.get_rng_state()
    return states


def replica_rng_states(checkpoint: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every replica's random states in a checkpoint, by rank; older checkpoints hold the main
    process's only (one dict rather than a list)."""
    states = checkpoint["rng_states"]
    return [states] if isinstance(states, Mapping) else list(states)


_RNG_PAYLOAD_WORDS = 1 << 14  # int32 words for one replica's pickled random states (about 16 kB of 64)


def gather_rng_states(*, accelerator: Accelerator, generator: torch.Generator | None) -> list[dict[str, Any]]:
    """Every replica's random states, on every replica, by rank: each replica draws its own dropout
    masks and augmentation noise, so an exact resume needs them all. One exchange per checkpoint.

    On XLA the states travel as a fixed-size int32 tensor through one all_gather (one compiled
    graph, no scalar reads), and they do so with one replica too, so the path a TPU pod takes is
    the one tested on the CPU backend. gloo and NCCL use all_gather_object."""
    states = _rng_states(generator=generator)
    if accelerator.distributed_type == DistributedType.XLA:
        import torch_xla.core.xla_model as xm

        payload = pickle.dumps(states)
        n_words = -(-len(payload) // 4)
        if n_words + 1 > _RNG_PAYLOAD_WORDS:
            raise RuntimeError(f"random states of {len(payload)} bytes exceed the {4 * _RNG_PAYLOAD_WORDS}-byte exchange")
        words = np.zeros(_RNG_PAYLOAD_WORDS, dtype=np.int32)
        words[0] = len(payload)
        words[1:1 + n_words] = np.frombuffer(payload.ljust(4 * n_words, b"\0"), dtype=np.int32)
        gathered = xm.all_gather(torch.from_numpy(words).to(accelerator.device)).cpu().numpy()
        rows = gathered.reshape(accelerator.num_processes, _RNG_PAYLOAD_WORDS)
        return [pickle.loads(row[1:].tobytes()[: int(row[0])]) for row in rows]
    if accelerator.num_processes == 1:
        return [states]
    gathered_objects: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered_objects, states)
    return gathered_objects


def set_rng_states(states: Mapping[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "augmentation" in states:
        generator.set_state(states["augmentation"])
    if "xla" in states and "torch_xla" in sys.modules:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(states["xla"])


def save_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    step: int,
    best_val_per: float,
    best_val_loss: float,
    val_per: float,
    val_loss: float,
    sessions: Sequence[str],
    generator: torch.Generator | None = None,
    n_skipped_steps: int = 0,
    n_bad_vals: int = 0,
    with_optimizer: bool = True,
    rng_states: Sequence[Mapping[str, Any]] | None = None,
    ownership: RunOwnership | None = None,
) -> None:
    """Write one self-describing checkpoint dict atomically; `model` must be the unwrapped model.

    Without `with_optimizer` (the best checkpoint) the AdamW moments are left out: evaluation and
    init_from_checkpoint read only the weights, and the moments are twice their size.
    The checkpoint's `rng_states` is a list: every replica's random states by rank (`rng_states`,
    gathered by the caller), or this process's alone. `ownership` adds the run's id and its periodic
    checkpoints (see RunOwnership).
    """
    checkpoint = {
        "model_state_dict": to_cpu(model.state_dict()),
        **({"optimizer_state_dict": to_cpu(optimizer.state_dict())} if with_optimizer else {}),
        "scheduler_state_dict": scheduler.state_dict(),
        "config": config_to_dict(cfg),
        "step": step,
        "best_val_per": best_val_per,
        "best_val_loss": best_val_loss,
        "val_per": val_per,
        "val_loss": val_loss,
        "rng_states": list(rng_states or [_rng_states(generator=generator)]),
        "sessions": list(sessions),
        "n_skipped_steps": n_skipped_steps,
        "n_bad_vals": n_bad_vals,
        **(ownership.checkpoint_fields() if ownership is not None else {}),
    }
    storage.atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def _checkpoint_step(checkpoint: Mapping[str, Any], path: str) -> int:
    step = checkpoint.get("step")
    if not isinstance(step, int):
        raise rnn_model.CheckpointError(f"{path}: the checkpoint names no step")
    return step


def periodic_checkpoints(directory: str) -> list[str]:
    """The periodic checkpoints in a checkpoint directory, oldest first (the step is in the name)."""
    return [storage.join(directory, entry)
            for entry in storage.list_names(directory, PERIODIC_CHECKPOINT.replace("{step:08d}", "*"))]


def periodic_checkpoint_path(run_dir: str, *, step: int, ownership: RunOwnership) -> str:
    """Where the periodic checkpoint of `step` goes; recorded as the run's own before it is written."""
    name = PERIODIC_CHECKPOINT.format(step=step)
    if name not in ownership.periodic:
        ownership.periodic.append(name)
    return storage.join(run_dir, CHECKPOINT_DIR, name)


def prune_periodic_checkpoints(run_dir: str, *, ownership: RunOwnership, keep: int) -> None:
    """Remove the oldest periodic checkpoints of this run beyond the newest `keep`; any other file
    (another run's, one copied in by hand) stays."""
    directory = storage.join(run_dir, CHECKPOINT_DIR)
    own = [path for path in periodic_checkpoints(directory) if storage.name(path) in ownership.periodic]
    for path in own[: max(0, len(own) - keep)]:
        storage.remove(path)
        ownership.periodic.remove(storage.name(path))


def run_files(run_dir: str) -> list[str]:
    """The files of a run that `run_dir` holds: config.yaml, train.log, metrics.jsonl, checkpoint/*.pt."""
    held = [name for name in RUN_FILES if storage.isfile(storage.join(run_dir, name))]
    directory = storage.join(run_dir, CHECKPOINT_DIR)
    return held + [f"{CHECKPOINT_DIR}/{name}" for name in storage.list_names(directory, "*.pt")]


def _check_same_run(cfg: Config, saved: Mapping[str, Any], *, source: str, run_dir: str) -> None:
    """RunDirectoryError naming the keys in which the saved config (a checkpoint's or config.yaml's)
    makes another run than `cfg`; keys that only one of them knows are not compared."""
    ours, theirs = flat_keys(config_to_dict(cfg)), flat_keys(saved)
    keys = [key for key in ours if (key == "seed" or key.startswith("model.")) and key not in _NOT_RUN_IDENTITY]
    differ = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in keys
              if key in theirs and theirs[key] != ours[key]]
    if differ:
        raise RunDirectoryError(
            f"{source}: holds another run ({'; '.join(differ)}): continue that run with its own config "
            f"(--resume {run_dir} without --config_path), or give this one a new output_dir (--set output_dir=NEW_DIR)")


def claim_run_dir(
    cfg: Config, run_dir: str, *, newest: tuple[str, Mapping[str, Any]] | None, restart: bool = False
) -> RunOwnership:
    """Check that this run may write to `run_dir`, and return what it owns there.

    `newest` is the checkpoint the run continues from (newest_checkpoint), None for a fresh start.
    A continued run must be the checkpoint's run (same model shape and seed); it keeps the run's
    id and periodic checkpoints (a checkpoint written before runs named theirs: every periodic
    checkpoint in the directory). A fresh run needs a directory that holds no run: the files of
    another run are never overwritten, appended to or pruned. With `restart` (`--resume auto` that
    found no checkpoint) a run the directory holds may start over if its config.yaml is this run's.
    Raises RunDirectoryError with one line naming the directory and the ways on.
    """
    if newest is not None:
        path, checkpoint = newest
        _check_same_run(cfg, checkpoint.get("config") or {}, source=path, run_dir=run_dir)
        periodic = checkpoint.get("periodic_checkpoints")
        if periodic is None:
            periodic = [storage.name(p) for p in periodic_checkpoints(storage.join(run_dir, CHECKPOINT_DIR))]
        return RunOwnership(run_id=checkpoint.get("run_id") or RunOwnership().run_id, periodic=list(periodic))
    held = run_files(run_dir)
    config_path = storage.join(run_dir, "config.yaml")
    if held and restart and storage.isfile(config_path):
        try:
            saved = yaml.safe_load(storage.read_text(config_path))
        except yaml.YAMLError:
            saved = None
        if not isinstance(saved, Mapping):
            raise RunDirectoryError(f"{config_path}: not a run's config: give this run a new output_dir "
                                    "(--set output_dir=NEW_DIR)")
        _check_same_run(cfg, saved, source=config_path, run_dir=run_dir)
    elif held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise RunDirectoryError(
            f"{run_dir} already holds a run ({shown}): continue it with --resume {run_dir} (or rerun "
            "its command with --resume auto), or give this run a new output_dir (--set output_dir=NEW_DIR)")
    return RunOwnership()


def _read_to_resume(path: str) -> dict[str, Any]:
    """A checkpoint to resume from, memory-mapped. One at a URL is first downloaded to a local
    temporary file (torch.load of a stream would hold the whole file, 8.25 GB for the shipped
    triple, in host memory), mapped from there and the file unlinked: its pages stay mapped."""
    if not storage.is_url(path):
        return rnn_model.read_checkpoint(path)
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, storage.name(path))
        try:
            with storage.open_read(path) as source, open(local, "wb") as target:
                shutil.copyfileobj(source, target, 16 << 20)
            return rnn_model.read_checkpoint(local)
        except rnn_model.CheckpointError as error:
            raise rnn_model.CheckpointError(str(error).replace(local, path)) from None


def newest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint a run continues from, and its contents: the highest step among
    last_checkpoint.pt and the periodic ones (last_checkpoint.pt on a tie), or None when the run
    has none. A periodic checkpoint's step is in its name, so at most two files are read (at a URL
    each read is one download to local disk, _read_to_resume); one process per host reads it. An unreadable candidate (say, truncated by a full disk) stops with a
    CheckpointError naming it rather than falling back silently to an older one or to a fresh start."""
    directory = storage.join(run_dir, CHECKPOINT_DIR)
    newest: tuple[int, str, dict[str, Any]] | None = None
    last_path = storage.join(directory, LAST_CHECKPOINT)
    if storage.isfile(last_path):
        last = _read_to_resume(last_path)
        newest = (_checkpoint_step(last, last_path), last_path, last)
    periodic = periodic_checkpoints(directory)
    if periodic and (newest is None or int(storage.name(periodic[-1]).removeprefix("step_").removesuffix(".pt")) > newest[0]):
        checkpoint = _read_to_resume(periodic[-1])
        newest = (_checkpoint_step(checkpoint, periodic[-1]), periodic[-1], checkpoint)
    return None if newest is None else newest[1:]


def restore_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    restore_rng: bool = False,
    source: str | None = None,
) -> None:
    """Load whichever of model/optimizer/scheduler/RNG states are given from a checkpoint dict."""
    if model is not None:
        rnn_model.load_state_dict_compat(model, checkpoint["model_state_dict"], source=source)
    if optimizer is not None:
        # The wrapped optimizer itself: Accelerate's wrapper on XLA first sends the whole state to
        # the device and drops the result, then torch's load_state_dict sends it again.
        getattr(optimizer, "optimizer", optimizer).load_state_dict(checkpoint["optimizer_state_dict"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    if restore_rng:
        set_rng_states(replica_rng_states(checkpoint)[0], generator=generator)


def load_checkpoint(path: str, **states: Any) -> dict[str, Any]:
    """Read a checkpoint (rnn_model.read_checkpoint: a file or a model directory, on the CPU) and
    restore the states given as keywords (see restore_checkpoint); returns the checkpoint dict."""
    checkpoint = rnn_model.read_checkpoint(path)
    restore_checkpoint(checkpoint, source=rnn_model.checkpoint_file(path), **states)
    return checkpoint
