"""Tests of robustness.py: each perturbation's statistics, seeding, padding, nesting across levels,
and the PER-versus-level plot.

    python -m pytest tests/test_robustness.py -q
"""

import sys

import pytest
import torch

from robustness import (
    KINDS, add_bursts, add_white_noise, drop_channels, perturb_features, plot_per_by_level, trial_seeds,
)

LEVELS = {"white_noise": 0.5, "channel_dropout": 0.25, "bursts": 2.0}


def _batch(lengths=(90, 60, 75), n_time=100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), n_time, 512, generator=generator)
    return features, torch.tensor(lengths)


@pytest.mark.parametrize("kind", list(KINDS))
def test_level_zero_is_the_identity_and_padding_is_untouched(kind: str):
    features, lengths = _batch()
    seeds = trial_seeds(3, range(3))
    assert torch.equal(perturb_features(features, lengths, kind=kind, level=0.0, seeds=seeds), features)
    out = perturb_features(features, lengths, kind=kind, level=LEVELS[kind], seeds=seeds)
    assert not torch.equal(out, features)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], features[b, n:])


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_trial_is_perturbed_alike_in_any_batch_and_by_seed_only(kind: str):
    features, lengths = _batch()
    seeds = trial_seeds(3, [10, 11, 12])
    batched = perturb_features(features, lengths, kind=kind, level=LEVELS[kind], seeds=seeds)
    for b, n in enumerate(lengths.tolist()):
        alone = perturb_features(features[b : b + 1, :n], lengths[b : b + 1], kind=kind, level=LEVELS[kind],
                                 seeds=seeds[b : b + 1])
        assert torch.equal(alone[0], batched[b, :n]), b
    other = perturb_features(features, lengths, kind=kind, level=LEVELS[kind], seeds=trial_seeds(4, [10, 11, 12]))
    assert not torch.equal(other, batched)
    assert len(set(seeds)) == 3


def test_white_noise_has_the_given_std_and_scales_with_the_level():
    features, lengths = _batch(lengths=(100, 100))
    seeds = [1, 2]
    low = add_white_noise(features, lengths, std=0.5, seeds=seeds) - features
    high = add_white_noise(features, lengths, std=1.5, seeds=seeds) - features
    assert float(low.std()) == pytest.approx(0.5, rel=0.02)
    torch.testing.assert_close(high, 3.0 * low, rtol=1e-5, atol=1e-5)  # the same draws, scaled


def test_channel_dropout_zeroes_whole_electrodes_nested_by_fraction():
    features, lengths = _batch()
    seeds = [5, 6, 7]
    dropped = {}
    for fraction in (0.1, 0.25):
        out = drop_channels(features, lengths, fraction=fraction, seeds=seeds)
        for b, n in enumerate(lengths.tolist()):
            zero = (out[b, :n] == 0).all(dim=0)  # (512,)
            assert torch.equal(zero[:256], zero[256:])  # both features of an electrode
            assert int(zero[:256].sum()) == round(fraction * 256)
            assert torch.equal(out[b, :n, ~zero], features[b, :n, ~zero])
            dropped[fraction, b] = set(torch.nonzero(zero[:256]).flatten().tolist())
    assert all(dropped[0.1, b] < dropped[0.25, b] for b in range(3))


def test_bursts_hit_electrode_groups_at_the_given_rate_nested_by_rate():
    n_time = 5000  # 100 s
    features, lengths = torch.zeros(8, n_time, 512), torch.full((8,), n_time)
    seeds = list(range(8))
    low = add_bursts(features, lengths, rate=0.5, seeds=seeds)
    high = add_bursts(features, lengths, rate=2.0, seeds=seeds)
    for added in (low, high):
        assert (added >= 0).all()
        assert torch.equal(added[..., :256] != 0, added[..., 256:] != 0)
    # rate x seconds bursts per trial, each 5 bins x 64 features x amplitude 8 (gains average 1).
    expected = 0.5 * n_time * 0.02 * 5 * 64 * 8.0
    assert float(low.sum(dim=(1, 2)).mean()) == pytest.approx(expected, rel=0.1)
    assert bool(((low != 0) <= (high != 0)).all())  # every burst at 0.5/s is also there at 2/s


def test_unknown_kind_and_negative_level_are_rejected():
    features, lengths = _batch()
    with pytest.raises(ValueError, match="kind"):
        perturb_features(features, lengths, kind="pink_noise", level=1.0, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="level"):
        perturb_features(features, lengths, kind="white_noise", level=-1.0, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="one seed per row"):
        perturb_features(features, lengths, kind="white_noise", level=1.0, seeds=[0])


def test_plot_per_by_level_draws_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "per_white_noise.png"
    written = plot_per_by_level({"triple": {0.0: 0.19, 0.5: 0.25, 1.0: 0.4}, "baseline": {0.0: 0.2, 1.0: 0.5}},
                                kind="white_noise", path=path)
    assert written and path.read_bytes().startswith(b"\x89PNG")


def test_plot_is_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    path = tmp_path / "per_bursts.png"
    assert plot_per_by_level({"triple": {0.0: 0.2}}, kind="bursts", path=path) is False
    assert not path.exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]
