"""benchmarks/tpu_cost.py's core: XLA's cost analysis with loops counted per trip, and the run figures.

    python -m pytest tests/test_tpu_cost.py -q

Runs in a PJRT_DEVICE=CPU subprocess (torch_xla traces; jaxlib's XLA runs HloCostAnalysis).
"""

import importlib.util
import json

import pytest

from conftest import requires_xla, run_xla_script

requires_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

CODE = """
import json, sys
sys.path.insert(0, "benchmarks")
import tpu_cost
import torch, torch_xla
from torch_xla.experimental.scan import _scan_impl_pytree
from config import load_config

device = torch_xla.device()


def loop_flops(n_steps, batch=8, hidden=64):
    # h <- h @ u + x_t for n_steps steps; ones are constants, so nothing else costs FLOPs.
    u = torch.ones(hidden, hidden, device=device)
    xs = torch.ones(n_steps, batch, hidden, device=device)
    _, ys = _scan_impl_pytree(lambda h, x: (h @ u + x, h @ u + x), torch.zeros(batch, hidden, device=device), xs)
    cost = tpu_cost.hlo_cost(torch_xla._XLAC._get_xla_tensors_hlo_proto([ys]))
    return cost["flops"], cost["loop_trip_counts"]


tiny = ["model.n_units=16", "model.noise_hidden_size=16", "model.n_input_features=24",
        "dataset.feature_subset=" + str(list(range(24))), "model.n_noise_layers=1", "model.n_clean_layers=1",
        "model.n_noisy_layers=1"]
cfg = load_config("rnn_args.yaml", tiny)
tpu_cost.N_DAYS = 3
report = tpu_cost.model_cost(cfg, n_steps=1000, trials_per_step=512)
report["hours_and_prices"] = tpu_cost.hours_and_prices(report["flops_per_run"])
print(json.dumps({"loops": [loop_flops(3), loop_flops(7)], "hidden": 64, "batch": 8, "tiny": report}))
"""


@requires_xla
@requires_jax
def test_cost_counts_every_loop_trip_and_run_figures_follow_the_fit():
    out = json.loads([line for line in run_xla_script(CODE).splitlines() if line.startswith("{")][-1])
    (flops3, trips3), (flops7, trips7) = out["loops"]
    assert (trips3, trips7) == ([3], [7])
    matmul = 2 * out["batch"] * out["hidden"] ** 2  # FLOPs of h @ u, twice per step in the body
    # 4 more trips cost 4 bodies: 2 matmuls each, plus B*H adds and the loop's index arithmetic.
    assert 1.0 <= (flops7 - flops3) / (4 * 2 * matmul) <= 1.05, out["loops"]
    assert flops3 >= 3 * 2 * matmul, out["loops"]  # counted once per trip, not once per loop

    r = out["tiny"]
    frames = r["frames_per_trial"]
    assert r["padded_bins"] == {"mean": 1024, "max": 2560}  # 875 and 2,475 bins in the shipped buckets
    assert frames == {"mean_padded": (1024 - 14) // 4 + 1, "max_padded": (2560 - 14) // 4 + 1,
                      "mean_unpadded": (875 - 14) // 4 + 1}
    assert set(r["loop_trip_counts"]) == {frames["mean_padded"]}, r  # recurrences and CTC over T' frames
    per_trial = r["flops_per_trial_frame"] * frames["mean_padded"]
    assert r["flops_per_step"] == pytest.approx(r["flops_fixed_per_step"] + 512 * per_trial)
    assert r["flops_per_run"] == pytest.approx(1000 * r["flops_per_step"])
    assert r["batch_fit_check_relative_error"] < 1e-3, r  # linear in trials: a third batch size agrees
    assert r["length_relative_difference"] < 0.05, r  # per trial-frame, whatever the padded length
    assert r["flops_fixed_per_step"] > 0  # the optimizer update and clipping, once per step
    # Forward + backward through a GRU cost 6 FLOPs per weight and frame; the rest only adds.
    assert r["ratio_to_six_flops_per_gru_weight"] >= 1.0, r
    rows = {row["accelerator"]: row for row in r["hours_and_prices"]}
    assert rows["v4-8"]["hours"] == pytest.approx(r["flops_per_run"] / (4 * 275e12) / 3600)
    assert rows["v5e-8"]["usd"] == pytest.approx(rows["v5e-8"]["hours"] * 8 * 1.20)
