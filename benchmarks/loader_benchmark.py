"""Training-loader throughput: trials per second of the trainer's loader, side by side with upstream's.

    python benchmarks/loader_benchmark.py --dataset_dir data/synthetic45 [--upstream ../nejm-brain-to-text]
        [--config_path rnn_args.yaml --n_batches 20 --rounds 3 --warmup_rounds 1 --num_workers 0
         --cache_dtype float32 bfloat16]

For each --cache_dtype, builds the trial cache of the train and val splits into a temporary folder
(its seconds are `cache_build_s`; the folder is removed at the end), then builds the training loader
with dataset.build_dataloaders at batch 64 exactly as the trainer does (one item per optimizer step,
the config's static shapes and buckets; a half-precision cache's batches in its dtype, widened by the
trainer on the device) and times, in `rounds` alternating rounds, n_batches of each and,
with --upstream, n_batches of upstream's BrainToTextDataset (its model_training/dataset.py,
imported from UPSTREAM_DIR, which is never copied here) in a DataLoader as upstream's trainer
makes it, over the same files and with the same workers; each item is held while the next is
drawn, as a training loop holds its step's batches. `warmup_rounds` alternating rounds go first,
reported apart (`*warmup*`): workers start, pages of the cache are mapped, and the loader's
kept batch buffers are allocated there. Per cache dtype (`by_cache_dtype`): trials/s (median of the
rounds), its ratio to upstream's (of the medians, and per round), `first_batch_s`, the wait for the
first item of a fresh iterator (workers starting included), `index_s` the loader build with a
fresh cache; `hdf5_index_s` is the same without the cache (indices read from the HDF5 files, as
before the cache): with the cache build, the time to the first training step. --index_only
stops there, for sets made with make_synthetic_data.py --full_size --unwritten_features (real
trial counts and lengths, features never written: reading them would time nothing). RSS is this process's (and its workers' at their peak), split into anonymous memory
and mapped files: the cache's pages are file pages that every process of a host shares.

Also prints, per shipped model and TPU slice, the trials per second a host must deliver to keep
the chips busy at the compute-bound step time: the FLOPs per step that benchmarks/tpu_cost.py
measures (TPU_MODEL_SUMMARY.md) over the slice's peak bf16 rate (tpu_cost.TPU_SPECS).
Generate data in the real trial lengths first, e.g.
`python make_synthetic_data.py --out data/synthetic45 --n_sessions 45 --n_train_trials 16
--n_val_trials 4 --n_test_trials 1 --mean_phoneme_bins 41`. One JSON line.
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from config import load_config  # noqa: E402
from dataset import build_dataloaders, build_trial_cache, discover_sessions, session_files  # noqa: E402

# FLOPs of one training step of 512 trials at the bucket of the mean real trial (1024 bins), as
# benchmarks/tpu_cost.py measures them (TPU_MODEL_SUMMARY.md, "What a run costs").
FLOPS_PER_STEP = {"triple": 517.6e12, "triple_noise768": 59.2e12, "baseline": 25.9e12}
TRIALS_PER_STEP = 512
TPUS = ("v4-8", "v5e-8", "v6e-8")


def _tpu_specs() -> dict[str, dict[str, float]]:
    """tpu_cost.TPU_SPECS, imported without the XLA environment that tpu_cost sets for itself."""
    saved = dict(os.environ)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import tpu_cost

    os.environ.clear()
    os.environ.update(saved)
    return tpu_cost.TPU_SPECS


def needed_trials_per_s() -> dict[str, dict[str, dict[str, float]]]:
    """Per model and slice: compute-bound step time and the trials/s a host must feed it."""
    specs = _tpu_specs()
    table = {}
    for model, flops in FLOPS_PER_STEP.items():
        table[model] = {}
        for tpu in TPUS:
            step_s = flops / (specs[tpu]["chips"] * specs[tpu]["peak_bf16"])
            table[model][tpu] = {"step_s": round(step_s, 5), "trials_per_s": round(TRIALS_PER_STEP / step_s)}
    return table


def _upstream_loader(upstream_dir: str, paths: list[str], *, n_batches: int, batch_size: int, days_per_batch: int,
                     seed: int, n_workers: int) -> DataLoader:
    """Upstream's training loader over the same files, as its rnn_trainer.py builds it."""
    folder = Path(upstream_dir)
    source = folder / "dataset.py" if folder.name == "model_training" else folder / "model_training" / "dataset.py"
    if not source.is_file():
        raise SystemExit(f"loader_benchmark.py: {source}: not found (--upstream takes upstream's repository or its "
                         "model_training folder)")
    spec = importlib.util.spec_from_file_location("upstream_dataset", source)
    upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream)
    train_trials, _ = upstream.train_test_split_indicies(file_paths=paths, test_percentage=0, seed=seed, bad_trials_dict=None)
    dataset = upstream.BrainToTextDataset(trial_indicies=train_trials, split="train", days_per_batch=days_per_batch,
                                          n_batches=n_batches, batch_size=batch_size, must_include_days=None,
                                          random_seed=seed, feature_subset=None)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=n_workers, pin_memory=False)


