"""On-device augmentation of neural feature batches (B, T, C), as in the upstream baseline.

Used as a library by rnn_trainer.py:
    from data_augmentations import augment_batch, gauss_smooth
    features, n_time_steps = augment_batch(features, n_time_steps, cfg.dataset.data_transforms,
                                           training=True, generator=gen, static_shapes=True)

Order as upstream: static gain, white noise, constant offset, random walk, random cut (training
only), then temporal jitter (training only), then Gaussian smoothing (training and validation).
Random numbers come from `generator` (reproducible on CPU) or, when it is None, the global RNG of
the features' device (on XLA). The static_shapes path never changes a shape and never reads a
value back to the host, so it can run inside a compiled XLA step.
"""

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d


@functools.lru_cache(maxsize=16)
def gauss_kernel(smooth_kernel_std: float = 2, smooth_kernel_size: int = 100) -> np.ndarray:
    """Upstream's kernel: a unit impulse smoothed by a Gaussian, entries <= 0.01 trimmed, sum 1."""
    impulse = np.zeros(smooth_kernel_size, dtype=np.float32)
    impulse[smooth_kernel_size // 2] = 1
    kernel = gaussian_filter1d(impulse, smooth_kernel_std)
    kernel = kernel[kernel > 0.01]
    return (kernel / kernel.sum()).astype(np.float32)


def gauss_smooth(
    inputs: torch.Tensor, smooth_kernel_std: float = 2, smooth_kernel_size: int = 100, padding: str = "same"
) -> torch.Tensor:
    """Smooth each channel along time with the Gaussian kernel: conv1d's cross-correlation.

    inputs: (B, T, C). padding 'same' keeps T (zero padded at the ends); 'valid' gives
    T - K + 1 steps for a trimmed kernel of length K. On XLA a grouped conv1d; elsewhere one
    scaled add of a shifted slice per tap (K = 9 for std 2) on the (B, T, C) layout, about 3x
    faster than the depthwise conv1d on the CPU, equal to its float rounding.
    """
    kernel = torch.from_numpy(gauss_kernel(float(smooth_kernel_std), int(smooth_kernel_size)))
    if inputs.device.type != "xla":
        return _smooth_by_shifts(inputs, kernel.tolist(), padding)
    n_channels = inputs.shape[-1]
    weight = kernel.to(device=inputs.device, dtype=inputs.dtype).view(1, 1, -1).repeat(n_channels, 1, 1)  # (C, 1, K)
    smoothed = F.conv1d(inputs.permute(0, 2, 1), weight, padding=padding, groups=n_channels)  # (B, C, T) -> (B, C, T')
    return smoothed.permute(0, 2, 1)  # (B, C, T') -> (B, T', C)


def _smooth_by_shifts(inputs: torch.Tensor, kernel: list[float], padding: str) -> torch.Tensor:
    """out[:, t] = sum_j kernel[j] * inputs[:, t + j - left], zero outside [0, T): conv1d's
    cross-correlation with its 'same' (left = (K - 1) // 2) or 'valid' (left = 0) padding.
    Accumulates in float32 at least, as conv1d does for bf16 inputs."""
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    n_batch, n_time, n_channels = inputs.shape
    n_taps = len(kernel)
    left = (n_taps - 1) // 2 if padding == "same" else 0
    n_out = n_time if padding == "same" else n_time - n_taps + 1
    if n_out < 0:
        raise ValueError(f"padding 'valid' needs at least {n_taps} time bins, got {n_time}")
    x = inputs if inputs.dtype in (torch.float32, torch.float64) else inputs.float()
    out = x.new_zeros(n_batch, n_out, n_channels)
    for j, weight in enumerate(kernel):
        shift = j - left  # out[:, t] += weight * x[:, t + shift]
        start, stop = max(0, -shift), min(n_out, n_time - shift)
        if start < stop:
            out[:, start:stop].add_(x[:, start + shift : stop + shift], alpha=weight)
    return out.to(inputs.dtype)


def _get(transforms: Any, key: str, default: Any = 0) -> Any:
    if isinstance(transforms, Mapping):
        return transforms.get(key, default)
    return getattr(transforms, key, default)


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Normal noise drawn on the generator's device (or like's device), returned on like's device."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


