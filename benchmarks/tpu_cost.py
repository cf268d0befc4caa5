"""What a training run costs at least: FLOPs from XLA's cost analysis of the trainer's step graph.

    python benchmarks/tpu_cost.py [--config rnn_args.yaml] [--steps 120000] [--trials_per_step 512]

For the shipped triple (rnn_args.yaml), the triple with `noise_hidden_size: 768` and the baseline,
this traces `rnn_trainer.train_step` on torch_xla (PJRT_DEVICE=CPU; nothing is executed): two
micro-batches (gradient_accumulation_steps 2), clipping and the DayAdamW update included, the
weights at full width as lazy device tensors (no memory). The step's HLO module goes to XLA's
HloCostAnalysis (jaxlib's binding of the same XLA library, `hlo_module_cost_analysis`), which
counts a while loop's body once: every loop (the GRU recurrences forward and backward, the dense
CTC) is costed again on its own and multiplied by its trip count, read from the loop condition.

The step is traced at the real padded lengths (each trial padded to the time bucket of the
mean real trial, and of the longest), where its cost is linear in the number of trials:
FLOPs = fixed (optimizer update, clipping) + per_trial x trials, fitted at two batch sizes and
checked at a third; per_trial / frames (output frames of 80 ms, (T - 14) // 4 + 1) is the cost
per trial-frame, and its value at the two lengths shows it does not depend on the length.
FLOPs per step are for trials_per_step trials each padded to the bucket of the mean real trial
(REAL_TRIAL_BINS; a lower limit, since a batch pads to its longest trial), FLOPs per run for
the config's steps. Hours are the compute-bound lower limit at the accelerators' peak bf16 rate
(the recurrences are latency-bound in practice: real runs are slower); prices are list prices
per chip-hour that must be checked before use. Full widths cost nothing to trace: the weights
stay lazy, and no graph is compiled or run (about 1.5 GB of host memory, a few minutes).

Prints one JSON line ({model: {flops_per_trial_frame, flops_per_step, flops_per_run, ...,
ratio_to_six_flops_per_gru_weight}}) and a table with the 6-FLOPs-per-GRU-weight check.
`model_cost` is the core that tests/test_tpu_cost.py runs on a tiny config.
"""

import os
import sys

