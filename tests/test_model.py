"""Tests for rnn_model.py: patching, day layers, gradient reversal, parameter counts, upstream
checkpoint compatibility, bf16 autocast and CPU-vs-XLA agreement.

Run: `.venv/bin/python -m pytest tests/test_model.py -q`
"""

import types

import pytest
import torch
import torch.nn.functional as F

import xla_gru
from conftest import requires_xla, run_xla_script
from rnn_model import (
    CleanSpeechModel,
    DayInputLayer,
    GRUDecoder,
    NoiseModel,
    NoisySpeechModel,
    TripleGRUDecoder,
    build_model,
    decoder_outputs,
    format_parameter_summary,
    grad_reverse,
    infer,
    is_day_parameter,
    load_state_dict_compat,
    n_patches,
    parameter_summary,
    patch_inputs,
)

FULL = dict(neural_dim=512, n_units=768, n_days=45, n_classes=41, patch_size=14, patch_stride=4)


def _gru_parameter_count(input_size: int, hidden_size: int, n_layers: int) -> int:
    """3 gates x (input weights + recurrent weights + two biases) per layer."""
    first = 3 * (hidden_size * input_size + hidden_size * hidden_size + 2 * hidden_size)
    rest = 3 * (2 * hidden_size * hidden_size + 2 * hidden_size)
    return first + (n_layers - 1) * rest


