"""Tests of day_adamw.py: days absent from a step keep their weights and optimizer state; present
days follow torch's AdamW on a parameter that gets gradients only when its day is present.

    python -m pytest tests/test_day_adamw.py -q
"""

import copy
import json

import pytest
import torch
from accelerate.state import AcceleratorState

import rnn_trainer
from conftest import requires_xla, run_xla_script
from day_adamw import DayAdamW, count_days, day_index_of
from conftest import make_config
from test_trainer import _first_batch, _setup

N_DAYS = 3
# Day sets of successive steps: day 0 is absent from step 2 right after a step that gave it momentum.
DAY_SETS = [(0, 1), (1, 2), (0, 2), (2,), (0, 1, 2), (1,)]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _day_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.day_weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(4, 4)) for _ in range(N_DAYS)])
    model.day_biases = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1, 4)) for _ in range(N_DAYS)])
    model.shared = torch.nn.Parameter(torch.randn(5))
    return model


def _optimizer(model: torch.nn.Module, *, fused: bool) -> DayAdamW:
    day_names = [(n, p) for n, p in model.named_parameters() if day_index_of(n) is not None]
    groups = [
        {"params": [p for _, p in day_names], "day_indices": [day_index_of(n) for n, _ in day_names],
         "weight_decay": 0.05},
        {"params": [model.shared]},
    ]
    return DayAdamW(groups, n_days=N_DAYS, lr=0.01, betas=(0.9, 0.999), eps=0.1, weight_decay=0.01, fused=fused)


def _state_copy(optimizer: torch.optim.Optimizer, params) -> list[dict]:
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-others", "single-tensor-others"])
def test_absent_days_are_untouched_and_present_days_follow_adamw(fused: bool):
    model = _day_model()
    ours = _optimizer(model, fused=fused)
    day_params = list(model.day_weights) + list(model.day_biases)
    day_of = [i for i in range(N_DAYS)] * 2
    # Upstream's view: one AdamW parameter per day tensor, given a gradient only when its day is present.
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in day_params]
    reference = torch.optim.AdamW(reference_params, lr=0.01, betas=(0.9, 0.999), eps=0.1, weight_decay=0.05,
                                  foreach=False)
    generator = torch.Generator().manual_seed(1)
    for step, days in enumerate(DAY_SETS):
        lr = 0.01 * step / 3  # a warm-up from exactly 0, as the trainer's schedule
        for group in ours.param_groups + reference.param_groups:
            group["lr"] = lr
        before_params = [p.detach().clone() for p in day_params]
        before_state = _state_copy(ours, day_params) if step else None
        for p, ref, day in zip(day_params, reference_params, day_of):
            grad = torch.randn(p.shape, generator=generator)
            # index_select's backward gives an absent day a zero gradient, upstream gives none.
            p.grad = grad if day in days else torch.zeros_like(grad)
            ref.grad = grad.clone() if day in days else None
        model.shared.grad = torch.randn(5, generator=generator)
        present = torch.zeros(N_DAYS, dtype=torch.bool)
        present[list(days)] = True
        ours.days_present = present
        ours.step()
        reference.step()

        for i, (p, ref, day) in enumerate(zip(day_params, reference_params, day_of)):
            if day in days:
                assert lr == 0 or not torch.equal(p, before_params[i])
                # Moments are formed alike: equal to the bit; the weight to float32 rounding (torch
                # takes its bias corrections in float64 on the host, DayAdamW in float32 on the device).
                assert torch.equal(ours.state[p]["exp_avg"], reference.state[ref]["exp_avg"]), (step, i)
                assert torch.equal(ours.state[p]["exp_avg_sq"], reference.state[ref]["exp_avg_sq"]), (step, i)
                assert float(ours.state[p]["step"]) == float(reference.state[ref]["step"]), (step, i)
                torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p, before_params[i]), (step, i)
                if before_state is not None:
                    for key, value in before_state[i].items():
                        assert torch.equal(ours.state[p][key], value), (step, i, key)
    # Each day's step count is the number of steps that saw it.
    for p, day in zip(day_params, day_of):
        assert float(ours.state[p]["step"]) == sum(day in days for days in DAY_SETS)
    assert ours.days_present is None  # applies to one step only


