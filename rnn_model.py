"""GRU phoneme decoders for intracortical speech: the published baseline and a triple-GRU variant.

`GRUDecoder` is parameter-for-parameter compatible with the published baseline (Card et al.
2024): same constructor arguments, parameter names, shapes, initialisation and forward pass, so
its checkpoints load with `load_state_dict_compat`. `TripleGRUDecoder` separates a noise
estimate from the speech signal: a noise model, a clean-speech decoder of (input - noise) and a
noisy-speech decoder fed the noise through gradient reversal.

Both run under bf16 autocast (GRU recurrences stay in float32) and on torch_xla, where their
GRUs run through `xla_gru.GRU` (same parameters as nn.GRU, backward memory linear in length).

`decoder_outputs` and `infer` are the one way callers run either model (autocast policy, the
model call, output lengths); `read_checkpoint` is the one reader of checkpoint files, this
repo's and upstream's, and `load_run_model` / `load_upstream_model` rebuild a trained decoder
from a model directory; `load_day_mapped` loads weights trained under another session list, day
layers matched by session (calibration, init_from_checkpoint).

Used as a library: `from rnn_model import build_model, infer, read_checkpoint, GRUDecoder, TripleGRUDecoder`.
Tested by: `.venv/bin/python -m pytest tests/test_model.py -q`.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import storage
from config import Config, ConfigError, TransformsConfig, config_from_dict, from_upstream, load_config
from xla_gru import GRU

# Prefixes that wrappers add to saved parameter names: torch.compile and DistributedDataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Where a checkpoint sits inside a model directory: this repo's run directories, then upstream's.
CHECKPOINT_NAMES = (Path("checkpoint") / "best_checkpoint.pt", Path("checkpoint") / "best_checkpoint")
UPSTREAM_ARGS = Path("checkpoint") / "args.yaml"  # upstream's config, saved beside its checkpoint
_DAY_KEY = re.compile(r"(.*day_(?:weights|biases))\.(\d+)")  # a day layer's state-dict key: (prefix, day)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; names the file."""


def n_patches(n_time_steps: Tensor | int, patch_size: int, patch_stride: int) -> Tensor | int:
    """Number of patches (output frames) for inputs of `n_time_steps` bins; T when patching is off.

    Trials shorter than one patch have 0 patches rather than a negative count.
    """
    if patch_size == 0:
        return n_time_steps
    count = (n_time_steps - patch_size) // patch_stride + 1
    if isinstance(count, Tensor):
        return count.clamp_min(0)
    return max(count, 0)


def patched_size(neural_dim: int, patch_size: int) -> int:
    """Feature size of one patched frame: P*D, or D when patching is off."""
    return neural_dim * patch_size if patch_size > 0 else neural_dim


def patch_inputs(x: Tensor, patch_size: int, patch_stride: int) -> Tensor:
    """Concatenate `patch_size` consecutive bins every `patch_stride` bins (0 disables patching).

    x: (B, T, D). Returns (B, T', P*D) with time within a patch outer and features inner, the
    layout the published baseline's first GRU layer was trained on.
    """
    if patch_size == 0:
        return x
    n_time_steps = x.shape[1]
    if n_time_steps < patch_size:
        raise ValueError(f"patching needs at least patch_size={patch_size} time bins, got {n_time_steps}")
    if x.device.type == "xla":
        # torch_xla has no lowering for Tensor.unfold (it falls back to the CPU every step).
        return _patch_by_slices(x, patch_size, patch_stride, n_patches(n_time_steps, patch_size, patch_stride))
    return _Patches.apply(x, patch_size, patch_stride)