def _upstream_patching(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """The published baseline's patching steps, written out independently."""
    x = x.unsqueeze(1).permute(0, 3, 1, 2)  # (B, T, D) -> (B, D, 1, T)
    x = x.unfold(3, size, stride)  # (B, D, 1, T) -> (B, D, 1, T', P)
    x = x.squeeze(2).permute(0, 2, 3, 1)  # (B, D, 1, T', P) -> (B, T', P, D)
    return x.reshape(x.shape[0], x.shape[1], -1)  # (B, T', P, D) -> (B, T', P*D)


def _reference_gru(x: torch.Tensor, h0: torch.Tensor, weights: dict, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GRU equations step by step from raw tensors. x: (B, T, I); h0: (L, B, H)."""
    finals = []
    for layer in range(n_layers):
        w_ih, w_hh = weights[f"weight_ih_l{layer}"], weights[f"weight_hh_l{layer}"]
        b_ih, b_hh = weights[f"bias_ih_l{layer}"], weights[f"bias_hh_l{layer}"]
        h = h0[layer]
        outputs = []
        for t in range(x.shape[1]):
            i_r, i_z, i_n = F.linear(x[:, t], w_ih, b_ih).chunk(3, dim=1)
            h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            outputs.append(h)
        x = torch.stack(outputs, dim=1)  # T x (B, H) -> (B, T, H)
        finals.append(h)
    return x, torch.stack(finals)  # L x (B, H) -> (L, B, H)


def test_n_patches_matches_unfold_length_sweep():
    for size in (1, 2, 3, 5, 14):
        for stride in (1, 2, 3, 4, 7):
            for n_time_steps in range(1, 40):
                expected = torch.arange(n_time_steps).unfold(0, size, stride).shape[0] if n_time_steps >= size else 0
                assert n_patches(n_time_steps, size, stride) == expected, (n_time_steps, size, stride)
                as_tensor = n_patches(torch.tensor([n_time_steps]), size, stride)
                assert as_tensor.tolist() == [expected]
                if n_time_steps >= size:
                    assert patch_inputs(torch.zeros(1, n_time_steps, 2), size, stride).shape == (1, expected, 2 * size)
    assert n_patches(17, 0, 0) == 17
    assert n_patches(875, 14, 4) == 216


def test_patching_uses_upstream_layout():
    torch.manual_seed(0)
    x = torch.randn(3, 37, 5)
    for size, stride in ((14, 4), (3, 1), (4, 4), (5, 3)):
        torch.testing.assert_close(patch_inputs(x, size, stride), _upstream_patching(x, size, stride), rtol=0, atol=0)
    assert patch_inputs(x, 0, 0) is x
    with pytest.raises(ValueError, match="patch_size"):
        patch_inputs(x[:, :10], 14, 4)


def test_patching_by_slices_for_xla_equals_unfold_in_values_and_gradients():
    from rnn_model import _patch_by_slices

    torch.manual_seed(0)
    for size, stride, n_time_steps in ((14, 4, 61), (3, 1, 9), (5, 3, 20)):
        x = torch.randn(2, n_time_steps, 6, dtype=torch.float64, requires_grad=True)
        by_unfold = patch_inputs(x, size, stride)
        by_slices = _patch_by_slices(x, size, stride, n_patches(n_time_steps, size, stride))
        assert torch.equal(by_unfold, by_slices)
        weight = torch.randn_like(by_unfold)
        grads = [torch.autograd.grad((y * weight).sum(), x)[0] for y in (by_unfold, by_slices)]
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_softsign_equals_f_softsign_in_values_and_gradients():
    from rnn_model import Softsign

    torch.manual_seed(0)
    x = torch.randn(3, 9, 6, dtype=torch.float64).mul_(3).requires_grad_()
    y, want = Softsign()(x), F.softsign(x)
    assert torch.equal(y, want)
    weight = torch.randn_like(y)
    grads = [torch.autograd.grad((out * weight).sum(), x)[0] for out in (y, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(Softsign(), x[:1, :3])
    assert all(isinstance(model.day_layer_activation, Softsign) for model in (
        GRUDecoder(6, 4, 3, 5, n_layers=1), DayInputLayer(neural_dim=6, n_days=3)))


def test_identity_day_layers_give_softsign():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 6)
    day_idx = torch.tensor([0, 2, 1, 2])
    layer = DayInputLayer(neural_dim=6, n_days=3, input_dropout=0.5).eval()
    torch.testing.assert_close(layer(x, day_idx), F.softsign(x))
    baseline = GRUDecoder(6, 4, 3, 5, n_layers=1).eval()
    assert all(torch.equal(w, torch.eye(6)) for w in baseline.day_weights)


def test_day_layer_applies_each_trials_own_day():
    torch.manual_seed(0)
    layer = DayInputLayer(neural_dim=6, n_days=3)
    with torch.no_grad():
        for w, b in zip(layer.day_weights, layer.day_biases):
            w.normal_()
            b.normal_()
    x = torch.randn(4, 9, 6)
    day_idx = torch.tensor([2, 0, 2, 1])
    expected = torch.stack([F.softsign(x[i] @ layer.day_weights[d] + layer.day_biases[d]) for i, d in enumerate(day_idx.tolist())])
    torch.testing.assert_close(layer(x, day_idx), expected)


def test_day_layers_are_stacked_and_saved_per_day_as_upstream():
    torch.manual_seed(0)
    n_days, d = 4, 6
    triple = TripleGRUDecoder(d, 5, n_days, 3, noise_hidden_size=4)
    shapes = {n: tuple(p.shape) for n, p in triple.named_parameters() if is_day_parameter(n)}
    assert shapes == {f"{m}.day_layer.{k}": s for m in ("noise_model", "clean_model")
                      for k, s in (("day_weights", (n_days, d, d)), ("day_biases", (n_days, 1, d)))}
    with torch.no_grad():
        for name, p in triple.named_parameters():
            p.normal_()
    state = triple.state_dict()
    # Upstream's layout: one (D, D) weight and one (1, D) bias per day, nothing stacked.
    day_keys = [k for k in state if "day_" in k]
    assert day_keys == [f"{m}.day_layer.{k}.{i}" for m in ("noise_model", "clean_model")
                        for k in ("day_weights", "day_biases") for i in range(n_days)]
    assert all(state[k].shape == ((d, d) if "weights" in k else (1, d)) for k in day_keys)
    assert torch.equal(state["clean_model.day_layer.day_weights.2"], triple.clean_model.day_layer.day_weights[2])
    assert set(state) - set(day_keys) == {n for n, _ in triple.named_parameters() if not is_day_parameter(n)}

    # Per-day entries (this repo's and upstream's files) and the stacked form both load strictly.
    for saved in (state, {n: p.detach().clone() for n, p in triple.named_parameters()}):
        fresh = TripleGRUDecoder(d, 5, n_days, 3, noise_hidden_size=4)
        load_state_dict_compat(fresh, saved)
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), triple.parameters()))
    # A checkpoint with a day fewer or a day missing does not load.
    fewer = {k: v for k, v in state.items() if not k.endswith(f"day_weights.{n_days - 1}")}
    with pytest.raises(RuntimeError, match="size mismatch for noise_model.day_layer.day_weights"):
        load_state_dict_compat(TripleGRUDecoder(d, 5, n_days, 3, noise_hidden_size=4), fewer)
    gap = {k: v for k, v in state.items() if not k.endswith("clean_model.day_layer.day_biases.1")}
    with pytest.raises(RuntimeError, match="day_biases"):
        load_state_dict_compat(TripleGRUDecoder(d, 5, n_days, 3, noise_hidden_size=4), gap)


@pytest.mark.parametrize("grl_lambda", [0.7, torch.tensor(0.7)])
def test_gradient_reversal_negates_and_scales(grl_lambda, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    upstream_grad = torch.randn(3, 4)
    if isinstance(grl_lambda, torch.Tensor):
        # A tensor lambda must stay a tensor (no host sync, no XLA recompile on a schedule).
        def refuse(*args, **kwargs):
            raise AssertionError("lambda was converted to a Python number")

        monkeypatch.setattr(torch.Tensor, "item", refuse)
        monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    y = grad_reverse(x, grl_lambda)
    y.backward(upstream_grad)
    monkeypatch.undo()
    assert torch.equal(y.detach(), x.detach())
    torch.testing.assert_close(x.grad, -0.7 * upstream_grad)


def test_full_size_parameter_counts_on_meta_device():
    with torch.device("meta"):
        triple = TripleGRUDecoder(**FULL)
        lighter = TripleGRUDecoder(**FULL, noise_hidden_size=768)
        baseline = GRUDecoder(**FULL, n_layers=5)
    d, p, h, c, n_days = 512, 512 * 14, 768, 41, 45
    day = n_days * (d * d + d)
    head = h * c + c
    noise = day + _gru_parameter_count(p, p, 2) + p
    clean = day + _gru_parameter_count(p, h, 3) + head + h
    noisy = _gru_parameter_count(p, h, 2) + head + h
    summary = parameter_summary(triple)
    assert summary["by_submodule"] == {"noise_model": noise, "clean_model": clean, "noisy_model": noisy}
    assert summary["total"] == noise + clean + noisy
    assert round(summary["total"] / 1e6, 1) == 687.6
    assert summary["day_specific"] == 2 * day
    lighter_noise = day + _gru_parameter_count(p, h, 2) + h + (h * p + p)
    assert parameter_summary(lighter)["total"] == lighter_noise + clean + noisy
    baseline_summary = parameter_summary(baseline)
    assert baseline_summary["total"] == 44_315_177
    assert baseline_summary["day_specific"] == 11_819_520
    assert "44,315,177" in format_parameter_summary(baseline_summary)


def test_modes_and_sub_models_return_documented_shapes():
    torch.manual_seed(0)
    model = TripleGRUDecoder(8, 6, 3, 5, patch_size=4, patch_stride=2, noise_hidden_size=0)
    x, day_idx = torch.randn(2, 21, 8), torch.tensor([0, 2])
    (clean,) = model(x, day_idx, mode="inference")
    assert clean.shape == (2, 9, 5)
    clean_full, noisy, noise = model(x, day_idx, mode="full", grl_lambda=1.0)
    assert (clean_full.shape, noisy.shape, noise.shape) == ((2, 9, 5), (2, 9, 5), (2, 9, 32))
    torch.testing.assert_close(clean_full, clean)
    with pytest.raises(ValueError, match="mode"):
        model(x, day_idx, mode="train")

    noise_alone = NoiseModel(neural_dim=8, n_days=3, patch_size=4, patch_stride=2, noise_hidden_size=7)(x, day_idx)
    assert noise_alone.shape == (2, 9, 32)
    clean_alone = CleanSpeechModel(neural_dim=8, n_units=6, n_days=3, n_classes=5, patch_size=4, patch_stride=2)
    assert clean_alone(x, day_idx).shape == clean_alone(x, day_idx, noise_alone).shape == (2, 9, 5)
    assert NoisySpeechModel(input_size=32, n_units=6, n_classes=5)(noise_alone).shape == (2, 9, 5)

    baseline = GRUDecoder(8, 6, 3, 5, n_layers=2, patch_size=0, patch_stride=0)
    logits, hidden = baseline(x, day_idx, return_state=True)
    assert logits.shape == (2, 21, 5) and hidden.shape == (2, 2, 6)


def test_build_model_reads_config_section():
    cfg = types.SimpleNamespace(
        type="triple", n_input_features=8, n_units=6, n_classes=5, rnn_dropout=0.0, input_dropout=0.0,
        n_layers=2, patch_size=4, patch_stride=2, n_noise_layers=1, n_clean_layers=2, n_noisy_layers=1,
        noise_hidden_size=3, gru_save_dtype="bfloat16", bidirectional=False,
    )
    triple = build_model(cfg, n_days=4)
    assert {m.save_dtype for m in triple.modules() if hasattr(m, "save_dtype")} == {torch.bfloat16}
    assert isinstance(triple, TripleGRUDecoder) and len(triple.clean_model.day_layer.day_weights) == 4
    assert triple.noise_model.branch.gru.hidden_size == 3 and triple.clean_model.branch.gru.num_layers == 2
    baseline = build_model(types.SimpleNamespace(**{**vars(cfg), "type": "baseline"}), n_days=4)
    assert isinstance(baseline, GRUDecoder) and baseline.gru.num_layers == 2 and baseline.input_size == 32
    with pytest.raises(ValueError, match="baseline"):
        build_model(types.SimpleNamespace(**{**vars(cfg), "type": "transformer"}), n_days=4)
    with pytest.raises(ValueError, match="gru_save_dtype"):
        build_model(types.SimpleNamespace(**{**vars(cfg), "gru_save_dtype": "float16"}), n_days=4)
    for model_type in ("baseline", "triple"):
        model = build_model(types.SimpleNamespace(**{**vars(cfg), "type": model_type, "bidirectional": True}), n_days=4)
        assert {m.bidirectional for m in model.modules() if isinstance(m, torch.nn.GRU)} == (
            {True} if model_type == "baseline" else {True, False}  # the triple's noise GRU stays causal
        )


def _bidirectional_gru_parameter_count(input_size: int, hidden_size: int, n_layers: int) -> int:
    """Two directions per layer; layers after the first read both directions' states (2H)."""
    first = 2 * 3 * (hidden_size * input_size + hidden_size * hidden_size + 2 * hidden_size)
    rest = 2 * 3 * (hidden_size * 2 * hidden_size + hidden_size * hidden_size + 2 * hidden_size)
    return first + (n_layers - 1) * rest


def test_bidirectional_full_size_shapes_and_counts_on_meta_device():
    with torch.device("meta"):
        baseline = GRUDecoder(**FULL, n_layers=5, bidirectional=True)
        triple = TripleGRUDecoder(**FULL, bidirectional=True)
    shapes = {n: tuple(p.shape) for n, p in baseline.named_parameters()}
    assert shapes["h0"] == (2, 1, 768) and shapes["out.weight"] == (41, 2 * 768)
    assert shapes["gru.weight_ih_l1_reverse"] == (3 * 768, 2 * 768)
    assert sum(p.numel() for p in baseline.gru.parameters()) == _bidirectional_gru_parameter_count(7168, 768, 5)
    assert not triple.noise_model.branch.gru.bidirectional and triple.noise_model.branch.h0.shape == (1, 1, 7168)
    for branch, n_layers in ((triple.clean_model.branch, 3), (triple.noisy_model.branch, 2)):
        assert sum(p.numel() for p in branch.gru.parameters()) == _bidirectional_gru_parameter_count(7168, 768, n_layers)
        assert branch.h0.shape == (2, 1, 768) and branch.out.weight.shape == (41, 2 * 768)


def test_bidirectional_baseline_is_torch_bidirectional_gru_with_h0_per_direction():
    torch.manual_seed(0)
    d, h, n_layers = 8, 6, 2
    model = GRUDecoder(d, h, 2, 5, n_layers=n_layers, patch_size=4, patch_stride=2, bidirectional=True).eval()
    x, day_idx = torch.randn(3, 20, d), torch.tensor([1, 0, 1])
    logits, hidden = model(x, day_idx, return_state=True)

    reference = torch.nn.modules.rnn.GRU(4 * d, h, n_layers, batch_first=True, bidirectional=True)
    reference.load_state_dict({k.removeprefix("gru."): v for k, v in model.state_dict().items() if k.startswith("gru.")})
    per_trial = torch.stack([x[i] @ model.day_weights[k] + model.day_biases[k] for i, k in enumerate(day_idx.tolist())])
    patched = _upstream_patching(F.softsign(per_trial), 4, 2)
    # nn.GRU's layout: state index layer * 2 + direction; every layer starts from its direction's h0.
    h0 = torch.cat([model.h0] * n_layers).expand(2 * n_layers, 3, h)
    output, expected_hidden = reference(patched, h0)
    torch.testing.assert_close(logits, model.out(output), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.h0[0], model.h0[1])  # each direction initialised on its own
    # The first frame's logits depend on the last bins: the reverse direction reads the whole trial.
    later = x.clone()
    later[:, -4:] += 1.0
    assert not torch.allclose(model(later, day_idx)[:, 0], logits[:, 0])
    causal = GRUDecoder(d, h, 2, 5, n_layers=n_layers, patch_size=4, patch_stride=2).eval()
    torch.testing.assert_close(causal(later, day_idx)[:, 0], causal(x, day_idx)[:, 0])


def _small_models(bidirectional: bool, use_scan: bool = False) -> dict[str, torch.nn.Module]:
    """A small baseline and triple (patch 4, stride 2), weights moved off their initialisation,
    their GRUs on torch's kernels or on the scan (xla_gru's XLA recurrence, run on the CPU)."""
    torch.manual_seed(0)
    kwargs = dict(neural_dim=8, n_units=6, n_days=2, n_classes=5, patch_size=4, patch_stride=2,
                  bidirectional=bidirectional)
    models = {"baseline": GRUDecoder(**kwargs, n_layers=2), "triple": TripleGRUDecoder(**kwargs, noise_hidden_size=0)}
    for model in models.values():
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.1 * torch.randn_like(w))
        for module in model.modules():
            if isinstance(module, xla_gru.GRU):
                module.use_scan = use_scan
    return models


def _padded_batch(trials: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max, D) features, padded with noise rather than zeros so that reading it shows, and (B,) lengths."""
    lengths = torch.tensor([len(t) for t in trials])
    batch = torch.randn(len(trials), int(lengths.max()), trials[0].shape[1], generator=torch.Generator().manual_seed(3))
    for row, trial in enumerate(trials):
        batch[row, : len(trial)] = trial
    return batch, lengths


@pytest.mark.parametrize("use_scan", [False, True], ids=["torch-gru", "scan-gru"])
@pytest.mark.parametrize("name", ["baseline", "triple"])
def test_bidirectional_trial_outputs_do_not_depend_on_padding_or_batch_mates(name: str, use_scan: bool):
    """A trial's logits (and the triple's noisy logits and noise) alone, and in a batch with longer
    trials and a trial shorter than one patch: the reverse direction starts at its last frame."""
    model = _small_models(bidirectional=True, use_scan=use_scan)[name].eval()
    torch.manual_seed(1)
    trial, longer, empty = torch.randn(18, 8), torch.randn(40, 8), torch.randn(3, 8)  # 8, 19 and 0 frames
    features, n_time_steps = _padded_batch([longer, trial, empty])
    day_idx = torch.tensor([0, 1, 1])
    with torch.no_grad():
        alone, n_frames = infer(model, trial[None], day_idx[1:2], n_time_steps[1:2], use_amp=False)
        batched, batched_frames = infer(model, features, day_idx, n_time_steps, use_amp=False)
        full_alone = decoder_outputs(model, trial[None], day_idx[1:2], use_amp=False, mode="full", lengths=n_frames)
        full_batched = decoder_outputs(model, features, day_idx, use_amp=False, mode="full", lengths=batched_frames)
    assert n_frames.tolist() == [8] and batched_frames.tolist() == [19, 8, 0]
    torch.testing.assert_close(batched[1, :8], alone[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(full_batched, full_alone):
        torch.testing.assert_close(got[1, :8], want[0], rtol=1e-5, atol=1e-5)
    # Past its end a trial's GRU outputs are 0, so its logits are the output layer's bias.
    head = model.out if name == "baseline" else model.clean_model.branch.out
    torch.testing.assert_close(batched[1, 8:], head.bias.expand(11, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched[2], head.bias.expand(19, -1), rtol=1e-6, atol=1e-6)


XLA_BUCKET_SCRIPT = r"""
import torch
import torch_xla
import torch_xla.debug.metrics as met
from rnn_model import GRUDecoder, TripleGRUDecoder, infer