def _randint(high: int, shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integers in [0, high) as a tensor on like's device."""
    device = generator.device if generator is not None else like.device
    return torch.randint(0, high, shape, generator=generator, device=device).to(like.device)


def shift_time(features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[b, t] = features[b, t + shift[b]], zero where t + shift falls outside [0, T).

    features: (B, T, C); shift: (B,) integer tensor (positive = drop leading bins, negative =
    delay). A gather instead of slicing, so shapes are static and no value goes to the host.
    """
    n_batch, n_time, n_channels = features.shape
    source = torch.arange(n_time, device=features.device)[None, :] + shift[:, None]  # (B, T)
    inside = (source >= 0) & (source < n_time)
    index = source.clamp(0, n_time - 1)[:, :, None].expand(n_batch, n_time, n_channels)  # (B, T) -> (B, T, C)
    return torch.gather(features, 1, index) * inside[:, :, None].to(features.dtype)


def augment_batch(
    features: torch.Tensor,
    n_time_steps: torch.Tensor,
    transforms: Any,
    training: bool,
    generator: torch.Generator | None = None,
    static_shapes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the configured augmentations; returns (features, n_time_steps).

    features: (B, T, C); n_time_steps: (B,). `transforms` is the data_transforms config section
    or a dict with its keys. In dynamic mode a random cut slices the leading bins off (T shrinks,
    as upstream); with static_shapes it shifts left and zeroes the tail instead.
    """
    n_batch, n_time, n_channels = features.shape
    if training:
        gain_std = _get(transforms, "static_gain_std")
        if gain_std > 0:
            # Per-trial channel mixing I + N(0, std): electrodes pick up slightly different neurons.
            eye = torch.eye(n_channels, device=features.device, dtype=features.dtype)
            warp = eye + _randn((n_batch, n_channels, n_channels), features, generator) * gain_std
            features = torch.bmm(features, warp)  # (B, T, C) @ (B, C, C) -> (B, T, C)
        white_noise_std = _get(transforms, "white_noise_std")
        if white_noise_std > 0:
            features = features + _randn(tuple(features.shape), features, generator) * white_noise_std
        offset_std = _get(transforms, "constant_offset_std")
        if offset_std > 0:
            features = features + _randn((n_batch, 1, n_channels), features, generator) * offset_std
        walk_std = _get(transforms, "random_walk_std")
        if walk_std > 0:
            steps = _randn(tuple(features.shape), features, generator) * walk_std
            features = features + torch.cumsum(steps, dim=int(_get(transforms, "random_walk_axis", -1)))
        random_cut = int(_get(transforms, "random_cut"))
        if random_cut > 0:
            # One cut for the whole batch in [0, random_cut), as upstream's randint.
            cut = _randint(random_cut, (1,), features, generator)
            if static_shapes:
                features = shift_time(features, cut.expand(n_batch))
                n_time_steps = (n_time_steps - cut).clamp(min=0)
            else:
                n_cut = int(cut)  # host value is fine here: dynamic shapes only run eagerly
                features = features[:, n_cut:, :]
                n_time_steps = n_time_steps - n_cut
                n_time -= n_cut
        jitter_max = int(_get(transforms, "jitter_max"))
        if jitter_max > 0:
            # Per-trial shift in [-jitter_max, jitter_max]: negative delays the trial (leading
            # zeros, which z-scored data reads as the mean), positive drops its first bins.
            shift = _randint(2 * jitter_max + 1, (n_batch,), features, generator) - jitter_max
            features = shift_time(features, shift)
            n_time_steps = (n_time_steps - shift).clamp(min=0, max=n_time)
    if _get(transforms, "smooth_data", False):
        features = gauss_smooth(
            features, _get(transforms, "smooth_kernel_std", 2), _get(transforms, "smooth_kernel_size", 100)
        )
    return features, n_time_steps
