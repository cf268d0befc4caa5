"""Does the adversarial denoiser help, and does reading the whole trial? Baseline vs
TripleGRUDecoder vs the triple without its adversarial terms, each causal or bidirectional,
trained on the same data at an equal number of steps and at an equal wall-clock budget.

    python benchmarks/ablation.py --data_dir data/synthetic [--config rnn_args_demo.yaml] [--steps 400]
        [--seconds S] [--variants baseline triple triple_no_adv baseline_bidirectional triple_bidirectional]
        [--steps_only] [--out RUN_DIR] [--set key=value ...]

Variants (overrides on top of --config and --set):
  baseline       model.type=baseline: the upstream GRUDecoder (model.n_layers GRU layers)
  triple         model.type=triple, the adversarial settings of the config
  triple_no_adv  model.type=triple, adversarial.enabled=false: no CTC(noisy) term, no noise L2
                 term and a gradient reversal of 0, so the noise model learns only through the
                 clean decoder's input (x_processed - noise). The NoisySpeechModel still runs its
                 forward pass (its time is in the step time) and counts in n_parameters; its
                 weights get no gradient.
  baseline_bidirectional, triple_bidirectional
                 the same with model.bidirectional=true: bidirectional speech GRUs (offline
                 decoding), the triple's noise model still causal.

Budgets:
  steps  every variant trains --steps optimizer steps.
  time   every variant gets the training time of the baseline's --steps steps (or --seconds):
         its step count is that budget over its own step time. A step time here is the fastest
         10-step window of the variant's steps run (best-of, as in train_speed.py): on a shared
         machine the mean follows the load of other processes (triple and triple_no_adv, of
         equal cost, differed by 16% on means and 6% on best windows in one run). The budget
         is the baseline's steps x its best step time. A variant whose count equals its steps
         run reuses that run; train_seconds reports what each run actually took.
--steps_only runs the steps budget alone (where step times on a loaded machine would not measure
the models). In both, every step-valued schedule key (lr and day-lr warm-up and decay, adversarial warm-up) is
scaled by the run's steps / the config's num_training_batches, so each run goes through the whole
schedule; with the demo config and --steps 400 the steps runs are the demo's own training.

Every run validates once, at its last step (greedy PER on the val split, the trainer's
validation), and keeps no checkpoint. One JSON line per run (variant, budget, steps,
train_seconds, ms_per_step (mean), ms_per_step_best, n_parameters, val_per, val_loss, data,
torch_threads), then a
markdown table. Runs on CPU (USE_TORCH_XLA=0); set OMP_NUM_THREADS to fix the thread count.
For artifact data, write a second data set first, e.g.
`python make_synthetic_data.py --out data/synthetic_artifacts --burst_rate 0.5 --dead_rate 0.02
--saturated_rate 0.01 --baseline_shift_std 0.5`, and pass it as --data_dir.
"""

import os
import sys

os.environ.setdefault("USE_TORCH_XLA", "0")  # before accelerate is imported: CPU, not XLA
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import rnn_model  # noqa: E402
import rnn_trainer  # noqa: E402
from config import load_config  # noqa: E402

VARIANTS = {
    "baseline": ["model.type=baseline"],
    "triple": ["model.type=triple"],
    "triple_no_adv": ["model.type=triple", "adversarial.enabled=false"],
    "baseline_bidirectional": ["model.type=baseline", "model.bidirectional=true"],
    "triple_bidirectional": ["model.type=triple", "model.bidirectional=true"],
}
# Schedule keys counted in steps: scaled with the step count of a time-budget run.
STEP_KEYS = (
    "optimizer.lr_warmup_steps", "optimizer.lr_decay_steps", "optimizer.lr_warmup_steps_day",
    "optimizer.lr_decay_steps_day", "adversarial.warmup_steps",
)


def schedule_overrides(config_path: str, overrides: list[str], *, n_steps: int) -> list[str]:
    """The config's STEP_KEYS scaled to a run of n_steps: by n_steps / num_training_batches, rounded."""
    cfg = load_config(config_path, overrides)
    scaled = []
    for key in STEP_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        scaled.append(f"{key}={round(value * n_steps / cfg.num_training_batches)}")
    return scaled


