"""The alternatives the XLA design turned down, measured against what the code does; one JSON line.

    python benchmarks/xla_design.py

On torch_xla's CPU backend (PJRT_DEVICE=CPU), at small widths (the properties measured do not
depend on them), counting torch_xla's metrics:
  ctc            aten:: fallbacks of torch's F.ctc_loss vs ctc_loss.ctc_loss_dense, forward+backward
  patching       aten:: fallbacks of Tensor.unfold vs rnn_model.patch_inputs (strided slices)
  day_layer      compilations and host reads over 4 batches with different day mixes: a loop over the
                 batch's days with boolean masks vs index_select + bmm (rnn_model._select_day_affine)
  static_shapes  compilations of a GRUDecoder forward+backward over 6 batches of different lengths,
                 at their own lengths vs padded to time buckets of 320 and 352 bins
  outputs        HLO instructions of the TripleGRUDecoder graph for mode 'inference' (validation,
                 a 1-tuple) vs 'full' (training, clean and noisy logits and the noise)
On the CPU, against float64 (where the design keeps float32):
  gru_bf16       mean |error| of a 768-unit GRU layer's outputs over 250 frames (xla_gru.gru_scan),
                 float32 vs under bf16 autocast, at the first and the last 25 frames
  ctc_bf16       relative error of CTC losses (T' 250, 30 labels) from float32 log-probabilities vs
                 from log-probabilities computed in bf16
"""

import os
import sys

