"""CPU tests of the trainer: learning, accumulation, resume, checkpoint safety, skipped steps, PER.

    python -m pytest tests/test_trainer.py -q

Tiny models on a tiny synthetic dataset written to a temp dir; every test is seeded.
"""

import copy
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import checkpoints
import rnn_model
import rnn_trainer
from config import config_from_dict
from dataset import build_dataloaders
from conftest import QUIET_TRANSFORMS, assert_same_training_state, make_config, requires_xla, run_xla_script

REPO_ROOT = Path(__file__).resolve().parent.parent

def _quiet_transforms():
    return config_from_dict({"dataset": {"data_transforms": QUIET_TRANSFORMS}}).dataset.data_transforms


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps process-wide singletons; each test starts from a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _setup(cfg, n_days: int = 3, optimizer: str = "adamw"):
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    model = rnn_model.build_model(cfg.model, n_days=n_days)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        opt = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
        scheduler = rnn_trainer.build_lr_scheduler(optimizer=opt, cfg_optimizer=cfg.optimizer)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt, scheduler


def _first_batch(cfg) -> dict:
    train_loader, _, _ = build_dataloaders(cfg, n_steps=1)
    return rnn_trainer._to_device(train_loader.dataset[0], torch.device("cpu"))


def _step(accelerator, model, opt, scheduler, cfg, micro_batches, counters=None):
    step_counter, n_skipped = counters or (torch.tensor(0), torch.tensor(0))
    return rnn_trainer.train_step(
        accelerator=accelerator, model=model, optimizer=opt, scheduler=scheduler, micro_batches=micro_batches,
        cfg=cfg, step_counter=step_counter, n_skipped=n_skipped,
        generator=torch.Generator().manual_seed(0), use_dense_ctc=False,
    )


@pytest.mark.parametrize("model_type", ["baseline", "triple"])
def test_overfitting_one_batch_reduces_the_loss(data_dir: Path, tmp_path: Path, model_type: str):
    cfg = make_config(data_dir, tmp_path, f"model.type={model_type}", "model.input_dropout=0.0",
                      "optimizer.lr_max=0.02", "optimizer.lr_max_day=0.02", "optimizer.epsilon=1e-8")
    cfg.dataset.data_transforms = _quiet_transforms()
    accelerator, model, opt, scheduler = _setup(cfg)
    batch = _first_batch(cfg)
    counters = (torch.tensor(0), torch.tensor(0))
    losses = [float(_step(accelerator, model, opt, scheduler, cfg, [batch], counters)["ctc_clean"]) for _ in range(12)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses


def test_sparse_day_gradients_train_as_the_dense_ones(data_dir: Path, tmp_path: Path, monkeypatch):
    # The triple (two day layers), two micro-batches of different days, clipping active: three steps
    # with sparse day-layer gradients (rnn_model.use_sparse_day_gradients) against dense ones.
    cfg = make_config(data_dir, tmp_path, "model.input_dropout=0.0", "model.rnn_dropout=0.0",
                      "optimizer.grad_norm_clip_value=0.5", "gradient_accumulation_steps=2")
    cfg.dataset.data_transforms = _quiet_transforms()
    batch = _first_batch(cfg)
    n_rows = batch["day_indices"].shape[0]
    micro_batches = [{**batch, "day_indices": torch.tensor([days[i % len(days)] for i in range(n_rows)])}
                     for days in [(0, 2), (2,)]]
    runs = {}
    for sparse in (False, True):
        accelerator, model, opt, scheduler = _setup(cfg)
        unwrapped = accelerator.unwrap_model(model)
        rnn_model.use_sparse_day_gradients(unwrapped, sparse)
        counters = (torch.tensor(0), torch.tensor(0))
        norms = [float(_step(accelerator, model, opt, scheduler, cfg, micro_batches, counters)["grad_norm"])
                 for _ in range(3)]
        assert norms[0] > 0.5  # clipping scales the gradients
        runs[sparse] = (norms, unwrapped, opt.optimizer)
    (dense_norms, dense, dense_opt), (sparse_norms, sparse, sparse_opt) = runs[False], runs[True]
    assert sparse_norms == pytest.approx(dense_norms, rel=1e-6)
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sparse_opt.state[a][key], dense_opt.state[b][key], rtol=1e-5, atol=1e-8)
    assert torch.equal(sparse.clean_model.day_layer.day_weights[1], dense.clean_model.day_layer.day_weights[1])
    # Only the rows of the batch's days: the backward's gradient is sparse.
    sparse.zero_grad(set_to_none=True)
    outputs = sparse(micro_batches[1]["input_features"], micro_batches[1]["day_indices"], mode="full")
    sum(o.square().mean() for o in outputs).backward()
    grad = sparse.clean_model.day_layer.day_weights.grad
    assert grad.is_sparse and grad.coalesce().indices().tolist() == [[2]]
    # train() turns them on for a CPU run in one process.
    turned_on = []
    monkeypatch.setattr(rnn_model, "use_sparse_day_gradients", lambda model, enabled=True: turned_on.append(enabled))
    rnn_trainer.train(make_config(data_dir, tmp_path / "run", "num_training_batches=1"))
    assert turned_on == [True]