case = torch.load(CASE_PATH)
device = torch_xla.device()
met.clear_all()
for name, cls in (("baseline", GRUDecoder), ("triple", TripleGRUDecoder)):
    model = cls(**case[name]["kwargs"])
    model.load_state_dict(case[name]["state"])
    model.to(device).eval()
    compiles = []
    for features, n_time_steps, day_idx, row in case["batches"]:  # one bucket of 48 bins, other trials
        with torch.no_grad():
            logits, _ = infer(model, features.to(device), day_idx.to(device), n_time_steps.to(device), use_amp=False)
        torch_xla.sync()
        torch.testing.assert_close(logits.cpu()[row, :8], case[name]["alone"], rtol=1e-5, atol=1e-5)
        compiles.append(met.metric_data("CompileTime")[0])
    assert compiles[1] == compiles[0], compiles
    print(name, "bucket matches alone")
fallbacks = [c for c in met.counter_names() if c.startswith("aten::")]
assert not fallbacks, fallbacks
"""


@requires_xla
def test_xla_bucket_padded_bidirectional_logits_match_the_trial_alone(tmp_path):
    """A trial's logits on XLA, in a batch padded to a 48-bin bucket beside a longer trial, are its
    logits alone and unpadded on the CPU; other batches of the bucket reuse the compiled graph."""
    torch.manual_seed(1)
    trial = torch.randn(18, 8)  # of day 1
    case = {"batches": []}
    for other, row in ((torch.randn(40, 8), 1), (torch.randn(30, 8), 0)):
        trials = [other, trial] if row == 1 else [trial, other]
        features, n_time_steps = _padded_batch([*trials, torch.randn(48, 8)])  # the third row sets the bucket
        day_idx = torch.tensor([0, 1] if row == 1 else [1, 0])
        case["batches"].append((features[:2], n_time_steps[:2], day_idx, row))
    for name, model in _small_models(bidirectional=True).items():
        with torch.no_grad():
            alone = infer(model.eval(), trial[None], torch.tensor([1]), torch.tensor([18]), use_amp=False)[0][0]
        kwargs = dict(neural_dim=8, n_units=6, n_days=2, n_classes=5, patch_size=4, patch_stride=2, bidirectional=True)
        kwargs.update(n_layers=2) if name == "baseline" else kwargs.update(noise_hidden_size=0)
        case[name] = {"kwargs": kwargs, "state": model.state_dict(), "alone": alone}
    path = tmp_path / "case.pt"
    torch.save(case, path)
    stdout = run_xla_script(XLA_BUCKET_SCRIPT.replace("CASE_PATH", repr(str(path))))
    assert {"baseline bucket matches alone", "triple bucket matches alone"} <= set(stdout.splitlines())


@pytest.mark.parametrize("use_scan", [False, True], ids=["torch-gru", "scan-gru"])
def test_lengths_change_nothing_for_causal_models(use_scan: bool):
    """Causal GRUs are not packed or masked: outputs and gradients are bit for bit those without lengths."""
    torch.manual_seed(2)
    features, day_idx = torch.randn(3, 30, 8), torch.tensor([0, 1, 1])
    for model in _small_models(bidirectional=False, use_scan=use_scan).values():
        results = []
        for lengths in (None, torch.tensor([13, 4, 0])):
            model.zero_grad()
            outputs = decoder_outputs(model, features, day_idx, use_amp=False, mode="full", grl_lambda=0.5,
                                      lengths=lengths)
            sum(o.square().mean() for o in outputs).backward()
            results.append([o.detach() for o in outputs] + [p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("use_scan", [False, True], ids=["torch-gru", "scan-gru"])
@pytest.mark.parametrize("model_type", ["baseline", "triple"])
def test_bidirectional_trial_ctc_and_gradient_do_not_depend_on_batch_mates(tmp_path, model_type: str, use_scan: bool):
    """The trainer's loss over two trials is the mean of each trial's loss alone, term by term and
    in every gradient (noise_l2, a mean over all frames of the batch, is weighted 0 here)."""
    import rnn_trainer
    from conftest import make_config

    cfg = make_config(tmp_path, tmp_path, f"model.type={model_type}", "model.bidirectional=true", "model.patch_size=4",
                      "model.patch_stride=2", "model.input_dropout=0.0", "adversarial.noise_l2_weight=0.0")
    torch.manual_seed(0)
    model = build_model(cfg.model, n_days=2)
    for module in model.modules():
        if isinstance(module, xla_gru.GRU):
            module.use_scan = use_scan
    trials = [torch.randn(18, 24), torch.randn(44, 24)]
    features, n_time_steps = _padded_batch(trials)
    batch = {"input_features": features, "n_time_steps": n_time_steps, "day_indices": torch.tensor([1, 0]),
             "seq_class_ids": torch.tensor([[3, 5, 7], [9, 2, 0]]), "phone_seq_lens": torch.tensor([3, 2]),
             "row_mask": torch.tensor([True, True])}

    def loss_terms_and_grads(rows: slice) -> tuple[dict, list[torch.Tensor]]:
        model.zero_grad()
        part = {k: v[rows] for k, v in batch.items()}
        part["input_features"] = part["input_features"][:, : int(part["n_time_steps"].max())]
        total, terms = rnn_trainer.compute_loss(model=model, batch=part, cfg=cfg, adversarial_gate=torch.tensor(1.0),
                                                use_dense_ctc=False)
        total.backward()
        return terms, [p.grad.clone() for p in model.parameters()]

    together, first, second = (loss_terms_and_grads(rows) for rows in (slice(0, 2), slice(0, 1), slice(1, 2)))
    keys = ["ctc_clean", "ctc_noisy"] if model_type == "triple" else ["ctc_clean"]
    for key in keys:
        torch.testing.assert_close(together[0][key], (first[0][key] + second[0][key]) / 2, rtol=1e-5, atol=1e-6)
    for got, a, b in zip(together[1], first[1], second[1]):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-5)


def test_causal_checkpoints_keep_their_names_and_do_not_load_into_bidirectional():
    causal = GRUDecoder(4, 3, 2, 5, n_layers=2)
    shapes = {n: tuple(v.shape) for n, v in causal.state_dict().items()}
    assert shapes["h0"] == (1, 1, 3) and shapes["out.weight"] == (5, 3)
    assert not any("reverse" in n for n in shapes)
    with pytest.raises(RuntimeError, match="weight_ih_l0_reverse"):
        load_state_dict_compat(GRUDecoder(4, 3, 2, 5, n_layers=2, bidirectional=True), causal.state_dict())


@pytest.mark.parametrize("wrap", ["checkpoint_orig_mod", "bare_module", "bare_plain"])
def test_upstream_checkpoint_loads_and_matches_reference(wrap):
    n_days, d, h, c, n_layers, size, stride = 3, 8, 6, 5, 2, 4, 2
    torch.manual_seed(1)
    source = GRUDecoder(d, h, n_days, c, n_layers=n_layers, patch_size=size, patch_stride=stride)
    with torch.no_grad():  # move off identity/zero so the day layer is exercised
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    raw = {k: v.clone() for k, v in source.state_dict().items()}
    if wrap == "checkpoint_orig_mod":
        loaded = {"model_state_dict": {f"_orig_mod.{k}": v for k, v in raw.items()}, "val_PER": 0.1}
    elif wrap == "bare_module":
        loaded = {f"module.{k}": v for k, v in raw.items()}
    else:
        loaded = raw
    torch.manual_seed(2)
    model = GRUDecoder(d, h, n_days, c, n_layers=n_layers, patch_size=size, patch_stride=stride).eval()
    load_state_dict_compat(model, loaded)

    x, day_idx = torch.randn(3, 19, d), torch.tensor([2, 0, 1])
    logits, hidden = model(x, day_idx, return_state=True)

    per_trial = torch.stack([x[i] @ raw[f"day_weights.{k}"] + raw[f"day_biases.{k}"] for i, k in enumerate(day_idx.tolist())])
    patched = _upstream_patching(F.softsign(per_trial), size, stride)
    h0 = raw["h0"].expand(n_layers, 3, h)  # (1, 1, H) -> (L, B, H)
    gru_weights = {k.removeprefix("gru."): v for k, v in raw.items() if k.startswith("gru.")}
    output, expected_hidden = _reference_gru(patched, h0, gru_weights, n_layers)
    expected_logits = F.linear(output, raw["out.weight"], raw["out.bias"])
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-5)


def test_load_state_dict_compat_is_strict():
    model = GRUDecoder(4, 3, 2, 5, n_layers=1)
    state = model.state_dict()
    state.pop("h0")
    with pytest.raises(RuntimeError, match="h0"):
        load_state_dict_compat(model, state)


def test_bf16_autocast_forward_backward_on_cpu():
    torch.manual_seed(0)
    x, day_idx = torch.randn(2, 21, 8), torch.tensor([1, 0])
    triple = TripleGRUDecoder(8, 6, 2, 5, patch_size=4, patch_stride=2, noise_hidden_size=4)
    baseline = GRUDecoder(8, 6, 2, 5, n_layers=2, patch_size=4, patch_stride=2)
    reference = triple(x, day_idx, mode="full", grl_lambda=0.5)
    seen = []  # (autocast enabled, input dtype, state dtype) as each GRU starts
    for model in (triple, baseline):
        for module in model.modules():
            if isinstance(module, torch.nn.GRU):
                module.register_forward_pre_hook(
                    lambda _, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype, args[1].dtype))
                )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = triple(x, day_idx, mode="full", grl_lambda=torch.tensor(0.5))
        logits, hidden = baseline(x.bfloat16(), day_idx, return_state=True)
    assert all(o.dtype == torch.float32 for o in (*outputs, logits, hidden))
    # The recurrences themselves run in float32 with autocast off (4 GRUs, 1 call each).
    assert seen == [(False, torch.float32, torch.float32)] * 4
    loss = sum(o.square().mean() for o in outputs) + logits.square().mean()
    loss.backward()
    for model in (triple, baseline):
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    # Only the day layers and linear layers run in bf16, so the outputs stay close to float32.
    for low, high in zip(outputs, reference):
        torch.testing.assert_close(low, high, rtol=0.05, atol=0.05)


XLA_SCRIPT = r"""
import torch
import torch_xla  # patches nn.GRU process-wide; the models must not depend on it
import torch_xla.debug.metrics as met
from rnn_model import GRUDecoder, TripleGRUDecoder

