"""Device memory of one training micro-batch of the full-width models on XLA, and what fits a TPU.

    python benchmarks/xla_memory.py [--frames 64 125 250] [--batch 4] [--gru ours|torch_xla] [--bidirectional]
        [--models baseline triple triple_noise768] [--set key=value ...]
        [--devices N [--full_width FIXED_GIB MIB_PER_TRIAL_FRAME]]

For each model of rnn_args.yaml at full width -- baseline 5x768, triple with the 7168-wide noise
GRU, triple with noise_hidden_size 768 -- and each patched length T' in --frames, a fresh
subprocess (PJRT_DEVICE=CPU, XLA_FLAGS=--xla_dump_to) places the model on the XLA device, traces
rnn_trainer.compute_loss (dense CTC) and its backward for a batch of --batch trials, and
compiles that graph without running it. Memory is read from XLA's buffer assignment of the
compiled graph ("Total bytes used": weights and inputs, gradients out, and the heap-simulated
peak of every temporary), so configurations too large for this machine are measured as well.

From two or more lengths it fits total = fixed + per_frame * T' and derives
  bytes_per_trial_frame = per_frame / batch,
  fixed_bytes = the fit's intercept (weights, gradients) + 8 bytes per parameter (AdamW moments).
It prints one JSON line and a table: the largest per-core batch at each time bucket of
rnn_args.yaml whose micro-batch fits TPU v4 (32 GiB HBM per chip), v5e (16 GiB), v5p (95 GiB)
and v6e (32 GiB), with no headroom reserved for the XLA runtime. The unit is one micro-batch:
the trainer's step graph also holds the optimizer update and, with accumulation, the next
micro-batch, which this benchmark does not measure. XLA's CPU compiler lays out memory as
TPU's does not (no tile padding, its own fusions), so the table is an estimate for TPU.

--devices N (N > 1) measures the whole training step instead (forward, backward and the
DayAdamW update) as one SPMD program over N CPU devices (spmd.py), --batch trials per device,
twice: AdamW moments replicated and split N ways (shard_optimizer_state). With SPMD the compiled
module is the per-device partitioned program, so its buffer assignment is one device's bytes.
It reports, per model, each variant's bytes per device, the bytes the split saved against the
8 (N - 1) / N bytes per parameter it should, and their ratio. Placing the weights on N devices
and materialising the moments runs at small widths only (e.g. --set model.n_input_features=32
--set model.n_units=64); --full_width FIXED_GIB MIB_PER_TRIAL_FRAME (the one-device figures of
a full-width run of this script) then derives the full-width fit table with the moments split
over each chip's host (CHIPS_PER_HOST): the formula's saving scaled by the measured ratio, and
the bytes per trial-frame scaled by the split step's over the replicated step's when larger.

--gru torch_xla measures torch_xla's own scan GRU (torch_xla.experimental.gru) in place of
xla_gru.GRU, for comparison.

--bidirectional measures every model a second time with model.bidirectional=true (reported as
`<model>_bidirectional`, with its bytes per trial-frame as a multiple of the causal model's,
measured side by side in the same run).
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

MODELS = {
    "baseline": ["model.type=baseline"],
    "triple": ["model.type=triple", "model.noise_hidden_size=0"],
    "triple_noise768": ["model.type=triple", "model.noise_hidden_size=768"],
}
CHIPS_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
CHIPS_PER_HOST = {"v4": 4, "v5e": 8, "v5p": 4, "v6e": 8}  # a v4-8, v5e-8, v5p-8, v6e-8 host: one device per chip
LABEL_LENGTH = 96  # padded phonemes per trial; real sentences have ~29 on average
GIB = 2**30


def _use_torch_xla_gru(model) -> None:
    """Run every GRU of `model` through torch_xla's scan GRU (its weights stacked per step)."""
    import types

    from torch_xla.experimental.gru import GRU as ScanGRU

    import xla_gru

    for module in model.modules():
        if isinstance(module, xla_gru.GRU):
            module.forward = types.MethodType(lambda self, x, hx=None, save_dtype=None: ScanGRU.forward(self, x, hx), module)


