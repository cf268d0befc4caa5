"""Tests of calibration to a new session (calibrate_session.py) and of day layers mapped by session name.

    python -m pytest tests/test_calibration.py -q

A tiny baseline decoder is trained once (seeded) on two synthetic sessions; a third, held out by
make_synthetic_data's --holdout_sessions, is the new day.
"""

import re
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import calibrate_session as C
from config import load_config
import evaluate_model
import rnn_model
import rnn_trainer
from conftest import make_config
from dataset import DataError, day_sources, session_trial_index
from make_synthetic_data import generate_dataset

TRAIN_SESSIONS = ["t15.2023.08.11", "t15.2023.08.13"]
NEW_SESSION = "t15.2023.08.18"
N_BASE_STEPS = 300


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def holdout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("holdout")
    generate_dataset(str(out), n_sessions=2, n_train_trials=40, n_val_trials=12, n_test_trials=1, seed=0, snr=2.0,
                     mean_phoneme_bins=6.0, n_holdout_sessions=1)
    return out


def _base_config(data_dir: Path, run_dir: Path, *overrides: str):
    return make_config(
        data_dir, run_dir, "model.type=baseline", "model.n_units=32", "model.input_dropout=0.0",
        f"dataset.sessions=[{','.join(TRAIN_SESSIONS)}]", "dataset.batch_size=8", "optimizer.lr_max=0.01",
        "optimizer.lr_max_day=0.01", f"optimizer.lr_decay_steps={N_BASE_STEPS}", f"optimizer.lr_decay_steps_day={N_BASE_STEPS}",
        *overrides,
    )


