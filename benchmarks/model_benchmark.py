"""Model size and CPU speed: baseline GRU decoder vs triple-GRU decoder, printed as one JSON line.

Parameter counts come from full-size models built on the meta device (no memory is allocated):
the faithful triple model, the triple model with a lighter noise GRU, and the baseline; in
total, day-specific, and per sub-module (each leaf module: a GRU, a linear layer, one model's
day weights or day biases; a learnable initial state h0 under its parent's name).
Forward+backward time is measured on demo-size models on the CPU, alternating the two models
step by step so both see the same machine load.

Run: `.venv/bin/python benchmarks/model_benchmark.py`
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rnn_model import GRUDecoder, TripleGRUDecoder, decoder_outputs, n_patches, parameter_summary  # noqa: E402

FULL_SIZE = dict(neural_dim=512, n_units=768, n_days=45, n_classes=41, rnn_dropout=0.4, input_dropout=0.2, patch_size=14, patch_stride=4)


def parameters_by_module(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count per leaf module (GRU, Linear, a ParameterList of day layers), in model order;
    a parameter held directly by a module with children (h0) is counted under its own name."""
    counts: dict[str, int] = {}
    for module_name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        for param_name, param in module.named_parameters(recurse=False):
            key = module_name if is_leaf else ".".join(filter(None, (module_name, param_name)))
            counts[key] = counts.get(key, 0) + param.numel()
    return counts


def count_full_size_parameters(lighter_noise_hidden_size: int) -> dict[str, dict]:
    """parameter_summary of each full-size model, built on the meta device."""
    with torch.device("meta"):
        models = {
            "triple": TripleGRUDecoder(**FULL_SIZE),
            f"triple_noise_hidden_{lighter_noise_hidden_size}": TripleGRUDecoder(
                **FULL_SIZE, noise_hidden_size=lighter_noise_hidden_size
            ),
            "baseline": GRUDecoder(**FULL_SIZE, n_layers=5),
        }
    return {
        name: {**parameter_summary(model), "by_module": parameters_by_module(model)} for name, model in models.items()
    }


def time_forward_backward(models: dict[str, torch.nn.Module], x: torch.Tensor, day_idx: torch.Tensor, n_steps: int) -> dict[str, float]:
    """Median milliseconds of forward+backward per model; one warm-up step each, then interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(n_steps + 1):
        for name, model in models.items():
            start = time.perf_counter()
            outputs = decoder_outputs(model, x, day_idx, use_amp=False, mode="full", grl_lambda=1.0)
            sum(o.square().mean() for o in outputs).backward()
            model.zero_grad(set_to_none=True)
            if step > 0:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(values), 1) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-time-steps", type=int, default=300)
    parser.add_argument("--n-units", type=int, default=128)
    parser.add_argument("--noise-hidden-size", type=int, default=128, help="lighter noise GRU for the demo-size triple")
    parser.add_argument("--full-noise-hidden-size", type=int, default=768, help="lighter noise GRU for the full-size count")
    parser.add_argument("--n-days", type=int, default=4)
    parser.add_argument("--n-steps", type=int, default=3)
    args = parser.parse_args()

    counts = count_full_size_parameters(args.full_noise_hidden_size)

    torch.manual_seed(0)
    demo = dict(FULL_SIZE, n_units=args.n_units, n_days=args.n_days)
    models = {
        "baseline": GRUDecoder(**demo, n_layers=5),
        "triple": TripleGRUDecoder(**demo, noise_hidden_size=args.noise_hidden_size),
    }
    x = torch.randn(args.batch_size, args.n_time_steps, demo["neural_dim"])  # (B, T, D)
    day_idx = torch.randint(0, args.n_days, (args.batch_size,))
    timings = time_forward_backward(models, x, day_idx, args.n_steps)

    result = {
        "params_full": {name: s["total"] for name, s in counts.items()},
        "day_specific_full": {name: s["day_specific"] for name, s in counts.items()},
        "by_module_full": {name: s["by_module"] for name, s in counts.items()},
        "demo": {
            "batch_size": args.batch_size,
            "n_time_steps": args.n_time_steps,
            "n_patches": n_patches(args.n_time_steps, demo["patch_size"], demo["patch_stride"]),
            "n_units": args.n_units,
            "noise_hidden_size": args.noise_hidden_size,
            "params": {name: parameter_summary(m)["total"] for name, m in models.items()},
            "threads": torch.get_num_threads(),
            "n_steps": args.n_steps,
        },
        "fwd_bwd_ms_median": timings,
        "triple_over_baseline": round(timings["triple"] / timings["baseline"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