@torch.no_grad()
def test_compute_loss_is_clean_plus_gated_weighted_adversarial_terms(data_dir: Path, tmp_path: Path):
    # total = ctc_clean + gate * (noisy_loss_weight * ctc_noisy + noise_l2_weight * noise_l2), each
    # term recomputed here from the model's outputs with torch's CTC and an explicit frame mask.
    cfg = make_config(data_dir, tmp_path, "adversarial.noisy_loss_weight=0.3", "adversarial.noise_l2_weight=0.7",
                      "model.input_dropout=0.0")
    torch.manual_seed(0)
    model = rnn_model.build_model(cfg.model, n_days=3).eval()
    batch = _first_batch(cfg)
    lengths = batch["n_time_steps"]
    assert lengths.min() < batch["input_features"].shape[1]  # some rows have padded frames

    clean, noisy, noise = model(batch["input_features"], batch["day_indices"], mode="full")
    frames = rnn_model.n_patches(lengths, cfg.model.patch_size, cfg.model.patch_stride)
    by_hand = {}
    for name, logits in (("ctc_clean", clean), ("ctc_noisy", noisy)):
        per_trial = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), batch["seq_class_ids"], frames,
                               batch["phone_seq_lens"], reduction="none")
        by_hand[name] = per_trial.mean()
    valid = torch.arange(noise.shape[1])[None, :] < frames[:, None]  # (B, T')
    by_hand["noise_l2"] = noise.pow(2).mean(-1)[valid].mean()

    for gate in (0.0, 1.0):
        total, terms = rnn_trainer.compute_loss(model=model, batch=batch, cfg=cfg,
                                                adversarial_gate=torch.tensor(gate), use_dense_ctc=False)
        for name, value in by_hand.items():
            assert float(terms[name]) == pytest.approx(float(value), rel=1e-5), name
        expected = by_hand["ctc_clean"] + gate * (0.3 * by_hand["ctc_noisy"] + 0.7 * by_hand["noise_l2"])
        assert float(total) == pytest.approx(float(expected), rel=1e-5)
    assert 0.3 * by_hand["ctc_noisy"] + 0.7 * by_hand["noise_l2"] > 1e-3  # the gate visibly matters

    # Padded frames stay out of the L2 term: garbage past every trial's end changes nothing.
    padded = batch["input_features"].clone()
    for row, n in enumerate(lengths.tolist()):
        padded[row, n:] = 1e3
    _, garbage_terms = rnn_trainer.compute_loss(model=model, batch={**batch, "input_features": padded}, cfg=cfg,
                                                adversarial_gate=torch.tensor(1.0), use_dense_ctc=False)
    assert float(garbage_terms["noise_l2"]) == pytest.approx(float(by_hand["noise_l2"]), rel=1e-5)