class _Patches(torch.autograd.Function):
    """patch_inputs on CPU and CUDA: Tensor.unfold's patches (a view of x; forward+backward about
    3x faster on the CPU than the strided slices), whose backward adds each of the P patch
    positions' gradients back with one strided add, about 3x faster on the CPU than unfold's own
    backward (equal to float rounding)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, patch_size: int, patch_stride: int) -> Tensor:
        """x: (B, T, D). Returns (B, T', P*D)."""
        batch_size, n_time_steps, _ = x.shape
        ctx.n_time_steps, ctx.patch_size, ctx.patch_stride = n_time_steps, patch_size, patch_stride
        patches = x.unfold(1, patch_size, patch_stride)  # (B, T, D) -> (B, T', D, P)
        return patches.transpose(2, 3).reshape(batch_size, patches.shape[1], -1)  # (B, T', D, P) -> (B, T', P*D)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        batch_size, n_out, _ = grad.shape
        size, stride = ctx.patch_size, ctx.patch_stride
        # A view when the gradient is time-major, as the GRU's input gradient is.
        per_position = grad.transpose(0, 1).reshape(n_out, batch_size, size, -1)  # (B, T', P*D) -> (T', B, P, D)
        grad_x = grad.new_zeros(batch_size, ctx.n_time_steps, per_position.shape[-1])  # (B, T, D)
        span = stride * (n_out - 1) + 1
        for p in range(size):  # bin p of every patch: bins p, p + stride, ..
            grad_x[:, p : p + span : stride].add_(per_position[:, :, p].transpose(0, 1))  # (T', B, D) -> (B, T', D)
        return grad_x, None, None


def _patch_by_slices(x: Tensor, patch_size: int, patch_stride: int, n_out: int) -> Tensor:
    """patch_inputs as strided slices and a stack, which compile into an XLA graph; slice p holds
    bin p of every patch."""
    span = patch_stride * (n_out - 1) + 1
    patches = torch.stack(
        [x[:, p : p + span : patch_stride] for p in range(patch_size)], dim=2
    )  # P x (B, T', D) -> (B, T', P, D)
    return patches.reshape(x.shape[0], n_out, -1)  # (B, T', P, D) -> (B, T', P*D)


class _SoftsignFunction(torch.autograd.Function):
    """softsign(x) = x / (1 + |x|) with its derivative 1 / (1 + |x|)^2 written out: the backward
    is two divisions by the saved 1 + |x|, where autograd through F.softsign's abs, add and div
    runs about six ops. Values are F.softsign's bit for bit, gradients equal to float rounding."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        denominator = x.abs().add_(1)
        ctx.save_for_backward(denominator)
        return x / denominator

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (denominator,) = ctx.saved_tensors
        return grad / denominator / denominator


class Softsign(nn.Softsign):
    """nn.Softsign through `_SoftsignFunction` off XLA (about 2x faster forward+backward on the CPU);
    on XLA F.softsign as before."""

    def forward(self, x: Tensor) -> Tensor:
        return F.softsign(x) if x.device.type == "xla" else _SoftsignFunction.apply(x)


# Day-specific parameters: one stacked tensor per layer, day first. Names ending so are day parameters.
DAY_PARAMETER_NAMES = ("day_weights", "day_biases")


def is_day_parameter(name: str) -> bool:
    """Whether a parameter name (`clean_model.day_layer.day_weights`) names a day-specific input layer."""
    return name.rpartition(".")[2] in DAY_PARAMETER_NAMES


class _DayRows(torch.autograd.Function):
    """`table.index_select(0, day_idx)` whose gradient for `table` is sparse: a hybrid COO tensor
    holding one summed row per day in the batch, (n_present, ...) values over (n_days, ...), where
    index_select's is a dense (n_days, ...) tensor, zero outside those rows. At the recipe's 45 days
    of 512 x 512 that dense gradient is 47 MB that the CPU allocates, page-faults, zeroes, clips
    and frees every step. Used where `use_sparse_day_gradients` turned it on."""

    @staticmethod
    def forward(ctx: Any, table: Tensor, day_idx: Tensor) -> Tensor:
        ctx.save_for_backward(day_idx)
        ctx.table_shape = table.shape
        return table.index_select(0, day_idx)  # (n_days, ...) -> (B, ...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (day_idx,) = ctx.saved_tensors
        days, position = torch.unique(day_idx, return_inverse=True)  # sorted, so the result is coalesced
        rows = grad.new_zeros((days.numel(), *grad.shape[1:])).index_add_(0, position, grad)  # (B, ...) -> (n_present, ...)
        return torch.sparse_coo_tensor(days[None], rows, ctx.table_shape, is_coalesced=True), None


def _select_day_affine(
    x: Tensor, day_idx: Tensor, day_weights: Tensor, day_biases: Tensor, sparse_grad: bool = False
) -> Tensor:
    """x @ W[day] + b[day] per trial, batched: pick each trial's day from the stacked layers, one bmm.

    day_weights: (n_days, D, D); day_biases: (n_days, 1, D). An absent day gets a zero gradient
    from index_select's backward (day_adamw.DayAdamW leaves it untouched); with `sparse_grad`, no
    gradient row at all (`_DayRows`).
    """
    day_idx = day_idx.to(device=day_weights.device, dtype=torch.long)
    if sparse_grad and torch.is_grad_enabled():
        weights, biases = _DayRows.apply(day_weights, day_idx), _DayRows.apply(day_biases, day_idx)
    else:
        weights = day_weights.index_select(0, day_idx)  # (n_days, D, D) -> (B, D, D)
        biases = day_biases.index_select(0, day_idx)  # (n_days, 1, D) -> (B, 1, D)
    # Inputs may arrive in bf16 outside autocast; bmm needs matching dtypes.
    return torch.bmm(x.to(weights.dtype), weights) + biases  # (B, T, D) @ (B, D, D) -> (B, T, D)


def use_sparse_day_gradients(model: nn.Module, enabled: bool = True) -> None:
    """Give the day layers sparse gradients (`_DayRows`), holding only the rows of the days in the
    batch: for CPU training in one process, where the dense one costs more than the day layers'
    own matmuls' share of the step. Whatever reads them must take sparse gradients: DayAdamW and
    the trainer's clipping do; DDP, which all-reduces dense buckets, and XLA, whose graph must not
    depend on the days present, keep the dense ones."""
    for module in model.modules():
        if hasattr(module, "sparse_day_gradients"):
            module.sparse_day_gradients = enabled


def _new_day_parameters(module: nn.Module, neural_dim: int, n_days: int) -> None:
    """Give `module` stacked day layers, identity weights (n_days, D, D) and zero biases (n_days, 1, D),
    so every day starts as a pass-through; its state dict keeps upstream's one entry per day.

    One tensor per layer rather than one per day: the forward pass picks rows without stacking 45
    matrices every step, and the optimizer updates a layer in a few tensor ops.
    """
    module.day_weights = nn.Parameter(torch.eye(neural_dim).expand(n_days, neural_dim, neural_dim).clone())
    module.day_biases = nn.Parameter(torch.zeros(n_days, 1, neural_dim))
    module.register_state_dict_post_hook(_split_days)
    module.register_load_state_dict_pre_hook(_stack_days)
    module.sparse_day_gradients = False  # a plain attribute, not state: see use_sparse_day_gradients


def _split_days(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: each stacked day tensor saved as upstream's entries `day_weights.{i}`,
    (D, D), and `day_biases.{i}`, (1, D), in place, so checkpoint files keep upstream's format."""
    stacked = {prefix + name for name in DAY_PARAMETER_NAMES}
    if not stacked & state_dict.keys():
        return
    entries = list(state_dict.items())
    state_dict.clear()  # re-inserted in order, the per-day entries where the stacked one was
    for key, value in entries:
        if key not in stacked:
            state_dict[key] = value
            continue
        if value.device.type == "xla" and not isinstance(value, nn.Parameter):
            # One transfer of the layer; a view per day would compile one slicing graph per day.
            value = value.cpu()
        for day, tensor in enumerate(value.unbind(0)):  # (n_days, ...) -> n_days x (...)
            state_dict[f"{key}.{day}"] = tensor


def _stack_days(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    """Load pre-hook: upstream's per-day entries `day_weights.0 .. day_weights.{n-1}` stacked into the
    layer's one tensor. A stacked entry loads as it is; per-day entries that are not days 0..n-1
    are left alone, so strict loading names them."""
    for name in DAY_PARAMETER_NAMES:
        key = prefix + name
        per_day = {int(k[len(key) + 1 :]): k for k in state_dict if k.startswith(key + ".") and k[len(key) + 1 :].isdigit()}
        if key in state_dict or sorted(per_day) != list(range(len(per_day))) or not per_day:
            continue
        state_dict[key] = torch.stack([state_dict.pop(per_day[day]) for day in range(len(per_day))])  # n x (...) -> (n, ...)


def _init_gru_weights(gru: GRU) -> None:
    """The baseline's rule: orthogonal recurrent weights, xavier input weights, default biases."""
    for name, param in gru.named_parameters():
        if "weight_hh" in name:
            nn.init.orthogonal_(param)
        if "weight_ih" in name:
            nn.init.xavier_uniform_(param)


def _new_initial_state(hidden_size: int, n_directions: int = 1) -> nn.Parameter:
    """Learnable initial hidden state (D, 1, H), one per direction, shared by all layers and trials.

    Each direction's (1, 1, H) is xavier-initialised on its own, so a causal model's h0 keeps
    upstream's shape (1, 1, H) and initialisation.
    """
    return nn.Parameter(torch.cat([nn.init.xavier_uniform_(torch.zeros(1, 1, hidden_size)) for _ in range(n_directions)]))


def _initial_states(h0: Tensor, n_layers: int, batch_size: int) -> Tensor:
    """Every layer's initial state in nn.GRU's layout, from the per-direction h0 (D, 1, H).

    Returns (L*D, B, H), index layer * D + direction: every layer starts from h0.
    """
    n_directions, _, hidden_size = h0.shape
    states = h0[None].expand(n_layers, n_directions, batch_size, hidden_size)  # (D, 1, H) -> (L, D, B, H)
    return states.reshape(n_layers * n_directions, batch_size, hidden_size)  # (L, D, B, H) -> (L*D, B, H)


def _new_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)
    return layer


def _run_gru(gru: GRU, x: Tensor, states: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run a GRU with autocast off and inputs in the weights' dtype (float32 under autocast).

    Under bf16 a 768-unit layer's outputs are off by ~1e-3 on average, four orders of magnitude
    more than in float32 (TPU_MODEL_SUMMARY.md, "Where bf16 applies"), so mixed precision stops at
    the GRU's boundary. x: (B, T, I); states: (L*D, B, H); lengths: (B,) frames per trial.

    Only a bidirectional GRU reads the lengths: its reverse direction must start at each trial's
    last frame, not at the padding's. A causal GRU's frame t reads no later frame, so it runs
    unpacked and its outputs stay bit for bit what they were.
    """
    dtype = gru.weight_hh_l0.dtype
    lengths = lengths if gru.bidirectional else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        # expand()ed initial states are strided views; cuDNN wants a contiguous hx.
        return gru(x.to(dtype), states.to(dtype).contiguous(), lengths=lengths)


class GRUDecoder(nn.Module):
    """The published baseline: day-specific input layers, optional patching, a GRU and a linear head.

    State-dict names and shapes match upstream (`day_weights.{i}`, `day_biases.{i}`, `gru.*`,
    `out.*`, `h0`), so upstream checkpoints load strictly; the day layers are held stacked
    (`day_weights` (n_days, D, D), `day_biases` (n_days, 1, D)) and split per day on saving.
    `bidirectional` (offline decoding: the whole trial is read before a frame is decoded) adds
    nn.GRU's `gru.*_reverse` weights, a second h0 row and a head over 2H features.
    """

    def __init__(
        self,
        neural_dim: int,
        n_units: int,
        n_days: int,
        n_classes: int,
        *,
        rnn_dropout: float = 0.0,
        input_dropout: float = 0.0,
        n_layers: int = 5,
        patch_size: int = 0,
        patch_stride: int = 0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        _check_patching(patch_size, patch_stride)
        self.neural_dim = neural_dim
        self.n_units = n_units
        self.n_days = n_days
        self.n_classes = n_classes
        self.rnn_dropout = rnn_dropout
        self.input_dropout = input_dropout
        self.n_layers = n_layers
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.bidirectional = bidirectional
        n_directions = 2 if bidirectional else 1

        self.day_layer_activation = Softsign()
        _new_day_parameters(self, neural_dim, n_days)
        self.day_layer_dropout = nn.Dropout(input_dropout)
        self.input_size = patched_size(neural_dim, patch_size)
        self.gru = GRU(self.input_size, n_units, n_layers, dropout=rnn_dropout, batch_first=True,
                       bidirectional=bidirectional)
        _init_gru_weights(self.gru)
        self.out = _new_linear(n_directions * n_units, n_classes)  # both directions' states when bidirectional
        self.h0 = _new_initial_state(n_units, n_directions)

    def forward(
        self, x: Tensor, day_idx: Tensor, states: Tensor | None = None, return_state: bool = False,
        lengths: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, D) features; day_idx: (B,) day indices; states: (L*Dir, B, H) or None for h0
        (Dir = 2 directions when bidirectional, nn.GRU's layout); lengths: (B,) each trial's
        number of output frames (n_patches of its bins), or None when every frame is real.

        Returns logits (B, T', C) in float32, plus the final hidden state (L*Dir, B, H) when
        return_state is set. When bidirectional, frames at t >= lengths are read by neither
        direction (their GRU output is 0, their logits the head's bias).
        """
        x = _select_day_affine(x, day_idx, self.day_weights, self.day_biases, self.sparse_day_gradients)
        x = self.day_layer_dropout(self.day_layer_activation(x))
        x = patch_inputs(x, self.patch_size, self.patch_stride)  # (B, T, D) -> (B, T', P*D)
        if states is None:
            states = _initial_states(self.h0, self.n_layers, x.shape[0])  # (Dir, 1, H) -> (L*Dir, B, H)
        output, hidden = _run_gru(self.gru, x, states, lengths)  # output: (B, T', Dir*H)
        logits = self.out(output).float()  # autocast returns bf16 from the head; callers get float32
        if return_state:
            return logits, hidden
        return logits


class DayInputLayer(nn.Module):
    """Day-specific affine map + softsign + dropout, the baseline's input layer as a module."""

    def __init__(self, *, neural_dim: int, n_days: int, input_dropout: float = 0.0) -> None:
        super().__init__()
        self.day_layer_activation = Softsign()
        _new_day_parameters(self, neural_dim, n_days)
        self.day_layer_dropout = nn.Dropout(input_dropout)

    def forward(self, x: Tensor, day_idx: Tensor) -> Tensor:
        """x: (B, T, D); day_idx: (B,). Returns (B, T, D)."""
        x = _select_day_affine(x, day_idx, self.day_weights, self.day_biases, self.sparse_day_gradients)
        return self.day_layer_dropout(self.day_layer_activation(x))


class GRUBranch(nn.Module):
    """A batch-first GRU (causal or bidirectional) with a learnable initial state per direction and
    an optional linear output layer over every direction's state."""

    def __init__(
        self, *, input_size: int, hidden_size: int, n_layers: int, dropout: float = 0.0, output_size: int = 0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        n_directions = 2 if bidirectional else 1
        self.gru = GRU(input_size, hidden_size, n_layers, dropout=dropout, batch_first=True, bidirectional=bidirectional)
        _init_gru_weights(self.gru)
        self.h0 = _new_initial_state(hidden_size, n_directions)
        self.out = _new_linear(n_directions * hidden_size, output_size) if output_size > 0 else None

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x: (B, T, I); lengths: (B,) frames per trial (read when bidirectional) or None.
        Returns (B, T, output_size) through the output layer, else (B, T, Dir*H), float32."""
        states = _initial_states(self.h0, self.n_layers, x.shape[0])  # (Dir, 1, H) -> (L*Dir, B, H)
        output, _ = _run_gru(self.gru, x, states, lengths)  # (B, T, Dir*H)
        if self.out is None:
            return output
        return self.out(output).float()


class NoiseModel(nn.Module):
    """Estimates the noise in the patched input space: day layer, patching, then a GRU.

    With noise_hidden_size == 0 the GRU's hidden size equals the patched size P*D (the faithful
    design, ~617M parameters at full size); a positive value uses a GRU of that size followed by
    a linear projection back to P*D.
    """

    def __init__(
        self,
        *,
        neural_dim: int,
        n_days: int,
        rnn_dropout: float = 0.0,
        input_dropout: float = 0.0,
        patch_size: int = 0,
        patch_stride: int = 0,
        n_layers: int = 2,
        noise_hidden_size: int = 0,
    ) -> None:
        super().__init__()
        _check_patching(patch_size, patch_stride)
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.patched_size = patched_size(neural_dim, patch_size)
        self.day_layer = DayInputLayer(neural_dim=neural_dim, n_days=n_days, input_dropout=input_dropout)
        # Without a hidden size the GRU is as wide as its input and needs no output layer.
        self.branch = GRUBranch(
            input_size=self.patched_size, hidden_size=noise_hidden_size or self.patched_size, n_layers=n_layers,
            dropout=rnn_dropout, output_size=self.patched_size if noise_hidden_size > 0 else 0,
        )

    def forward(self, x: Tensor, day_idx: Tensor) -> Tensor:
        """x: (B, T, D); day_idx: (B,). Returns the noise estimate (B, T', P*D), float32."""
        x = patch_inputs(self.day_layer(x, day_idx), self.patch_size, self.patch_stride)  # -> (B, T', P*D)
        return self.branch(x)


class CleanSpeechModel(nn.Module):
    """Decodes phonemes from the day-processed, patched input minus the noise estimate."""

    def __init__(
        self,
        *,
        neural_dim: int,
        n_units: int,
        n_days: int,
        n_classes: int,
        rnn_dropout: float = 0.0,
        input_dropout: float = 0.0,
        patch_size: int = 0,
        patch_stride: int = 0,
        n_layers: int = 3,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        _check_patching(patch_size, patch_stride)
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.day_layer = DayInputLayer(neural_dim=neural_dim, n_days=n_days, input_dropout=input_dropout)
        self.branch = GRUBranch(
            input_size=patched_size(neural_dim, patch_size), hidden_size=n_units, n_layers=n_layers,
            dropout=rnn_dropout, output_size=n_classes, bidirectional=bidirectional,
        )

    def forward(
        self, x: Tensor, day_idx: Tensor, noise: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """x: (B, T, D); day_idx: (B,); noise: (B, T', P*D) or None; lengths: (B,) frames per
        trial or None. Returns logits (B, T', C)."""
        x_processed = patch_inputs(self.day_layer(x, day_idx), self.patch_size, self.patch_stride)  # -> (B, T', P*D)
        if noise is not None:
            # Subtract in float32: under autocast either side may be bf16.
            x_processed = x_processed.float() - noise.float()
        return self.branch(x_processed, lengths)


class NoisySpeechModel(nn.Module):
    """Decodes phonemes from the noise estimate alone (trained adversarially through a GRL)."""

    def __init__(
        self, *, input_size: int, n_units: int, n_classes: int, rnn_dropout: float = 0.0, n_layers: int = 2,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.branch = GRUBranch(
            input_size=input_size, hidden_size=n_units, n_layers=n_layers, dropout=rnn_dropout, output_size=n_classes,
            bidirectional=bidirectional,
        )

    def forward(self, noise: Tensor, lengths: Tensor | None = None) -> Tensor:
        """noise: (B, T', P*D); lengths: (B,) frames per trial or None. Returns logits (B, T', C)."""
        return self.branch(noise, lengths)


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by -lambda in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, grl_lambda: float | Tensor) -> Tensor:
        ctx.grl_lambda = grl_lambda
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        grl_lambda = ctx.grl_lambda
        if isinstance(grl_lambda, Tensor):
            # Stay a tensor: turning it into a Python number would bake it into the XLA graph
            # and recompile whenever a schedule changes it.
            grl_lambda = grl_lambda.detach().to(device=grad_output.device, dtype=grad_output.dtype)
        return grad_output * -grl_lambda, None


def grad_reverse(x: Tensor, grl_lambda: float | Tensor = 1.0) -> Tensor:
    """Gradient reversal layer: returns x, and scales gradients flowing back into x by -grl_lambda."""
    return GradientReversal.apply(x, grl_lambda)


class TripleGRUDecoder(nn.Module):
    """Noise model + clean-speech decoder + adversarial noisy-speech decoder.

    The clean decoder reads (day-processed patched input - noise); the noisy decoder reads the
    noise through gradient reversal, which pushes speech information out of the noise estimate.

    `bidirectional` makes the clean and noisy speech GRUs bidirectional; the noise model stays
    causal. Its output is subtracted from the input, so it must stay as wide as the patch (P*D,
    7168 at full size): a bidirectional noise GRU would either double its 617M parameters and
    need a 2*P*D -> P*D projection (another ~103M), or halve each direction's width, changing the
    design's noise estimator; the speech decoders still see every noise frame of the trial in
    both directions, since the clean one reads (input - noise) and the noisy one the noise itself.
    """

    def __init__(
        self,
        neural_dim: int,
        n_units: int,
        n_days: int,
        n_classes: int,
        *,
        rnn_dropout: float = 0.0,
        input_dropout: float = 0.0,
        patch_size: int = 0,
        patch_stride: int = 0,
        n_noise_layers: int = 2,
        n_clean_layers: int = 3,
        n_noisy_layers: int = 2,
        noise_hidden_size: int = 0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        shared = dict(neural_dim=neural_dim, n_days=n_days, rnn_dropout=rnn_dropout, input_dropout=input_dropout,
                      patch_size=patch_size, patch_stride=patch_stride)
        self.noise_model = NoiseModel(**shared, n_layers=n_noise_layers, noise_hidden_size=noise_hidden_size)
        self.clean_model = CleanSpeechModel(
            **shared, n_units=n_units, n_classes=n_classes, n_layers=n_clean_layers, bidirectional=bidirectional
        )
        self.noisy_model = NoisySpeechModel(
            input_size=self.noise_model.patched_size, n_units=n_units, n_classes=n_classes, rnn_dropout=rnn_dropout,
            n_layers=n_noisy_layers, bidirectional=bidirectional,
        )

    def forward(
        self, x: Tensor, day_idx: Tensor, mode: str = "inference", grl_lambda: float | Tensor = 0.0,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """x: (B, T, D); day_idx: (B,); lengths: (B,) frames per trial, read by bidirectional
        speech GRUs (the noise GRU is causal). inference -> (clean_logits,); full -> (clean_logits,
        noisy_logits, noise) with logits (B, T', C) and noise (B, T', P*D), all float32."""
        if mode not in ("inference", "full"):
            raise ValueError(f"mode must be 'inference' or 'full', got {mode!r}")
        noise = self.noise_model(x, day_idx)
        clean_logits = self.clean_model(x, day_idx, noise, lengths)
        if mode == "inference":
            return (clean_logits,)
        noisy_logits = self.noisy_model(grad_reverse(noise, grl_lambda), lengths)
        return clean_logits, noisy_logits, noise


def _check_patching(patch_size: int, patch_stride: int) -> None:
    if patch_size < 0 or (patch_size > 0 and patch_stride <= 0):
        raise ValueError(f"patch_size must be >= 0 and patch_stride > 0 when patching; got {patch_size}, {patch_stride}")


def _stripped_state_dict(state_dict_or_checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model state dict of a checkpoint dict (or a bare state dict) with the `_orig_mod.`
    (torch.compile) and `module.` (DDP) prefixes stripped, in any nesting."""
    state_dict = state_dict_or_checkpoint
    if "model_state_dict" in state_dict:
        state_dict = state_dict["model_state_dict"]
    cleaned = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def load_day_mapped(
    model: nn.Module, state_dict_or_checkpoint: Mapping[str, Any], day_sources: Sequence[int | None],
    source: str | Path | None = None,
) -> Any:
    """Load a checkpoint trained with another session list: day d of `model` gets the checkpoint's
    day `day_sources[d]` (dataset.day_sources maps them by session name), or keeps the fresh
    layer `model` was built with (identity weights, zero biases) where that is None. Every other
    weight is loaded strictly, as load_state_dict_compat.

    Works on state-dict keys (`...day_weights.{d}`, `...day_biases.{d}`), whatever the modules
    hold the days in.
    """
    loaded = _stripped_state_dict(state_dict_or_checkpoint)
    mapped = {}
    for key, fresh in model.state_dict().items():
        match = _DAY_KEY.fullmatch(key)
        if match is None:
            if key in loaded:
                mapped[key] = loaded[key]
            continue  # a missing key: the strict load below names it
        day = int(match.group(2))
        if day >= len(day_sources):
            raise CheckpointError(f"{key}: the model has more days than the {len(day_sources)} day sources given")
        origin = day_sources[day]
        origin_key = f"{match.group(1)}.{origin}"
        if origin is not None and origin_key not in loaded:
            raise CheckpointError(f"{source or 'checkpoint'}: has no {origin_key} (day {origin} of its session list)")
        mapped[key] = fresh if origin is None else loaded[origin_key]
    for key in loaded:  # keys the model lacks, apart from the day layers of days left out
        if _DAY_KEY.fullmatch(key) is None and key not in mapped:
            mapped[key] = loaded[key]
    return load_state_dict_compat(model, mapped, source=source)


def load_state_dict_compat(
    model: nn.Module, state_dict_or_checkpoint: Mapping[str, Any], source: str | Path | None = None
) -> Any:
    """Load an upstream or local checkpoint dict, or a bare state dict, strictly into `model`.

    Accepts {'model_state_dict': ...} checkpoints and strips the `_orig_mod.` (torch.compile) and
    `module.` (DDP) prefixes, in any nesting. Returns load_state_dict's result. With `source` (the
    file the weights came from), weights that do not fit raise CheckpointError naming it.
    """
    cleaned = _stripped_state_dict(state_dict_or_checkpoint)
    try:
        return model.load_state_dict(cleaned, strict=True)
    except RuntimeError as error:
        if source is None:
            raise
        first_lines = "\n".join(str(error).splitlines()[:4])
        raise CheckpointError(f"{source}: weights do not fit the configured model: {first_lines}") from None


def checkpoint_file(path: str | Path) -> str:
    """The checkpoint a path or URL names: the file itself, or a model directory's best checkpoint
    (this repo's checkpoint/best_checkpoint.pt, else upstream's checkpoint/best_checkpoint)."""
    if storage.isdir(path):
        for name in CHECKPOINT_NAMES:
            if storage.isfile(storage.join(path, str(name))):
                return storage.join(path, str(name))
        raise CheckpointError(f"checkpoint not found: {path} holds neither {' nor '.join(map(str, CHECKPOINT_NAMES))}")
    if not storage.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return str(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict onto the CPU: this repo's (resume, init, evaluation) or upstream's.

    mmap=True pages a local file's tensor data in on demand instead of first reading the whole
    file (~8 GB of weights and AdamW moments at full size) into host memory; a URL (storage.py) is
    read through fsspec. weights_only=False: this repo's checkpoints also hold numpy and Python RNG
    states.
    """
    path = checkpoint_file(path)
    try:
        if storage.is_url(path):
            with storage.open_read(path) as handle:
                checkpoint = torch.load(handle, map_location="cpu", weights_only=False)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # a truncated or foreign file: torch's own error is not the message to show
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a checkpoint dict with a 'model_state_dict'")
    return checkpoint


def _unwrapped(model: nn.Module) -> nn.Module:
    """The decoder inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model._orig_mod
    return model


def decoder_outputs(
    model: nn.Module, features: Tensor, day_indices: Tensor, *, use_amp: bool, mode: str = "inference",
    grl_lambda: float | Tensor = 0.0, lengths: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Either decoder's outputs as a tuple, clean logits first, under bf16 autocast when use_amp.

    `model` may be wrapped (DDP, torch.compile); the call goes through the wrapper so DDP's
    gradient hooks run. mode 'full' adds the triple model's (noisy_logits, noise); the baseline
    has one output in either mode. The GRU recurrences stay float32 inside the model and the
    logits come back float32, so the CTC that follows runs in float32. `lengths` (B,), each
    trial's output frames (the CTC input lengths), keep a bidirectional model to each trial's
    frames, so its outputs do not depend on the padding; None reads every frame as real.
    """
    with torch.autocast(device_type=features.device.type, dtype=torch.bfloat16, enabled=use_amp):
        if isinstance(_unwrapped(model), TripleGRUDecoder):
            return tuple(model(features, day_indices, mode=mode, grl_lambda=grl_lambda, lengths=lengths))
        return (model(features, day_indices, lengths=lengths),)


def infer(
    model: nn.Module, features: Tensor, day_indices: Tensor, n_time_steps: Tensor, *, use_amp: bool
) -> tuple[Tensor, Tensor]:
    """Inference forward for validation, evaluation and benchmarks.

    features: (B, T, D) already smoothed; day_indices, n_time_steps: (B,). Returns the clean
    logits (B, T', C) float32 and each trial's number of valid output frames (B,).
    """
    inner = _unwrapped(model)
    lengths = n_patches(n_time_steps, inner.patch_size, inner.patch_stride)
    return decoder_outputs(model, features, day_indices, use_amp=use_amp, lengths=lengths)[0], lengths


def build_model(cfg_model: Any, n_days: int) -> nn.Module:
    """Build the model named by cfg_model.type ('baseline' | 'triple') from the config's model section."""
    common = dict(
        neural_dim=cfg_model.n_input_features,
        n_units=cfg_model.n_units,
        n_days=n_days,
        n_classes=cfg_model.n_classes,
        rnn_dropout=cfg_model.rnn_dropout,
        input_dropout=cfg_model.input_dropout,
        patch_size=cfg_model.patch_size,
        patch_stride=cfg_model.patch_stride,
        bidirectional=cfg_model.bidirectional,
    )
    save_dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if cfg_model.gru_save_dtype not in save_dtypes:
        raise ValueError(f"model.gru_save_dtype must be 'float32' or 'bfloat16', got {cfg_model.gru_save_dtype!r}")
    if cfg_model.type == "baseline":
        model = GRUDecoder(**common, n_layers=cfg_model.n_layers)
    elif cfg_model.type == "triple":
        model = TripleGRUDecoder(
            **common,
            n_noise_layers=cfg_model.n_noise_layers,
            n_clean_layers=cfg_model.n_clean_layers,
            n_noisy_layers=cfg_model.n_noisy_layers,
            noise_hidden_size=cfg_model.noise_hidden_size,
        )
    else:
        raise ValueError(f"model.type must be 'baseline' or 'triple', got {cfg_model.type!r}")
    for module in model.modules():
        if isinstance(module, GRU):
            module.save_dtype = save_dtypes[cfg_model.gru_save_dtype]
    return model


@dataclass
class TrainedModel:
    """A trained decoder with what feeding it needs: its session order and input settings."""

    model: nn.Module
    sessions: list[str]  # day index = position
    transforms: TransformsConfig  # only the smoothing keys matter at inference
    time_buckets: list[int]  # padded lengths on XLA, as in training
    feature_subset: list[int] | None = None
    source: str = ""  # the checkpoint file
    config: Config | None = None  # the config the model was built from (upstream's mapped to this schema)


def load_run_model(model_path: str | Path) -> TrainedModel:
    """A run directory of this repo: config.yaml + checkpoint/best_checkpoint.pt."""
    run_dir = str(model_path)
    if not storage.isdir(run_dir):
        raise CheckpointError(f"model directory not found: {run_dir}")
    path = storage.join(run_dir, str(CHECKPOINT_NAMES[0]))
    checkpoint = read_checkpoint(path)
    config_path = storage.join(run_dir, "config.yaml")
    cfg = load_config(config_path) if storage.isfile(config_path) else config_from_dict(checkpoint.get("config") or {})
    sessions = list(checkpoint.get("sessions") or cfg.dataset.sessions)
    if not sessions:
        raise CheckpointError(f"{path}: the checkpoint names no sessions (day order unknown)")
    if cfg.dataset.sessions and list(cfg.dataset.sessions) != sessions:
        raise CheckpointError(f"{run_dir}: config.yaml and the checkpoint list different sessions; day indices would not match")
    model = build_model(cfg.model, n_days=len(sessions))
    load_state_dict_compat(model, checkpoint, source=path)
    return TrainedModel(
        model=model.eval(), sessions=sessions, transforms=cfg.dataset.data_transforms,
        time_buckets=list(cfg.dataset.time_buckets), feature_subset=cfg.dataset.feature_subset, source=str(path),
        config=cfg,
    )


def load_upstream_model(model_path: str | Path) -> TrainedModel:
    """An upstream (nejm-brain-to-text) model directory: checkpoint/args.yaml + checkpoint/best_checkpoint.

    args.yaml is read through config.from_upstream, the mapping that lets upstream configs train
    here, so the model is the baseline GRUDecoder that config describes.
    """
    model_dir = Path(model_path)
    args_path = model_dir / UPSTREAM_ARGS
    if not args_path.is_file():
        raise CheckpointError(f"upstream args file not found: {args_path}")
    try:
        args = yaml.safe_load(args_path.read_text()) or {}
        cfg = config_from_dict(from_upstream(args)[0])
    except (ConfigError, AttributeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{args_path}: not an upstream args file ({type(error).__name__}: {error})") from None
    sessions = list(cfg.dataset.sessions)
    if not sessions:
        raise CheckpointError(f"{args_path}: dataset.sessions is empty (day order unknown)")
    model = build_model(cfg.model, n_days=len(sessions))
    path = model_dir / CHECKPOINT_NAMES[1]
    load_state_dict_compat(model, read_checkpoint(path), source=path)
    return TrainedModel(
        model=model.eval(), sessions=sessions, transforms=cfg.dataset.data_transforms, time_buckets=[],
        feature_subset=cfg.dataset.feature_subset, source=str(path), config=cfg,
    )


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """Total and day-specific parameter counts, and counts per top-level sub-module.

    Returns {'total': int, 'day_specific': int, 'by_submodule': {name: int}}.
    """
    total = 0
    day_specific = 0
    by_submodule: dict[str, int] = {}
    for name, param in model.named_parameters():
        count = param.numel()
        total += count
        if is_day_parameter(name):
            day_specific += count
        top = name.split(".")[0]
        by_submodule[top] = by_submodule.get(top, 0) + count
    return {"total": total, "day_specific": day_specific, "by_submodule": by_submodule}


def format_parameter_summary(summary: Mapping[str, Any]) -> str:
    """Multi-line text of `parameter_summary`'s result, for the training log."""
    total, day_specific = summary["total"], summary["day_specific"]
    share = day_specific / total if total else 0.0
    lines = [f"Model has {total:,} parameters ({day_specific:,} day-specific, {share:.1%})"]
    for name, count in summary["by_submodule"].items():
        lines.append(f"  {name:<20} {count:>14,}")
    return "\n".join(lines)
