"""The training loop on torch_xla's CPU backend: bounded compilations, no fallbacks, no host syncs.

    python -m pytest tests/test_xla_training.py -q

Runs benchmarks/xla_report.py's measurement (tiny model, static-shape batches over several
length buckets, the adversarial terms switching on mid-run) in a PJRT_DEVICE=CPU subprocess.
"""

import json

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
@pytest.mark.parametrize("use_amp", ["false", "true"])  # true: the TPU config's bf16 autocast
def test_xla_training_compiles_once_per_bucket_without_fallbacks_or_syncs(use_amp: str):
    report = _report(["--steps", "6", "--log_every", "2", *TINY_MODEL,
                      "--set", "dataset.time_buckets=[256,384,512,768]", "--set", f"use_amp={use_amp}"])
    assert report["aten_fallbacks"] == {}, report  # dense CTC and the masked step keep everything in XLA
    assert report["local_scalar_dense"] == 0, report  # no .item() anywhere in the run
    # One setup graph (weights placed on the device), one graph per training bucket, one more for
    # the first step (AdamW creates its moments, and the warm-up lr is exactly 0), one eval graph
    # per validation bucket. The adversarial gate switching on at step 2 (mid-bucket) must not add any.
    bound = 1 + len(report["train_buckets"]) + 1 + len(report["val_buckets"])
    assert 0 < report["n_compilations"] <= bound, report
    assert len(report["train_buckets"]) >= 2, report  # the run really spans several buckets
    assert report["graphs_per_step"] == [1] * 6, report


@requires_xla
def test_accumulated_micro_batches_compile_once_per_bucket():
    # The TPU config: two micro-batches per step, bf16; the report's fine time buckets. Micro-batches
    # in different buckets would trace a graph per pair of buckets if a step did not pad them alike.
    report = _report(["--config", "rnn_args.yaml", "--steps", "12", "--log_every", "4", *TINY_MODEL,
                      "--set", "dataset.sessions=[]"])  # the sessions the synthetic data holds
    assert report["gradient_accumulation_steps"] == 2, report
    assert report["aten_fallbacks"] == {} and report["local_scalar_dense"] == 0, report
    assert all(len(set(lengths)) == 1 for lengths in report["step_lengths"]), report
    assert len(report["train_buckets"]) >= 2, report
    bound = len(report["train_buckets"]) + len(report["val_buckets"]) + 3
    assert 0 < report["n_compilations"] <= bound, report
    assert report["graphs_per_step"] == [1] * 12, report
