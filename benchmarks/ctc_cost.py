"""Cost of the dense CTC (ctc_loss.py) at upstream's label padding (500) and at a data-derived one.

The dense CTC runs its alpha recursion over all 2S+1 extended states of the padded labels, so its
time and memory grow with the padding S, not with the real sentence lengths. This measures one
forward+backward on the CPU, batch 32, T' output frames, 41 classes, at each padding, the two
alternated repeat by repeat so both see the same machine load; it prints one JSON line.

Memory is counted from tensor sizes: the bytes of every tensor autograd keeps for the backward
(distinct storages, through saved_tensors_hooks), which is what a step holds between forward and
backward. REFERENCE.md gives real sentences ~29 phonemes on average but not the longest; the
default derived padding of 96 assumes a longest label of 81-96 phonemes (the trainer derives the
real value from the data: dataset.derived_label_padding).

Run: `.venv/bin/python benchmarks/ctc_cost.py [--paddings 500 96] [--repeats 5]`
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctc_loss import ctc_loss_dense  # noqa: E402


def make_batch(*, n_batch: int, n_frames: int, n_classes: int, padding: int, max_label: int, seed: int) -> tuple:
    """Logits (B, T', C) and labels padded to `padding`; real label lengths <= max_label <= padding."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_batch, n_frames, n_classes, generator=gen)
    targets = torch.zeros(n_batch, padding, dtype=torch.long)
    target_lengths = torch.randint(max_label // 3, max_label + 1, (n_batch,), generator=gen)
    for row, length in enumerate(target_lengths.tolist()):
        targets[row, :length] = torch.randint(1, n_classes, (length,), generator=gen)
    input_lengths = torch.randint(n_frames // 2, n_frames + 1, (n_batch,), generator=gen)
    input_lengths = torch.maximum(input_lengths, 2 * target_lengths)  # feasible whatever the repeats
    return logits, targets, input_lengths.clamp(max=n_frames), target_lengths


def saved_for_backward_bytes(logits: torch.Tensor, *labels: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during one dense-CTC forward."""
    # Holding every saved storage keeps its address from being reused, so data_ptr identifies it.
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ctc_loss_dense(logits.detach().requires_grad_(True).log_softmax(-1), *labels)
    return sum(storage.nbytes() for storage in storages.values())


def time_forward_backward(logits: torch.Tensor, *labels: torch.Tensor) -> float:
    """Seconds for one forward+backward of the summed per-sample loss."""
    x = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    ctc_loss_dense(x.log_softmax(-1), *labels).sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paddings", type=int, nargs="+", default=[500, 96], help="label paddings S to compare")
    parser.add_argument("--max_label", type=int, default=90, help="longest real label in the batch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=300, help="output frames T' after patching")
    parser.add_argument("--classes", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the comparison steady

    batches = {
        s: make_batch(n_batch=args.batch, n_frames=args.frames, n_classes=args.classes, padding=s,
                      max_label=min(args.max_label, s), seed=0)
        for s in args.paddings
    }
    # Same real labels at every padding (the first max_label columns), so the losses must agree.
    losses = {s: ctc_loss_dense(b[0].log_softmax(-1), *b[1:]) for s, b in batches.items()}
    reference = losses[args.paddings[0]]
    max_loss_diff = max(float((loss - reference).abs().max()) for loss in losses.values())

    times: dict[int, list[float]] = {s: [] for s in args.paddings}
    for s in args.paddings:
        time_forward_backward(*batches[s])  # warm-up
    for _ in range(args.repeats):
        for s in args.paddings:
            times[s].append(time_forward_backward(*batches[s]))
    report = {
        "batch": args.batch, "frames": args.frames, "classes": args.classes, "max_label": args.max_label,
        "threads": 1, "repeats": args.repeats, "max_loss_diff_between_paddings": max_loss_diff,
        "paddings": {
            str(s): {
                "states": 2 * s + 1,
                "fwd_bwd_ms_median": round(1000 * statistics.median(times[s]), 1),
                "saved_for_backward_mb": round(saved_for_backward_bytes(*batches[s]) / 2**20, 1),
            }
            for s in args.paddings
        },
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
