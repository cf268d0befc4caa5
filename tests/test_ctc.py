"""ctc_loss_dense must give torch's CTC values and gradients, on CPU and on the XLA device.

Run: .venv/bin/python -m pytest tests/test_ctc.py -q
"""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_xla, run_xla_script
from ctc_loss import ctc_feasible, ctc_loss, ctc_loss_dense
from ctc_loss import ctc_frames_needed

N_CLASSES = 41


def _torch_ctc(logits: torch.Tensor, targets, input_lengths, target_lengths, zero_infinity=False):
    """Reference per-sample loss and gradient w.r.t. the logits (what training sees)."""
    logits = logits.detach().clone().requires_grad_(True)
    # (B, T, C) -> (T, B, C): torch's layout.
    loss = F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths,
        reduction="none", zero_infinity=zero_infinity,
    )
    loss.sum().backward()
    return loss.detach(), logits.grad


def _dense_ctc(logits: torch.Tensor, targets, input_lengths, target_lengths, zero_infinity=False):
    logits = logits.detach().clone().requires_grad_(True)
    loss = ctc_loss_dense(logits.log_softmax(-1), targets, input_lengths, target_lengths, zero_infinity=zero_infinity)
    # Sum only finite terms so an infeasible sample's +inf does not poison the backward.
    torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).sum().backward()
    return loss.detach(), logits.grad


def _random_batch(seed: int, n_batch: int, n_time: int, n_labels: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n_batch, n_time, N_CLASSES, generator=gen, dtype=dtype)
    targets = torch.randint(1, N_CLASSES, (n_batch, n_labels), generator=gen)
    target_lengths = torch.randint(1, n_labels + 1, (n_batch,), generator=gen)
    # Every input at least twice its label count, so all samples are feasible.
    input_lengths = torch.randint(2 * n_labels, n_time + 1, (n_batch,), generator=gen)
    return logits, targets, input_lengths, target_lengths


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_float64(seed: int) -> None:
    batch = _random_batch(seed, n_batch=5, n_time=40, n_labels=12)
    ref_loss, ref_grad = _torch_ctc(*batch)
    loss, grad = _dense_ctc(*batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)


def test_matches_torch_float32() -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(2, n_batch=6, n_time=80, n_labels=20,
                                                                   dtype=torch.float32)
    batch = (logits / 2, targets, input_lengths, target_lengths)
    ref_loss, ref_grad = _torch_ctc(*batch)
    loss, grad = _dense_ctc(*batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-4)
    # torch's float32 gradient is itself ~1e-4 off the float64 one; the dense one is closer.
    _, exact_grad = _torch_ctc(batch[0].double(), *batch[1:])
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=3e-5)


def test_repeated_labels_and_blank_heavy_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, N_CLASSES, generator=gen, dtype=torch.float64)
    logits[2, :, 0] += 6.0  # frames dominated by blank
    targets = torch.tensor([[3, 3, 3, 0], [3, 3, 5, 5], [7, 7, 7, 7], [1, 2, 1, 2]])
    target_lengths = torch.tensor([3, 4, 4, 4])
    # Sample 0: [3,3,3] needs 5 frames, and gets exactly 5 (the only alignment is 3 b 3 b 3).
    input_lengths = torch.tensor([5, 12, 7, 12])
    ref_loss, ref_grad = _torch_ctc(logits, targets, input_lengths, target_lengths)
    loss, grad = _dense_ctc(logits, targets, input_lengths, target_lengths)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)


def test_empty_targets() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, N_CLASSES, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[0, 0], [5, 0], [0, 0]])
    target_lengths = torch.tensor([0, 1, 0])
    input_lengths = torch.tensor([10, 6, 3])
    ref_loss, ref_grad = _torch_ctc(logits, targets, input_lengths, target_lengths)
    loss, grad = _dense_ctc(logits, targets, input_lengths, target_lengths)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)
    # An all-empty batch has zero label columns; the loss is then -sum of blank log-probs.
    lp = logits.log_softmax(-1)
    empty = ctc_loss_dense(lp, torch.zeros(3, 0, dtype=torch.long), input_lengths, torch.zeros(3, dtype=torch.long))
    expected = torch.stack([-lp[b, : input_lengths[b], 0].sum() for b in range(3)])
    torch.testing.assert_close(empty, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_infeasible_lengths(zero_infinity: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 8, N_CLASSES, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[4, 5, 6], [2, 2, 0], [9, 8, 7]])
    target_lengths = torch.tensor([3, 2, 3])
    # Sample 0: 3 labels in 2 frames; sample 1: [2,2] needs 3 frames, gets 2; sample 2 is fine.
    input_lengths = torch.tensor([2, 2, 8])
    loss, grad = _dense_ctc(logits, targets, input_lengths, target_lengths, zero_infinity=zero_infinity)
    ref_loss, ref_grad = _torch_ctc(logits, targets, input_lengths, target_lengths, zero_infinity=True)
    expected_bad = 0.0 if zero_infinity else float("inf")
    assert loss[0].item() == expected_bad and loss[1].item() == expected_bad
    torch.testing.assert_close(loss[2], ref_loss[2], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(grad).all()
    assert (grad[:2] == 0).all()
    # torch's own gradient for an inf sample is NaN unless zero_infinity; compare against that.
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)


