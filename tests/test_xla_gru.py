"""xla_gru.GRU against torch's GRU: outputs, final states and every gradient, on CPU and on XLA.

    python -m pytest tests/test_xla_gru.py -q

On the CPU the scan path is forced with `use_scan = True` (a Python loop over the same step
functions); the XLA tests run it as one while loop on torch_xla's CPU backend and check that the
compiled graph neither grows with the sequence length nor stacks a weight matrix per step.
"""

import torch
import torch.nn.functional as F
import pytest
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import xla_gru
from conftest import requires_xla, run_xla_script
from rnn_model import GRUDecoder, TripleGRUDecoder


def _pair(input_size: int, hidden_size: int, n_layers: int, dtype: torch.dtype = torch.float32, **kwargs):
    """torch's GRU and ours with the same weights (ours forced onto the scan path)."""
    torch.manual_seed(0)
    reference = torch.nn.modules.rnn.GRU(input_size, hidden_size, n_layers, **kwargs).to(dtype)
    ours = xla_gru.GRU(input_size, hidden_size, n_layers, **kwargs).to(dtype)
    ours.load_state_dict(reference.state_dict())
    ours.use_scan = True
    return reference, ours


def _packed(gru, x: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's GRU on packed sequences, its output padded back to x's length with zeros."""
    packed = pack_padded_sequence(x, lengths, batch_first=gru.batch_first, enforce_sorted=False)
    output, h_n = torch.nn.modules.rnn.GRU.forward(gru, packed, h0)
    n_steps = x.shape[1 if gru.batch_first else 0]
    return pad_packed_sequence(output, batch_first=gru.batch_first, total_length=n_steps)[0], h_n


def _outputs_and_grads(
    gru, x: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """[output, h_n, d/dx, d/dh0, d/dparam...] for a fixed random linear loss on output and h_n.
    With lengths, torch's GRU runs on packed sequences and ours is given the lengths."""
    x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    if lengths is None:
        output, h_n = gru(x, h0)
    elif isinstance(gru, xla_gru.GRU):
        output, h_n = gru(x, h0, lengths=lengths)
    else:
        output, h_n = _packed(gru, x, h0, lengths)
    g = torch.Generator().manual_seed(1)
    loss = (output * torch.randn(output.shape, generator=g, dtype=output.dtype)).sum()
    loss = loss + (h_n * torch.randn(h_n.shape, generator=g, dtype=h_n.dtype)).sum()
    grads = torch.autograd.grad(loss, [x, h0, *gru.parameters()])
    return [output.detach(), h_n.detach(), *grads]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_matches_torch_gru_outputs_states_and_all_gradients(batch_first: bool, bidirectional: bool):
    reference, ours = _pair(5, 7, 3, batch_first=batch_first, bidirectional=bidirectional)
    torch.manual_seed(2)
    x = torch.randn(4, 11, 5) if batch_first else torch.randn(11, 4, 5)
    h0 = torch.randn(3 * (2 if bidirectional else 1), 4, 7)
    names = ["output", "h_n", "x", "h0", *(n for n, _ in ours.named_parameters())]
    for name, want, got in zip(names, _outputs_and_grads(reference, x, h0), _outputs_and_grads(ours, x, h0)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def _recurrence_inputs(n_steps: int, *, batch: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """Seeded float64 (gi, h0, w_hh, b_hh) of a recurrence, for gradcheck."""
    torch.manual_seed(0)
    return (
        torch.randn(n_steps, batch, 3 * hidden, dtype=torch.float64, requires_grad=True),  # gi
        torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True),  # h0
        torch.randn(3 * hidden, hidden, dtype=torch.float64, requires_grad=True),  # w_hh
        torch.randn(3 * hidden, dtype=torch.float64, requires_grad=True),  # b_hh
    )


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrence_gradients_are_exact_in_float64(reverse: bool, with_lengths: bool):
    n_steps = 5
    inputs = _recurrence_inputs(n_steps, batch=3, hidden=4)
    # Rows of 5, 2 and 0 real steps: past its end a row holds its state.
    valid = (torch.arange(n_steps)[:, None] < torch.tensor([5, 2, 0])).unsqueeze(-1) if with_lengths else None
    apply = lambda *a: xla_gru._GRURecurrence.apply(*a, torch.float64, reverse, valid)  # noqa: E731
    assert torch.autograd.gradcheck(apply, inputs)


def test_cpu_recurrence_gradients_are_exact_in_float64():
    inputs = _recurrence_inputs(6, batch=3, hidden=4)
    assert torch.autograd.gradcheck(xla_gru._CPURecurrence.apply, inputs)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cpu_training_path_matches_torch_gru(monkeypatch, batch_first: bool, dropout: float):
    """A causal GRU trained on the CPU runs _CPURecurrence: outputs, final states and every gradient
    as torch's kernel, in float64 to its rounding and in float32 to float32's; between layers the
    same dropout masks from the same seed."""
    calls = []
    apply = xla_gru._CPURecurrence.apply
    monkeypatch.setattr(xla_gru._CPURecurrence, "apply", lambda *a: calls.append(1) or apply(*a))
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        reference, ours = _pair(5, 7, 3, dtype, batch_first=batch_first, dropout=dropout)
        ours.use_scan = False
        torch.manual_seed(2)
        x = torch.randn(4, 11, 5, dtype=dtype) if batch_first else torch.randn(11, 4, 5, dtype=dtype)
        h0 = torch.randn(3, 4, 7, dtype=dtype)
        names = ["output", "h_n", "x", "h0", *(n for n, _ in ours.named_parameters())]
        torch.manual_seed(3)
        want = _outputs_and_grads(reference, x, h0)
        torch.manual_seed(3)
        got = _outputs_and_grads(ours, x, h0)
        for name, expected, value in zip(names, want, got):
            torch.testing.assert_close(value, expected, rtol=tolerance, atol=tolerance, msg=f"{name}, {dtype}")
    assert len(calls) == 2 * 3  # one per layer and dtype


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_lengths_match_torch_gru_on_packed_sequences(batch_first: bool, bidirectional: bool):
    """Outputs (0 past each row's end), final states per row and every gradient, as torch's GRU
    on packed sequences: the reverse direction starts at each row's last real step."""
    reference, ours = _pair(5, 7, 3, batch_first=batch_first, bidirectional=bidirectional)
    torch.manual_seed(2)
    x = torch.randn(4, 11, 5) if batch_first else torch.randn(11, 4, 5)
    h0 = torch.randn(3 * (2 if bidirectional else 1), 4, 7)
    lengths = torch.tensor([4, 11, 1, 7])
    want = _outputs_and_grads(reference, x, h0, lengths)
    names = ["output", "h_n", "x", "h0", *(n for n, _ in ours.named_parameters())]
    for use_scan in (True, False):  # forced, and the CPU's route for lengths
        ours.use_scan = use_scan
        for name, expected, got in zip(names, want, _outputs_and_grads(ours, x, h0, lengths)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name}, use_scan={use_scan}")
    for name, expected, got in zip(names[:2], want, ours._packed_forward(x, h0, lengths)):  # CUDA's route
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
    if bidirectional:  # without lengths the reverse direction reads the padding: the reference must see it
        assert not torch.allclose(ours(x, h0)[1], want[1], rtol=1e-3, atol=1e-3)


def test_a_row_without_steps_outputs_zeros_and_keeps_its_initial_state():
    """A trial shorter than one patch has 0 frames; packing takes none, so both routes handle it."""
    _, ours = _pair(5, 7, 2, batch_first=True, bidirectional=True)
    x, h0, lengths = torch.randn(2, 6, 5), torch.randn(4, 2, 7), torch.tensor([6, 0])
    alone = ours(x[:1], h0[:, :1])
    for route in (lambda: ours(x, h0, lengths=lengths), lambda: ours._packed_forward(x, h0, lengths)):
        output, h_n = route()
        assert torch.equal(output[1], torch.zeros_like(output[1])) and torch.equal(h_n[:, 1], h0[:, 1])
        torch.testing.assert_close(output[:1], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_n[:, :1], alone[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_between_layers_follows_nn_gru_rule(bidirectional: bool):
    """Layer l > 0 reads dropout(output of layer l-1, both directions); the last layer's output is not dropped."""
    n_directions = 2 if bidirectional else 1
    _, ours = _pair(6, 5, 2, batch_first=True, dropout=0.5, bidirectional=bidirectional)
    ours.train()
    layers = [torch.nn.modules.rnn.GRU(size, 5, batch_first=True, bidirectional=bidirectional)
              for size in (6, 5 * n_directions)]
    for index, layer in enumerate(layers):
        layer.load_state_dict({
            f"{k}_l0{suffix}": getattr(ours, f"{k}_l{index}{suffix}")
            for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for suffix in ("", "_reverse")[:n_directions]
        })
    x, h0 = torch.randn(3, 9, 6), torch.randn(2 * n_directions, 3, 5)
    torch.manual_seed(7)
    output, h_n = ours(x, h0)
    torch.manual_seed(7)
    first, h1 = layers[0](x, h0[:n_directions])
    want, h2 = layers[1](F.dropout(first, 0.5, training=True), h0[n_directions:])
    torch.testing.assert_close(output, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_n, torch.cat([h1, h2]), rtol=1e-5, atol=1e-5)
    ours.eval()
    assert not torch.allclose(ours(x, h0)[0], output)  # eval: no dropout, so the result changes


def test_bf16_saved_activations_keep_outputs_and_approximate_gradients():
    _, ours = _pair(5, 8, 2, batch_first=True)
    x, h0 = torch.randn(3, 10, 5), torch.randn(2, 3, 8)
    full = _outputs_and_grads(ours, x, h0)
    ours.save_dtype = torch.bfloat16
    half = _outputs_and_grads(ours, x, h0)
    torch.testing.assert_close(half[0], full[0], rtol=0, atol=0)  # the float32 carry is untouched
    for want, got in zip(full[2:], half[2:]):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)
    assert any(not torch.equal(want, got) for want, got in zip(full[2:], half[2:]))  # bf16 really used


@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameters_and_checkpoints_are_nn_grus(bidirectional: bool):
    reference, ours = _pair(4, 6, 2, batch_first=True, bidirectional=bidirectional)
    ours.save_dtype = torch.bfloat16
    assert list(ours.state_dict()) == list(reference.state_dict())  # use_scan, save_dtype are not state
    assert all(a.shape == b.shape for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert bidirectional == any(name.endswith("_reverse") for name in ours.state_dict())


def test_cpu_routes(monkeypatch):
    """On the CPU without use_scan: training a causal GRU runs _CPURecurrence, inference torch's
    kernel; neither runs the scan's recurrence, and a bidirectional GRU given no lengths trains
    on torch's kernel."""
    _, ours = _pair(4, 6, 2, batch_first=True)
    _, bidirectional = _pair(4, 6, 2, batch_first=True, bidirectional=True)
    ours.use_scan = bidirectional.use_scan = False
    calls = []

    def fail(*args, **kwargs):
        raise AssertionError("the scan recurrence ran on the CPU without use_scan")

    apply = xla_gru._CPURecurrence.apply
    monkeypatch.setattr(xla_gru._GRURecurrence, "apply", fail)
    monkeypatch.setattr(xla_gru._CPURecurrence, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        ours(x)
    assert calls == []
    ours(x)[0].sum().backward()
    assert len(calls) == 2  # one per layer
    bidirectional(x)[0].sum().backward()
    assert len(calls) == 2


@pytest.mark.parametrize("use_amp", [False, True])
def test_decoders_match_with_the_scan_gru(use_amp: bool):
    """Both decoders, causal and bidirectional, give the same logits and gradients on either GRU
    path (bf16 autocast too)."""
    torch.manual_seed(0)
    x, day_idx = torch.randn(2, 26, 8), torch.tensor([1, 0])
    models = [
        TripleGRUDecoder(8, 6, 2, 5, patch_size=4, patch_stride=2, noise_hidden_size=0),
        GRUDecoder(8, 6, 2, 5, n_layers=2, patch_size=4, patch_stride=2),
        TripleGRUDecoder(8, 6, 2, 5, patch_size=4, patch_stride=2, noise_hidden_size=0, bidirectional=True),
        GRUDecoder(8, 6, 2, 5, n_layers=2, patch_size=4, patch_stride=2, bidirectional=True),
    ]
    for model in models:
        results = []
        for use_scan in (False, True):
            for module in model.modules():
                if isinstance(module, xla_gru.GRU):
                    module.use_scan = use_scan
                    module.save_dtype = torch.bfloat16 if use_amp else torch.float32
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
                outputs = model(x, day_idx, mode="full", grl_lambda=0.5) if isinstance(model, TripleGRUDecoder) else (model(x, day_idx),)
            sum(o.square().mean() for o in outputs).backward()
            results.append(([o.detach() for o in outputs], {n: p.grad.clone() for n, p in model.named_parameters()}))
        (want_out, want_grads), (got_out, got_grads) = results
        tolerance = dict(rtol=0.05, atol=0.01) if use_amp else dict(rtol=1e-4, atol=1e-5)
        for want, got in zip(want_out, got_out):
            torch.testing.assert_close(got, want, **tolerance)
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, **tolerance, msg=name)


XLA_SCRIPT = r"""
import re
import torch
import torch_xla
import torch_xla.debug.metrics as met
from torch_xla.experimental.gru import GRU as TorchXlaScanGRU
import xla_gru

device = torch_xla.device()
torch.zeros(1, device=device).cpu()  # bring the runtime up before the first backward
I, H, L, B = 10, 12, 2, 3

def run(gru_cls, n_steps, where, bidirectional=False):
    torch.manual_seed(0)
    D = 2 if bidirectional else 1
    reference = torch.nn.modules.rnn.GRU(I, H, L, batch_first=True, bidirectional=bidirectional)
    x, h0 = torch.randn(B, n_steps, I), torch.randn(L * D, B, H)
    w_out, w_state = torch.randn(B, n_steps, D * H), torch.randn(L * D, B, H)
    model = reference
    if where == "xla":
        model = gru_cls(I, H, L, batch_first=True, bidirectional=bidirectional)
        model.load_state_dict(reference.state_dict())
        model.to(device)
    dev = "cpu" if where == "cpu" else device
    xx, hh = x.to(dev).requires_grad_(), h0.to(dev).requires_grad_()
    output, h_n = model(xx, hh)
    loss = (output * w_out.to(dev)).sum() + (h_n * w_state.to(dev)).sum()
    grads = torch.autograd.grad(loss, [xx, hh, *model.parameters()])
    return [output, h_n, *grads]

def hlo_of(tensors):
    return torch_xla._XLAC._get_xla_tensors_hlo(tensors)

for bidirectional in (False, True):
    want = run(None, 9, "cpu", bidirectional)
    met.clear_all()
    got = run(xla_gru.GRU, 9, "xla", bidirectional)
    torch_xla.sync()
    for a, b in zip(want, got):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    assert not [c for c in met.counter_names() if c.startswith("aten::")], met.counter_names()
print("matches")

def stacked_weights(text, n_steps):
    # a weight matrix (3H, I), (3H, 2H) or (3H, H), or its transpose, repeated once per step
    shapes = "|".join(f"{a},{b}|{b},{a}" for a, b in ((3 * H, I), (3 * H, 2 * H), (3 * H, H)))
    return re.findall(rf"f32\[{n_steps},({shapes})\]", text)

for bidirectional in (False, True):
    sizes = {}
    for n_steps in (8, 32):
        text = hlo_of(run(xla_gru.GRU, n_steps, "xla", bidirectional))
        sizes[n_steps] = len(text.splitlines())
        assert not stacked_weights(text, n_steps), stacked_weights(text, n_steps)
    print("hlo lines", bidirectional, sizes)
    assert abs(sizes[32] - sizes[8]) <= 0.02 * sizes[8], sizes  # one loop body, whatever the length
# The same check sees torch_xla's own scan GRU stack its weights per step.
assert stacked_weights(hlo_of(run(TorchXlaScanGRU, 32, "xla")), 32)
print("control ok")
"""


XLA_LENGTHS_SCRIPT = r"""
import torch
import torch_xla
import torch_xla.debug.metrics as met
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
import xla_gru

device = torch_xla.device()
torch.zeros(1, device=device).cpu()
I, H, L, B, T = 10, 12, 2, 3, 9
torch.manual_seed(0)
reference = torch.nn.modules.rnn.GRU(I, H, L, batch_first=True, bidirectional=True)
ours = xla_gru.GRU(I, H, L, batch_first=True, bidirectional=True)
ours.load_state_dict(reference.state_dict())
ours.to(device)

def run(gru, dev, x, h0, lengths, w_out, w_state):
    xx, hh = x.to(dev).requires_grad_(), h0.to(dev).requires_grad_()
    if dev == "cpu":  # torch's GRU on packed sequences
        packed = pack_padded_sequence(xx, lengths, batch_first=True, enforce_sorted=False)
        output, h_n = gru(packed, hh)
        output = pad_packed_sequence(output, batch_first=True, total_length=T)[0]
    else:  # the bucket's static shape, with lengths
        output, h_n = gru(xx, hh, lengths=lengths.to(dev))
    loss = (output * w_out.to(dev)).sum() + (h_n * w_state.to(dev)).sum()
    return [output, h_n, *torch.autograd.grad(loss, [xx, hh, *gru.parameters()])]

met.clear_all()
compiles = []
for lengths in ([9, 4, 1], [2, 9, 6], [5, 5, 5]):  # one bucket (T = 9), other lengths
    case = (torch.randn(B, T, I), torch.randn(2 * L, B, H), torch.tensor(lengths),
            torch.randn(B, T, 2 * H), torch.randn(2 * L, B, H))
    want = run(reference, "cpu", *case)
    got = run(ours, device, *case)
    torch_xla.sync()
    for a, b in zip(want, got):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    compiles.append(met.metric_data("CompileTime")[0])
assert compiles[0] >= 1 and compiles[1:] == compiles[:1] * 2, compiles
fallbacks = [c for c in met.counter_names() if c.startswith("aten::")]
assert not fallbacks, fallbacks
print("lengths match", compiles)
"""


@requires_xla
def test_xla_gru_with_lengths_matches_packed_torch_gru_in_one_graph_per_bucket():
    """On XLA, at the bucket's static shape: outputs, final states and gradients as torch's
    bidirectional GRU on packed sequences; other lengths reuse the compiled graph; no CPU fallback."""
    assert "lengths match" in run_xla_script(XLA_LENGTHS_SCRIPT)


@requires_xla
def test_xla_gru_matches_cpu_and_compiles_one_loop_without_stacked_weights():
    stdout = run_xla_script(XLA_SCRIPT)
    assert "matches" in stdout and "control ok" in stdout, stdout


def test_inference_without_grad_matches_and_saves_nothing(monkeypatch):
    """Under no_grad the weights still require grad; the recurrence must not save gates anyway."""
    reference, ours = _pair(5, 7, 2, batch_first=True)
    x, h0 = torch.randn(2, 6, 5), torch.randn(2, 2, 7)
    assert all(p.requires_grad for p in ours.parameters())

    def fail(*args, **kwargs):
        raise AssertionError("the saving (training) recurrence ran with grad mode off")

    monkeypatch.setattr(xla_gru._GRURecurrence, "apply", fail)
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad():
            for want, got in zip(reference(x, h0), ours(x, h0)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


XLA_INFERENCE_SCRIPT = r"""
import os, re, sys, tempfile
from pathlib import Path
dump = tempfile.mkdtemp()
os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump}"
import torch
import torch_xla
import xla_gru

device = torch_xla.device()
T, B, I, H = 9, 3, 10, 12
gates = rf"f32\[{T},{B},{4 * H}\]"  # the (T, B, 4H) gates a training forward saves
gru = xla_gru.GRU(I, H, 2, batch_first=True).to(device)  # its weights require grad
x = torch.randn(B, T, I).to(device)

out, h_n = gru(x)  # grad mode on: the control, the check must see the saved gates
assert re.search(gates, torch_xla._XLAC._get_xla_tensors_hlo([out, h_n]))
with torch.no_grad():
    out, h_n = gru(x)
traced = torch_xla._XLAC._get_xla_tensors_hlo([out, h_n])
assert not re.findall(gates, traced), re.findall(gates, traced)
torch_xla.sync()
out.cpu()
assignments = list(Path(dump).glob("*buffer-assignment.txt"))
compiled = list(Path(dump).glob("*before_optimizations.txt"))
assert len(assignments) == len(compiled) == 1, (assignments, compiled)
for path in (*assignments, *compiled):
    assert not re.findall(gates, path.read_text()), path
print("no gates")
"""


@requires_xla
def test_xla_inference_graph_holds_no_gate_buffer():
    assert "no gates" in run_xla_script(XLA_INFERENCE_SCRIPT)
