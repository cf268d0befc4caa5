"""CTC loss in plain tensor ops, so it compiles on torch_xla instead of falling back to the host.

torch's nn.CTCLoss has no XLA lowering: every step runs `aten::_ctc_loss` and
`aten::_ctc_loss_backward` on the host and splits the graph. `ctc_loss_dense` computes the same
per-sample negative log likelihood with the log-space forward (alpha) recursion over the
extended label sequence (blank, l1, blank, l2, ..., blank) and lets autograd produce the
gradient. On an XLA device the recursion over time runs inside `torch_xla.experimental.scan`,
so the step is traced and compiled once whatever the padded length T; elsewhere it is a plain
Python loop. Under SPMD its backward is a reverse scan of its own (`_AlphaScan`): the public scan's
backward adds a sharding hint that needs JAX. torch_xla internals relied on:
`torch_xla.experimental.scan._scan_impl_pytree` (private), read in torch_xla 2.9.0, its last release.

Used by the trainer as
    loss = ctc_loss(log_probs, targets, input_lengths, target_lengths, use_dense=on_xla)  # (B,)
Tested by: .venv/bin/python -m pytest tests/test_ctc.py -q
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Stands in for log(0). Finite so that logsumexp and its backward never see inf - inf (NaN);
# adding a few hundred log-probabilities to it does not move it in float32, so it never
# reaches -inf either.
_LOG_ZERO = -1e30


def _logsumexp3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Elementwise log(exp(a) + exp(b) + exp(c)).

    The max is detached: d/dm of m + log(sum exp(x - m)) is exactly zero, and detaching keeps
    ties in the max from splitting gradients in odd ways.
    """
    m = torch.maximum(torch.maximum(a, b), c).detach()
    return m + torch.log(torch.exp(a - m) + torch.exp(b - m) + torch.exp(c - m))


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise log(exp(a) + exp(b)); torch.logaddexp has no XLA lowering (host fallback)."""
    m = torch.maximum(a, b).detach()
    return m + torch.log(torch.exp(a - m) + torch.exp(b - m))


def _alpha_step(carry: tuple[Tensor, Tensor], x: tuple[Tensor, Tensor]) -> tuple[tuple[Tensor, Tensor], None]:
    """One frame of the alpha recursion, shaped for `scan`: fn(carry, x_t) -> (carry, y_t).

    carry = (alpha (B, L), skip_bias (B, L)); skip_bias is 0 where the transition s-2 -> s is
    allowed (s is a label differing from the label two states back) and _LOG_ZERO elsewhere. It
    rides in the carry rather than a closure because scan traces `fn` with its inputs only.
    x = (emit_t (B, L) log-prob of each extended state's symbol at frame t, valid_t (B, 1)).
    """
    alpha, skip_bias = carry
    emit, valid = x
    log_zero = torch.full_like(alpha[:, :1], _LOG_ZERO)
    # (B, L) -> (B, L): alpha shifted right by one and two states.
    stay = alpha
    step = torch.cat([log_zero, alpha[:, :-1]], dim=1)
    skip = torch.cat([log_zero, log_zero, alpha[:, :-2]], dim=1) + skip_bias
    new_alpha = _logsumexp3(stay, step, skip) + emit
    # Frames at or past input_length leave alpha unchanged, so the final alpha is the one at
    # t = input_length - 1 without any data-dependent indexing.
    new_alpha = torch.where(valid, new_alpha, alpha)
    # No per-frame output: scan's backward mishandles a y whose gradient is unused.
    return (new_alpha, skip_bias), None


class _AlphaScan(torch.autograd.Function):
    """The alpha recursion as one compiled loop on XLA with its traced backward: what
    torch_xla.experimental.scan.scan does, less the sharding hint its backward adds under SPMD
    (shard_as, which runs through JAX and torchax, neither installed with torch_xla[tpu]). The
    partitioner's own propagation keeps the batch-split gradients split."""

    @staticmethod
    def forward(ctx: Any, forward: Any, alias_input: Any, backward: Any, alpha0: Tensor, skip_bias: Tensor,
                emit: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        from torch_xla.experimental.scan import _scan_impl_pytree

        (alpha, skip_bias), (_, partial_activations) = _scan_impl_pytree(forward, (alpha0, skip_bias), (emit, valid))
        ctx.backward = backward
        ctx.save_for_backward(*alias_input(partial_activations, (emit, valid)))
        return alpha, skip_bias

    @staticmethod
    def backward(ctx: Any, d_alpha: Tensor, d_skip_bias: Tensor) -> tuple[Tensor | None, ...]:
        from torch_xla.experimental.scan import _scan_impl_pytree

        (d_alpha0, d_skip), (d_emit, _) = _scan_impl_pytree(
            ctx.backward, (d_alpha, d_skip_bias), (None, tuple(ctx.saved_tensors)), reverse=True
        )
        return None, None, None, d_alpha0, d_skip, d_emit, None


def ctc_frames_needed(labels: Sequence[int]) -> int:
    """Fewest input frames CTC can align `labels` to: one per label plus a blank between each pair
    of equal neighbours. `ctc_feasible` applies the same rule to padded batches on the device."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


def ctc_feasible(targets: Tensor, *, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """(B,) bool: the input has at least `ctc_frames_needed` frames for each row's labels.

    Decided from lengths alone, on the device, instead of thresholding the loss, so an unlikely
    but feasible alignment is never called impossible. targets (B, S); lengths (B,).
    """
    targets = targets.to(torch.long)
    input_lengths = input_lengths.to(device=targets.device, dtype=torch.long)
    target_lengths = target_lengths.to(device=targets.device, dtype=torch.long)
    position = torch.arange(1, targets.shape[1], device=targets.device).unsqueeze(0)  # (1, S-1)
    repeats = ((targets[:, 1:] == targets[:, :-1]) & (position < target_lengths.unsqueeze(1))).sum(1)
    return input_lengths >= target_lengths + repeats


def ctc_loss_dense(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
    zero_infinity: bool = False,
) -> Tensor:
    """Per-sample CTC negative log likelihood (torch's reduction='none'), static shapes only.

    log_probs: (B, T, C) log-softmaxed, batch first. targets: (B, S) int64, padded past
    target_lengths with anything. input_lengths, target_lengths: (B,). Returns (B,).
    Infeasible samples (input too short for the labels and their repeats) give +inf, or 0 with
    zero_infinity, and zero gradient in both cases, as torch does.
    """
    n_batch, n_time, _ = log_probs.shape
    device = log_probs.device
    work_dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    log_probs = log_probs.to(work_dtype)
    targets = targets.to(torch.long)
    if targets.shape[1] == 0:
        # A batch of empty targets still needs the two-state shifts below to line up.
        targets = torch.zeros((n_batch, 1), dtype=torch.long, device=targets.device)
    input_lengths = input_lengths.to(device=device, dtype=torch.long)
    target_lengths = target_lengths.to(device=device, dtype=torch.long)

    n_labels = targets.shape[1]

    # Extended labels: blank, l1, blank, l2, ..., lS, blank.  (B, S) -> (B, 2S+1)
    n_states = 2 * n_labels + 1
    ext = torch.full((n_batch, n_states), blank, dtype=torch.long, device=device)
    ext[:, 1::2] = targets
    # Skip s-2 -> s only into a label state whose label differs from the previous label;
    # blank states and repeated labels must pass through the blank between them.
    prev2 = torch.cat([ext[:, :2], ext[:, :-2]], dim=1)
    is_label = (torch.arange(n_states, device=device) % 2 == 1).unsqueeze(0)
    skip_allowed = is_label & (ext != prev2)
    skip_allowed[:, :2] = False
    skip_bias = torch.where(skip_allowed, 0.0, _LOG_ZERO).to(work_dtype)

    # (B, T, C) gathered at (B, T, 2S+1): emission log-prob of every state's symbol per frame.
    # clamp: an exact -inf from log_softmax would make inf - inf in the backward.
    emit = log_probs.gather(2, ext.unsqueeze(1).expand(n_batch, n_time, n_states)).clamp(min=_LOG_ZERO)
    valid = torch.arange(n_time, device=device).unsqueeze(0) < input_lengths.unsqueeze(1)  # (B, T)

    # Alpha "before frame 0": all mass in state 0. The first step's stay and step moves then
    # give exactly CTC's start (leading blank or first label), so every frame runs the same step.
    alpha0 = torch.full((n_batch, n_states), _LOG_ZERO, dtype=work_dtype, device=device)
    alpha0[:, 0] = 0.0
    if device.type == "xla":
        from torch_xla.experimental.scan import value_and_grad_partitioned

        # (B, T, L) -> (T, B, L) so the loop walks the leading (time) dimension.
        xs = (emit.transpose(0, 1).contiguous(), valid.t().unsqueeze(2).contiguous())
        # is_fn_pure reuses the traced step graphs across calls (~0.25 s of Python tracing per
        # training step otherwise); _alpha_step depends on its arguments only.
        graphs = value_and_grad_partitioned(_alpha_step, (alpha0, skip_bias), xs, is_fn_pure=True)
        alpha, _ = _AlphaScan.apply(*graphs, alpha0, skip_bias, *xs)
    else:
        # Eager autograd through a Python loop costs nothing to compile off XLA.
        carry = (alpha0, skip_bias)
        for t in range(n_time):
            carry, _ = _alpha_step(carry, (emit[:, t], valid[:, t].unsqueeze(1)))
        alpha = carry[0]

    # Paths end in the last label (state 2*S_b - 1) or the trailing blank (state 2*S_b).
    end_blank = alpha.gather(1, (2 * target_lengths).unsqueeze(1)).squeeze(1)
    end_label = alpha.gather(1, (2 * target_lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    end_label = torch.where(target_lengths > 0, end_label, torch.full_like(end_label, _LOG_ZERO))
    nll = -_logaddexp(end_blank, end_label)

    feasible = ctc_feasible(targets, input_lengths=input_lengths, target_lengths=target_lengths)
    # torch.where sends zero gradient into the branch it does not pick.
    fill = 0.0 if zero_infinity else float("inf")
    return torch.where(feasible, nll, torch.full_like(nll, fill))


def ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
    use_dense: bool = False,
    zero_infinity: bool = False,
) -> Tensor:
    """Per-sample CTC loss (B,): torch's kernel (CPU/CUDA) or `ctc_loss_dense` (XLA).

    log_probs: (B, T, C) log-softmaxed, batch first; targets (B, S); lengths (B,).
    """
    if use_dense:
        return ctc_loss_dense(
            log_probs, targets, input_lengths, target_lengths, blank=blank, zero_infinity=zero_infinity
        )
    # torch wants time first: (B, T, C) -> (T, B, C).
    return F.ctc_loss(
        log_probs.transpose(0, 1), targets, input_lengths, target_lengths,
        blank=blank, reduction="none", zero_infinity=zero_infinity,
    )
