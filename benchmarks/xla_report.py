"""Compilation, fallback and host-sync report of the training loop on torch_xla's CPU backend.

    python benchmarks/xla_report.py [--config rnn_args_demo.yaml] [--steps 24] [--time_buckets "[256,...]"]
        [--devices N] [--set key=value ...]    # e.g. --set gradient_accumulation_steps=2

Writes a tiny synthetic dataset (make_synthetic_data.generate_dataset) to a temp dir, trains
--steps steps of the config through rnn_trainer.train on XLA (PJRT_DEVICE=CPU) with static
shapes over fine length buckets (so trials of varied length pad to several shapes), validating
once at the end, and prints ONE JSON line. --devices N runs it over N CPU devices as one SPMD
program (CPU_NUM_DEVICES=N, spmd.py), as launch_tpu_training.py --num_cores N does; the line holds:
  n_compilations (torch_xla 'CompileTime' count), compile_seconds, aten_fallbacks
  ({counter: count} of aten:: fallbacks), local_scalar_dense (aten::_local_scalar_dense count),
  step_lengths (padded length of each micro-batch as train_step received it, one list per step),
  train_buckets (the distinct lengths among them), val_buckets (padded lengths of the validation
  batches), graphs_per_step (graphs launched by each train_step: cached + uncached compiles),
  compiles_per_step (of those, graphs compiled anew),
  steps_per_second after warm-up (median step time of the log windows after the first two),
  host_reads (device-to-host transfers: in train steps, between one step and the next outside
  logging and validation, in the log lines, in validation and its checkpoints),
  devices, gradient_accumulation_steps.
"""

import os
import sys

# Before anything imports accelerate/torch_xla: run on XLA, on the host CPU.
os.environ["PJRT_DEVICE"] = os.environ.get("PJRT_DEVICE", "CPU")
os.environ["USE_TORCH_XLA"] = "1"
os.environ.setdefault("CPU_NUM_DEVICES", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from config import load_config  # noqa: E402
from make_synthetic_data import generate_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args_demo.yaml")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log_every", type=int, default=4)
    # Finer than the demo's buckets: batches of 16 trials nearly always land in the same coarse
    # bucket, and the point is to watch compilations as the padded length changes.
    parser.add_argument("--time_buckets", default="[256,320,352,384,416,448,512,768,1024]")
    parser.add_argument("--devices", type=int, default=None,
                        help="CPU devices of one SPMD program (default: CPU_NUM_DEVICES, else 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.devices is not None:
        os.environ["CPU_NUM_DEVICES"] = str(args.devices)
    n_devices = int(os.environ["CPU_NUM_DEVICES"])

    import torch_xla.debug.metrics as met

    import spmd

    if n_devices > 1:
        spmd.enable()
    import rnn_trainer
    from dataset import build_dataloaders

    step_lengths, graphs_per_step, compiles_per_step = [], [], []
    reads = {"train_steps": 0, "between_steps": 0, "logs": 0, "validation": 0}
    after_last_step: list[int] = []  # host reads, and those counted, when the previous step returned
    train_step = rnn_trainer.train_step
    wrapped = {name: getattr(rnn_trainer, name) for name in ("train_step", "_log_train", "_validate_and_save")}

    def recording_train_step(**kwargs):
        """train_step, noting the shapes it was given and how many graphs it launched."""
        if after_last_step:  # what the loop read since the previous step, outside logs and validation
            reads["between_steps"] += _host_reads(met) - after_last_step[0] - (sum(reads.values()) - after_last_step[1])
        step_lengths.append([batch["input_features"].shape[1] for batch in kwargs["micro_batches"]])
        launched_before, compiled_before = _graphs_launched(met), met.counter_value("UncachedCompile") or 0
        result = counting(train_step, "train_steps")(**kwargs)
        graphs_per_step.append(_graphs_launched(met) - launched_before)
        compiles_per_step.append((met.counter_value("UncachedCompile") or 0) - compiled_before)
        after_last_step[:] = [_host_reads(met), sum(reads.values())]
        return result

    def counting(fn, key):
        def call(*args, **kwargs):
            before = _host_reads(met)
            try:
                return fn(*args, **kwargs)
            finally:
                reads[key] += _host_reads(met) - before
        return call

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        generate_dataset(str(data_dir), n_sessions=3, n_train_trials=24, n_val_trials=6, n_test_trials=1, seed=0)
        overrides = [
            f"dataset.dataset_dir={data_dir}", f"output_dir={Path(tmp) / 'run'}", "use_tpu=true",
            "dataset.static_shapes=true", "dataset.days_per_batch=2", f"num_training_batches={args.steps}",
            f"batches_per_train_log={args.log_every}", f"batches_per_val_step={args.steps}",
            "dataset.num_dataloader_workers=0", f"dataset.time_buckets={args.time_buckets}", *args.set,
        ]
        cfg = load_config(args.config, overrides)
        # One process: the trainer validates on every validation batch.
        _, val_loader, _ = build_dataloaders(cfg, n_steps=args.steps)
        val_set = val_loader.dataset
        val_buckets = sorted({val_set[i]["input_features"].shape[1] for i in range(len(val_set))})

        met.clear_all()
        rnn_trainer.train_step = recording_train_step
        rnn_trainer._log_train = counting(wrapped["_log_train"], "logs")
        rnn_trainer._validate_and_save = counting(wrapped["_validate_and_save"], "validation")
        try:
            rnn_trainer.train(cfg)
        finally:
            for name, fn in wrapped.items():
                setattr(rnn_trainer, name, fn)

        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]

    n_compilations, compile_ns, _ = met.metric_data("CompileTime") or (0, 0, None)
    step_ms = [r["train/ms_per_step"] for r in records if "train/ms_per_step" in r][2:]
    report = {
        "config": args.config,
        "devices": n_devices,
        "steps": args.steps,
        "n_compilations": n_compilations,
        "compile_seconds": round(compile_ns / 1e9, 2),
        "aten_fallbacks": {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")},
        "local_scalar_dense": met.counter_value("aten::_local_scalar_dense") or 0,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "step_lengths": step_lengths,
        "train_buckets": sorted({n for lengths in step_lengths for n in lengths}),
        "val_buckets": val_buckets,
        "graphs_per_step": graphs_per_step,
        "compiles_per_step": compiles_per_step,
        "steps_per_second": round(1000.0 / statistics.median(step_ms), 3) if step_ms else None,
        "host_reads": reads,
    }
    print(json.dumps(report))
    return report


def _host_reads(met) -> int:
    """Device-to-host transfers so far (each .cpu() of device data, whatever waits it makes)."""
    return (met.metric_data("TransferFromDeviceTime") or (0,))[0]


def _graphs_launched(met) -> int:
    """Graphs launched so far: every sync looks its graph up in the compile cache, hit or miss."""
    return (met.counter_value("CachedCompile") or 0) + (met.counter_value("UncachedCompile") or 0)


if __name__ == "__main__":
    main()
