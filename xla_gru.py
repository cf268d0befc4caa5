"""A GRU for XLA, causal or bidirectional, whose backward memory grows with T'·B·H, not with T'·H².

torch_xla replaces `nn.GRU` with a scan whose carry holds the weight matrices, and scan saves
every step's carry for the backward pass: one copy of W_ih and W_hh per time step (about 2.65 GB
per frame for the full TripleGRUDecoder). This GRU instead

- projects the inputs of all time steps in one matmul before the recurrence (x @ W_ih^T), for
  both directions at once when bidirectional ([W_ih; W_ih_reverse] stacked: one matmul forward,
  one for each of its gradients);
- runs each direction's recurrence as one compiled loop (torch_xla.experimental.scan's loop
  builder on XLA, a Python loop elsewhere; the reverse direction loops from the last step to the
  first), saving only the per-step gates and hidden states;
- runs its own backward as a reverse loop that returns per-step gate gradients, then forms the
  weight gradients as single matmuls over all steps, outside the loop;
- writes those matmuls as einsums over (T, B, ·) tensors, never merging time and batch: under
  SPMD the batch is split over devices, and a time-major (T*B, ·) reshape cannot stay split (the
  partitioner gathered every input projection's input over the devices); an einsum contracts
  each device's own rows and sums the small result;
- given each trial's length, keeps static shapes: a row past its trial's end holds its state
  (h0 for the reverse direction, which so starts at the trial's last real frame) and outputs 0,
  in the forward loop and in the backward one, as torch's GRU on packed sequences computes.

The weights ride in the loop carry, where a while loop keeps one copy whatever the length; they
are never stacked per step. torch_xla's own scan GRU has no bidirectional form (it falls back to
the unrolled nn.GRU that stores weights per step). `GRU` subclasses torch's own `nn.GRU` class
(not torch_xla's patched one), so parameter names and shapes are nn.GRU's (`*_reverse` for the
reverse direction) and every checkpoint loads unchanged, on CPU, CUDA (cuDNN) and XLA alike. It uses
this recurrence on XLA devices, or anywhere with `use_scan = True` (how the tests compare it with
torch's kernels on the CPU); on CPU and CUDA it otherwise is torch's GRU (cuDNN on CUDA), except
that a causal GRU trained on the CPU runs `_CPURecurrence`, the same recurrence in fewer ops per
step than torch's autograd over its CPU kernel (3 layers of 256 units, 16 trials of 101 frames,
forward + backward: 127 vs 172 ms best CPU time, one thread, same run). Given
lengths, CUDA runs cuDNN over packed sequences and the CPU this recurrence: for a bidirectional
3-layer 128-unit GRU (forward + backward, 16 trials of up to 150 frames) torch's CPU kernel over
packed sequences took 1.3-2.3x the time of the padded one, this loop with lengths 0.97-1.08x.

torch_xla internals relied on: `torch_xla.experimental.scan._scan_impl_pytree` (private), read in
torch_xla 2.9.0, its last release, which the `xla`/`tpu` extras pin.

Used as a library: `from xla_gru import GRU`.
Tested by: `.venv/bin/python -m pytest tests/test_xla_gru.py -q`.
"""

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.rnn import GRU as _TorchGRU  # the class itself, never torch_xla's replacement
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._pytree import tree_map


def _loop(step: Any, carry: Any, xs: Any, *, reverse: bool = False) -> tuple[Any, Any]:
    """carry, ys = step(carry, xs[t]) for every t (last to first when reverse); ys stacked on dim 0.

    On XLA this is one compiled while loop. torch_xla's public `scan` wraps the same loop in an
    autograd Function that saves the whole carry of every step for its backward; the loop
    builder below it saves nothing, and `_GRURecurrence` supplies the backward.
    """
    first = next(iter(xs)) if isinstance(xs, (tuple, list)) else xs
    if first.device.type == "xla":
        from torch_xla.experimental.scan import _scan_impl_pytree

        return _scan_impl_pytree(step, carry, xs, reverse=reverse)
    steps = range(first.shape[0] - 1, -1, -1) if reverse else range(first.shape[0])
    ys = []
    for t in steps:
        carry, y = step(carry, tree_map(lambda v: v[t], xs))
        ys.append(y)
    if reverse:
        ys.reverse()
    return carry, tree_map(lambda *ts: torch.stack(ts), *ys)


