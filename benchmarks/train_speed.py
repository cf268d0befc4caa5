"""Training speed on CPU: the baseline GRUDecoder vs the TripleGRUDecoder on the demo config; with
--kernels, DayAdamW's fused kernel vs its foreach ops, and this repository's step vs upstream's.

    python benchmarks/train_speed.py [--config rnn_args_demo.yaml] [--steps 6] [--rounds 2] [--bidirectional]
        [--set key=value ...]
    OMP_NUM_THREADS=1 python benchmarks/train_speed.py --kernels [--steps 8] [--n_days 45]
        [--upstream UPSTREAM/model_training] [--models demo_triple demo_baseline recipe_baseline_256x3]

Writes a small synthetic dataset (make_synthetic_data.generate_dataset) to a temp dir and runs
rnn_trainer.train for --steps steps per model type (data loading and augmentation included,
validation excluded), alternating the two models for --rounds rounds so that load from other
processes hits both alike. Prints ONE JSON line: steps/s of each from its fastest step after the
first (timeit's best-of, the least disturbed by a shared machine), the median-based steps/s,
and the triple/baseline time ratio. With --bidirectional the bidirectional form of each model
(model.bidirectional=true) joins the alternation, and the line adds its steps/s and its time over
the causal form's.

--kernels (one torch thread, --n_days sessions, float32): for each model of SPECS (the demo's
triple and baseline at its widths, the recipe's baseline at 256 units x 3 layers), the ms of
  optimizer_step: one masked DayAdamW step (4 days present, random gradients) with its foreach
    ops and with torch's fused kernel, and torch's fused AdamW over the same groups (every day's
    rows: what the fused path costs without the per-day split), alternating step by step;
  train_step: rnn_trainer.train_step (augmentation, forward, CTC, backward, clip, update) with
    either optimizer path, on the same host batches, alternating step by step; with --upstream,
    for the baseline models also upstream's step (its GRUDecoder, transform_data, AdamW groups and
    cosine schedule from its modules in that directory, never part of this repository; its
    training loop's step, logging and validation left out), on the same batches, same sizes and
    optimizer settings.
Each as median and best over --steps steps after the first, and the time ratios from the best
steps; upstream's over ours also from the medians and as the median of the per-step ratios (both
steps ran on the same batch, so that one does not see how batch lengths vary). Progress goes to
stderr, one line per model; the JSON line to stdout.
"""

import os
import sys

os.environ.setdefault("USE_TORCH_XLA", "0")  # before accelerate is imported: CPU, not XLA
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import rnn_model  # noqa: E402
import rnn_trainer  # noqa: E402
from config import load_config  # noqa: E402
from dataset import build_dataloaders  # noqa: E402
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


# ----------------------------------------------------------------------------- --kernels

# The models timed with --kernels: the demo config's two models at its widths, and the recipe's
# baseline at a CPU width (n_units 256, 3 layers: 8.08M parameters with 6 days, 18.3M with 45).
SPECS = {
    "demo_triple": ["model.type=triple"],
    "demo_baseline": ["model.type=baseline"],
    "recipe_baseline_256x3": ["model.type=baseline", "model.n_units=256", "model.n_layers=3"],
}
N_PRESENT = 4  # days drawn per batch (days_per_batch), the rows an optimizer step updates


def _host_batches(cfg: Any, n: int) -> list[dict[str, torch.Tensor]]:
    train_loader, _, _ = build_dataloaders(cfg, n_steps=n)
    return [rnn_trainer._to_device(train_loader.dataset[i], torch.device("cpu")) for i in range(n)]


def _ours(cfg: Any, *, accelerator: Any, n_days: int, fused: bool) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model = rnn_model.build_model(cfg.model, n_days=n_days)
    rnn_model.use_sparse_day_gradients(model)  # as rnn_trainer.train in one CPU process
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    optimizer.fused = fused
    scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, counters=(torch.tensor(0), torch.tensor(0)),
                generator=torch.Generator().manual_seed(cfg.seed))


def _our_step(run: dict[str, Any], batch: dict[str, torch.Tensor], *, cfg: Any, accelerator: Any) -> None:
    rnn_trainer.train_step(
        accelerator=accelerator, model=run["model"], optimizer=run["optimizer"], scheduler=run["scheduler"],
        micro_batches=[batch], cfg=cfg, step_counter=run["counters"][0], n_skipped=run["counters"][1],
        generator=run["generator"], use_dense_ctc=False,
    )