def _random_batch(rows: int, n_bins: int, n_frames: int, m: Any, n_days: int, device: Any) -> dict:
    """A training batch of random features and labels, every trial n_bins long, on `device`."""
    import torch

    batch = {
        "input_features": torch.randn(rows, n_bins, m.n_input_features),
        "n_time_steps": torch.full((rows,), n_bins),
        "seq_class_ids": torch.randint(1, m.n_classes, (rows, LABEL_LENGTH)),
        "phone_seq_lens": torch.full((rows,), min(LABEL_LENGTH, n_frames // 2)),
        "day_indices": torch.arange(rows) % n_days,
        "row_mask": torch.ones(rows, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure(model_name: str, n_frames: int, batch_size: int, overrides: list[str], gru: str, dump_dir: str) -> dict:
    """Compile one micro-batch's forward + backward; return its buffer sizes. Runs in a subprocess."""
    import torch
    import torch_xla

    import rnn_model
    import rnn_trainer
    from config import load_config

    device = torch_xla.device()
    cfg = load_config(os.path.join(REPO_ROOT, "rnn_args.yaml"), [*MODELS[model_name], *overrides])
    m = cfg.model
    n_days = len(cfg.dataset.sessions)
    n_bins = m.patch_size + m.patch_stride * (n_frames - 1)  # the shortest length with T' frames
    torch.manual_seed(0)
    # Buffer sizes do not depend on weight values: skip the orthogonal initialisation (QR of
    # 21504 x 7168 matrices at full size), which would dominate the run time.
    rnn_model._init_gru_weights = lambda gru: None
    model = rnn_model.build_model(m, n_days=n_days)
    n_params = sum(p.numel() for p in model.parameters())
    if gru == "torch_xla":
        _use_torch_xla_gru(model)
    model.to(device).train()
    batch = _random_batch(batch_size, n_bins, n_frames, m, n_days, device)
    total, _ = rnn_trainer.compute_loss(
        model=model, batch=batch, cfg=cfg, adversarial_gate=torch.ones((), device=device), use_dense_ctc=True
    )
    total.backward()
    start = time.perf_counter()
    torch_xla._XLAC._xla_warm_up_cache([p.grad for p in model.parameters()], [])  # compile, do not run
    compile_seconds = time.perf_counter() - start
    return {"n_params": n_params, "compile_seconds": round(compile_seconds, 2), **_read_buffer_assignment(dump_dir)}


def measure_step(model_name: str, n_frames: int, batch_size: int, overrides: list[str], n_devices: int,
                 shard: bool, dump_dir: str) -> dict:
    """Compile one training step (forward, backward, DayAdamW update) as one SPMD program over
    n_devices, `batch_size` trials per device, the moments split when `shard`; return one device's
    buffer sizes. Runs in a subprocess (CPU_NUM_DEVICES=n_devices)."""
    import torch
    import torch_xla
    import torch_xla.distributed.spmd as xs

    import spmd

    spmd.enable()
    import rnn_model
    import rnn_trainer
    from config import load_config

    device = torch_xla.device()
    cfg = load_config(os.path.join(REPO_ROOT, "rnn_args.yaml"), [*MODELS[model_name], *overrides])
    m = cfg.model
    n_days = len(cfg.dataset.sessions)
    n_bins = m.patch_size + m.patch_stride * (n_frames - 1)
    torch.manual_seed(0)
    rnn_model._init_gru_weights = lambda gru: None
    model = rnn_model.build_model(m, n_days=n_days)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device).train()
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    if shard:
        spmd.shard_optimizer_state(optimizer)  # as the trainer does: moments split, weights replicated
    else:
        optimizer.init_state()
    torch_xla.sync()  # weights and moments are the step's inputs, as in training
    rows = batch_size * n_devices
    batch = _random_batch(rows, n_bins, n_frames, m, n_days, device)
    for value in batch.values():  # each device its own rows, as the trainer's loader sends them
        xs.mark_sharding(value, spmd.mesh(), (spmd.DATA_AXIS,) + (None,) * (value.dim() - 1))
    total, _ = rnn_trainer.compute_loss(
        model=model, batch=batch, cfg=cfg, adversarial_gate=torch.ones((), device=device), use_dense_ctc=True,
        n_shards=n_devices,
    )
    total.backward()
    optimizer.step()
    outputs = [p for p in model.parameters()] + [v for state in optimizer.state.values() for v in state.values()]
    start = time.perf_counter()
    torch_xla._XLAC._xla_warm_up_cache(outputs, [])  # compile, do not run
    compile_seconds = time.perf_counter() - start
    return {"n_params": n_params, "compile_seconds": round(compile_seconds, 2), **_read_buffer_assignment(dump_dir)}


def _read_buffer_assignment(dump_dir: str) -> dict:
    """Total, parameter and temporary bytes of the largest compiled graph in an XLA dump."""
    best = None
    for path in Path(dump_dir).glob("*buffer-assignment.txt"):
        text = path.read_text()
        found = re.search(r"Total bytes used: (\d+)", text)
        if found is None:
            continue
        total = int(found.group(1))
        if best is None or total > best["total_bytes"]:
            sizes = [(int(size), kind) for size, kind in re.findall(r"^allocation \d+: size (\d+), (\S+)", text, re.M)]
            best = {
                "total_bytes": total,
                "parameter_bytes": sum(size for size, kind in sizes if kind == "parameter"),
                "temp_bytes": sum(size for size, kind in sizes if kind.startswith("preallocated-temp")),
            }
    if best is None:
        raise RuntimeError(f"no buffer assignment in {dump_dir}")
    return best


def _run_measurement(model_name: str, n_frames: int, batch_size: int, overrides: list[str], gru: str,
                     n_devices: int = 1, shard: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as dump_dir:
        env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(n_devices), USE_TORCH_XLA="1",
                   XLA_FLAGS=f"--xla_dump_to={dump_dir}")
        if n_devices > 1:
            what = ["--_measure_step", model_name, str(n_frames), str(batch_size), json.dumps(overrides),
                    str(n_devices), str(int(shard)), dump_dir]
        else:
            what = ["--_measure", model_name, str(n_frames), str(batch_size), json.dumps(overrides), gru, dump_dir]
        args = [sys.executable, os.path.abspath(__file__), *what]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measurement {model_name} T'={n_frames} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares line total = intercept + slope * frames."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def fit_table(*, fixed_bytes: float, bytes_per_trial_frame: float, frames_per_bucket: dict[int, int]) -> dict:
    """{chip: {bucket: largest batch}} for a micro-batch of fixed + batch * T' * per-trial-frame bytes."""
    table = {}
    for chip, gib in CHIPS_GIB.items():
        free = gib * GIB - fixed_bytes
        table[chip] = {
            bucket: max(0, int(free // (bytes_per_trial_frame * frames))) if free > 0 else 0
            for bucket, frames in frames_per_bucket.items()
        }
    return table


def sharded_fit(*, fixed_bytes: float, bytes_per_trial_frame: float, n_params: int, saved_ratio: float,
                frame_ratio: float, frames_per_bucket: dict[int, int]) -> dict:
    """{chip: {bucket: largest batch}} when each chip of a host (CHIPS_PER_HOST) holds 1/N of AdamW's
    two float32 moments: `fixed_bytes` (one device, every moment whole) less saved_ratio x 8 (N - 1) / N
    bytes per parameter, and bytes_per_trial_frame times frame_ratio (the measured split step's bytes
    per trial-frame over the replicated one's, at least 1: no gain is assumed there)."""
    table = {}
    for chip, n in CHIPS_PER_HOST.items():
        fixed = fixed_bytes - saved_ratio * 8 * n_params * (n - 1) / n
        table[chip] = fit_table(fixed_bytes=fixed, bytes_per_trial_frame=bytes_per_trial_frame * max(1.0, frame_ratio),
                                frames_per_bucket=frames_per_bucket)[chip]
        table[chip]["fixed_gib"] = round(fixed / GIB, 2)
    return table


def _full_width_params(model_name: str) -> int:
    """Parameters of `model_name` at rnn_args.yaml's width, counted on the meta device."""
    import torch

    import rnn_model
    from config import load_config

    cfg = load_config(os.path.join(REPO_ROOT, "rnn_args.yaml"), MODELS[model_name])
    with torch.device("meta"):
        model = rnn_model.build_model(cfg.model, n_days=len(cfg.dataset.sessions))
    return sum(p.numel() for p in model.parameters())


def _sharded_report(args: argparse.Namespace, frames_per_bucket: dict[int, int]) -> dict:
    """--devices N: each model's training step per device, moments replicated and split."""
    n = args.devices
    report = {"devices": n, "batch_per_device": args.batch, "frames": args.frames, "overrides": args.set,
              "measured_by": "XLA CPU buffer assignment (Total bytes used) of the compiled SPMD step, one device",
              "models": {}}
    for name in args.models:
        result = {}
        for variant, shard in (("replicated", False), ("sharded", True)):
            runs = [_run_measurement(name, frames, args.batch, args.set, args.gru, n_devices=n, shard=shard)
                    for frames in args.frames]
            intercept, slope = _fit([(frames, run["total_bytes"]) for frames, run in zip(args.frames, runs)])
            result["n_params"] = runs[0]["n_params"]
            result[variant] = {"total_bytes": [run["total_bytes"] for run in runs],
                               "parameter_bytes": [run["parameter_bytes"] for run in runs],
                               "compile_seconds": [run["compile_seconds"] for run in runs],
                               "fixed_bytes": round(intercept), "bytes_per_trial_frame": round(slope / args.batch)}
        # The moments are step inputs: the parameter bytes show what the split saves of them. The
        # total saves more (the update's temporaries computed on shards), which the one-device
        # fixed bytes of a micro-batch never counted, so the fit uses the moments' saving only.
        held = [a - b for a, b in zip(result["replicated"]["parameter_bytes"], result["sharded"]["parameter_bytes"])]
        saved = [a - b for a, b in zip(result["replicated"]["total_bytes"], result["sharded"]["total_bytes"])]
        expected = 8 * result["n_params"] * (n - 1) / n
        result.update(saved_input_bytes=held, saved_total_bytes=saved, expected_saved_bytes=round(expected),
                      saved_ratio=round(min(held) / expected, 3),
                      frame_ratio=round(result["sharded"]["bytes_per_trial_frame"]
                                        / result["replicated"]["bytes_per_trial_frame"], 3))
        if args.full_width:
            fixed_gib, mib = args.full_width
            full_params = _full_width_params(name)
            result["full_width"] = {
                "n_params": full_params, "fixed_gib_one_device": fixed_gib, "mib_per_trial_frame": mib,
                "fit_sharded": sharded_fit(fixed_bytes=fixed_gib * GIB, bytes_per_trial_frame=mib * 2**20,
                                           n_params=full_params, saved_ratio=result["saved_ratio"],
                                           frame_ratio=result["frame_ratio"],
                                           frames_per_bucket=frames_per_bucket),
            }
        report["models"][name] = result
    print(json.dumps(report))
    buckets = list(frames_per_bucket)
    for name, result in report["models"].items():
        print(f"\n{name}: {result['n_params']:,} parameters, {n} devices, per device (MiB) at T' = {args.frames}:")
        for variant in ("replicated", "sharded"):
            print(f"  moments {variant:<10} " + " ".join(f"{b / 2**20:9.2f}" for b in result[variant]["total_bytes"]))
        print(f"  moments held: {min(result['saved_input_bytes']) / 2**20:.2f} MiB less of the expected "
              f"{result['expected_saved_bytes'] / 2**20:.2f} MiB (8 (N-1)/N bytes per parameter): ratio {result['saved_ratio']}; "
              f"whole step: {min(result['saved_total_bytes']) / 2**20:.2f} MiB less; bytes per trial-frame "
              f"{result['sharded']['bytes_per_trial_frame']} split, {result['replicated']['bytes_per_trial_frame']} replicated")
        if "full_width" in result:
            print(f"  full width, moments split over each chip's host: largest per-chip micro-batch, bins/T' "
                  f"({max(1.0, result['frame_ratio'])} x {args.full_width[1]} MiB per trial-frame)")
            print(f"  {'chip':<5} {'N':>2} {'fixed':>9} " + " ".join(f"{f'{b}/{frames_per_bucket[b]}':>9}" for b in buckets))
            for chip, row in result["full_width"]["fit_sharded"].items():
                print(f"  {chip:<5} {CHIPS_PER_HOST[chip]:>2} {row['fixed_gib']:>5} GiB " + " ".join(f"{row[b]:>9}" for b in buckets))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Long enough that activations, not weight-sized temporaries, set the peak.
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 125, 250], help="patched lengths T' to measure")
    parser.add_argument("--batch", type=int, default=4, help="trials per micro-batch")
    parser.add_argument("--gru", choices=["ours", "torch_xla"], default="ours")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--bidirectional", action="store_true",
                        help="also measure each model with model.bidirectional=true, and the ratio to causal")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override rnn_args.yaml, e.g. use_amp=false or model.gru_save_dtype=bfloat16")
    parser.add_argument("--devices", type=int, default=1,
                        help="N > 1: the training step over N devices, AdamW moments replicated and split")
    parser.add_argument("--full_width", type=float, nargs=2, metavar=("FIXED_GIB", "MIB_PER_TRIAL_FRAME"),
                        help="with --devices: the full-width fit table with split moments from these one-device figures")
    parser.add_argument("--_measure", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--_measure_step", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure_step:
        name, frames, batch, overrides, n_devices, shard, dump_dir = args._measure_step
        print(json.dumps(measure_step(name, int(frames), int(batch), json.loads(overrides), int(n_devices),
                                      bool(int(shard)), dump_dir)))
        return {}
    if args._measure:
        name, frames, batch, overrides, gru, dump_dir = args._measure
        print(json.dumps(measure(name, int(frames), int(batch), json.loads(overrides), gru, dump_dir)))
        return {}
    if len(set(args.frames)) < 2:
        parser.error("--frames needs two or more distinct lengths")

    from config import load_config
    from rnn_model import n_patches

    cfg = load_config(os.path.join(REPO_ROOT, "rnn_args.yaml"), args.set)
    frames_per_bucket = {
        b: n_patches(b, cfg.model.patch_size, cfg.model.patch_stride) for b in cfg.dataset.time_buckets
    }
    if args.devices > 1:
        return _sharded_report(args, frames_per_bucket)
    report = {"gru": args.gru, "use_amp": cfg.use_amp, "gru_save_dtype": cfg.model.gru_save_dtype,
              "batch": args.batch, "frames": args.frames,
              "measured_by": "XLA CPU buffer assignment (Total bytes used) of the compiled micro-batch graph",
              "models": {}}
    variants = [(name, name, args.set) for name in args.models]
    if args.bidirectional:
        variants += [(f"{name}_bidirectional", name, [*args.set, "model.bidirectional=true"]) for name in args.models]
    for label, name, overrides in variants:
        runs = [_run_measurement(name, frames, args.batch, overrides, args.gru) for frames in args.frames]
        intercept, slope = _fit([(frames, run["total_bytes"]) for frames, run in zip(args.frames, runs)])
        n_params = runs[0]["n_params"]
        fixed = intercept + 8 * n_params  # + AdamW's two float32 moments
        per_trial_frame = slope / args.batch
        report["models"][label] = {
            "n_params": n_params,
            "total_bytes": [run["total_bytes"] for run in runs],
            "temp_bytes": [run["temp_bytes"] for run in runs],
            "compile_seconds": [run["compile_seconds"] for run in runs],
            "bytes_per_trial_frame": round(per_trial_frame),
            "fixed_bytes": round(fixed),
            "fit": fit_table(fixed_bytes=fixed, bytes_per_trial_frame=per_trial_frame,
                             frames_per_bucket=frames_per_bucket),
        }
        causal = report["models"].get(name)
        if label != name and causal:
            report["models"][label]["per_trial_frame_vs_causal"] = round(per_trial_frame / causal["bytes_per_trial_frame"], 3)
    print(json.dumps(report))
    _print_table(report, frames_per_bucket)
    return report


def _print_table(report: dict, frames_per_bucket: dict[int, int]) -> None:
    buckets = list(frames_per_bucket)
    print(f"\nlargest per-core micro-batch per time bucket (bins / T'), gru={report['gru']}, "
          f"use_amp={report['use_amp']}, gru_save_dtype={report['gru_save_dtype']}")
    header = f"{'model':<16} {'chip':<5} " + " ".join(f"{f'{b}/{frames_per_bucket[b]}':>9}" for b in buckets)
    print(header)
    for name, result in report["models"].items():
        ratio = f" ({result['per_trial_frame_vs_causal']}x causal)" if "per_trial_frame_vs_causal" in result else ""
        print(f"{name} per trial-frame {result['bytes_per_trial_frame'] / 2**20:.3f} MiB{ratio}, "
              f"fixed {result['fixed_bytes'] / GIB:.2f} GiB, compile {result['compile_seconds']} s")
        for chip, row in result["fit"].items():
            print(f"{'':<16} {chip:<5} " + " ".join(f"{row[b]:>9}" for b in buckets))


if __name__ == "__main__":
    main()