def _forward_step(
    carry: tuple[Tensor, Tensor, Tensor], gi_t: Tensor, *, save_dtype: torch.dtype | None
) -> tuple[Any, Any]:
    """One GRU step (torch's gate order r, z, n). carry: h (B, H), w_hh (3H, H), b_hh (3H,).

    Returns h_t, plus the gates in `save_dtype` for the backward unless save_dtype is None.
    """
    h, w_hh, b_hh = carry
    gh = torch.addmm(b_hh, h, w_hh.t())  # (B, H) @ (H, 3H) -> (B, 3H)
    gi_r, gi_z, gi_n = gi_t.chunk(3, dim=-1)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    h_new = n + z * (h - n)  # (1 - z) * n + z * h
    if save_dtype is None:  # inference: nothing to save
        return (h_new, w_hh, b_hh), h_new
    gates = torch.cat([r, z, n, gh_n], dim=-1).to(save_dtype)  # 4 x (B, H) -> (B, 4H)
    return (h_new, w_hh, b_hh), (h_new, gates)


def _held_step(
    carry: tuple[Tensor, Tensor, Tensor], xs: tuple[Tensor, Tensor], *, save_dtype: torch.dtype | None
) -> tuple[Any, Any]:
    """`_forward_step` for the rows inside their trial (valid_t (B, 1) bool); the others hold their
    state. xs: gi_t (B, 3H), valid_t."""
    gi_t, valid_t = xs
    (h_new, w_hh, b_hh), ys = _forward_step(carry, gi_t, save_dtype=save_dtype)
    h = torch.where(valid_t, h_new, carry[0])
    return (h, w_hh, b_hh), (h if save_dtype is None else (h, ys[1]))


def _backward_step(carry: tuple[Tensor, Tensor], xs: tuple[Tensor, ...]) -> tuple[Any, Tensor]:
    """Reverse step: gradient of the pre-activations gi_t (B, 3H) and of h_{t-1}.

    carry: dh (B, H) flowing back from step t+1, w_hh (3H, H). xs: dL/dh_t from the layer's
    output (B, H), the saved gates (B, 4H), h_{t-1} (B, H), and with lengths valid_t (B, 1) bool.
    """
    dh_next, w_hh = carry
    d_out, gates, h_prev, *valid = xs
    r, z, n, gh_n = gates.float().chunk(4, dim=-1)
    dh = dh_next + d_out
    da_n = dh * (1 - z) * (1 - n * n)  # through n = tanh(a_n)
    da_z = dh * (h_prev - n) * z * (1 - z)  # through z = sigmoid(a_z)
    da_r = da_n * gh_n * r * (1 - r)  # a_n = gi_n + r * gh_n
    dgi = torch.cat([da_r, da_z, da_n], dim=-1)  # (B, 3H)
    dgh = torch.cat([da_r, da_z, da_n * r], dim=-1)  # (B, 3H)
    dh_prev = dh * z + dgh @ w_hh  # (B, 3H) @ (3H, H) -> (B, H)
    if valid:  # a row past its trial's end held its state: its gradient passes through unchanged
        dgi = torch.where(valid[0], dgi, torch.zeros_like(dgi))
        dh_prev = torch.where(valid[0], dh_prev, dh)
    return (dh_prev, w_hh), dgi


