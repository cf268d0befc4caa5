"""Training speed of the baseline GRUDecoder vs the TripleGRUDecoder on the demo config, on CPU.

    python benchmarks/train_speed.py [--config rnn_args_demo.yaml] [--steps 10] [--set key=value ...]

Writes a small synthetic dataset (make_synthetic_data.generate_dataset) to a temp dir, runs
rnn_trainer.train for --steps steps per model type (data loading and augmentation included,
validation excluded) and prints ONE JSON line with steps/s of each, measured over the second
half of the steps (the first half warms up), and their ratio.
"""

import os
import sys

os.environ.setdefault("USE_TORCH_XLA", "0")  # before accelerate is imported: CPU, not XLA
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import rnn_trainer  # noqa: E402
from config import load_config  # noqa: E402
from make_synthetic_data import generate_dataset  # noqa: E402


def _steps_per_second(
    config_path: str, *, model_type: str, data_dir: Path, run_dir: Path, n_steps: int, overrides: list[str]
) -> float:
    half = max(1, n_steps // 2)
    cfg = load_config(config_path, [
        f"dataset.dataset_dir={data_dir}", f"output_dir={run_dir}", f"model.type={model_type}",
        f"num_training_batches={2 * half}", f"batches_per_train_log={half}", f"batches_per_val_step={2 * half}",
        "save_best_checkpoint=false", "save_final_model=false", *overrides,
    ])
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    rnn_trainer.train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_window = [r["train/ms_per_step"] for r in records if "train/ms_per_step" in r][-1]
    return 1000.0 / last_window


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args_demo.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        generate_dataset(str(data_dir), n_sessions=4, n_train_trials=32, n_val_trials=4, n_test_trials=1, seed=0)
        speed = {
            model_type: _steps_per_second(
                args.config, model_type=model_type, data_dir=data_dir, run_dir=Path(tmp) / model_type,
                n_steps=args.steps, overrides=args.set,
            )
            for model_type in ("baseline", "triple")
        }
    report = {
        "config": args.config,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "baseline_steps_per_second": round(speed["baseline"], 3),
        "triple_steps_per_second": round(speed["triple"], 3),
        "triple_over_baseline_time": round(speed["baseline"] / speed["triple"], 2),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