@pytest.fixture(scope="module")
def base_run(holdout_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained decoder of the two training sessions (the held-out one is not in its list)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids oversubscribing a busy machine
    try:
        rnn_trainer.train(_base_config(holdout_dir, run_dir, f"num_training_batches={N_BASE_STEPS}",
                                       f"batches_per_val_step={N_BASE_STEPS}", f"batches_per_train_log={N_BASE_STEPS}"))
    finally:
        torch.set_num_threads(n_threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    return run_dir


def _args(base_run: Path, data_dir: Path, out: Path, *extra: str):
    return C.build_parser().parse_args([
        "--model_path", str(base_run), "--data_dir", str(data_dir), "--session", NEW_SESSION,
        "--out", str(out), "--steps", "40", *extra,
    ])


# --- the session-name mapping --------------------------------------------------------------------


def test_day_sources_follow_session_names():
    assert day_sources(["a", "b", "c"], ["c", "a", "new"]) == [2, 0, None]
    with pytest.raises(DataError, match="names a more than once"):
        day_sources(["a"], ["a", "a"])


def test_load_day_mapped_moves_day_layers_by_name_and_starts_new_days_as_identity(holdout_dir: Path, tmp_path: Path):
    cfg = _base_config(holdout_dir, tmp_path)
    torch.manual_seed(0)
    source = rnn_model.build_model(cfg.model, n_days=2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    target = rnn_model.build_model(cfg.model, n_days=3)
    rnn_model.load_day_mapped(target, source.state_dict(), [1, None, 0])
    src, tgt = source.state_dict(), target.state_dict()
    assert torch.equal(tgt["day_weights.0"], src["day_weights.1"])
    assert torch.equal(tgt["day_weights.2"], src["day_weights.0"])
    assert torch.equal(tgt["day_weights.1"], torch.eye(cfg.model.n_input_features))
    assert torch.equal(tgt["day_biases.1"], torch.zeros(1, cfg.model.n_input_features))
    for key, value in src.items():
        if "day_" not in key:
            assert torch.equal(tgt[key], value), key


def test_init_from_checkpoint_with_another_session_list_maps_days_by_name(holdout_dir: Path, base_run: Path, tmp_path: Path):
    sessions = [NEW_SESSION, TRAIN_SESSIONS[1]]
    cfg = _base_config(holdout_dir, tmp_path / "run", f"init_from_checkpoint={base_run}")
    model = rnn_trainer._build_replica_model(cfg, n_days=2, sessions=sessions, device=torch.device("cpu"), rank=0,
                                            broadcast=False)
    trained = rnn_model.read_checkpoint(base_run)["model_state_dict"]
    assert torch.equal(model.state_dict()["day_weights.1"], trained["day_weights.1"])  # t15.2023.08.13, was day 1
    assert torch.equal(model.state_dict()["day_weights.0"], torch.eye(cfg.model.n_input_features))  # new: identity
    assert torch.equal(model.state_dict()["out.weight"], trained["out.weight"])


def test_session_without_data_is_one_clear_error(holdout_dir: Path):
    with pytest.raises(DataError, match=r"t15\.2099\.01\.01: session folder does not exist"):
        session_trial_index(str(holdout_dir), "t15.2099.01.01", "train", day=0)
    with pytest.raises(DataError, match=r"41 trials asked for, but the session has only 40 usable train trials"):
        session_trial_index(str(holdout_dir), NEW_SESSION, "train", day=2, n_trials=41)


# --- calibration ---------------------------------------------------------------------------------


def test_train_day_moves_only_the_new_day_layer(holdout_dir: Path, base_run: Path, tmp_path: Path):
    start = C.load_start(str(base_run), upstream=False)
    model, sessions, day = C.model_for_session(start, NEW_SESSION, 1)
    assert (sessions, day) == ([*TRAIN_SESSIONS, NEW_SESSION], 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    index = session_trial_index(str(holdout_dir), NEW_SESSION, "train", day=day, n_trials=5, cfg=start.cfg)
    dataset = C.BrainToTextDataset(index, 5, "train", 4, 1, random_seed=0, feature_subset=start.cfg.dataset.feature_subset)
    batches = C._batches(dataset, torch.device("cpu"))
    C.calibrate(model, train_batches=batches, cfg=start.cfg, train="day", day=day, lr=0.01, seed=0)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"day_weights.2", "day_biases.2"}  # every shared weight and the other days: bit-for-bit
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen for later training


def test_stacked_day_parameters_keep_other_days_bit_for_bit():
    # A day layer held as one (n_days, D, D) tensor: the other days' rows get zero gradient after
    # masking, and AdamW without weight decay leaves them exactly unchanged.
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.day_weights = torch.nn.Parameter(torch.randn(3, 4, 4))
    model.out = torch.nn.Linear(4, 41)
    trainable = C.select_trainable(model, train="day", day=2, n_classes=41)
    assert set(trainable) == {"day_weights"} and not model.out.weight.requires_grad
    before = model.day_weights.detach().clone()
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        x = torch.randn(5, 4)
        loss = sum((x @ model.day_weights[d]).pow(2).sum() for d in range(3))  # every day gets a gradient
        optimizer.zero_grad()
        loss.backward()
        C.mask_other_days(trainable, 2)
        optimizer.step()
    assert torch.equal(model.day_weights[:2], before[:2])
    assert not torch.equal(model.day_weights[2], before[2])
    assert set(C.select_trainable(model, train="day+head", day=2, n_classes=41)) == {"day_weights", "out.weight", "out.bias"}


def test_calibrating_with_25_sentences_beats_an_identity_day_layer(holdout_dir: Path, base_run: Path, tmp_path: Path):
    out = tmp_path / "calibrated"
    result = C.run(_args(base_run, holdout_dir, out, "--n_sentences", "25", "--init", "identity", "--steps", "150"))
    row = result["by_k"][0]
    assert row["k"] == 25 and row["init_used"] == "identity"
    assert row["per_init"] == row["per_identity"]
    assert row["per_after"] < row["per_identity"], row
    assert (out / "calibration.json").is_file() and (out / "calibration.png").is_file()


def test_calibrated_run_directory_evaluates_and_resumes(holdout_dir: Path, base_run: Path, tmp_path: Path):
    out = tmp_path / "calibrated"
    result = C.run(_args(base_run, holdout_dir, out, "--n_sentences", "5", "--init", "last", "--sweep", "0"))
    assert [r["k"] for r in result["by_k"]] == [0, 5]
    loaded = rnn_model.load_run_model(out)
    assert loaded.sessions == [*TRAIN_SESSIONS, NEW_SESSION]
    # The evaluator scores the new session like any other (all three sessions are in the model now).
    metrics = evaluate_model.run(evaluate_model.build_parser().parse_args(
        ["--model_path", str(out), "--data_dir", str(holdout_dir), "--split", "val", "--no_words", "--out", str(tmp_path / "eval")]))
    assert metrics["trials_by_session"][NEW_SESSION] == 12
    per_new = metrics["phonemes"]["by_session"][NEW_SESSION]["rate"]
    assert abs(per_new - result["by_k"][1]["per_after"]) < 1e-9
    # Resume: two more training steps over all three sessions, from the calibrated weights.
    step = rnn_model.read_checkpoint(out / "checkpoint" / "last_checkpoint.pt")["step"]
    assert step == N_BASE_STEPS  # the source run's step: resuming continues its schedule
    cfg = load_config(out / "config.yaml", [f"num_training_batches={step + 2}", "batches_per_val_step=2", "batches_per_train_log=2"])
    resumed = rnn_trainer.train(cfg, resume_dir=str(out))
    assert resumed["step"] == step + 2


@pytest.mark.parametrize("case, extra, message", [
    ("session", ["--session", "t15.2099.01.01", "--n_sentences", "5"], "t15.2099.01.01: session folder does not exist"),
    ("too many", ["--n_sentences", "41"], "41 trials asked for, but the session has only 40"),
    ("sweep too many", ["--n_sentences", "5", "--sweep", "0,50"], "50 trials asked for"),
    ("train", ["--n_sentences", "5", "--train", "head"], "--train 'head': expected one of day, day\\+head, all"),
    ("init", ["--n_sentences", "5", "--init", "random"], "--init 'random': expected one of"),
    ("no checkpoint", ["--n_sentences", "5", "--model_path", "EMPTY"], "checkpoint not found"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(holdout_dir: Path, base_run: Path, tmp_path: Path, capsys,
                                                          case, extra, message):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    out = tmp_path / "out"
    extra = [str(empty) if value == "EMPTY" else value for value in extra]
    argv = ["--model_path", str(base_run), "--data_dir", str(holdout_dir), "--session", NEW_SESSION, "--out", str(out)]
    code = C.main(argv + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("calibrate_session.py: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()