class _GRURecurrence(torch.autograd.Function):
    """hs = GRU recurrence over precomputed input projections, with a memory-lean backward.

    Saves hs (T, B, H) and the gates r, z, n, W_hn h + b_hn (T, B, 4H) in `save_dtype`; the
    backward returns dgi per step and dW_hh, db_hh as one matmul / sum over all steps. With
    `reverse` the recurrence runs from the last step to the first (a bidirectional GRU's reverse
    direction): hs[t] is then the state after reading steps T-1 .. t. With `valid` (T, B, 1) bool,
    a row holds its state where valid is False (see `_held_step`).
    """

    @staticmethod
    def forward(
        ctx: Any, gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, save_dtype: torch.dtype, reverse: bool,
        valid: Tensor | None,
    ) -> Tensor:
        """gi: (T, B, 3H) = x @ W_ih^T + b_ih; h0: (B, H). Returns hs (T, B, H)."""
        step = functools.partial(_forward_step if valid is None else _held_step, save_dtype=save_dtype)
        _, (hs, gates) = _loop(step, (h0, w_hh, b_hh), gi if valid is None else (gi, valid), reverse=reverse)
        ctx.save_for_backward(h0, w_hh, hs, gates, valid)
        ctx.reverse = reverse
        return hs

    @staticmethod
    def backward(ctx: Any, d_hs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None, None, None]:
        h0, w_hh, hs, gates, valid = ctx.saved_tensors
        # The state each step read: h_{t-1} forward, h_{t+1} in reverse. (T, B, H)
        h_prev = torch.cat([hs[1:], h0[None]]) if ctx.reverse else torch.cat([h0[None], hs[:-1]])
        xs = (d_hs, gates, h_prev) if valid is None else (d_hs, gates, h_prev, valid)
        (dh0, _), dgi = _loop(_backward_step, (torch.zeros_like(h0), w_hh), xs, reverse=not ctx.reverse)
        # dgh differs from dgi only in its n block (times r): rebuilt here rather than stacked by
        # the loop as a second (T, B, 3H) output.
        r = gates[..., : h0.shape[-1]].float()
        da_r, da_z, da_n = dgi.chunk(3, dim=-1)
        dgh = torch.cat([da_r, da_z, da_n * r], dim=-1)  # (T, B, 3H)
        dw_hh = torch.einsum("tbg,tbh->gh", dgh, h_prev)  # sum over t, b of (3H, 1) x (1, H): (3H, H)
        return dgi, dh0, dw_hh, dgh.sum(dim=(0, 1)), None, None, None