def test_feasibility_counts_a_blank_between_repeats() -> None:
    targets = torch.tensor([[4, 5, 6], [2, 2, 0], [7, 7, 7], [3, 3, 9]])
    target_lengths = torch.tensor([3, 2, 3, 1])  # row 3: the repeat lies in the padding and is not counted
    needed = [ctc_frames_needed(row[:n].tolist()) for row, n in zip(targets, target_lengths)]
    assert needed == [3, 3, 5, 1]
    for extra, expected in ((0, True), (-1, False)):
        input_lengths = torch.tensor(needed) + extra
        feasible = ctc_feasible(targets, input_lengths=input_lengths, target_lengths=target_lengths)
        assert feasible.tolist() == [expected] * 4


def test_frames_past_input_length_are_ignored() -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(6, n_batch=4, n_time=30, n_labels=6)
    input_lengths = torch.tensor([30, 17, 12, 25])
    lp = logits.log_softmax(-1)
    # Garbage past each sample's end (and in target padding) must change nothing.
    noisy = lp.clone()
    for b in range(4):
        noisy[b, input_lengths[b]:] = torch.randn(30 - input_lengths[b], N_CLASSES, dtype=lp.dtype).log_softmax(-1)
    padded_targets = targets.clone()
    for b in range(4):
        padded_targets[b, target_lengths[b]:] = 7
    clean = ctc_loss_dense(lp, targets, input_lengths, target_lengths)
    dirty = ctc_loss_dense(noisy, padded_targets, input_lengths, target_lengths)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    # A sample cut to its own length alone gives the same loss as inside the padded batch.
    b = 2
    alone = ctc_loss_dense(lp[b : b + 1, : input_lengths[b]], targets[b : b + 1], input_lengths[b : b + 1],
                           target_lengths[b : b + 1])
    torch.testing.assert_close(alone[0], clean[b], rtol=1e-12, atol=1e-12)


def test_ctc_loss_dispatch() -> None:
    logits, targets, input_lengths, target_lengths = _random_batch(7, n_batch=3, n_time=20, n_labels=5)
    lp = logits.log_softmax(-1).requires_grad_(True)
    via_torch = ctc_loss(lp, targets, input_lengths, target_lengths, use_dense=False)
    via_dense = ctc_loss(lp, targets, input_lengths, target_lengths, use_dense=True)
    assert via_torch.shape == via_dense.shape == (3,)
    assert via_torch.grad_fn is not None and "Ctc" in type(via_torch.grad_fn).__name__
    torch.testing.assert_close(via_dense, via_torch, rtol=1e-9, atol=1e-9)


_XLA_SCRIPT = """
import json
import torch
import torch.nn.functional as F
import torch_xla
import torch_xla.debug.metrics as met
from ctc_loss import ctc_loss_dense

gen = torch.Generator().manual_seed(0)
n_batch, n_time, n_classes, n_labels = 4, 60, 41, 10
logits = torch.randn(n_batch, n_time, n_classes, generator=gen)
targets = torch.randint(1, n_classes, (n_batch, n_labels), generator=gen)
targets[0, :3] = 3  # repeated labels
target_lengths = torch.tensor([3, 10, 0, 10])
input_lengths = torch.tensor([60, 41, 30, 5])  # last sample infeasible

device = torch_xla.device()
met.clear_all()
x = logits.to(device).requires_grad_(True)
loss = ctc_loss_dense(x.log_softmax(-1), targets.to(device), input_lengths.to(device),
                      target_lengths.to(device), zero_infinity=True)
loss.sum().backward()
torch_xla.sync()
fallbacks = {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")}

ref_x = logits.clone().requires_grad_(True)
ref = F.ctc_loss(ref_x.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths,
                 reduction="none", zero_infinity=True)
ref.sum().backward()
print(json.dumps({
    "fallbacks": fallbacks,
    "loss_diff": (loss.cpu() - ref.detach()).abs().max().item(),
    "grad_diff": (x.grad.cpu() - ref_x.grad).abs().max().item(),
    "loss_zero_for_infeasible": loss.cpu()[3].item() == 0.0,
}))
"""


@requires_xla
def test_xla_no_fallbacks_and_matches_cpu() -> None:
    result = json.loads(run_xla_script(_XLA_SCRIPT).strip().splitlines()[-1])
    assert result["fallbacks"] == {}, f"ops falling back to the host on XLA: {result['fallbacks']}"
    assert result["loss_zero_for_infeasible"]
    assert result["loss_diff"] < 1e-4
    assert result["grad_diff"] < 1e-4
