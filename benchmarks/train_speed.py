"""Training speed of the baseline GRUDecoder vs the TripleGRUDecoder on the demo config, on CPU.

    python benchmarks/train_speed.py [--config rnn_args_demo.yaml] [--steps 6] [--rounds 2] [--bidirectional]
        [--set key=value ...]

Writes a small synthetic dataset (make_synthetic_data.generate_dataset) to a temp dir and runs
rnn_trainer.train for --steps steps per model type (data loading and augmentation included,
validation excluded), alternating the two models for --rounds rounds so that load from other
processes hits both alike. Prints ONE JSON line: steps/s of each from its fastest step after the
first (timeit's best-of, the least disturbed by a shared machine), the median-based steps/s,
and the triple/baseline time ratio. With --bidirectional the bidirectional form of each model
(model.bidirectional=true) joins the alternation, and the line adds its steps/s and its time over
the causal form's.
"""

import os
import sys

os.environ.setdefault("USE_TORCH_XLA", "0")  # before accelerate is imported: CPU, not XLA
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import rnn_trainer  # noqa: E402
from config import load_config  # noqa: E402
from make_synthetic_data import generate_dataset  # noqa: E402

MODEL_TYPES = ("baseline", "triple")


def _step_ms(
    config_path: str, *, model: str, data_dir: Path, run_dir: Path, n_steps: int, overrides: list[str]
) -> list[float]:
    """Wall-clock ms of each training step after the first (which pays for one-off set-up)."""
    model_type, _, direction = model.partition("_")
    cfg = load_config(config_path, [
        f"dataset.dataset_dir={data_dir}", f"output_dir={run_dir}", f"model.type={model_type}",
        f"model.bidirectional={direction == 'bidirectional'}",
        f"num_training_batches={n_steps}", "batches_per_train_log=1", f"batches_per_val_step={n_steps}",
        "save_best_checkpoint=false", "save_final_model=false", *overrides,
    ])
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    rnn_trainer.train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/ms_per_step"] for r in records if "train/ms_per_step" in r][1:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args_demo.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bidirectional", action="store_true", help="also time each model bidirectional")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    models = [*MODEL_TYPES, *(f"{m}_bidirectional" for m in MODEL_TYPES if args.bidirectional)]
    step_ms: dict[str, list[float]] = {model: [] for model in models}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        generate_dataset(str(data_dir), n_sessions=4, n_train_trials=32, n_val_trials=4, n_test_trials=1, seed=0)
        for round_index in range(args.rounds):
            for model in models:
                step_ms[model] += _step_ms(
                    args.config, model=model, data_dir=data_dir,
                    run_dir=Path(tmp) / f"{model}_{round_index}", n_steps=max(2, args.steps), overrides=args.set,
                )
    best = {m: 1000.0 / min(ms) for m, ms in step_ms.items()}
    median = {m: 1000.0 / statistics.median(ms) for m, ms in step_ms.items()}
    report = {
        "config": args.config,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "steps_timed_per_model": len(step_ms["baseline"]),
        "baseline_steps_per_second": round(best["baseline"], 3),
        "triple_steps_per_second": round(best["triple"], 3),
        "baseline_steps_per_second_median": round(median["baseline"], 3),
        "triple_steps_per_second_median": round(median["triple"], 3),
        "triple_over_baseline_time": round(best["baseline"] / best["triple"], 2),
    }
    for model_type in MODEL_TYPES if args.bidirectional else ():
        bidirectional = f"{model_type}_bidirectional"
        report[f"{bidirectional}_steps_per_second"] = round(best[bidirectional], 3)
        report[f"{bidirectional}_steps_per_second_median"] = round(median[bidirectional], 3)
        report[f"{bidirectional}_over_causal_time"] = round(best[model_type] / best[bidirectional], 2)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