def test_adversarial_gate_is_closed_before_the_warm_up(data_dir: Path, tmp_path: Path):
    cfg = make_config(data_dir, tmp_path, "adversarial.warmup_steps=1", "model.input_dropout=0.0")
    accelerator, model, opt, scheduler = _setup(cfg)
    batch = _first_batch(cfg)
    counters = (torch.tensor(0), torch.tensor(0))
    first = _step(accelerator, model, opt, scheduler, cfg, [batch], counters)
    second = _step(accelerator, model, opt, scheduler, cfg, [batch], counters)
    assert float(first["loss"]) == float(first["ctc_clean"])  # step 0: the gate is closed
    expected = second["ctc_clean"] + cfg.adversarial.noisy_loss_weight * second["ctc_noisy"] \
        + cfg.adversarial.noise_l2_weight * second["noise_l2"]
    assert float(second["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(second["loss"]) != float(second["ctc_clean"])


def test_gradient_accumulation_matches_one_large_batch(data_dir: Path, tmp_path: Path):
    # SGD with lr 1 makes the weight change equal the (unclipped) gradient.
    overrides = ["model.input_dropout=0.0", "optimizer.grad_norm_clip_value=1e9", "adversarial.warmup_steps=0"]
    cfg_large = make_config(data_dir, tmp_path, *overrides)
    cfg_large.dataset.data_transforms = _quiet_transforms()
    batch = _first_batch(cfg_large)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]  # (4, ...) -> 2 x (2, ...)

    accelerator, model_large, opt, scheduler = _setup(cfg_large, optimizer="sgd")
    initial = copy.deepcopy(accelerator.unwrap_model(model_large).state_dict())
    _step(accelerator, model_large, opt, scheduler, cfg_large, [batch])
    large = accelerator.unwrap_model(model_large).state_dict()

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg_accum = copy.deepcopy(cfg_large)
    cfg_accum.gradient_accumulation_steps = 2
    accelerator, model_accum, opt, scheduler = _setup(cfg_accum, optimizer="sgd")
    accelerator.unwrap_model(model_accum).load_state_dict(initial)
    _step(accelerator, model_accum, opt, scheduler, cfg_accum, halves)
    accum = accelerator.unwrap_model(model_accum).state_dict()

    moved = [name for name in large if not torch.equal(large[name], initial[name])]
    assert len(moved) > 10  # the step really changed the weights
    for name in large:  # compare the updates (= gradients); float32 summation order differs
        torch.testing.assert_close(accum[name] - initial[name], large[name] - initial[name], rtol=1e-3, atol=1e-4,
                                   msg=name)


def test_resume_is_bit_exact_and_keeps_run_outputs(data_dir: Path, tmp_path: Path):
    straight = rnn_trainer.train(make_config(data_dir, tmp_path / "straight"))
    assert straight["step"] == 4

    interrupted_dir = tmp_path / "interrupted"
    rnn_trainer.train(make_config(data_dir, interrupted_dir, "num_training_batches=2"))
    AcceleratorState._reset_state(reset_partial_state=True)
    log_before = (interrupted_dir / "train.log").read_text()
    resumed = rnn_trainer.train(make_config(data_dir, tmp_path / "ignored"), resume_dir=str(interrupted_dir))
    assert resumed["step"] == 4

    a = torch.load(tmp_path / "straight" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    b = torch.load(interrupted_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    assert a["step"] == 4
    assert_same_training_state(a, b)

    # Logs are appended to, never rewritten.
    log_after = (interrupted_dir / "train.log").read_text()
    assert log_after.startswith(log_before) and "resumed" in log_after
    steps = [line for line in (interrupted_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    assert len(steps) == 2  # step 2 from the first part, step 4 after resuming
    assert all('"train/ctc_infeasible": 0.0' in line for line in steps)

    run = tmp_path / "straight"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "training_curves.png", "checkpoint/best_checkpoint.pt"):
        assert (run / name).is_file(), name
    line = re.compile(r"^step +4/4 \| loss [\d.]+ \| ctc_clean [\d.]+ \| ctc_noisy [\d.]+ \| noise_l2 \S+ \| "
                      r"ctc_infeasible 0 \| grad \S+ \| lr \S+ \| skipped 0 \| \d+ ms$", re.M)
    assert line.search((run / "train.log").read_text())
    expected_keys = {"model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "config", "step",
                     "best_val_per", "best_val_loss", "val_per", "val_loss", "rng_states", "sessions"}
    assert expected_keys <= set(a)
    assert a["sessions"] == ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]
    assert len(a["rng_states"]) == 1 and set(a["rng_states"][0]) >= {"torch", "numpy", "python", "augmentation"}


def _small_state(cfg):
    model = rnn_model.build_model(cfg.model, n_days=3)
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg, best_val_per=0.5,
                best_val_loss=1.0, val_per=0.5, val_loss=1.0, sessions=["a", "b", "c"])


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_crash_during_save_keeps_the_previous_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch, failing: str):
    cfg = make_config(data_dir, tmp_path)
    path = tmp_path / "checkpoint" / "last_checkpoint.pt"
    checkpoints.save_checkpoint(path, step=1, **_small_state(cfg))

    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half-written file, then the crash
        raise OSError("disk full")

    def failing_replace(*args, **kwargs):
        raise OSError("power cut")

    if failing == "torch.save":
        monkeypatch.setattr(rnn_trainer.torch, "save", torn_save)
    else:
        monkeypatch.setattr(rnn_trainer.os, "replace", failing_replace)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, step=2, **_small_state(cfg))
    monkeypatch.undo()

    checkpoint = checkpoints.load_checkpoint(path, model=rnn_model.build_model(cfg.model, n_days=3))
    assert checkpoint["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last_checkpoint.pt"]  # no temp file left


