"""Training-loader throughput on the synthetic set: batches per second, printed as one JSON line.

Reads the dataset section of a config (default rnn_args_demo.yaml) at batch 64, builds the
training loader with dataset.build_dataloaders exactly as the trainer does (one item per optimizer
step) and times its items after the first (which opens the files). Generate the data first with `python make_synthetic_data.py --out data/synthetic`.

Run: `.venv/bin/python benchmarks/loader_benchmark.py [--n_batches 40 --num_workers 0 --static_shapes]`
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import load_config  # noqa: E402
from dataset import build_dataloaders  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config_path", default="rnn_args_demo.yaml")
    parser.add_argument("--dataset_dir", default="data/synthetic")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--n_batches", type=int, default=40, help="timed batches (after one warm-up batch)")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--static_shapes", action="store_true", help="pad to the config's time buckets")
    args = parser.parse_args()
    overrides = [
        f"dataset.dataset_dir={args.dataset_dir}",
        f"dataset.batch_size={args.batch_size}",
        f"dataset.num_dataloader_workers={args.num_workers}",
        f"dataset.static_shapes={str(args.static_shapes).lower()}",
    ]
    cfg = load_config(args.config_path, overrides)
    start = time.perf_counter()
    # The loader training iterates: one item per optimizer step, the step's micro-batches.
    accum = cfg.gradient_accumulation_steps
    n_steps = -(-(args.n_batches + 1) // accum)
    train_loader, _, sessions = build_dataloaders(cfg, n_steps=n_steps, batches_per_step=accum)
    index_seconds = time.perf_counter() - start
    steps = iter(train_loader)
    next(steps)  # warm-up: opens the files (and starts the workers)
    start = time.perf_counter()
    n_batches, n_trials = 0, 0
    for micro_batches in steps:
        n_batches += len(micro_batches)
        n_trials += sum(int(batch["row_mask"].sum()) for batch in micro_batches)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "batches_per_s": round(n_batches / seconds, 2),
        "trials_per_s": round(n_trials / seconds, 1),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "static_shapes": args.static_shapes,
        "n_sessions": len(sessions),
        "index_s": round(index_seconds, 2),
    }))


if __name__ == "__main__":
    main()
