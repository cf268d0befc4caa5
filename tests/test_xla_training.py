"""The training loop on torch_xla's CPU backend: bounded compilations, no fallbacks, no host syncs.

    python -m pytest tests/test_xla_training.py -q

Runs benchmarks/xla_report.py's measurement (tiny model, static-shape batches over several
length buckets, the adversarial terms switching on mid-run) in a PJRT_DEVICE=CPU subprocess.
"""

import json
import math

import pytest

from conftest import requires_xla, run_xla_script

TINY_MODEL = [
    "--set", "model.n_units=16", "--set", "model.noise_hidden_size=16", "--set", "model.n_noise_layers=1",
    "--set", "model.n_clean_layers=1", "--set", "model.n_noisy_layers=1", "--set", "dataset.batch_size=2",
    "--set", "dataset.val_batch_size=4", "--set", "adversarial.warmup_steps=2",
]

CODE = """
import json, sys
sys.path.insert(0, "benchmarks")
import xla_report
report = xla_report.main({argv!r})
"""


def _report(argv: list[str]) -> dict:
    lines = [line for line in run_xla_script(CODE.format(argv=argv)).splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


@requires_xla
# true: the TPU config's bf16 autocast; a bfloat16 trial cache sends bf16 batches, widened in the step's graph
@pytest.mark.parametrize("use_amp,cache_dtype", [("false", "float32"), ("true", "float32"), ("true", "bfloat16")])
def test_xla_training_compiles_once_per_bucket_without_fallbacks_or_syncs(use_amp: str, cache_dtype: str):
    report = _report(["--steps", "6", "--log_every", "2", *TINY_MODEL, "--set", "dataset.time_buckets=[256,384,512,768]",
                      "--set", f"use_amp={use_amp}", "--set", f"dataset.trial_cache_dtype={cache_dtype}"])
    assert report["aten_fallbacks"] == {}, report  # dense CTC and the masked step keep everything in XLA
    assert report["local_scalar_dense"] == 0, report  # no .item() anywhere in the run
    # One setup graph (weights placed on the device), one graph per training bucket, one more for
    # the first step (AdamW creates its moments, and the warm-up lr is exactly 0), one eval graph
    # per validation bucket, and one fixed-shape all_gather of the replicas' random states at the
    # first checkpoint. The adversarial gate switching on at step 2 (mid-bucket) must not add any.
    bound = 1 + len(report["train_buckets"]) + 1 + len(report["val_buckets"]) + 1
    assert 0 < report["n_compilations"] <= bound, report
    assert len(report["train_buckets"]) >= 2, report  # the run really spans several buckets
    assert report["graphs_per_step"] == [1] * 6, report


@pytest.fixture(scope="module")
def accumulation_report() -> dict:
    # The TPU config: two micro-batches per step, bf16; the report's fine time buckets. Micro-batches
    # in different buckets would trace a graph per pair of buckets if a step did not pad them alike.
    return _report(["--config", "rnn_args.yaml", "--steps", "12", "--log_every", "4", *TINY_MODEL,
                    "--set", "dataset.sessions=[]"])  # the sessions the synthetic data holds


@requires_xla
def test_accumulated_micro_batches_share_one_length_and_one_graph(accumulation_report: dict):
    report = accumulation_report
    assert report["gradient_accumulation_steps"] == 2, report
    assert report["aten_fallbacks"] == {} and report["local_scalar_dense"] == 0, report
    assert all(len(set(lengths)) == 1 for lengths in report["step_lengths"]), report
    assert len(report["train_buckets"]) >= 2, report
    assert report["graphs_per_step"] == [1] * 12, report


@requires_xla
def test_accumulated_micro_batches_compile_once_per_bucket(accumulation_report: dict):
    report = accumulation_report
    bound = len(report["train_buckets"]) + len(report["val_buckets"]) + 3 + 1  # + the random states' all_gather
    assert 0 < report["n_compilations"] <= bound, report
    # Each bucket compiles once, plus the first step's variant: no bucket compiles again when the
    # warm-up lr makes AdamW's decay factor 1 - lr * wd stop rounding to 1.0 (steps 1-6 here).
    assert sum(report["compiles_per_step"]) <= len(report["train_buckets"]) + 1, report


# Several XLA replicas cannot be run on this CPU backend, so the step's code path is checked with
# the replica count faked to 2: the collectives are traced as for 2 replicas and run on 1.
SIMULATED_REPLICAS_CODE = """
import sys, tempfile
sys.path.insert(0, "tests")
import torch, torch_xla
import torch_xla.debug.metrics as met
from accelerate import Accelerator
import rnn_trainer
from config import config_from_dict
from dataset import build_dataloaders
from make_synthetic_data import generate_dataset
from conftest import tiny_config_dict

Accelerator.num_processes = property(lambda self: 2)
tmp = tempfile.mkdtemp()
generate_dataset(tmp, n_sessions=3, n_train_trials=8, n_val_trials=2, n_test_trials=1, seed=0)
values = tiny_config_dict(tmp, tmp + "/run")
values.update(gradient_accumulation_steps=2)
values["dataset"].update(static_shapes=True, time_buckets=[256, 320, 384, 448, 512, 768])
cfg = config_from_dict(values)
accelerator = Accelerator(gradient_accumulation_steps=2)
device = accelerator.device
model = rnn_trainer._build_replica_model(cfg, n_days=3, device=device, rank=0, broadcast=False)
optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
model, optimizer = accelerator.prepare(model, optimizer)
train_steps = iter(build_dataloaders(cfg, n_steps=2, batches_per_step=2)[0])
step_counter = torch.tensor(0, device=device)
n_skipped = torch.tensor(0, device=device)
torch_xla.sync()


def counters():
    return {name: met.counter_value(name) or 0 for name in ("MarkStep", "CachedCompile", "UncachedCompile")}


for step in range(2):
    micro_batches = [rnn_trainer._to_device(b, device) for b in next(train_steps)]
    before = counters()
    terms = rnn_trainer.train_step(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        micro_batches=micro_batches, cfg=cfg, step_counter=step_counter, n_skipped=n_skipped,
        generator=None, use_dense_ctc=True,
    )
    after = counters()
    syncs = after["MarkStep"] - before["MarkStep"]
    graphs = sum(after[k] - before[k] for k in ("CachedCompile", "UncachedCompile"))
    print("STEP", syncs, graphs, float(terms["loss"].cpu()), int(n_skipped.cpu()))
"""


@requires_xla
def test_a_step_with_several_replicas_is_one_graph():
    lines = [line.split()[1:] for line in run_xla_script(SIMULATED_REPLICAS_CODE).splitlines()
             if line.startswith("STEP")]
    assert len(lines) == 2, lines
    for syncs, graphs, loss, n_skipped in lines:
        assert (int(syncs), int(graphs)) == (1, 1), lines  # only the step's final sync; no cut at a reduce
        assert math.isfinite(float(loss)) and int(n_skipped) == 0, lines


# Accelerate calls xm.mark_step() when its gradient state turns sync_gradients true, but only when
# `is_torch_xla_available(check_is_tpu=True)` (accelerate/state.py, GradientState._set_sync_gradients),
# so on this CPU backend the cut never fires. Here Accelerate's own TPU check answers true.
TPU_SYNC_PATH_CODE = """
import json, sys
sys.path.insert(0, "benchmarks")
import accelerate.state
import torch_xla.debug.metrics as met

is_torch_xla_available = accelerate.state.is_torch_xla_available
accelerate.state.is_torch_xla_available = lambda check_is_tpu=False, **kwargs: True
import xla_report

# The TPU-only path is live in this process: opening a synced micro-batch cuts the graph.
before = met.counter_value("MarkStep") or 0
accelerate.state.GradientState()._set_sync_gradients(True)
print(json.dumps({{"mark_steps_of_tpu_path": (met.counter_value("MarkStep") or 0) - before}}))
report = xla_report.main({argv!r})
"""


@requires_xla
def test_a_step_with_accumulation_is_one_graph_on_accelerates_tpu_path():
    argv = ["--config", "rnn_args.yaml", "--steps", "3", "--log_every", "3", *TINY_MODEL,
            "--set", "dataset.sessions=[]", "--set", "dataset.time_buckets=[768]"]
    lines = [json.loads(line) for line in run_xla_script(TPU_SYNC_PATH_CODE.format(argv=argv)).splitlines()
             if line.startswith("{")]
    probe, report = lines[0], lines[-1]
    assert probe["mark_steps_of_tpu_path"] == 1, probe
    assert report["gradient_accumulation_steps"] == 2, report
    # Graphs launched by each train_step (executions: cached + uncached compiles). With
    # accelerator.accumulate this is 2 per step: the mark_step before the last micro-batch.
    assert report["graphs_per_step"] == [1] * 3, report
    assert report["aten_fallbacks"] == {} and report["local_scalar_dense"] == 0, report