case = torch.load(CASE_PATH)
device = torch_xla.device()
x, day_idx = case["x"].to(device), case["day_idx"].to(device)
for name in case["names"]:
    cls = TripleGRUDecoder if name.startswith("triple") else GRUDecoder
    model = cls(**case[name]["kwargs"])
    model.load_state_dict(case[name]["state"])
    model.to(device)
    if cls is TripleGRUDecoder:
        outputs = model(x, day_idx, mode="full", grl_lambda=torch.tensor(0.5, device=device))
    else:
        outputs = (model(x, day_idx),)
    loss = sum((o * w.to(device)).sum() for o, w in zip(outputs, case[name]["loss_weights"]))
    loss.backward()
    torch_xla.sync()
    fallbacks = [c for c in met.counter_names() if c.startswith("aten::")]
    assert not fallbacks, f"ops fell back to the CPU on XLA: {fallbacks}"
    for got, want in zip(outputs, case[name]["outputs"]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), case[name]["grads"][pname], rtol=1e-3, atol=1e-4, msg=pname)
    grus = [m for m in model.modules() if isinstance(m, torch.nn.modules.rnn.RNNBase)]
    print(name, "matches", {type(m).__module__ for m in grus}, sorted({m.bidirectional for m in grus}))

# bf16 autocast on XLA: runs forward and backward without dtype errors, outputs stay float32.
model.zero_grad()
with torch.autocast("xla", dtype=torch.bfloat16):
    outputs = model(x, day_idx, mode="full", grl_lambda=torch.tensor(0.5, device=device))