def test_non_finite_step_is_skipped_and_counted(data_dir: Path, tmp_path: Path):
    cfg = make_config(data_dir, tmp_path, "model.input_dropout=0.0")
    accelerator, model, opt, scheduler = _setup(cfg)
    batch = _first_batch(cfg)
    counters = (torch.tensor(0), torch.tensor(0))
    _step(accelerator, model, opt, scheduler, cfg, [batch], counters)  # creates the AdamW moments
    weights = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
    moments = copy.deepcopy(opt.state_dict()["state"])

    poisoned = dict(batch, input_features=batch["input_features"].clone())
    poisoned["input_features"][1, 5, 3] = float("nan")
    terms = _step(accelerator, model, opt, scheduler, cfg, [poisoned], counters)
    assert not torch.isfinite(terms["loss"])
    assert int(counters[1]) == 1 and int(counters[0]) == 2
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(value, weights[name]), name
    for p, state in opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], moments[p][key]), (p, key)

    _step(accelerator, model, opt, scheduler, cfg, [batch], counters)
    after = accelerator.unwrap_model(model).state_dict()
    assert int(counters[1]) == 1
    assert any(not torch.equal(after[n], weights[n]) for n in weights)
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize("use_dense_ctc", [False, True], ids=["torch-ctc", "dense-ctc"])
def test_infeasible_trial_is_left_out_of_the_loss_and_counted(data_dir: Path, tmp_path: Path, use_dense_ctc: bool):
    cfg = make_config(data_dir, tmp_path, "model.type=baseline", "model.patch_size=0", "model.patch_stride=0")
    logits = torch.randn(4, 10, 41, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    labels = torch.tensor([[5, 6, 7], [3, 3, 3], [8, 9, 0], [1, 0, 0]])
    # Row 1: [3, 3, 3] needs 5 frames (blanks between the repeats) but has 4. Row 3 is padding.
    batch = {"input_features": logits, "n_time_steps": torch.tensor([10, 4, 7, 10]), "seq_class_ids": labels,
             "phone_seq_lens": torch.tensor([3, 3, 2, 1]), "day_indices": torch.zeros(4, dtype=torch.long),
             "row_mask": torch.tensor([True, True, True, False])}
    total, terms = rnn_trainer.compute_loss(model=_LogitsAreInputs(), batch=batch, cfg=cfg,
                                            adversarial_gate=torch.tensor(0.0), use_dense_ctc=use_dense_ctc)
    total.backward()

    feasible = [0, 2]
    alone = F.ctc_loss(logits.detach()[feasible].log_softmax(-1).transpose(0, 1), labels[feasible],
                       batch["n_time_steps"][feasible], batch["phone_seq_lens"][feasible], reduction="none")
    assert torch.isfinite(total)
    assert float(total.detach()) == pytest.approx(float(alone.mean()), rel=1e-5)
    assert float(terms["ctc_infeasible"]) == 1.0
    assert (logits.grad[1] == 0).all() and (logits.grad[3] == 0).all()
    assert (logits.grad[0] != 0).any() and torch.isfinite(logits.grad).all()


def test_step_with_an_infeasible_trial_updates_the_weights(data_dir: Path, tmp_path: Path):
    cfg = make_config(data_dir, tmp_path)
    accelerator, model, opt, scheduler = _setup(cfg)
    batch = _first_batch(cfg)
    # As if random_cut had taken the frames: one patch left for labels that need several.
    batch["n_time_steps"] = batch["n_time_steps"].clone()
    batch["n_time_steps"][0] = cfg.model.patch_size
    weights = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
    counters = (torch.tensor(0), torch.tensor(0))
    terms = _step(accelerator, model, opt, scheduler, cfg, [batch, batch], counters)
    assert torch.isfinite(terms["loss"]) and int(counters[1]) == 0
    assert float(terms["ctc_infeasible"]) == 2.0  # one per micro-batch, summed over the step
    after = accelerator.unwrap_model(model).state_dict()
    assert any(not torch.equal(after[n], weights[n]) for n in weights)


def test_early_stopping_after_validations_without_improvement(data_dir: Path, tmp_path: Path, monkeypatch):
    # A validation that never improves after the first: patience 2 stops at the third one.
    def flat_evaluate(*args, **kwargs):
        return {"per": 0.5, "loss": 1.0, "per_by_day": {1: 0.5, 2: 0.5}, "n_trials": 8}

    monkeypatch.setattr(rnn_trainer, "evaluate", flat_evaluate)
    cfg = make_config(data_dir, tmp_path, "num_training_batches=10", "batches_per_val_step=1",
                      "early_stopping=true", "early_stopping_val_steps=2")
    result = rnn_trainer.train(cfg)
    assert result["step"] == 3 and result["best_val_per"] == 0.5
    assert "early stopping at step 3" in (tmp_path / "train.log").read_text()


class _LogitsAreInputs(torch.nn.Module):
    """Stand-in decoder whose logits are its input features, to script the greedy paths."""

    patch_size, patch_stride = 0, 0  # no patching: one output frame per input bin

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, day_idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return x


def _scripted_batch(paths: list[list[int]], labels: list[list[int]], day: int, row_mask: list[bool]) -> dict:
    n_frames = max(len(p) for p in paths)
    features = torch.full((len(paths), n_frames, 41), -5.0)
    for row, path in enumerate(paths):
        for t, cls in enumerate(path):
            features[row, t, cls] = 5.0
    seq = torch.zeros(len(labels), 6, dtype=torch.long)
    for row, label in enumerate(labels):
        seq[row, : len(label)] = torch.tensor(label)
    return {
        "input_features": features,
        "n_time_steps": torch.tensor([len(p) for p in paths]),
        "seq_class_ids": seq,
        "phone_seq_lens": torch.tensor([len(label) for label in labels]),
        "day_indices": torch.full((len(paths),), day),
        "row_mask": torch.tensor(row_mask),
    }


def test_validation_per_is_per_day_and_ignores_padding_rows(data_dir: Path, tmp_path: Path):
    cfg = make_config(data_dir, tmp_path, "model.type=baseline", "model.patch_size=0", "model.patch_stride=0")
    cfg.dataset.data_transforms.smooth_data = False
    day0 = _scripted_batch(
        paths=[[5, 0, 6, 7, 0, 0], [8, 8, 0, 0, 0, 0]], labels=[[5, 6, 7], [8, 9]], day=0, row_mask=[True, True]
    )
    # Row 1 of day 1 is padding: its hypothesis is all wrong and must not count.
    day1 = _scripted_batch(
        paths=[[1, 0, 2, 0, 0, 0], [3, 0, 3, 0, 3, 0]], labels=[[1, 2, 3, 4], [1]], day=1, row_mask=[True, False]
    )
    result = rnn_trainer.evaluate(_LogitsAreInputs(), [day0, day1], cfg=cfg, n_days=3)
    assert result["per_by_day"] == pytest.approx({0: 1 / 5, 1: 2 / 4})
    assert result["per"] == pytest.approx(3 / 9)
    assert result["n_trials"] == 3

    def ctc(batch, rows):
        log_probs = batch["input_features"][rows].log_softmax(-1).transpose(0, 1)
        return F.ctc_loss(log_probs, batch["seq_class_ids"][rows], batch["n_time_steps"][rows],
                          batch["phone_seq_lens"][rows], reduction="none")

    expected_loss = torch.cat([ctc(day0, [0, 1]), ctc(day1, [0])]).mean()
    assert result["loss"] == pytest.approx(float(expected_loss), rel=1e-5)


def test_optimizer_groups_and_lr_schedule_follow_upstream(data_dir: Path, tmp_path: Path):
    cfg = make_config(
        data_dir, tmp_path, "optimizer.lr_max=0.01", "optimizer.lr_min=0.001", "optimizer.lr_warmup_steps=10",
        "optimizer.lr_decay_steps=110", "optimizer.lr_max_day=0.02", "optimizer.lr_min_day=0.002",
        "optimizer.lr_warmup_steps_day=0", "optimizer.lr_decay_steps_day=50", "optimizer.weight_decay_day=0.5",
    )
    model = rnn_model.build_model(cfg.model, n_days=3)
    optimizer = rnn_trainer.build_optimizer(model=model, cfg_optimizer=cfg.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    bias, day, other = optimizer.param_groups
    assert bias["weight_decay"] == 0.0 and all("bias" in names[id(p)] for p in bias["params"])
    assert day["weight_decay"] == 0.5 and all("day_" in names[id(p)] for p in day["params"])
    assert other["weight_decay"] == cfg.optimizer.weight_decay and other["lr"] == 0.01
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)

    scheduler = rnn_trainer.build_lr_scheduler(optimizer=optimizer, cfg_optimizer=cfg.optimizer)
    lrs = []
    for _ in range(200):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[0][2] == 0.0 and lrs[5][2] == pytest.approx(0.005)  # linear warm-up from 0
    assert lrs[10][2] == pytest.approx(0.01)
    halfway = 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs[60][2] == pytest.approx(halfway)  # cosine halfway through 10..110
    assert lrs[110][2] == pytest.approx(0.001) and lrs[199][2] == pytest.approx(0.001)
    assert lrs[0][1] == pytest.approx(0.02) and lrs[50][1] == pytest.approx(0.002)  # day group: own schedule


def test_launcher_without_tpu_prints_one_line():
    proc = subprocess.run(
        [sys.executable, "launch_tpu_training.py", "--config", "rnn_args.yaml", "--num_cores", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert lines[0].startswith("launch_tpu_training.py: no TPU runtime: ")


def test_train_model_bad_data_dir_exits_2_without_a_run_directory(data_dir: Path, tmp_path: Path, capsys):
    import train_model
    from config import save_config

    run_dir = tmp_path / "run"
    config_path = tmp_path / "config.yaml"
    save_config(make_config(tmp_path / "no_such_data", run_dir), config_path)
    # SystemExit, not a return value: under accelerate's TPU launcher main() runs in spawned replicas.
    with pytest.raises(SystemExit) as exit_info:
        train_model.main(["--config_path", str(config_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_model.py: ") and "no_such_data" in lines[0]
    assert not run_dir.exists()


def test_train_model_bad_config_exits_2_with_one_line(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "train_model.py", "--config_path", "rnn_args.yaml", "--set", "dataset.batch_sise=8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dataset.batch_sise" in lines[0], proc.stderr


def test_launcher_failure_exits_2_with_one_line(data_dir: Path, tmp_path: Path, monkeypatch, capsys):
    import launch_tpu_training
    from config import save_config

    run_dir = tmp_path / "run"
    config_path = tmp_path / "config.yaml"
    save_config(make_config(tmp_path / "no_such_data", run_dir), config_path)
    monkeypatch.setattr(launch_tpu_training, "missing_tpu_runtime", lambda: None)
    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # restored after the test, as USE_TORCH_XLA, which main() sets
    monkeypatch.setenv("USE_TORCH_XLA", "0")
    assert launch_tpu_training.main(["--config", str(config_path), "--num_cores", "1"]) == 2  # the trainer, in-process
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch_tpu_training.py: ") and "no_such_data" in lines[0]
    assert not run_dir.exists()


def test_plot_is_skipped_with_one_line_without_matplotlib(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "train/loss": 1.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    rnn_trainer._plot_curves(tmp_path)
    assert not (tmp_path / "training_curves.png").exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see memory maps")
def test_checkpoint_is_memory_mapped_when_loaded(data_dir: Path, tmp_path: Path):
    cfg = make_config(data_dir, tmp_path)
    path = tmp_path / "checkpoint.pt"
    state = _small_state(cfg)
    checkpoints.save_checkpoint(path, step=1, **state)
    model = rnn_model.build_model(cfg.model, n_days=3)
    checkpoint = checkpoints.load_checkpoint(path, model=model)
    # Read in place from the file (pages on demand), not copied whole into host memory first.
    assert str(path) in Path("/proc/self/maps").read_text()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"].state_dict()[name]), name
    del checkpoint


_LAUNCH_FAILURE_CODE = """
import launch_tpu_training
print("STATUS", launch_tpu_training.main(["--config", {config!r}, "--num_cores", "2"]))
"""


@requires_xla
def test_a_bad_data_directory_stops_the_two_device_launch_with_one_line(tmp_path: Path):
    # The trainer runs inside the launcher (one SPMD process over PJRT_DEVICE=CPU's 2 devices),
    # so its DataError reaches main(), which prints one line and returns 2.
    from config import save_config

    save_config(make_config(tmp_path / "no_such_data", tmp_path / "run"), tmp_path / "config.yaml")
    out = run_xla_script(_LAUNCH_FAILURE_CODE.format(config=str(tmp_path / "config.yaml")), n_devices=2)
    assert out.strip().splitlines()[-1] == "STATUS 2", out
    assert not (tmp_path / "run").exists()


def test_every_replica_starts_from_the_same_weights(tmp_path: Path):
    # The set-up as process 0 and as process 1 of one run: no data is read, no step is taken.
    cfg = make_config(tmp_path / "unused", tmp_path)
    states, draws = [], []
    for rank in (0, 1):
        model = rnn_trainer._build_replica_model(
            cfg, n_days=3, device=torch.device("cpu"), rank=rank, broadcast=False
        )
        states.append(model.state_dict())
        draws.append(torch.rand(8))  # what dropout would draw next on this replica
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    assert not torch.equal(draws[0], draws[1])  # dropout masks and augmentations stay per replica


def test_init_from_checkpoint_reads_files_run_and_upstream_directories(data_dir: Path, tmp_path: Path):
    cfg = make_config(data_dir, tmp_path / "source", "model.type=baseline")
    torch.manual_seed(3)
    source = rnn_model.build_model(cfg.model, n_days=3)
    upstream = tmp_path / "upstream"
    (upstream / "checkpoint").mkdir(parents=True)
    state = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}  # as upstream saves it
    torch.save({"model_state_dict": state}, upstream / "checkpoint" / "best_checkpoint")
    for path in (upstream, upstream / "checkpoint" / "best_checkpoint"):
        init = make_config(data_dir, tmp_path / "run", "model.type=baseline", f"init_from_checkpoint={path}")
        model = rnn_trainer._build_replica_model(init, n_days=3, device=torch.device("cpu"), rank=0, broadcast=False)
        for name, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    missing = make_config(data_dir, tmp_path / "run", f"init_from_checkpoint={tmp_path / 'nowhere'}")
    with pytest.raises(rnn_model.CheckpointError, match="checkpoint not found: .*nowhere"):
        rnn_trainer._build_replica_model(missing, n_days=3, device=torch.device("cpu"), rank=0, broadcast=False)


def test_one_steps_micro_batches_share_one_padded_length(data_dir: Path, tmp_path: Path):
    # Fine buckets put the two micro-batches of some steps in different buckets.
    cfg = make_config(data_dir, tmp_path, "dataset.static_shapes=true", "dataset.time_buckets=[256,320,352,384,448,512,768]",
                      "gradient_accumulation_steps=2", "dataset.num_dataloader_workers=0")
    loader, _, _ = build_dataloaders(cfg, n_steps=8, batches_per_step=2)
    dataset = loader.dataset
    n_mixed = 0
    for step, micro_batches in enumerate(loader):
        originals = [dataset[2 * step], dataset[2 * step + 1]]
        lengths = [b["input_features"].shape[1] for b in originals]
        n_mixed += lengths[0] != lengths[1]
        for padded, original in zip(micro_batches, originals):
            assert padded["input_features"].shape[1] == max(lengths)  # a bucket: the longer one's
            assert torch.equal(padded["input_features"][:, : original["input_features"].shape[1]],
                               original["input_features"])
            assert not padded["input_features"][:, original["input_features"].shape[1]:].any()
            for key in ("n_time_steps", "seq_class_ids", "row_mask"):
                assert torch.equal(padded[key], original[key]), key
    assert step == 7 and n_mixed > 0  # the padding was exercised