def test_plain_adamw_moves_an_absent_day_and_dayadamw_does_not():
    # What the fix is for: after a step that gave day 0 momentum, a step without day 0.
    moved = {}
    for name in ("adamw", "day_adamw"):
        model = _day_model()
        optimizer = _optimizer(model, fused=False)
        for days in DAY_SETS[:2]:
            weight = model.day_weights[0].detach().clone()
            for i, p in enumerate(list(model.day_weights) + list(model.day_biases)):
                p.grad = torch.ones_like(p) if i % N_DAYS in days else torch.zeros_like(p)
            model.shared.grad = torch.ones(5)
            if name == "day_adamw":
                optimizer.days_present = torch.tensor([d in days for d in range(N_DAYS)])
            optimizer.step()
        moved[name] = float((model.day_weights[0].detach() - weight).abs().max())
    assert moved["adamw"] > 1e-3 and moved["day_adamw"] == 0.0, moved


def test_state_dict_round_trip_and_plain_adamw_checkpoints():
    model = _day_model()
    optimizer = _optimizer(model, fused=False)
    for days in DAY_SETS[:3]:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.days_present = torch.tensor([d in days for d in range(N_DAYS)])
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    fresh = _optimizer(model, fused=False)
    fresh.load_state_dict(saved)
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(fresh.state[p][key], value) and fresh.state[p][key].device == p.device, key
    assert fresh.param_groups[0]["day_indices"] == optimizer.param_groups[0]["day_indices"]

    # A checkpoint written by plain AdamW (before DayAdamW) has no day_indices in its groups.
    for group in saved["param_groups"]:
        group.pop("day_indices", None)
    older = _optimizer(model, fused=False)
    older.load_state_dict(saved)
    assert older.param_groups[0]["day_indices"] == optimizer.param_groups[0]["day_indices"]


def test_count_days_counts_real_rows_per_day():
    counts = count_days(torch.tensor([2, 0, 2, 2, 1]), torch.tensor([True, True, True, False, False]), n_days=4)
    assert counts.tolist() == [1.0, 0.0, 2.0, 0.0]
    assert day_index_of("noise_model.day_layer.day_weights.12") == 12
    assert day_index_of("day_biases.0") == 0
    assert day_index_of("gru.weight_ih_l0") is None and day_index_of("day_layer_dropout.p") is None


def _day_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if day_index_of(n) is not None}


@pytest.mark.parametrize("accumulate", [False, True], ids=["one-batch", "two-micro-batches"])
def test_train_step_leaves_days_absent_from_every_micro_batch_untouched(data_dir, tmp_path, accumulate: bool):
    # The tiny triple model: two day layers (noise and clean), 3 days; day decay on as well.
    cfg = make_config(data_dir, tmp_path, "optimizer.weight_decay_day=0.01",
                      f"gradient_accumulation_steps={2 if accumulate else 1}")
    accelerator, model, opt, scheduler = _setup(cfg)
    unwrapped = accelerator.unwrap_model(model)
    batch = _first_batch(cfg)
    n_rows = batch["day_indices"].shape[0]
    counters = (torch.tensor(0), torch.tensor(0))
    step_days = [[(0,), (1,)], [(1,), (1,)], [(2,), (0,)]] if accumulate else [[(0, 1)], [(1, 2)], [(2,)]]
    for micro_days in step_days:
        micro_batches = [{**batch, "day_indices": torch.tensor([days[i % len(days)] for i in range(n_rows)])}
                         for days in micro_days]
        before = _day_tensors(unwrapped)
        states = {n: {k: v.clone() for k, v in opt.optimizer.state[p].items()}
                  for n, p in unwrapped.named_parameters() if day_index_of(n) is not None and p in opt.optimizer.state}
        rnn_trainer.train_step(
            accelerator=accelerator, model=model, optimizer=opt, scheduler=scheduler, micro_batches=micro_batches,
            cfg=cfg, step_counter=counters[0], n_skipped=counters[1],
            generator=torch.Generator().manual_seed(0), use_dense_ctc=False,
        )
        present = {d for days in micro_days for d in days}
        after = _day_tensors(unwrapped)
        for name, value in after.items():
            if day_index_of(name) in present:
                assert not torch.equal(value, before[name]), (micro_days, name)
            else:
                assert torch.equal(value, before[name]), (micro_days, name)
                for key, old in states.get(name, {}).items():
                    param = dict(unwrapped.named_parameters())[name]
                    assert torch.equal(opt.optimizer.state[param][key], old), (micro_days, name, key)
    # A day's step count is the number of steps that saw it in any micro-batch (both day layers).
    for name, param in unwrapped.named_parameters():
        if day_index_of(name) is not None:
            n_seen = sum(any(day_index_of(name) in days for days in micro_days) for micro_days in step_days)
            assert float(opt.optimizer.state[param]["step"]) == n_seen, name