def _trials(item: Any) -> int:
    """Trials in a loader item: ours (a step's micro-batches, row_mask) or upstream's (a batch)."""
    if isinstance(item, list):
        return sum(int(batch["row_mask"].sum()) for batch in item)
    return len(item["n_time_steps"])


def _time_batches(steps: Any, n_items: int) -> float:
    """Trials per second over the next n_items items of an iterator, each item held while the next
    is drawn, as a training loop holds its step's batches."""
    start, n_trials, item = time.perf_counter(), 0, None
    for _ in range(n_items):
        item = next(steps)
        n_trials += _trials(item)
    del item
    return n_trials / (time.perf_counter() - start)


def _rss_mb() -> dict[str, float]:
    """This process's resident memory now (anonymous and file-backed), its peak, and the largest peak
    of its child processes (the workers among them)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(fields["VmRSS"]), "rss_anon_mb": round(fields["RssAnon"]),
            "rss_file_mb": round(fields["RssFile"]), "peak_rss_mb": round(fields["VmHWM"]),
            "children_peak_rss_mb": round(children)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--config_path", default="rnn_args.yaml", help="the trainer's config (its dataset section)")
    parser.add_argument("--upstream", default=None, metavar="UPSTREAM_DIR",
                        help="checkout of upstream's repository, or its model_training folder")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--n_batches", type=int, default=20, help="timed batches per round and loader")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, then upstream's)")
    parser.add_argument("--warmup_rounds", type=int, default=1,
                        help="rounds before the timed ones (reported apart): workers start, batch buffers fill")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--cache_dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16", "float16"),
                        help="one loader per cache dtype, timed in the same alternating rounds")
    parser.add_argument("--index_only", action="store_true", help="time the cache and index builds only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sessions = discover_sessions(args.dataset_dir)
    dtypes = list(dict.fromkeys(args.cache_dtype))
    cache_root = tempfile.mkdtemp(prefix="loader_benchmark_cache_")
    ours: dict[str, dict[str, Any]] = {}
    try:
        base = [
            f"dataset.dataset_dir={args.dataset_dir}", f"dataset.sessions=[{','.join(sessions)}]",
            f"dataset.batch_size={args.batch_size}", f"dataset.num_dataloader_workers={args.num_workers}",
            f"dataset.trial_cache_dir={cache_root}",
        ]
        cfg = load_config(REPO / args.config_path, base)
        accum = cfg.gradient_accumulation_steps
        n_items = -(-args.n_batches // accum)
        n_rounds = args.warmup_rounds + args.rounds + 1
        for dtype in dtypes:
            start = time.perf_counter()
            for split in ("train", "val"):
                build_trial_cache(args.dataset_dir, split, dtype, cache_root)
            cache_build_s = time.perf_counter() - start
            start = time.perf_counter()
            # The loader training iterates: one item per optimizer step, the step's micro-batches.
            train_loader, val_loader, _ = build_dataloaders(
                load_config(REPO / args.config_path, base + [f"dataset.trial_cache_dtype={dtype}"]),
                n_steps=n_rounds * n_items, batches_per_step=accum)
            ours[dtype] = {"loader": train_loader, "val_loader": val_loader, "cache_build_s": cache_build_s,
                           "index_s": time.perf_counter() - start, "rates": []}
        start = time.perf_counter()
        build_dataloaders(load_config(REPO / args.config_path, base + ["dataset.trial_cache=false"]),
                          n_steps=n_rounds * n_items, batches_per_step=accum)
        hdf5_index_s = time.perf_counter() - start
        first = ours[dtypes[0]]
        counts = {"n_sessions": len(sessions),
                  "n_train_trials": sum(len(e["trials"]) for e in first["loader"].dataset.trial_indices.values())}
        if args.index_only:
            print(json.dumps({"cache_build_s": {d: round(o["cache_build_s"], 2) for d, o in ours.items()},
                              "index_s": {d: round(o["index_s"], 3) for d, o in ours.items()},
                              "hdf5_index_s": round(hdf5_index_s, 3), **counts,
                              "n_val_trials": sum(len(e["trials"]) for e in first["val_loader"].dataset.trial_indices.values()),
                              **_rss_mb()}))
            return
        for o in ours.values():
            start = time.perf_counter()
            o["steps"] = iter(o["loader"])
            _trials(next(o["steps"]))
            o["first_batch_s"] = time.perf_counter() - start
        theirs, upstream_first_s = None, None
        if args.upstream:
            paths = session_files(args.dataset_dir, sessions, "train")
            loader = _upstream_loader(args.upstream, paths, n_batches=n_rounds * args.n_batches,
                                      batch_size=args.batch_size, days_per_batch=cfg.dataset.days_per_batch,
                                      seed=cfg.dataset.loader_seed, n_workers=args.num_workers)
            start = time.perf_counter()
            theirs = iter(loader)
            _trials(next(theirs))
            upstream_first_s = time.perf_counter() - start
        upstream_rates: list[float] = []
        for _ in range(args.warmup_rounds + args.rounds):
            for o in ours.values():
                o["rates"].append(_time_batches(o["steps"], n_items))
            if theirs is not None:
                upstream_rates.append(_time_batches(theirs, args.n_batches))
        memory = _rss_mb()
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    needed = needed_trials_per_s()
    upstream = statistics.median(upstream_rates[args.warmup_rounds :]) if theirs is not None else None
    by_dtype = {}
    for dtype, o in ours.items():
        rates, warmup = o["rates"][args.warmup_rounds :], o["rates"][: args.warmup_rounds]
        median = statistics.median(rates)
        entry = {
            "trials_per_s": round(median),
            "trials_per_s_rounds": [round(r) for r in rates],
            "warmup_trials_per_s_rounds": [round(r) for r in warmup],
            "cache_build_s": round(o["cache_build_s"], 2),
            "index_s": round(o["index_s"], 3),
            "first_batch_s": round(o["first_batch_s"], 3),
        }
        if upstream is not None:
            theirs_rounds = upstream_rates[args.warmup_rounds :]
            entry.update({
                "ratio_to_upstream": round(median / upstream, 1),  # of the medians
                "ratio_to_upstream_rounds": [round(a / b, 1) for a, b in zip(rates, theirs_rounds)],
                "median_round_ratio": round(statistics.median(a / b for a, b in zip(rates, theirs_rounds)), 1),
            })
        entry["input_bound_at_this_rate"] = sorted(
            f"{model} on {tpu}" for model, row in needed.items() for tpu, v in row.items() if v["trials_per_s"] > median
        )
        by_dtype[dtype] = entry
    report = {
        "by_cache_dtype": by_dtype,
        "hdf5_index_s": round(hdf5_index_s, 3),
        **memory,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "static_shapes": cfg.dataset.static_shapes,
        **counts,
        "cpu_count": os.cpu_count(),
    }
    if upstream is not None:
        report.update({
            "upstream_trials_per_s": round(upstream),
            "upstream_trials_per_s_rounds": [round(r) for r in upstream_rates[args.warmup_rounds :]],
            "upstream_warmup_trials_per_s_rounds": [round(r) for r in upstream_rates[: args.warmup_rounds]],
            "upstream_first_batch_s": round(upstream_first_s, 3),
        })
    report["needed_trials_per_s_per_host"] = needed
    print(json.dumps(report))


if __name__ == "__main__":
    main()