# Before anything imports accelerate/torch_xla: trace on XLA with the host CPU as the device.
os.environ["PJRT_DEVICE"] = os.environ.get("PJRT_DEVICE", "CPU")
os.environ["USE_TORCH_XLA"] = "1"
os.environ.setdefault("CPU_NUM_DEVICES", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from config import Config, load_config  # noqa: E402

# Real dataset (Dryad t15 copy task, shared/REFERENCE.md): trial length in 20 ms bins.
REAL_TRIAL_BINS = {"mean": 875, "median": 836, "max": 2475}
N_DAYS = 45
LABEL_LENGTH = 96  # padded phoneme labels (longest real sentence ~80 phonemes, rounded up to 16); CTC only
# Trials per micro-batch of the traced graphs: two to fit, one to check the line.
BATCH_SIZES = (1, 2)
CHECK_BATCH_SIZE = 3

# Google's published Cloud TPU specs, per chip (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# peak bf16 FLOP/s and HBM bandwidth in bytes/s; chips per "-8" slice.
TPU_SPECS = {
    "v4-8": {"chips": 4, "peak_bf16": 275e12, "hbm_bytes_per_s": 1200e9},
    "v5e-8": {"chips": 8, "peak_bf16": 197e12, "hbm_bytes_per_s": 819e9},
    "v5p-8": {"chips": 4, "peak_bf16": 459e12, "hbm_bytes_per_s": 2765e9},
    "v6e-8": {"chips": 8, "peak_bf16": 918e12, "hbm_bytes_per_s": 1638e9},
}
# On-demand list prices in USD per chip-hour, us-central1, Cloud TPU pricing page
# (cloud.google.com/tpu/pricing) as known in 2025; not fetched (no network): check them before use.
TPU_PRICE_PER_CHIP_HOUR = {"v4-8": 3.22, "v5e-8": 1.20, "v5p-8": 4.20, "v6e-8": 2.70}
TPU_PRICES_AS_OF = "2025 list prices, unverified: check cloud.google.com/tpu/pricing"
# NVIDIA's published dense bf16 tensor-core peaks (no sparsity; RTX 4090 with FP32 accumulate):
# Ada Lovelace architecture whitepaper (RTX 4090) and the H100 SXM5 datasheet.
GPU_SPECS = {
    "RTX 4090": {"chips": 1, "peak_bf16": 165.2e12, "hbm_bytes_per_s": 1008e9},
    "H100 SXM": {"chips": 1, "peak_bf16": 989.4e12, "hbm_bytes_per_s": 3350e9},
}
# H100: Google Cloud a3-highgpu-8g on demand / 8 GPUs (cloud.google.com/compute/gpus-pricing), as
# known in 2025, unverified. RTX 4090: no hyperscaler lists it on demand (marketplaces vary): none.
GPU_PRICE_PER_HOUR = {"RTX 4090": None, "H100 SXM": 11.06}

MODELS = {  # name: config overrides of the shipped triple
    "triple": [],
    "triple_noise768": ["model.noise_hidden_size=768"],
    "baseline": ["model.type=baseline"],
}


# ----------------------------------------------------------------------------- HLO cost


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> list[tuple[int, Any, bytes]]:
    """Top-level fields of a serialized protobuf: (field number, value, raw bytes of the field)."""
    fields, i = [], 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
        fields.append((number, value, buf[start:i]))
    return fields


def _key(number: int, wire_type: int) -> bytes:
    return _encode_varint(number << 3 | wire_type)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _with_entry(module_proto: bytes, computation: str, keep: set[str]) -> bytes:
    """The HloModuleProto with `computation` as its entry (its own program shape as the module's),
    holding only the computations named in `keep` (those it calls), so it parses quickly.

    HloModuleProto: 2 entry_computation_name, 3 computations, 4 host_program_shape,
    6 entry_computation_id; HloComputationProto: 1 name, 4 program_shape, 5 id.
    """
    for number, value, _ in _proto_fields(module_proto):
        if number == 3:
            fields = {n: v for n, v, _ in _proto_fields(value) if n in (1, 4, 5)}
            if fields[1].decode() == computation:
                name, shape, comp_id = fields[1], fields[4], fields[5]
                break
    else:
        raise KeyError(f"no computation {computation} in the HLO module")
    out = bytearray()
    for number, value, raw in _proto_fields(module_proto):
        if number == 3:
            if _proto_fields(value)[0][1].decode() in keep:
                out += raw
        elif number not in (2, 4, 6):
            out += raw
    out += _key(2, 2) + _encode_varint(len(name)) + name
    out += _key(4, 2) + _encode_varint(len(shape)) + shape
    out += _key(6, 0) + _encode_varint(comp_id)
    return bytes(out)


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_WHILE = re.compile(r"while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALL = re.compile(r"\bcall\(.*to_apply=%?([\w.\-]+)")
_BOUND = re.compile(r"s64\[\] constant\((\d+)\)")


def _reachable(blocks: dict[str, list[str]], root: str) -> set[str]:
    """`root` and every computation it calls, directly or not (to_apply, body, condition, calls)."""
    seen, todo = {root}, [root]
    while todo:
        for line in blocks[todo.pop()]:
            for name in re.findall(r"[\w.\-]+", line):
                if name in blocks and name not in seen:
                    seen.add(name)
                    todo.append(name)
    return seen


def _computations(hlo_text: str) -> dict[str, list[str]]:
    blocks, name = {}, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            name = match.group(1)
            blocks[name] = []
        elif name is not None and line.strip() not in ("", "}"):
            blocks[name].append(line)
    return blocks


def _trip_count(condition: list[str]) -> int:
    """torch_xla's scan loops count an s64 index from 0 while it is < a constant: that constant."""
    bounds = [int(m.group(1)) for line in condition for m in _BOUND.finditer(line)]
    if len(bounds) != 1 or not any("direction=LT" in line for line in condition):
        raise ValueError(f"loop condition is not `i < constant`: {condition}")
    return bounds[0]


def hlo_cost(module_proto: bytes) -> dict[str, float]:
    """XLA's HloCostAnalysis of a module with every while loop counted trip-count times.

    Returns flops, transcendentals, bytes accessed, and the loops found with their trip counts.
    """
    import jax.extend
    from jax._src.lib import _jax, xla_client

    backend = jax.extend.backend.get_backend("cpu")
    keys = ("flops", "transcendentals", "bytes accessed")

    def analyse(proto: bytes) -> dict[str, float]:
        result = _jax.hlo_module_cost_analysis(backend, xla_client.XlaComputation(proto).as_hlo_module())
        return {k: float(result.get(k, 0.0)) for k in keys}

    computation = xla_client.XlaComputation(module_proto)
    blocks = _computations(computation.as_hlo_text())
    entry = next(line for line in computation.as_hlo_text().splitlines() if line.startswith("ENTRY"))
    entry_name = _COMPUTATION.match(entry).group(1)
    # How many times each computation runs: calls run their callee once, loops their body trip times.
    runs: dict[str, float] = {entry_name: 1.0}
    loops: list[tuple[str, str, int, float]] = []  # (condition, body, trip count, runs of the caller)
    order = [entry_name]
    for name in order:
        for line in blocks[name]:
            if (m := _WHILE.search(line)) is not None:
                condition, body = m.groups()
                trips = _trip_count(blocks[condition])
                loops.append((condition, body, trips, runs[name]))
                runs[body] = runs.get(body, 0.0) + runs[name] * trips
                order.append(body)
            elif (m := _CALL.search(line)) is not None:
                runs[m.group(1)] = runs.get(m.group(1), 0.0) + runs[name]
                order.append(m.group(1))
    total = analyse(module_proto)  # each loop's body and condition counted once per caller run
    for condition, body, trips, caller_runs in loops:
        extra = caller_runs * (trips - 1)
        for part in (body, condition):
            cost = analyse(_with_entry(module_proto, part, _reachable(blocks, part)))
            for k in keys:
                total[k] += extra * cost[k]
    total["loop_trip_counts"] = sorted(trips for _, _, trips, _ in loops)
    return total


# ----------------------------------------------------------------------------- the step graph


def step_cost(cfg: Config, *, batch_size: int, n_bins: int, n_days: int = N_DAYS) -> dict[str, Any]:
    """Cost of one traced `rnn_trainer.train_step` over cfg.gradient_accumulation_steps micro-batches
    of `batch_size` trials of `n_bins` bins, at the config's full widths; nothing runs on a device.

    Returns hlo_cost's figures plus n_trials, n_trial_frames (trials x output frames in the step) and
    n_gru_weights (parameters of every GRU of the model).
    """
    import torch_xla
    from accelerate import Accelerator

    import rnn_model
    import rnn_trainer

    device = torch_xla.device()
    with torch.device("meta"):  # no host copy of the weights; to_empty leaves lazy device tensors
        model = rnn_model.build_model(cfg.model, n_days=n_days)
    model = model.to_empty(device=device)
    grus = [m for m in model.modules() if isinstance(m, torch.nn.modules.rnn.RNNBase)]
    n_gru_weights = sum(p.numel() for m in grus for p in m.parameters())
    accelerator = Accelerator(mixed_precision="no")
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    n_micro = cfg.gradient_accumulation_steps
    micro_batches = [
        {
            "input_features": torch.randn(batch_size, n_bins, cfg.model.n_input_features, device=device),
            "n_time_steps": torch.full((batch_size,), n_bins, dtype=torch.int64, device=device),
            "seq_class_ids": torch.randint(1, cfg.model.n_classes, (batch_size, LABEL_LENGTH), device=device),
            "phone_seq_lens": torch.full((batch_size,), LABEL_LENGTH // 4, dtype=torch.int64, device=device),
            "day_indices": torch.arange(batch_size, device=device) % n_days,
            "row_mask": torch.ones(batch_size, dtype=torch.bool, device=device),
        }
        for _ in range(n_micro)
    ]
    step_counter = torch.zeros((), dtype=torch.int64, device=device)
    n_skipped = torch.zeros((), dtype=torch.int64, device=device)
    sync = torch_xla.sync
    torch_xla.sync = lambda *args, **kwargs: None  # trace the step, do not run it
    try:
        terms = rnn_trainer.train_step(
            accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
            micro_batches=micro_batches, cfg=cfg, step_counter=step_counter, n_skipped=n_skipped,
            generator=None, use_dense_ctc=True,
        )
    finally:
        torch_xla.sync = sync
    inner = getattr(optimizer, "optimizer", optimizer)
    # What the step's sync would materialise: weights, optimizer state, counters, logged terms.
    outputs = [p for p in model.parameters()]
    outputs += [v for state in inner.state.values() for v in state.values()
                if torch.is_tensor(v) and v.device == device]
    outputs += [step_counter, n_skipped, *terms.values()]
    proto = torch_xla._XLAC._get_xla_tensors_hlo_proto(outputs)
    cost = hlo_cost(proto)
    n_frames = rnn_model.n_patches(n_bins, patch_size=cfg.model.patch_size, patch_stride=cfg.model.patch_stride)
    return {**cost, "n_trials": n_micro * batch_size, "n_trial_frames": n_micro * batch_size * n_frames,
            "n_gru_weights": n_gru_weights}


def padded_bins(n_bins: int, time_buckets: list[int]) -> int:
    """The shortest time bucket that holds n_bins (the loader's static-shape padding)."""
    return min(b for b in time_buckets if b >= n_bins)


def model_cost(cfg: Config, *, n_steps: int, trials_per_step: int,
               batch_sizes: tuple[int, int] = BATCH_SIZES, check_batch_size: int = CHECK_BATCH_SIZE) -> dict[str, Any]:
    """FLOPs per trial-frame, per step and per run for the config, at the real padded lengths.

    At each padded length (the buckets of the mean and of the longest real trial), the step is
    traced at two batch sizes: FLOPs = fixed (optimizer update, clipping) + per_trial x trials.
    A third batch size checks the line; the per-trial-frame figures of the two lengths show it
    does not depend on the length.
    """
    m = cfg.model
    by_length = {}
    for name in ("mean", "max"):
        n_bins = padded_bins(REAL_TRIAL_BINS[name], cfg.dataset.time_buckets)
        small, large = (step_cost(cfg, batch_size=b, n_bins=n_bins) for b in batch_sizes)
        per_trial = (large["flops"] - small["flops"]) / (large["n_trials"] - small["n_trials"])
        bytes_per_trial = (large["bytes accessed"] - small["bytes accessed"]) / (large["n_trials"] - small["n_trials"])
        n_frames = rnn_model_frames(n_bins, m)
        by_length[name] = {"n_bins": n_bins, "n_frames": n_frames, "per_trial": per_trial,
                           "fixed": small["flops"] - per_trial * small["n_trials"],
                           "bytes_per_trial": bytes_per_trial, "small": small}
    mean = by_length["mean"]
    check = step_cost(cfg, batch_size=check_batch_size, n_bins=mean["n_bins"])
    predicted = mean["fixed"] + mean["per_trial"] * check["n_trials"]
    per_frame = mean["per_trial"] / mean["n_frames"]
    per_frame_longest = by_length["max"]["per_trial"] / by_length["max"]["n_frames"]
    frames_unpadded = rnn_model_frames(REAL_TRIAL_BINS["mean"], m)
    per_step = mean["fixed"] + trials_per_step * mean["per_trial"]
    n_gru_weights = mean["small"]["n_gru_weights"]
    return {
        "flops_per_trial_frame": per_frame,
        "flops_per_step": per_step,
        "flops_per_run": per_step * n_steps,
        "flops_fixed_per_step": mean["fixed"],
        "bytes_accessed_per_trial_frame": mean["bytes_per_trial"] / mean["n_frames"],
        "padded_bins": {"mean": mean["n_bins"], "max": by_length["max"]["n_bins"]},
        "frames_per_trial": {"mean_padded": mean["n_frames"], "max_padded": by_length["max"]["n_frames"],
                             "mean_unpadded": frames_unpadded},
        "flops_per_trial_frame_longest_bucket": per_frame_longest,
        "flops_per_step_all_longest_bucket": (by_length["max"]["fixed"]
                                              + trials_per_step * by_length["max"]["per_trial"]),
        "flops_per_step_unpadded_mean": mean["fixed"] + trials_per_step * per_frame * frames_unpadded,
        "n_gru_weights": n_gru_weights,
        "six_flops_per_gru_weight": 6 * n_gru_weights,
        "ratio_to_six_flops_per_gru_weight": per_frame / (6 * n_gru_weights),
        "batch_fit_check_relative_error": abs(check["flops"] - predicted) / check["flops"],
        "length_relative_difference": abs(per_frame_longest - per_frame) / per_frame,
        "loop_trip_counts": sorted(set(mean["small"]["loop_trip_counts"])),
    }


def rnn_model_frames(n_bins: int, cfg_model: Any) -> int:
    import rnn_model

    return rnn_model.n_patches(n_bins, patch_size=cfg_model.patch_size, patch_stride=cfg_model.patch_stride)


def hours_and_prices(flops_per_run: float) -> list[dict[str, Any]]:
    """Compute-bound lower limit of hours per run and its on-demand price, per accelerator."""
    rows = []
    for name, spec in {**TPU_SPECS, **GPU_SPECS}.items():
        hours = flops_per_run / (spec["chips"] * spec["peak_bf16"]) / 3600
        if name in TPU_SPECS:
            price = hours * spec["chips"] * TPU_PRICE_PER_CHIP_HOUR[name]
        else:
            price = None if GPU_PRICE_PER_HOUR[name] is None else hours * GPU_PRICE_PER_HOUR[name]
        rows.append({"accelerator": name, "hours": hours, "usd": price})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args.yaml")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the config's)")
    parser.add_argument("--trials_per_step", type=int, default=512)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    args = parser.parse_args(argv)

    report: dict[str, Any] = {}
    for name in args.models.split(","):
        cfg = load_config(args.config, MODELS[name])
        n_steps = args.steps or cfg.num_training_batches
        report[name] = model_cost(cfg, n_steps=n_steps, trials_per_step=args.trials_per_step)
        report[name]["hours_and_prices"] = hours_and_prices(report[name]["flops_per_run"])
    print(json.dumps(report))
    print(f"\nCompute-bound LOWER LIMITS per run ({args.trials_per_step} trials/step, every trial padded to the "
          f"bucket of the mean trial, peak bf16; {TPU_PRICES_AS_OF})")
    for name, r in report.items():
        print(f"\n{name}: {r['flops_per_trial_frame'] / 1e9:.3f} GFLOP/trial-frame, "
              f"{r['flops_per_step'] / 1e12:.1f} TFLOP/step, {r['flops_per_run'] / 1e18:.2f} EFLOP/run "
              f"({r['frames_per_trial']['mean_padded']} frames/trial at {r['padded_bins']['mean']} bins; fixed "
              f"{r['flops_fixed_per_step'] / 1e9:.2f} GFLOP/step; batch-fit check error "
              f"{100 * r['batch_fit_check_relative_error']:.2f}%; at {r['padded_bins']['max']} bins "
              f"{r['flops_per_trial_frame_longest_bucket'] / 1e9:.3f} GFLOP/trial-frame, "
              f"{100 * r['length_relative_difference']:.2f}% apart; every trial at {r['padded_bins']['max']} bins: "
              f"{r['flops_per_step_all_longest_bucket'] / 1e12:.1f} TFLOP/step)")
        print(f"  check: {r['flops_per_trial_frame'] / 1e9:.3f} GFLOP/frame vs 6 x {r['n_gru_weights']:,} "
              f"GRU weights = "
              f"{r['six_flops_per_gru_weight'] / 1e9:.3f} GFLOP: ratio {r['ratio_to_six_flops_per_gru_weight']:.3f} "
              f"({'within' if abs(r['ratio_to_six_flops_per_gru_weight'] - 1) <= 0.25 else 'OUTSIDE'} 25%)")
        print(f"  {'accelerator':<10} {'hours':>10} {'USD on demand':>14}")
        for row in r["hours_and_prices"]:
            usd = "n/a" if row["usd"] is None else f"{row['usd']:,.0f}"
            print(f"  {row['accelerator']:<10} {row['hours']:>10.1f} {usd:>14}")
    return report


if __name__ == "__main__":
    main()