class _CPURecurrence(torch.autograd.Function):
    """The causal recurrence of `_GRURecurrence`, for training on the CPU: the same equations in
    fewer, larger ops. torch's CPU GRU runs its backward as autograd over every step's small ops
    and adds dW_hh up step by step. Here a forward step is 6 ops writing into (T, B, ·) buffers
    made once; the backward computes dh's factors for all steps at once, runs 3 ops a step (one
    matmul), then dW_hh, db_hh and dgi as single ops over all steps. Float32 rounding differs from
    torch's kernel; values agree to it.
    """

    @staticmethod
    def forward(ctx: Any, gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        """gi: (T, B, 3H) = x @ W_ih^T + b_ih; h0: (B, H). Returns hs (T, B, H)."""
        n_steps, hidden = gi.shape[0], h0.shape[-1]
        states = gi.new_empty(n_steps + 1, *h0.shape)  # h0, h_1 .. h_T: (T+1, B, H)
        states[0] = h0
        gh = gi.new_empty(n_steps, h0.shape[0], 3 * hidden)  # h_{t-1} @ W_hh^T + b_hh: (T, B, 3H)
        rz = gi.new_empty(n_steps, h0.shape[0], 2 * hidden)  # gates r, z: (T, B, 2H)
        n = torch.empty_like(states[1:])  # (T, B, H)
        w_hh_t = w_hh.t()
        # Every step's views, made by one unbind each rather than by indexing in the loop.
        h, gh_t, rz_t, n_t = states.unbind(0), gh.unbind(0), rz.unbind(0), n.unbind(0)
        gi_rz, gi_n = gi[..., : 2 * hidden].unbind(0), gi[..., 2 * hidden :].unbind(0)
        gh_rz, gh_n = gh[..., : 2 * hidden].unbind(0), gh[..., 2 * hidden :].unbind(0)
        r, z = rz[..., :hidden].unbind(0), rz[..., hidden:].unbind(0)
        for t in range(n_steps):
            torch.addmm(b_hh, h[t], w_hh_t, out=gh_t[t])  # (B, H) @ (H, 3H) -> (B, 3H)
            torch.add(gi_rz[t], gh_rz[t], out=rz_t[t]).sigmoid_()
            torch.addcmul(gi_n[t], r[t], gh_n[t], out=n_t[t]).tanh_()
            torch.lerp(n_t[t], h[t], z[t], out=h[t + 1])  # (1 - z) * n + z * h
        ctx.save_for_backward(w_hh, states, gh, rz, n)
        return states[1:]

    @staticmethod
    def backward(ctx: Any, d_hs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w_hh, states, gh, rz, n = ctx.saved_tensors
        n_steps, batch, hidden = n.shape
        h_prev = states[:-1]  # the state each step read: (T, B, H)
        r, z = rz[..., :hidden], rz[..., hidden:]
        one_minus_z = 1 - z
        a_n = torch.mul(n, n).neg_().add_(1).mul_(one_minus_z)  # dL/da_n per unit dL/dh_t, through n = tanh(a_n)
        # dL/dgh_t = dL/dh_t * factors_t, blocks r, z, n (gh's n block enters a_n times r). (T, B, 3H)
        factors = torch.empty_like(gh)
        f_r, f_z, f_n = factors.split(hidden, dim=-1)
        torch.mul(a_n, r, out=f_n)
        torch.mul(f_n, gh[..., 2 * hidden :], out=f_r).mul_(1 - r)
        torch.sub(h_prev, n, out=f_z).mul_(z).mul_(one_minus_z)
        dh = torch.empty_like(n)  # dL/dh_t, from the output and from step t+1: (T, B, H)
        dgh = torch.empty_like(gh)
        dh[-1] = d_hs[-1]
        dh_t, d_out, z_t, dgh_t = dh.unbind(0), d_hs.unbind(0), z.unbind(0), dgh.unbind(0)
        dh_1 = dh[:, :, None].unbind(0)  # (T, B, H) -> T x (B, 1, H)
        factors_3 = factors.unflatten(-1, (3, hidden)).unbind(0)  # (T, B, 3H) -> T x (B, 3, H)
        dgh_3 = dgh.unflatten(-1, (3, hidden)).unbind(0)  # (T, B, 3H) -> T x (B, 3, H), views of dgh
        for t in range(n_steps - 1, -1, -1):
            torch.mul(dh_1[t], factors_3[t], out=dgh_3[t])  # (B, 1, H) * (B, 3, H) -> (B, 3, H)
            if t > 0:  # dh_{t-1} = d_out_{t-1} + dh_t * z_t + dgh_t @ W_hh
                torch.addmm(torch.addcmul(d_out[t - 1], dh_t[t], z_t[t]), dgh_t[t], w_hh, out=dh_t[t - 1])
        dh0 = torch.addmm(dh[0] * z[0], dgh[0], w_hh)  # (B, 3H) @ (3H, H) -> (B, H)
        # (T, B, ·) buffers made here are contiguous: flattening (T, B) is a view.
        dw_hh = dgh.flatten(0, 1).t() @ h_prev.flatten(0, 1)  # (3H, T*B) @ (T*B, H) -> (3H, H)
        dgi = torch.cat([dgh[..., : 2 * hidden], dh * a_n], dim=-1)  # dgh with its n block before r: (T, B, 3H)
        return dgi, dh0, dw_hh, dgh.sum(dim=(0, 1))


def _recurrence(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, save_dtype: torch.dtype, reverse: bool = False,
    valid: Tensor | None = None, cpu_kernel: bool = False,
) -> Tensor:
    """hs (T, B, H) of the recurrence; saves gates for a backward only when one can follow.
    cpu_kernel: a causal recurrence that will be differentiated runs `_CPURecurrence`.

    Decided here, outside the autograd Function: inside it `ctx.needs_input_grad` reports the
    inputs' requires_grad even under torch.no_grad(), so validation and evaluation (weights that
    require grad, grad mode off) would trace and stack the (T, B, 4H) gates for nothing.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gi, h0, w_hh, b_hh)):
        if cpu_kernel and not reverse and valid is None:
            return _CPURecurrence.apply(gi, h0, w_hh, b_hh)
        return _GRURecurrence.apply(gi, h0, w_hh, b_hh, save_dtype, reverse, valid)
    step = functools.partial(_forward_step if valid is None else _held_step, save_dtype=None)
    _, hs = _loop(step, (h0, w_hh, b_hh), gi if valid is None else (gi, valid), reverse=reverse)
    return hs


Weights = tuple[Tensor, Tensor, Tensor, Tensor]  # one direction of one layer: w_ih, w_hh, b_ih, b_hh


def gru_scan(
    x: Tensor, hx: Tensor, weights: list[tuple[Weights, ...]] | list[Weights], *, dropout: float,
    training: bool, save_dtype: torch.dtype = torch.float32, lengths: Tensor | None = None,
    cpu_kernel: bool = False,
) -> tuple[Tensor, Tensor]:
    """Multi-layer GRU, batch first, with nn.GRU's equations, dropout rule and state layout.

    x: (B, T, I); weights: per layer, one (w_ih, w_hh, b_ih, b_hh) per direction (forward, then
    reverse when bidirectional), or the bare tuple for a unidirectional layer; hx: (L*D, B, H),
    index layer * D + direction. Returns the last layer's outputs (B, T, D*H), the directions'
    outputs concatenated, and the final states (L*D, B, H). Float32 throughout, with the saved
    activations in `save_dtype`.

    lengths (B,): each row's number of real steps, as torch's GRU on packed sequences: outputs at
    t >= length are 0, the final states are those after the last real step (the reverse
    direction's after reading length-1 .. 0), all at the padded static shape.

    cpu_kernel: causal recurrences without lengths that will be differentiated run
    `_CPURecurrence` (CPU training) rather than the scan's step functions.
    """
    layer_input = x.transpose(0, 1)  # (B, T, I) -> (T, B, I): the loop runs over dim 0
    valid = None
    if lengths is not None:
        steps = torch.arange(layer_input.shape[0], device=x.device)
        valid = (steps[:, None] < lengths.to(x.device)[None, :]).unsqueeze(-1)  # (T, B) -> (T, B, 1)
    finals = []
    for layer, directions in enumerate(weights):
        if isinstance(directions[0], Tensor):
            directions = (directions,)
        if layer > 0:
            layer_input = F.dropout(layer_input, dropout, training)
        if len(directions) == 1:
            w_ih, b_ih = directions[0][0], directions[0][2]
        else:  # both directions' input projections in one matmul
            w_ih = torch.cat([d[0] for d in directions])  # D x (3H, I) -> (D*3H, I)
            b_ih = torch.cat([d[2] for d in directions])  # D x (3H,) -> (D*3H,)
        if cpu_kernel:  # one addmm; its weight gradient comes out in w_ih's layout, with no transposed copy
            gi = F.linear(layer_input, w_ih, b_ih)  # all steps at once: (T, B, I) -> (T, B, 3H)
        else:
            gi = torch.einsum("tbi,gi->tbg", layer_input, w_ih) + b_ih  # all steps at once: (T, B, I) -> (T, B, D*3H)
        outputs = []
        for direction, (gi_d, (_, w_hh, _, b_hh)) in enumerate(zip(gi.chunk(len(directions), dim=-1), directions)):
            reverse = direction == 1
            hs = _recurrence(
                gi_d, hx[layer * len(directions) + direction], w_hh, b_hh, save_dtype, reverse, valid, cpu_kernel
            )
            finals.append(hs[0] if reverse else hs[-1])  # the reverse direction ends at t = 0
            outputs.append(hs if valid is None else torch.where(valid, hs, torch.zeros_like(hs)))  # (T, B, H)
        layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)  # D x (T, B, H) -> (T, B, D*H)
    return layer_input.transpose(0, 1), torch.stack(finals)  # (T, B, D*H) -> (B, T, D*H); L*D x (B, H) -> (L*D, B, H)


class GRU(_TorchGRU):
    """nn.GRU (with biases, causal or bidirectional) that runs `gru_scan` on XLA or when `use_scan` is set.

    `save_dtype` (float32, or bfloat16 to halve the saved gates) applies to the activations the
    scan saves for backward; torch's kernels ignore it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.bias or self.proj_size:
            raise ValueError("xla_gru.GRU supports GRUs with biases and no projection")
        # Plain attributes, not state, so checkpoints stay nn.GRU's.
        self.use_scan = False
        self.save_dtype = torch.float32  # dtype of the activations the scan saves for backward

    def forward(self, x: Tensor, hx: Tensor | None = None, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, I) when batch_first else (T, B, I); hx: (L*D, B, H), D = 2 when bidirectional;
        lengths: (B,) each row's number of real steps, or None when all T are.

        Returns (output (B, T, D*H) or (T, B, D*H), h_n (L*D, B, H)), as nn.GRU; with lengths, as
        nn.GRU on packed sequences, padded back to T with zeros.
        """
        # Training on the CPU, a causal GRU runs gru_scan with `_CPURecurrence`, faster than torch's
        # kernel's backward; inference, and anything use_scan forces, as before.
        cpu_kernel = (x.device.type == "cpu" and not self.use_scan and not self.bidirectional and lengths is None
                      and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
        if lengths is None and not (self.use_scan or x.device.type == "xla" or cpu_kernel):
            return super().forward(x, hx)
        if lengths is not None and x.device.type == "cuda" and not self.use_scan:
            return self._packed_forward(x, hx, lengths)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I) -> (B, T, I)
        if hx is None:
            hx = x.new_zeros(self.num_layers * (2 if self.bidirectional else 1), x.shape[0], self.hidden_size)
        suffixes = ("", "_reverse") if self.bidirectional else ("",)
        weights = [
            tuple(tuple(getattr(self, f"{kind}_l{layer}{suffix}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                  for suffix in suffixes)
            for layer in range(self.num_layers)
        ]
        output, h_n = gru_scan(
            x, hx, weights, dropout=self.dropout, training=self.training, save_dtype=self.save_dtype, lengths=lengths,
            cpu_kernel=cpu_kernel,
        )
        if not self.batch_first:
            output = output.transpose(0, 1)  # (B, T, H) -> (T, B, H)
        return output, h_n

    def _packed_forward(self, x: Tensor, hx: Tensor | None, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """torch's GRU over packed sequences (cuDNN's variable-length kernel on CUDA), padded back to T.

        Packing reads the lengths on the host. It takes no empty sequence: a row of length 0 (a
        trial shorter than one patch) runs one step, then gets outputs 0 and its h_n = hx, as the scan.
        """
        n_steps = x.shape[1 if self.batch_first else 0]
        lengths = lengths.cpu()
        packed = pack_padded_sequence(x, lengths.clamp_min(1), batch_first=self.batch_first, enforce_sorted=False)
        output, h_n = super().forward(packed, hx)
        output, _ = pad_packed_sequence(output, batch_first=self.batch_first, total_length=n_steps)
        empty = lengths == 0
        if empty.any():
            rows = empty.to(x.device)
            output = output.masked_fill(rows[:, None, None] if self.batch_first else rows[None, :, None], 0.0)
            h_n = torch.where(rows[None, :, None], torch.zeros_like(h_n) if hx is None else hx, h_n)
        return output, h_n