def _load_upstream(directory: str) -> types.SimpleNamespace:
    """Upstream's rnn_model, data_augmentations and rnn_trainer modules from `directory` (its
    model_training/), imported under their own names and then set aside, so this repository's
    modules of the same names stay in place. Its trainer's imports that no training step uses
    (torchaudio's edit distance, omegaconf) are stubbed when missing; the global settings it makes
    on import (float32 matmul precision, cuDNN determinism) are put back."""
    names = ("rnn_model", "rnn_trainer", "dataset", "data_augmentations")
    ours = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    stubs = {}
    if importlib.util.find_spec("torchaudio") is None:
        stubs["torchaudio"] = types.ModuleType("torchaudio")
        stubs["torchaudio"].functional = stubs["torchaudio.functional"] = types.ModuleType("torchaudio.functional")
    if importlib.util.find_spec("omegaconf") is None:
        stubs["omegaconf"] = types.ModuleType("omegaconf")
        stubs["omegaconf"].OmegaConf = None
    sys.modules.update(stubs)
    with warnings.catch_warnings():  # torch 2.9 warns that the getter's API is being replaced
        warnings.simplefilter("ignore")
        precision = torch.get_float32_matmul_precision()
    deterministic = torch.backends.cudnn.deterministic
    sys.path.insert(0, directory)
    try:
        trainer = importlib.import_module("rnn_trainer")
        upstream = types.SimpleNamespace(GRUDecoder=sys.modules["rnn_model"].GRUDecoder,
                                         Trainer=trainer.BrainToTextDecoder_Trainer)
    finally:
        sys.path.remove(directory)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(ours)
        for name in stubs:
            sys.modules.pop(name, None)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.deterministic = deterministic
    return upstream


def _upstream(upstream: types.SimpleNamespace, cfg: Any, *, n_days: int) -> types.SimpleNamespace:
    """Upstream's trainer state for cfg's model and optimizer settings, built by its own methods
    (create_optimizer, create_cosine_lr_scheduler) on an object holding what they read."""
    m, o = cfg.model, cfg.optimizer
    torch.manual_seed(cfg.seed)
    model = upstream.GRUDecoder(neural_dim=m.n_input_features, n_units=m.n_units, n_days=n_days,
                                n_classes=m.n_classes, rnn_dropout=m.rnn_dropout, input_dropout=m.input_dropout,
                                n_layers=m.n_layers, patch_size=m.patch_size, patch_stride=m.patch_stride)
    args = {key: getattr(o, key) for key in (
        "lr_max", "lr_min", "lr_decay_steps", "lr_warmup_steps", "lr_max_day", "lr_min_day", "lr_decay_steps_day",
        "lr_warmup_steps_day", "beta0", "beta1", "epsilon", "weight_decay", "weight_decay_day", "grad_norm_clip_value")}
    args["model"] = {"patch_size": m.patch_size, "patch_stride": m.patch_stride}
    transforms = dataclasses.asdict(cfg.dataset.data_transforms)
    run = types.SimpleNamespace(model=model, args=args, transform_args=transforms, device=torch.device("cpu"))
    run.optimizer = upstream.Trainer.create_optimizer(run)
    run.learning_rate_scheduler = upstream.Trainer.create_cosine_lr_scheduler(run, run.optimizer)
    run.ctc_loss = torch.nn.CTCLoss(blank=0, reduction="none", zero_infinity=False)
    run.transform_data = types.MethodType(upstream.Trainer.transform_data, run)
    return run


def _upstream_step(run: types.SimpleNamespace, batch: dict[str, torch.Tensor]) -> None:
    """One step of upstream's training loop (BrainToTextDecoder_Trainer.train), its logging and
    validation left out: augment, forward, CTC, backward, clip, fused AdamW, schedule. Its
    autocast names "cuda", so on the CPU it computes in float32, as the demo config does here."""
    run.model.train()
    run.optimizer.zero_grad()
    features, n_time_steps = run.transform_data(batch["input_features"].clone(), batch["n_time_steps"], "train")
    patch = run.args["model"]
    adjusted_lens = ((n_time_steps - patch["patch_size"]) / patch["patch_stride"] + 1).to(torch.int32)
    logits = run.model(features, batch["day_indices"])
    loss = run.ctc_loss(log_probs=torch.permute(logits.log_softmax(2), [1, 0, 2]), targets=batch["seq_class_ids"],
                        input_lengths=adjusted_lens, target_lengths=batch["phone_seq_lens"])
    loss = torch.mean(loss)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm=run.args["grad_norm_clip_value"],
                                   error_if_nonfinite=True, foreach=True)
    run.optimizer.step()
    run.learning_rate_scheduler.step()
    loss.detach().item()


