"""Traced aten ops per optimizer step, and the steps where AdamW's changing scalars round to 0 or 1.

    PJRT_DEVICE=CPU python benchmarks/optimizer_ops.py [--config rnn_args.yaml] [--n_days 45]
        [--widths 4 8] [--set key=value ...]
    python benchmarks/optimizer_ops.py --config rnn_args_demo.yaml --widths 0   # CPU step time at the config's widths

ops: builds the config's model (the shipped triple: the same modules, layers and day layers) at
small widths (0: the config's own), `--n_days` days, with its optimizer
(rnn_trainer.build_optimizer) on the XLA device when torch_xla is installed and PJRT_DEVICE is
set (the path a TPU runs; PJRT_DEVICE=CPU runs it here), else on the CPU. Every parameter gets a
gradient, a step creates the optimizer state, and a TorchDispatchMode then counts the aten ops
that one rnn_trainer._masked_optimizer_step dispatches (4 days present, as days_per_batch
draws). The count does not depend on the widths; two widths show it. step_ms is the host time of
that call, the median of 5 steps: on XLA tracing only (the graph runs at the sync after it), on
the CPU the whole update (there through torch's fused kernel; `train_speed.py --kernels` times it
against the foreach ops XLA runs).

scalars: for the k-th optimizer step, k = 1 .. num_training_batches, with the config's betas,
schedules (rnn_trainer._lr_factor: the k-th step uses the schedule's lr at k - 1) and weight
decays, each scalar that changes over a run, computed in float64 as torch's AdamW does, then
rounded to float32 as torch_xla does with a Python scalar. torch_xla makes a scalar that is then
0 or +-1 a graph constant and any other value data, so each run of such steps is a new graph
wherever a kernel receives the scalar as a Python float. torch.optim.AdamW (single-tensor, the
XLA path) hands kernels lr / (1 - beta1^t), sqrt(1 - beta2^t) and 1 - lr * wd so; t is the
parameter's step count (k for shared weights, at most k for a day layer). Prints, per scalar,
the [first, last] step of every run where it is 0 or 1.

Prints ONE JSON line: {"device", "n_days", "ops": {width: {"n_ops", "step_ms", "by_op"}},
"scalars_0_or_1": {scalar: [[first, last], ...]}}.
"""

import os
import sys

os.environ.setdefault("CPU_NUM_DEVICES", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import rnn_model  # noqa: E402
import rnn_trainer  # noqa: E402
from config import OptimizerConfig, apply_overrides, config_from_dict, config_to_dict, load_config  # noqa: E402


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _device() -> torch.device:
    if importlib.util.find_spec("torch_xla") is not None and os.environ.get("PJRT_DEVICE"):
        import torch_xla

        return torch_xla.device()
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def count_step_ops(cfg: Any, *, n_days: int, width: int, device: torch.device) -> dict[str, Any]:
    """Aten ops and host ms of one masked optimizer step of cfg's model at a small width."""
    cfg = copy.deepcopy(cfg)
    if width:  # 0: the config's own widths
        cfg.model.n_input_features = width
        cfg.model.n_units = 2 * width
        if cfg.model.noise_hidden_size:
            cfg.model.noise_hidden_size = 2 * width
    torch.manual_seed(0)
    model = rnn_model.build_model(cfg.model, n_days=n_days).to(device)
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    present = torch.zeros(n_days, dtype=torch.bool)
    present[torch.randperm(n_days)[: min(4, n_days)]] = True
    present = present.to(device)
    counts, times = None, []
    for step in range(7):
        for p in model.parameters():
            p.grad = torch.randn(p.shape).to(device)
        finite = torch.isfinite(next(model.parameters()).grad).all()  # computed in the graph, as in train_step
        _sync(device)
        # The first step creates the state outside the mode: on XLA a tensor a factory makes under
        # a dispatch mode is not functionalized, and the next step could not update it in place.
        counter = _OpCounter() if step == 1 else contextlib.nullcontext()
        start = time.perf_counter()
        with counter:
            rnn_trainer._masked_optimizer_step(optimizer, finite, days_present=present)
        elapsed = time.perf_counter() - start
        scheduler.step()
        _sync(device)
        if step == 1:
            counts = counter.counts  # the first step after the one that created the state
        if step >= 2:
            times.append(1000 * elapsed)
    return {"n_ops": sum(counts.values()), "step_ms": round(statistics.median(times), 2),
            "by_op": dict(counts.most_common())}


def scalars_0_or_1(o: OptimizerConfig, n_steps: int) -> dict[str, list[list[int]]]:
    """Per changing AdamW scalar, the runs [first, last] of optimizer steps 1..n_steps at which it
    rounds to exactly 0 or +-1 in float32 (torch_xla's graph constants)."""
    k = np.arange(1, n_steps + 1)
    t = k.astype(np.float64)
    schedule = dict(kind=o.lr_scheduler_type)
    lr = o.lr_max * np.array([rnn_trainer._lr_factor(int(s) - 1, lr_max=o.lr_max, lr_min=o.lr_min,
                              warmup_steps=o.lr_warmup_steps, decay_steps=o.lr_decay_steps, **schedule) for s in k])
    lr_day = o.lr_max_day * np.array([
        rnn_trainer._lr_factor(int(s) - 1, lr_max=o.lr_max_day, lr_min=o.lr_min_day, warmup_steps=o.lr_warmup_steps_day,
                               decay_steps=o.lr_decay_steps_day, **schedule) for s in k])
    bias_correction1 = 1 - o.beta0**t
    values = {
        "lr": lr,
        "lr_day": lr_day,
        "1 - lr * weight_decay": 1 - lr * o.weight_decay,
        "1 - lr_day * weight_decay_day": 1 - lr_day * o.weight_decay_day,
        "1 - beta1^t": bias_correction1,
        "1 - beta2^t": 1 - o.beta1**t,
        "sqrt(1 - beta2^t)": (1 - o.beta1**t) ** 0.5,
        "lr / (1 - beta1^t)": lr / bias_correction1,
        "lr_day / (1 - beta1^t)": lr_day / bias_correction1,
    }
    runs: dict[str, list[list[int]]] = {}
    for name, value in values.items():
        f32 = value.astype(np.float32)
        hit = (f32 == 0) | (np.abs(f32) == 1)
        steps = k[hit]
        found: list[list[int]] = []
        for s in steps.tolist():
            if found and found[-1][1] == s - 1:
                found[-1][1] = s
            else:
                found.append([s, s])
        runs[name] = found
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="rnn_args.yaml")
    parser.add_argument("--n_days", type=int, default=45)
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--set", action="append", default=[], help="dotted key=value config override")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.set:
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), args.set))
    device = _device()
    report = {
        "device": device.type,
        "n_days": args.n_days,
        "ops": {w: count_step_ops(cfg, n_days=args.n_days, width=w, device=device) for w in args.widths},
        "scalars_0_or_1": scalars_0_or_1(cfg.optimizer, cfg.num_training_batches),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
