"""What a checkpoint costs: size and seconds to write the shipped triple's full training state
(weights and both AdamW moments) atomically to this machine's disk or to a URL, the work a
preemption can lose with `checkpoint_every_steps`, and (with --demo_steps) the extra step time of
periodic checkpoints at the demo config, each printed as one JSON line.

The state is built with the shipped model's parameter shapes (rnn_args.yaml) filled with random
values, then written by the trainer's own atomic write (storage.atomic_write: temp file, fsync,
rename; at a URL a temporary object, then a move). The lost-work
bound is checkpoint_every_steps x seconds per step, for step times given on the command line
(defaults: tpu_cost.py's compute-bound lower limits per run / 120,000 steps, and five times
that, the efficiency upstream's baseline reaches on an RTX 4090; see TPU_MODEL_SUMMARY.md).

The demo measurement trains the demo config for --demo_steps steps without periodic checkpoints
and with them every --demo_every steps, alternating the two --repeats times in one process
(side by side, so the machine's load falls on both), and prints the mean training ms per step of
each (the trainer's own windows, which hold the saves and not the validations), their ratio, and
the seconds each periodic save took.

Run: `.venv/bin/python benchmarks/checkpoint_cost.py --out_dir /tmp/ckpt`
     `.venv/bin/python benchmarks/checkpoint_cost.py --skip_full --demo_steps 200 --data_dir data/synthetic`
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("USE_TORCH_XLA", "0")  # the trainer's import of accelerate would pick XLA

import fsspec  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import rnn_trainer  # noqa: E402
import storage  # noqa: E402
from config import load_config  # noqa: E402
from rnn_model import build_model  # noqa: E402

# Hours per run at the compute-bound lower limit, from benchmarks/tpu_cost.py (the shipped triple).
LOWER_LIMIT_HOURS = {"v4-8": 15.7, "v5e-8": 10.9, "v5p-8": 9.4, "v6e-8": 2.3}


def full_state_cost(config_path: str, out_dir: str, efficiency: float) -> dict:
    """Seconds and GB to write the shipped triple's training state, and the lost-work bounds."""
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = build_model(cfg.model, n_days=len(cfg.dataset.sessions or []) or 45)
    generator = torch.Generator().manual_seed(0)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    state = {
        "model_state_dict": {n: torch.randn(s, generator=generator) for n, s in shapes.items()},
        "optimizer_state_dict": {"state": {i: {"exp_avg": torch.randn(s, generator=generator),
                                               "exp_avg_sq": torch.rand(s, generator=generator)}
                                           for i, s in enumerate(shapes.values())}},
    }
    n_params = sum(s.numel() for s in shapes.values())
    path = storage.join(out_dir, "last_checkpoint.pt")
    start = time.perf_counter()
    storage.atomic_write(path, lambda handle: torch.save(state, handle))
    seconds = time.perf_counter() - start
    fs, inner = fsspec.core.url_to_fs(path)
    size = fs.size(inner)
    fs.rm(inner)
    every = cfg.checkpoint_every_steps
    lost = {tpu: {"lower_limit_min": every * hours * 3600 / cfg.num_training_batches / 60,
                  "at_efficiency_min": every * hours * 3600 / cfg.num_training_batches / 60 / efficiency}
            for tpu, hours in LOWER_LIMIT_HOURS.items()}
    return {"n_params": n_params, "checkpoint_gb": size / 1e9, "save_s": seconds,
            "save_gb_per_s": size / 1e9 / seconds, "checkpoint_every_steps": every,
            "efficiency": efficiency, "lost_work_minutes": lost}


def _mean_ms_per_step(run_dir: str) -> float:
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return sum(r["train/ms_per_step"] for r in records if "train/ms_per_step" in r) / sum(
        1 for r in records if "train/ms_per_step" in r)


def periodic_save_overhead(config_path: str, data_dir: str, n_steps: int, every: int, repeats: int) -> dict:
    """Mean ms per training step of the demo config without and with periodic checkpoints."""
    save_seconds: list[float] = []
    real_save = rnn_trainer._save_periodic

    def timed_save(run, *, step):
        start = time.perf_counter()
        real_save(run, step=step)
        save_seconds.append(time.perf_counter() - start)

    rnn_trainer._save_periodic = timed_save
    ms: dict[int, list[float]] = {0: [], every: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for interval in (0, every):
                run_dir = str(Path(tmp, f"every{interval}_{repeat}"))
                cfg = load_config(config_path, [
                    f"dataset.dataset_dir={data_dir}", f"output_dir={run_dir}", f"num_training_batches={n_steps}",
                    f"checkpoint_every_steps={interval}", f"batches_per_val_step={n_steps}", "log_with=none",
                ])
                rnn_trainer.train(cfg)
                AcceleratorState._reset_state(reset_partial_state=True)
                ms[interval].append(_mean_ms_per_step(run_dir))
    without, with_saves = sum(ms[0]) / repeats, sum(ms[every]) / repeats
    return {"config": config_path, "steps": n_steps, "checkpoint_every_steps": every, "repeats": repeats,
            "ms_per_step_without": without, "ms_per_step_with": with_saves, "ratio": with_saves / without,
            "n_saves": len(save_seconds), "save_s_mean": sum(save_seconds) / max(len(save_seconds), 1),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args.yaml")
    parser.add_argument("--out_dir", default="/tmp/checkpoint_cost", help="a directory or a URL (gs://bucket/dir)")
    parser.add_argument("--efficiency", type=float, default=0.2, help="share of peak a real step reaches")
    parser.add_argument("--skip_full", action="store_true", help="skip the full-size state write")
    parser.add_argument("--demo_steps", type=int, default=0, help="steps per demo run; 0: no demo measurement")
    parser.add_argument("--demo_config", default="rnn_args_demo.yaml")
    parser.add_argument("--demo_every", type=int, default=None, help="default: the demo config's checkpoint_every_steps")
    parser.add_argument("--data_dir", default="data/synthetic")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not args.skip_full:
        print(json.dumps(full_state_cost(args.config, args.out_dir, args.efficiency)), flush=True)
    if args.demo_steps:
        every = args.demo_every or load_config(args.demo_config).checkpoint_every_steps
        print(json.dumps(periodic_save_overhead(args.demo_config, args.data_dir, args.demo_steps, every, args.repeats)))


if __name__ == "__main__":
    main()
