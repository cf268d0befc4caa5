"""Tests of data_augmentations.py: kernel, smoothing, each augmentation's statistics, static shapes.

Run: .venv/bin/python -m pytest tests/test_augmentations.py -q
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_augmentations import augment_batch, gauss_kernel, gauss_smooth, shift_time

OFF = {"white_noise_std": 0, "constant_offset_std": 0, "random_walk_std": 0, "random_walk_axis": -1,
       "static_gain_std": 0, "random_cut": 0, "smooth_data": False, "smooth_kernel_size": 100,
       "smooth_kernel_std": 2, "jitter_max": 0}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _augment(features, n_time_steps=None, seed=0, training=True, static_shapes=False, **transforms):
    if n_time_steps is None:
        n_time_steps = torch.full((features.shape[0],), features.shape[1])
    return augment_batch(features, n_time_steps, {**OFF, **transforms}, training=training,
                         generator=_gen(seed), static_shapes=static_shapes)


def test_kernel_is_the_trimmed_normalised_gaussian():
    kernel = gauss_kernel(2, 100)
    # Gaussian of std 2 sampled at -4..4: entries at |k| >= 5 fall below 0.01 and are trimmed.
    expected = np.exp(-np.arange(-4, 5) ** 2 / 8)
    np.testing.assert_allclose(kernel, expected / expected.sum(), atol=1e-4)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    assert len(gauss_kernel(4, 100)) > len(kernel)


def test_smoothing_keeps_a_constant_signal_constant():
    constant = torch.full((2, 60, 3), 2.5)
    kernel_len = len(gauss_kernel(2, 100))
    same = gauss_smooth(constant, 2, 100, padding="same")
    assert same.shape == constant.shape
    half = kernel_len // 2
    torch.testing.assert_close(same[:, half:-half], constant[:, half:-half])
    valid = gauss_smooth(constant, 2, 100, padding="valid")
    assert valid.shape == (2, 60 - kernel_len + 1, 3)
    torch.testing.assert_close(valid, torch.full_like(valid, 2.5))


def test_smoothing_matches_a_per_channel_convolution():
    x = torch.randn(2, 50, 4, generator=_gen())
    smoothed = gauss_smooth(x, 1.5, 20)
    kernel = gauss_kernel(1.5, 20)
    expected = np.convolve(x[1, :, 2].numpy(), kernel[::-1], mode="same")
    np.testing.assert_allclose(smoothed[1, :, 2].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_smoothing_by_shifts_equals_the_grouped_conv1d(padding: str):
    """The CPU's shifted adds against the grouped conv1d (the XLA path, upstream's), several
    kernels and lengths down to one kernel's, float32 and bf16 inputs."""
    for std, size, n_time in ((2, 100, 60), (1.5, 20, 7), (4, 100, 33), (0.7, 9, 5)):
        kernel = torch.from_numpy(gauss_kernel(std, size))
        if padding == "valid" and n_time < len(kernel):
            continue
        x = torch.randn(3, n_time, 5, generator=_gen())
        weight = kernel.view(1, 1, -1).repeat(5, 1, 1)  # (C, 1, K)
        expected = F.conv1d(x.permute(0, 2, 1), weight, padding=padding, groups=5).permute(0, 2, 1)
        torch.testing.assert_close(gauss_smooth(x, std, size, padding=padding), expected, rtol=1e-6, atol=1e-6)
        smoothed_bf16 = gauss_smooth(x.bfloat16(), std, size, padding=padding)
        assert smoothed_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(smoothed_bf16.float(), expected, rtol=0.02, atol=0.02)


def test_white_noise_has_the_configured_std():
    out, n = _augment(torch.zeros(8, 200, 64), white_noise_std=0.7)
    assert out.std().item() == pytest.approx(0.7, rel=0.02) and abs(out.mean().item()) < 0.01
    assert torch.equal(n, torch.full((8,), 200))


def test_constant_offset_is_constant_in_time():
    out, _ = _augment(torch.zeros(64, 30, 32), constant_offset_std=0.3)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))
    assert out[:, 0].std().item() == pytest.approx(0.3, rel=0.05)


def test_random_walk_variance_grows_along_time():
    out, _ = _augment(torch.zeros(256, 100, 16), random_walk_std=0.1, random_walk_axis=1)
    var = out.var(dim=(0, 2))
    assert var[99].item() == pytest.approx(100 * 0.01, rel=0.15) and var[9].item() == pytest.approx(10 * 0.01, rel=0.15)


