"""Seeded test-time perturbations of neural features, and PER plotted against perturbation level.

Robustness evaluation scores a decoder on its evaluation features corrupted at several levels of
one kind, and compares models on one figure:

    from robustness import perturb_features, plot_per_by_level, trial_seeds
    seeds = trial_seeds(seed=0, indices=trial_indices)  # one per trial of the batch
    features = perturb_features(features, n_time_steps, kind="white_noise", level=0.5, seeds=seeds)
    plot_per_by_level({"triple": {0.0: 0.19, 0.5: 0.23}, "baseline": {0.0: 0.21, 0.5: 0.30}},
                      kind="white_noise", path="per_white_noise.png")

Kinds and what their level means (features are z-scored, so 1.0 is one block standard deviation):
    white_noise      std of Gaussian noise added to every feature and bin
    channel_dropout  fraction of electrodes whose features are set to 0 (the block mean) for the trial
    bursts           bursts per second: transient high-amplitude bursts on groups of neighbouring
                     electrodes, the burst model of make_synthetic_data.Artifacts

Every function is pure: (features (B, T, 512), n_time_steps (B,), level, seeds) -> new features;
padding frames (t >= n_time_steps[b]) are returned unchanged. Row b draws from its own generator
seeded with seeds[b] and only for its own n_time_steps[b] bins, so a trial is perturbed alike in
any batch and at any padding. The draws do not depend on the level: a kind's perturbations at
increasing levels are scaled or nested versions of one another (common random numbers), which
keeps PER-versus-level curves smooth. An electrode is a pair of features, threshold crossings (e)
and spike-band power (e + 256); dropout and bursts hit both. Apply the perturbation to the
features as read, before the evaluation's smoothing.

Tested by: `python -m pytest tests/test_robustness.py -q`.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BIN_SECONDS = 0.02
# Perturbation kinds and the axis label of their level.
KINDS = {
    "white_noise": "white noise std (block standard deviations)",
    "channel_dropout": "fraction of electrodes dropped",
    "bursts": "burst artifacts per second",
}


def trial_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """One generator seed per trial from a run seed and each trial's index in the split."""
    return [int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]) for i in indices]


def _row_generators(seeds: Sequence[int], n_rows: int) -> list[torch.Generator]:
    if len(seeds) != n_rows:
        raise ValueError(f"need one seed per row: {n_rows} rows, {len(seeds)} seeds")
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def _add_per_row(features: Tensor, n_time_steps: Tensor, added: list[Tensor]) -> Tensor:
    """features + added[b] on row b's first n_time_steps[b] bins; added[b]: (n_b, C) on the CPU."""
    out = features.clone()
    for b, (n_time, values) in enumerate(zip(n_time_steps.tolist(), added)):
        out[b, :n_time] += values.to(device=features.device, dtype=features.dtype)
    return out


def add_white_noise(features: Tensor, n_time_steps: Tensor, *, std: float, seeds: Sequence[int]) -> Tensor:
    """Gaussian noise of standard deviation `std` on every feature of every real bin."""
    if std == 0:
        return features.clone()
    n_channels = features.shape[-1]
    generators = _row_generators(seeds, features.shape[0])
    noise = [torch.randn(int(n), n_channels, generator=g) * std for n, g in zip(n_time_steps.tolist(), generators)]
    return _add_per_row(features, n_time_steps, noise)


def drop_channels(features: Tensor, n_time_steps: Tensor, *, fraction: float, seeds: Sequence[int]) -> Tensor:
    """Set round(fraction x electrodes) electrodes to 0 for the whole trial, as a dead electrode
    reads after z-scoring. A larger fraction drops a superset of a smaller one's electrodes."""
    n_rows, n_time, n_channels = features.shape
    n_electrodes = n_channels // 2
    n_dropped = round(fraction * n_electrodes)
    out = features.clone()
    if n_dropped == 0:
        return out
    for b, generator in enumerate(_row_generators(seeds, n_rows)):
        electrodes = torch.randperm(n_electrodes, generator=generator)[:n_dropped]
        channels = torch.cat([electrodes, electrodes + n_electrodes]).to(features.device)
        out[b, : int(n_time_steps[b]), channels] = 0.0
    return out


def add_bursts(
    features: Tensor,
    n_time_steps: Tensor,
    *,
    rate: float,
    seeds: Sequence[int],
    amplitude: float = 8.0,
    n_electrodes: int = 32,
    n_bins: int = 5,
) -> Tensor:
    """Bursts at `rate` per second: from each onset, `n_bins` bins of amplitude x gain (gain
    uniform in 0.5-1.5 per feature) added to both features of `n_electrodes` neighbouring
    electrodes. A bin starts a burst when its uniform draw falls below rate x 20 ms, so a higher
    rate keeps every burst of a lower one."""
    if rate == 0:
        return features.clone()
    n_channels = features.shape[-1]
    n_all = n_channels // 2
    n_group = min(n_electrodes, n_all)
    added = []
    for n_time, generator in zip(n_time_steps.tolist(), _row_generators(seeds, features.shape[0])):
        onset_draw = torch.rand(n_time, generator=generator)
        first = torch.randint(0, n_all - n_group + 1, (n_time,), generator=generator)
        gains = torch.rand(n_time, 2 * n_group, generator=generator) + 0.5
        values = torch.zeros(n_time, n_channels)
        for t in torch.nonzero(onset_draw < rate * BIN_SECONDS).flatten().tolist():
            e = int(first[t])
            channels = torch.cat([torch.arange(e, e + n_group), torch.arange(n_all + e, n_all + e + n_group)])
            values[t : t + n_bins, channels] += amplitude * gains[t]
        added.append(values)
    return _add_per_row(features, n_time_steps, added)


def perturb_features(
    features: Tensor, n_time_steps: Tensor, *, kind: str, level: float, seeds: Sequence[int]
) -> Tensor:
    """features (B, T, C) perturbed by `kind` at `level` (see the module docstring); level 0 returns
    an unchanged copy."""
    if level < 0:
        raise ValueError(f"perturbation level must be >= 0, got {level}")
    if kind == "white_noise":
        return add_white_noise(features, n_time_steps, std=level, seeds=seeds)
    if kind == "channel_dropout":
        return drop_channels(features, n_time_steps, fraction=level, seeds=seeds)
    if kind == "bursts":
        return add_bursts(features, n_time_steps, rate=level, seeds=seeds)
    raise ValueError(f"perturbation kind must be one of {list(KINDS)}, got {kind!r}")


def plot_per_by_level(per_by_model: Mapping[str, Mapping[float, float]], *, kind: str, path: str | Path) -> bool:
    """Write one PNG: PER (%) against the level of `kind`, one line per model.

    per_by_model: {model name: {level: PER as a fraction}}. matplotlib is optional (`.[plots]`):
    without it nothing is written, one line says so, and the result is False.
    """
    path = Path(path)
    try:
        import matplotlib
    except ImportError:
        print(f"{path.name} not written: matplotlib is not installed (pip install matplotlib)")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_by_level in per_by_model.items():
        levels = sorted(per_by_level)
        ax.plot(levels, [100.0 * per_by_level[level] for level in levels], marker="o", label=name)
    ax.set(xlabel=KINDS.get(kind, kind), ylabel="PER (%)", title=f"Phoneme error rate under {kind.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