XLA_DAYS_CODE = """
import json, sys, tempfile
sys.path.insert(0, "tests")
import torch, torch_xla
import torch_xla.debug.metrics as met
from accelerate import Accelerator
import rnn_trainer
from config import config_from_dict
from dataset import build_dataloaders
from day_adamw import day_index_of
from make_synthetic_data import generate_dataset
from conftest import tiny_config_dict

tmp = tempfile.mkdtemp()
generate_dataset(tmp, n_sessions=3, n_train_trials=8, n_val_trials=2, n_test_trials=1, seed=0)
values = tiny_config_dict(tmp, tmp + "/run")
values["dataset"].update(static_shapes=True, time_buckets=[1024])  # one padded shape for every step
values["optimizer"].update(weight_decay_day=0.01, lr_warmup_steps_day=2)  # day lr starts at 0, decay on
cfg = config_from_dict(values)
accelerator = Accelerator()
device = accelerator.device
model = rnn_trainer._build_replica_model(cfg, n_days=3, device=device, rank=0, broadcast=False)
optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
model, optimizer = accelerator.prepare(model, optimizer)
unwrapped = accelerator.unwrap_model(model)
train_loader, _, _ = build_dataloaders(cfg, n_steps=1)
host = train_loader.dataset[0]
n_rows = host["day_indices"].shape[0]
step_counter = torch.tensor(0, device=device)
n_skipped = torch.tensor(0, device=device)
torch_xla.sync()
day_params = {n: p for n, p in unwrapped.named_parameters() if day_index_of(n) is not None}

for days in [(0, 1), (1, 2), (0, 2), (2,), (0, 1)]:
    batch = dict(host, day_indices=torch.tensor([days[i % len(days)] for i in range(n_rows)]))
    micro_batches = [rnn_trainer._to_device(batch, device)]
    weights = {n: p.detach().cpu().clone() for n, p in day_params.items()}
    states = {n: {k: v.cpu().clone() for k, v in optimizer.optimizer.state[p].items()}
              for n, p in day_params.items() if p in optimizer.optimizer.state}
    compiled = met.counter_value("UncachedCompile") or 0
    rnn_trainer.train_step(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        micro_batches=micro_batches, cfg=cfg, step_counter=step_counter, n_skipped=n_skipped,
        generator=None, use_dense_ctc=True,
    )
    compiles = (met.counter_value("UncachedCompile") or 0) - compiled
    moved, state_moved = {}, {}
    for n, p in day_params.items():
        day = day_index_of(n)
        moved[day] = moved.get(day, False) or not torch.equal(p.detach().cpu(), weights[n])
        if n in states:
            now = optimizer.optimizer.state[p]
            changed = any(not torch.equal(now[k].cpu(), v) for k, v in states[n].items())
            state_moved[day] = state_moved.get(day, False) or changed
    print("STEP", json.dumps({"days": list(days), "compiles": compiles, "moved": moved, "state_moved": state_moved,
                              "skipped": int(n_skipped.cpu())}))
"""


@requires_xla
def test_xla_absent_days_untouched_without_recompiling():
    lines = [json.loads(line[5:]) for line in run_xla_script(XLA_DAYS_CODE).splitlines() if line.startswith("STEP ")]
    assert len(lines) == 5, lines
    for i, line in enumerate(lines):
        present = set(line["days"])
        assert line["skipped"] == 0, lines
        # The day lr warms up from 0 over two steps: at step 1 nothing moves, though moments do.
        assert {int(d) for d, m in line["moved"].items() if m} == (present if i > 0 else set()), lines
        if i > 0:
            assert {int(d) for d, m in line["state_moved"].items() if m} == present, lines
    # The first step compiles the graph that creates AdamW's state, the second the steady one;
    # after that a new day set is new data, not a new graph.
    assert [line["compiles"] for line in lines[2:]] == [0, 0, 0], lines