def test_static_gain_mixes_channels_per_trial():
    n_channels = 64
    eye = torch.eye(n_channels).expand(4, n_channels, n_channels).contiguous()  # (B, T=C, C)
    out, _ = _augment(eye, static_gain_std=0.05)
    warp_noise = out - eye  # rows of the identity pick out the mixing matrix I + N(0, std)
    assert warp_noise.std().item() == pytest.approx(0.05, rel=0.05)
    assert not torch.allclose(warp_noise[0], warp_noise[1])


def test_random_cut_with_static_shapes_keeps_the_shape_and_masks_the_tail():
    x = torch.arange(1, 41, dtype=torch.float32).view(1, 40, 1).expand(3, 40, 2).contiguous()
    n_in = torch.tensor([40, 30, 20])
    cuts = set()
    for seed in range(12):
        out, n = _augment(x, n_in, seed=seed, static_shapes=True, random_cut=4)
        assert out.shape == x.shape
        cut = int(n_in[0] - n[0])
        assert torch.equal(n, n_in - cut) and 0 <= cut < 4
        torch.testing.assert_close(out[:, : 40 - cut], x[:, cut:])
        assert (out[:, 40 - cut :] == 0).all()
        cuts.add(cut)
    assert len(cuts) > 1


def test_random_cut_without_static_shapes_slices_like_upstream():
    x = torch.randn(2, 40, 3, generator=_gen())
    lengths = set()
    for seed in range(12):
        out, n = _augment(x, seed=seed, random_cut=4)
        cut = 40 - out.shape[1]
        assert torch.equal(out, x[:, cut:]) and torch.equal(n, torch.full((2,), 40 - cut))
        lengths.add(out.shape[1])
    assert len(lengths) > 1


def test_jitter_shifts_each_trial_and_keeps_the_shape():
    x = torch.arange(1, 51, dtype=torch.float32).view(1, 50, 1).expand(16, 50, 1).contiguous()
    n_in = torch.full((16,), 40)
    out, n = _augment(x, n_in, jitter_max=3, static_shapes=True)
    assert out.shape == x.shape
    shifts = n_in - n  # positive drops leading bins, negative delays the trial
    assert shifts.abs().max() <= 3 and len(set(shifts.tolist())) > 1
    for row, shift in enumerate(shifts.tolist()):
        torch.testing.assert_close(out[row], shift_time(x[row : row + 1], torch.tensor([shift]))[0])


def test_validation_only_smooths():
    x = torch.randn(2, 30, 4, generator=_gen())
    transforms = {"white_noise_std": 1.0, "random_cut": 3, "jitter_max": 2, "static_gain_std": 0.1}
    out, n = _augment(x, training=False, **transforms)
    assert torch.equal(out, x) and torch.equal(n, torch.full((2,), 30))
    out, _ = _augment(x, training=False, smooth_data=True, **transforms)
    torch.testing.assert_close(out, gauss_smooth(x, 2, 100))


def test_generator_makes_augmentation_reproducible():
    x = torch.randn(4, 60, 8, generator=_gen(1))
    transforms = {"white_noise_std": 1.0, "constant_offset_std": 0.2, "random_walk_std": 0.01, "static_gain_std": 0.02,
                  "random_cut": 3, "jitter_max": 2, "smooth_data": True}
    a, na = _augment(x, seed=9, static_shapes=True, **transforms)
    b, nb = _augment(x, seed=9, static_shapes=True, **transforms)
    c, _ = _augment(x, seed=10, static_shapes=True, **transforms)
    assert torch.equal(a, b) and torch.equal(na, nb) and not torch.allclose(a, c)


def test_static_path_never_reads_values_back_to_the_host():
    # Meta tensors have no values: any .item()/int()/bool() on them raises, as a host sync would stall XLA.
    x = torch.empty(4, 60, 8, device="meta")
    n = torch.empty(4, dtype=torch.int64, device="meta")
    transforms = {**OFF, "white_noise_std": 1.0, "constant_offset_std": 0.2, "random_walk_std": 0.01,
                  "static_gain_std": 0.02, "random_cut": 3, "jitter_max": 2, "smooth_data": True}
    out, n_out = augment_batch(x, n, transforms, training=True, generator=None, static_shapes=True)
    assert out.shape == x.shape and n_out.shape == n.shape
    with pytest.raises(RuntimeError, match="item"):
        augment_batch(x, n, transforms, training=True, generator=None, static_shapes=False)  # dynamic cut needs a host value