sum(o.square().mean() for o in outputs).backward()
torch_xla.sync()
assert all(o.dtype == torch.float32 for o in outputs)
assert all(torch.isfinite(p.grad).all().item() for p in model.parameters())
print("autocast ok")
"""


@requires_xla
def test_xla_matches_cpu(tmp_path):
    torch.manual_seed(0)
    x, day_idx = torch.randn(2, 22, 8), torch.tensor([1, 0])
    triple = dict(neural_dim=8, n_units=6, n_days=2, n_classes=5, patch_size=4, patch_stride=2, noise_hidden_size=0)
    baseline = dict(neural_dim=8, n_units=6, n_days=2, n_classes=5, n_layers=2, patch_size=4, patch_stride=2)
    specs = {  # the triple last: the script's autocast check reuses it
        "baseline": (GRUDecoder, baseline),
        "baseline_bidirectional": (GRUDecoder, dict(baseline, bidirectional=True)),
        "triple_bidirectional": (TripleGRUDecoder, dict(triple, bidirectional=True)),
        "triple": (TripleGRUDecoder, triple),
    }
    case = {"x": x, "day_idx": day_idx, "names": list(specs)}
    for name, (cls, kwargs) in specs.items():
        model = cls(**kwargs)
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.1 * torch.randn_like(w))
        if cls is TripleGRUDecoder:
            outputs = model(x, day_idx, mode="full", grl_lambda=torch.tensor(0.5))
        else:
            outputs = (model(x, day_idx),)
        loss_weights = [torch.randn_like(o) for o in outputs]
        sum((o * w).sum() for o, w in zip(outputs, loss_weights)).backward()
        case[name] = {
            "kwargs": kwargs,
            "state": model.state_dict(),
            "outputs": [o.detach() for o in outputs],
            "loss_weights": loss_weights,
            "grads": {n: p.grad for n, p in model.named_parameters()},
        }
    path = tmp_path / "case.pt"
    torch.save(case, path)
    stdout = run_xla_script(XLA_SCRIPT.replace("CASE_PATH", repr(str(path))))
    # Our GRU, not the one torch_xla patches in; bidirectional where asked (the noise GRU stays causal).
    assert {
        "baseline matches {'xla_gru'} [False]", "triple matches {'xla_gru'} [False]",
        "baseline_bidirectional matches {'xla_gru'} [True]", "triple_bidirectional matches {'xla_gru'} [False, True]",
    } <= set(stdout.splitlines())
    assert "autocast ok" in stdout