def _optimizer_ms(runs: dict[str, dict[str, Any]], *, n_days: int, n_steps: int) -> dict[str, list[float]]:
    """ms of one masked optimizer step of each run's optimizer (N_PRESENT days present, fresh
    random gradients), alternating the runs, plus torch's fused AdamW over the same groups."""
    generator = torch.Generator().manual_seed(0)
    present = torch.zeros(n_days, dtype=torch.bool)
    present[torch.randperm(n_days, generator=generator)[:N_PRESENT]] = True
    optimizers = {name: run["optimizer"] for name, run in runs.items()}
    some = next(iter(runs.values()))["optimizer"].optimizer
    twin = copy.deepcopy([p.detach() for g in some.param_groups for p in g["params"]])
    groups, i = [], 0
    for g in some.param_groups:
        params = [torch.nn.Parameter(t) for t in twin[i : i + len(g["params"])]]
        groups.append({"params": params, "lr": g["lr"], "weight_decay": g["weight_decay"]})
        i += len(params)
    o = some.defaults
    optimizers["torch_fused_adamw_all_days"] = torch.optim.AdamW(groups, betas=o["betas"], eps=o["eps"], fused=True)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for step in range(n_steps + 1):
        for name, optimizer in optimizers.items():
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            start = time.perf_counter()
            if name.startswith("torch"):
                optimizer.step()
            else:
                rnn_trainer._masked_optimizer_step(optimizer, torch.tensor(True), days_present=present)
            if step:  # the first creates the state
                times[name].append(1000 * (time.perf_counter() - start))
            optimizer.zero_grad(set_to_none=True)
    return times


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {name: {"median_ms": round(statistics.median(ms), 1), "best_ms": round(min(ms), 1)}
            for name, ms in times.items()}


def compare_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """--kernels: per model in SPECS, the optimizer step and the whole training step with
    DayAdamW's foreach ops and with its fused kernel (and upstream's step, --upstream), alternating."""
    torch.set_num_threads(1)
    upstream = _load_upstream(args.upstream) if args.upstream else None
    accelerator = Accelerator(cpu=True)
    report: dict[str, Any] = {"config": args.config, "device": "cpu", "torch": torch.__version__,
                              "torch_threads": torch.get_num_threads(), "n_days": args.n_days,
                              "upstream": args.upstream, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        generate_dataset(str(data_dir), n_sessions=args.n_days, n_train_trials=8, n_val_trials=2, n_test_trials=1,
                         seed=0)
        for name in args.models:
            overrides = SPECS[name]
            cfg = load_config(args.config, [f"dataset.dataset_dir={data_dir}", f"output_dir={tmp}/run", "use_amp=false",
                                            *overrides, *args.set])
            batches = _host_batches(cfg, args.steps + 1)
            runs = {kernels: _ours(cfg, accelerator=accelerator, n_days=args.n_days, fused=kernels == "fused")
                    for kernels in ("foreach", "fused")}
            n_params = sum(p.numel() for p in runs["fused"]["model"].parameters())
            optimizer_ms = _optimizer_ms(runs, n_days=args.n_days, n_steps=args.steps)
            steps: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
                kernels: functools.partial(_our_step, run, cfg=cfg, accelerator=accelerator)
                for kernels, run in runs.items()}
            if upstream is not None and cfg.model.type == "baseline":
                steps["upstream"] = functools.partial(_upstream_step, _upstream(upstream, cfg, n_days=args.n_days))
            step_ms: dict[str, list[float]] = {variant: [] for variant in steps}
            for i, batch in enumerate(batches):  # the first step of each pays for one-off set-up
                for variant, step in steps.items():
                    start = time.perf_counter()
                    step(batch)
                    if i:
                        step_ms[variant].append(1000 * (time.perf_counter() - start))
            entry = {"parameters": n_params, "optimizer_step": _summary(optimizer_ms), "train_step": _summary(step_ms)}
            best = {v: min(ms) for v, ms in step_ms.items()}
            entry["train_step_foreach_over_fused"] = round(best["foreach"] / best["fused"], 3)
            entry["optimizer_step_foreach_over_fused"] = round(
                min(optimizer_ms["foreach"]) / min(optimizer_ms["fused"]), 2)
            if "upstream" in best:
                entry["train_step_upstream_over_fused"] = round(best["upstream"] / best["fused"], 3)
                entry["train_step_upstream_over_fused_median"] = round(
                    statistics.median(step_ms["upstream"]) / statistics.median(step_ms["fused"]), 3)
                # Paired: each step's batch is the same for both, so its ratio does not see batch lengths.
                entry["train_step_upstream_over_fused_per_step_median"] = round(
                    statistics.median(u / f for u, f in zip(step_ms["upstream"], step_ms["fused"])), 3)
            report["models"][name] = entry
            print(json.dumps({name: entry}), file=sys.stderr)
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args_demo.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bidirectional", action="store_true", help="also time each model bidirectional")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kernels", action="store_true", help="DayAdamW fused vs foreach (and upstream's step)")
    parser.add_argument("--n_days", type=int, default=45, help="--kernels: sessions, so day layers")
    parser.add_argument("--upstream", metavar="DIR", help="--kernels: upstream's model_training/ directory")
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=list(SPECS), help="--kernels: models")
    args = parser.parse_args(argv)
    if args.kernels:
        return compare_kernels(args)
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