def train_variant(
    *, config_path: str, variant: str, data_dir: str, run_dir: Path, n_steps: int, overrides: list[str]
) -> dict[str, Any]:
    """Train one variant for n_steps; its val PER at the last step, timings and size."""
    cfg = load_config(config_path, [
        *overrides, *VARIANTS[variant], f"dataset.dataset_dir={data_dir}", f"output_dir={run_dir}",
        f"num_training_batches={n_steps}", f"batches_per_train_log={min(10, n_steps)}",
        f"batches_per_val_step={n_steps}", "save_best_checkpoint=false", "save_final_model=false",
        "early_stopping=false",
    ])
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    result = rnn_trainer.train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Each training record holds the mean step time of the steps since the previous one.
    train_ms, previous, window_ms = 0.0, 0, []
    for record in records:
        if "train/ms_per_step" in record:
            train_ms += record["train/ms_per_step"] * (record["step"] - previous)
            previous = record["step"]
            window_ms.append(record["train/ms_per_step"])
    last_val = [r for r in records if "val/per" in r][-1]
    return {
        "variant": variant,
        "steps": result["step"],
        "train_seconds": train_ms / 1000.0,
        "ms_per_step": train_ms / result["step"],
        "ms_per_step_best": min(window_ms),
        "n_parameters": rnn_model.parameter_summary(result["model"])["total"],
        "val_per": last_val["val/per"],
        "val_loss": last_val["val/loss"],
    }


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    digits = {"train_seconds": 3, "ms_per_step": 2, "ms_per_step_best": 2, "val_per": 4, "val_loss": 3}
    return {key: round(value, digits[key]) if key in digits else value for key, value in row.items()}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | budget | steps | train s | ms/step (mean, best) | parameters | val PER |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['budget']} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['ms_per_step']:.0f}, {r['ms_per_step_best']:.0f} | {r['n_parameters'] / 1e6:.1f}M | "
                     f"{100 * r['val_per']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="dataset directory (make_synthetic_data.py layout)")
    parser.add_argument("--config", default="rnn_args_demo.yaml")
    parser.add_argument("--steps", type=int, default=400, help="steps of the equal-steps budget")
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall-clock budget in training seconds (default: the baseline's --steps steps)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps_only", action="store_true", help="run the equal-steps budget alone")
    parser.add_argument("--out", default=None, help="directory for the run directories (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    common = {"data": args.data_dir, "torch_threads": torch.get_num_threads()}
    rows: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(_rounded(row))
        print(json.dumps({**rows[-1], **common}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        schedule = schedule_overrides(args.config, args.set, n_steps=args.steps)
        by_steps = {}
        for variant in args.variants:
            result = train_variant(config_path=args.config, variant=variant, data_dir=args.data_dir,
                                   run_dir=out / f"{variant}_steps", n_steps=args.steps,
                                   overrides=[*args.set, *schedule])
            by_steps[variant] = result
            report({**result, "budget": f"{args.steps} steps"})

        if args.seconds is not None:
            budget = args.seconds
        elif "baseline" in by_steps:
            budget = by_steps["baseline"]["steps"] * by_steps["baseline"]["ms_per_step_best"] / 1000.0
        elif not args.steps_only:
            parser.error("the time budget needs --seconds or the baseline variant")
        for variant in [] if args.steps_only else args.variants:
            n_steps = max(1, round(1000.0 * budget / by_steps[variant]["ms_per_step_best"]))
            if n_steps == by_steps[variant]["steps"]:
                result = by_steps[variant]
            else:
                schedule = schedule_overrides(args.config, args.set, n_steps=n_steps)
                result = train_variant(config_path=args.config, variant=variant, data_dir=args.data_dir,
                                       run_dir=out / f"{variant}_time", n_steps=n_steps,
                                       overrides=[*args.set, *schedule])
            report({**result, "budget": f"{budget:.0f} s"})
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