# Before anything imports torch_xla: run on XLA, on the host CPU.
os.environ["PJRT_DEVICE"] = os.environ.get("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rnn_model  # noqa: E402
from ctc_loss import ctc_loss_dense  # noqa: E402
from xla_gru import gru_scan  # noqa: E402


def _measure(fn) -> dict:
    """torch_xla's counts for fn(), from cleared metrics to a sync of what fn returns: compilations,
    aten:: ops run on the host (fallbacks), and device-to-host transfers (each one waits for the
    device)."""
    import torch_xla
    import torch_xla.debug.metrics as met

    met.clear_all()
    results = fn()  # kept alive: the sync computes them
    torch_xla.sync()
    del results
    compiles, transfers = met.metric_data("CompileTime"), met.metric_data("TransferFromDeviceTime")
    return {
        "compilations": compiles[0] if compiles else 0,
        "aten_fallbacks": sum(met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")),
        "host_transfers": transfers[0] if transfers else 0,
    }


def _ctc_batch(device, *, n_batch=4, n_time=60, n_classes=41, n_labels=10, seed=0) -> tuple:
    """Logits (B, T', C) that require grad, labels (B, S), input and label lengths (B,), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_batch, n_time, n_classes, generator=gen).to(device).requires_grad_(True)
    targets = torch.randint(1, n_classes, (n_batch, n_labels), generator=gen).to(device)
    lengths = torch.full((n_batch,), n_time, device=device), torch.full((n_batch,), n_labels, device=device)
    return logits, targets, *lengths


def measure_ctc(device) -> dict:
    def torch_ctc():
        logits, targets, input_lengths, target_lengths = _ctc_batch(device)
        loss = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths,
                          reduction="none")
        loss.sum().backward()
        return loss, logits.grad

    def dense_ctc():
        logits, targets, input_lengths, target_lengths = _ctc_batch(device)
        loss = ctc_loss_dense(logits.log_softmax(-1), targets, input_lengths, target_lengths)
        loss.sum().backward()
        return loss, logits.grad

    return {"torch_ctc_loss": _measure(torch_ctc), "ctc_loss_dense": _measure(dense_ctc)}


def measure_patching(device) -> dict:
    x = torch.randn(2, 100, 8).to(device)

    def unfold():  # (B, T, D) -> (B, T', D, P) -> (B, T', P*D)
        return x.unfold(1, 14, 4).transpose(2, 3).reshape(2, -1, 14 * 8)

    return {"unfold": _measure(unfold), "strided_slices": _measure(lambda: rnn_model.patch_inputs(x, 14, 4))}


def _day_loop(x, day_idx, weights, biases):
    """The alternative: one affine map per day present, rows picked by boolean masks."""
    out = torch.zeros_like(x)
    for day in day_idx.unique().tolist():  # (B, T, D) rows of one day -> (b, T, D)
        rows = day_idx == day
        out[rows] = x[rows] @ weights[day] + biases[day]
    return out


def measure_day_layer(device) -> dict:
    n_days, dim = 6, 8
    layer = rnn_model.DayInputLayer(neural_dim=dim, n_days=n_days).to(device)
    batches = [torch.tensor(days, device=device) for days in ([0, 1, 2, 3], [4, 4, 5, 0], [1, 3, 3, 3], [2, 5, 0, 1])]
    x = torch.randn(4, 20, dim).to(device)
    weights, biases = layer.day_weights, layer.day_biases  # (n_days, D, D), (n_days, 1, D)

    def run(affine):
        import torch_xla

        outputs = []
        for day_idx in batches:
            outputs.append(affine(x, day_idx))
            torch_xla.sync()  # one training step per batch
        return outputs

    return {
        "mask_loop": _measure(lambda: run(lambda x, d: _day_loop(x, d, weights, biases))),
        "index_select_bmm": _measure(lambda: run(lambda x, d: rnn_model._select_day_affine(x, d, weights, biases))),
    }


def measure_static_shapes(device) -> dict:
    model = rnn_model.GRUDecoder(neural_dim=8, n_units=16, n_days=1, n_classes=41, n_layers=1, patch_size=14,
                                 patch_stride=4).to(device)
    lengths, buckets = [300, 317, 342, 288, 305, 331], [320, 352]

    def run(pad):
        import torch_xla

        for n_bins in lengths:
            padded = min(b for b in buckets if b >= n_bins) if pad else n_bins
            x = torch.zeros(2, padded, 8)
            x[:, :n_bins] = torch.randn(2, n_bins, 8)
            model(x.to(device), torch.zeros(2, dtype=torch.long, device=device)).square().mean().backward()
            torch_xla.sync()  # one training step per batch
        return [p.grad for p in model.parameters()]

    return {"own_lengths": _measure(lambda: run(pad=False)), "time_buckets": _measure(lambda: run(pad=True))}


def measure_outputs(device) -> dict:
    import torch_xla

    model = rnn_model.TripleGRUDecoder(neural_dim=8, n_units=16, n_days=2, n_classes=41, patch_size=14, patch_stride=4,
                                       n_noise_layers=1, n_clean_layers=1, n_noisy_layers=1).to(device)
    x, day_idx = torch.randn(2, 100, 8).to(device), torch.zeros(2, dtype=torch.long, device=device)

    def hlo_instructions(mode: str) -> int:
        with torch.no_grad():
            outputs = model(x, day_idx, mode=mode)
        hlo = torch_xla._XLAC._get_xla_tensors_hlo(list(outputs))
        return sum(" = " in line for line in hlo.splitlines())

    return {mode: {"hlo_instructions": hlo_instructions(mode)} for mode in ("inference", "full")}


def measure_gru_bf16(n_frames: int = 250, n_units: int = 768, n_batch: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    gru = torch.nn.GRU(n_units, n_units, batch_first=True)  # (B, T, H) -> (B, T, H)
    weights = [tuple(p.detach().double() for p in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0))]
    x = torch.randn(n_batch, n_frames, n_units, generator=gen, dtype=torch.float64)
    h0 = torch.zeros(1, n_batch, n_units, dtype=torch.float64)

    def outputs(dtype, autocast):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cast = [tuple(w.to(dtype) for w in layer) for layer in weights]
            return gru_scan(x.to(dtype), h0.to(dtype), cast, dropout=0.0, training=False)[0].double()

    reference = outputs(torch.float64, autocast=False)
    result = {}
    for name, out in (("float32", outputs(torch.float32, False)), ("bf16_autocast", outputs(torch.float32, True))):
        error = (out - reference).abs()  # (B, T, H)
        result[name] = {"first_25_frames": float(error[:, :25].mean()), "last_25_frames": float(error[:, -25:].mean())}
    return result


def measure_ctc_bf16(n_frames: int = 250, n_labels: int = 30, n_batch: int = 8) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(n_batch, n_frames, 41, generator=gen, dtype=torch.float64)
    targets = torch.randint(1, 41, (n_batch, n_labels), generator=gen)
    lengths = (torch.full((n_batch,), n_frames), torch.full((n_batch,), n_labels))

    def loss(log_probs):  # (B, T', C) -> (B,)
        return F.ctc_loss(log_probs.double().transpose(0, 1), targets, *lengths, reduction="none")

    reference = loss(logits.log_softmax(-1))
    result = {"mean_loss": float(reference.mean())}
    for name, log_probs in (("float32", logits.float().log_softmax(-1)), ("bf16", logits.bfloat16().log_softmax(-1))):
        error = (loss(log_probs) - reference).abs()
        result[name] = {"max_abs_error": float(error.max()), "max_relative_error": float((error / reference).max())}
    return result


def main() -> dict:
    report = {"gru_bf16": measure_gru_bf16(), "ctc_bf16": measure_ctc_bf16()}
    import torch_xla

    device = torch_xla.device()
    torch.manual_seed(0)
    report.update(ctc=measure_ctc(device), patching=measure_patching(device), day_layer=measure_day_layer(device),
                  static_shapes=measure_static_shapes(device), outputs=measure_outputs(device))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
