"""What a checkpoint costs: size and seconds to write the shipped triple's full training state
(weights and both AdamW moments) atomically to this machine's disk, and the work a preemption can
lose with `checkpoint_every_steps`, printed as one JSON line.

The state is built with the shipped model's parameter shapes (rnn_args.yaml) filled with random
values, then written by the trainer's own atomic save (temp file, fsync, rename). The lost-work
bound is checkpoint_every_steps x seconds per step, for step times given on the command line
(defaults: tpu_cost.py's compute-bound lower limits per run / 120,000 steps, and five times
that, the efficiency upstream's baseline reaches on an RTX 4090; see TPU_MODEL_SUMMARY.md).

Run: `.venv/bin/python benchmarks/checkpoint_cost.py --out_dir /tmp/ckpt`
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("USE_TORCH_XLA", "0")  # the trainer's import of accelerate would pick XLA

from config import load_config  # noqa: E402
from rnn_model import build_model  # noqa: E402
from rnn_trainer import _atomic_save  # noqa: E402

# Hours per run at the compute-bound lower limit, from benchmarks/tpu_cost.py (the shipped triple).
LOWER_LIMIT_HOURS = {"v4-8": 15.7, "v5e-8": 10.9, "v5p-8": 9.4, "v6e-8": 2.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args.yaml")
    parser.add_argument("--out_dir", default="/tmp/checkpoint_cost")
    parser.add_argument("--efficiency", type=float, default=0.2, help="share of peak a real step reaches")
    args = parser.parse_args()
    cfg = load_config(args.config)
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
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _atomic_save(state, out / "last_checkpoint.pt")
    seconds = time.perf_counter() - start
    size = (out / "last_checkpoint.pt").stat().st_size
    shutil.rmtree(out)
    every = cfg.checkpoint_every_steps
    lost = {tpu: {"lower_limit_min": every * hours * 3600 / cfg.num_training_batches / 60,
                  "at_efficiency_min": every * hours * 3600 / cfg.num_training_batches / 60 / args.efficiency}
            for tpu, hours in LOWER_LIMIT_HOURS.items()}
    print(json.dumps({"n_params": n_params, "checkpoint_gb": size / 1e9, "save_s": seconds,
                      "save_gb_per_s": size / 1e9 / seconds, "checkpoint_every_steps": every,
                      "efficiency": args.efficiency, "lost_work_minutes": lost}))


if __name__ == "__main__":
    main()
