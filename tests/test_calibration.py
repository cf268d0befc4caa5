"""Tests of calibration to a new session (calibrate_session.py) and of day layers mapped by session name.

    python -m pytest tests/test_calibration.py -q

A tiny baseline decoder is trained once (seeded) on two synthetic sessions; a third, held out by
make_synthetic_data's --holdout_sessions, is the new day. Its test file holds no labels (the
release's test layout); calibration without labels reads its train or test file as unlabelled.
"""

import re
from pathlib import Path

import h5py
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

import calibrate_session as C
from config import load_config
import evaluate_model
import rnn_model
import rnn_trainer
from conftest import make_config
from dataset import PHONEMES, SIL_ID, DataError, day_sources, session_trial_index
from evaluate_model_helpers import BeamSearchOptions, WordBeamDecoder, build_lexicon, write_arpa
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
    generate_dataset(str(out), n_sessions=2, n_train_trials=40, n_val_trials=12, n_test_trials=10, seed=0, snr=2.0,
                     mean_phoneme_bins=6.0, n_holdout_sessions=1)
    return out


def _base_config(data_dir: Path, run_dir: Path, *overrides: str, sessions: list[str] = TRAIN_SESSIONS,
                 n_steps: int = N_BASE_STEPS):
    return make_config(
        data_dir, run_dir, "model.type=baseline", "model.n_units=32", "model.input_dropout=0.0",
        f"dataset.sessions=[{','.join(sessions)}]", "dataset.batch_size=8", "optimizer.lr_max=0.01",
        "optimizer.lr_max_day=0.01", f"optimizer.lr_decay_steps={n_steps}", f"optimizer.lr_decay_steps_day={n_steps}",
        *overrides,
    )


def _train_base(data_dir: Path, run_dir: Path, *overrides: str, sessions: list[str] = TRAIN_SESSIONS,
                n_steps: int = N_BASE_STEPS) -> Path:
    AcceleratorState._reset_state(reset_partial_state=True)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids oversubscribing a busy machine
    try:
        rnn_trainer.train(_base_config(data_dir, run_dir, f"num_training_batches={n_steps}", f"batches_per_val_step={n_steps}",
                                       f"batches_per_train_log={n_steps}", *overrides, sessions=sessions, n_steps=n_steps))
    finally:
        torch.set_num_threads(n_threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    return run_dir


@pytest.fixture(scope="module")
def base_run(holdout_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained decoder of the two training sessions (the held-out one is not in its list)."""
    return _train_base(holdout_dir, tmp_path_factory.mktemp("base") / "run")


# A decoder that reads its last day well, and a held-out day two days after that one: where its
# LM-corrected sentences are better than its own phonemes (the demo's regime, at test size).
NEAR_TRAIN_SESSIONS = ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]
NEAR_SESSION = "t15.2023.08.20"


@pytest.fixture(scope="module")
def near_day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data directory, run directory): three training sessions of 80 trials and the next one held
    out; a 64-unit baseline trained 600 steps on the three (about 6 s on one thread)."""
    data_dir = tmp_path_factory.mktemp("near")
    generate_dataset(str(data_dir), n_sessions=3, n_train_trials=80, n_val_trials=12, n_test_trials=10, seed=0, snr=2.0,
                     mean_phoneme_bins=6.0, n_holdout_sessions=1)
    run_dir = _train_base(data_dir, tmp_path_factory.mktemp("near_base") / "run", "model.n_units=64",
                          sessions=NEAR_TRAIN_SESSIONS, n_steps=600)
    return data_dir, run_dir


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
    ("test split with labels", ["--n_sentences", "5", "--split", "test"], "--split test: the test split holds no labels"),
    ("objective", ["--n_sentences", "5", "--unsupervised", "--objective", "entropy"], "--objective 'entropy': expected one of"),
    ("align dims", ["--n_sentences", "5", "--unsupervised", "--objective", "align", "--align_dims", "51"],
     "--align_dims 51: expected 0 \\(the spectrum's knee\\) to 50"),
    ("align, trained day missing", ["--n_sentences", "5", "--unsupervised", "--objective", "align", "--init", "last",
                                    "--holdout_fraction", "0", "--data_dir", "ALONE"], r"alone/t15\.2023\.08\.13: session folder does not exist"),
    ("too many unlabelled", ["--n_sentences", "11", "--unsupervised", "--split", "test"], "11 trials asked for, but the session has only 10 usable test"),
    ("no LM text", ["--n_sentences", "5", "--unsupervised", "--data_dir", "ALONE"], "none of the model's other sessions has a data_train.hdf5"),
    ("LM text missing", ["--n_sentences", "5", "--unsupervised", "--lm_text", "MISSING"], "LM text file not found"),
    ("compare", ["--n_sentences", "5", "--compare", "EMPTY"], "--compare .*: cannot read its calibration.json"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(holdout_dir: Path, base_run: Path, tmp_path: Path, capsys,
                                                          case, extra, message):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    out = tmp_path / "out"
    alone = tmp_path / "alone"  # the new session's folder without the model's sessions (no text for the LM)
    alone.mkdir()
    (alone / NEW_SESSION).symlink_to(holdout_dir / NEW_SESSION)
    paths = {"EMPTY": str(empty), "ALONE": str(alone), "MISSING": str(tmp_path / "missing.txt")}
    argv = ["--model_path", str(base_run), "--data_dir", str(holdout_dir), "--session", NEW_SESSION, "--out", str(out)]
    code = C.main(argv + [paths.get(value, value) for value in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("calibrate_session.py: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


# --- keeping what calibration starts from ----------------------------------------------------------


def test_calibration_that_would_make_the_day_worse_keeps_its_start(holdout_dir: Path, base_run: Path, tmp_path: Path):
    # A learning rate far too high: trained on all K, the day ends worse than its starting layer.
    extra = ["--n_sentences", "10", "--init", "last", "--lr", "3.0", "--steps", "20"]
    unguarded = C.run(_args(base_run, holdout_dir, tmp_path / "all", *extra, "--holdout_fraction", "0"))["by_k"][0]
    assert unguarded["per_after"] > unguarded["per_init"], unguarded
    # With 2 of the 10 held out, no checked step beats the start on their CTC loss: the start stays.
    out = tmp_path / "guarded"
    row = C.run(_args(base_run, holdout_dir, out, *extra))["by_k"][0]
    assert (row["n_train"], row["n_holdout"]) == (8, 2)
    assert row["kept_step"] == 0 and row["holdout_loss_kept"] == row["holdout_loss_start"] < row["holdout_loss_last"]
    assert row["per_after"] == row["per_init"] and row["per_last_step"] > row["per_init"], row
    base = rnn_model.read_checkpoint(base_run)["model_state_dict"]
    saved = rnn_model.read_checkpoint(out / "checkpoint" / "best_checkpoint.pt")["model_state_dict"]
    assert torch.equal(saved["day_weights.2"], base["day_weights.1"])  # the last day's layer, as it started


# --- calibration without labels ------------------------------------------------------------------


def _phonemes(*symbols: str) -> list[int]:
    return [PHONEMES.index(x) for x in symbols]


def _logits(classes: list[int], runner_up: dict[int, int] | None = None) -> torch.Tensor:
    """(T', C) logits that read `classes` greedily: each held two frames then a blank frame; at the
    positions in runner_up the given class is a close second (where a confused layer swapped them)."""
    frames = []
    for position, c in enumerate(classes):
        frame = torch.zeros(len(PHONEMES))
        frame[c] = 6.0
        if runner_up and position in runner_up:
            frame[runner_up[position]] = 4.5
        blank = torch.zeros(len(PHONEMES))
        blank[0] = 6.0
        frames += [frame, frame, blank]
    return torch.stack(frames)


def test_keep_better_keeps_the_start_unless_a_layer_reads_more_phonemes_its_lm_corrected_sentences_keep(tmp_path: Path):
    lexicon = build_lexicon([], use_cmudict=False)
    lexicon.pronunciations.update({"cat": [tuple(_phonemes("K", "AE", "T"))], "sat": [tuple(_phonemes("S", "AE", "T"))]})
    write_arpa(["cat sat", "sat cat", "cat sat"], tmp_path / "lm.arpa", order=2)
    decoder = WordBeamDecoder(lexicon, tmp_path / "lm.arpa", BeamSearchOptions(beam_size=20))
    sentence = _phonemes("K", "AE", "T") + [SIL_ID] + _phonemes("S", "AE", "T") + [SIL_ID]  # "cat sat", as labels are written
    blank = torch.zeros(12, len(PHONEMES)).index_fill_(1, torch.tensor([0]), 6.0)  # (12, C): blank throughout
    clean = C.lm_agreement([_logits(sentence)], decoder)
    # A layer that reads D where the word has T (T a close second): the beam search says "cat sat" and keeps 7 of 8.
    confused = C.lm_agreement([_logits(sentence[:2] + _phonemes("D") + sentence[3:], runner_up={2: sentence[2]})], decoder)
    # One that reads "cat" and then only blanks: its sentence keeps all it reads, but that is half as much.
    half = C.lm_agreement([torch.cat([_logits(sentence[:4]), blank])], decoder)
    silent = C.lm_agreement([blank], decoder)
    assert clean == {"lm_agreement": 8 / 24, "n_confirmed": 8, "n_greedy_phonemes": 8, "n_frames": 24}
    assert confused == {"lm_agreement": 7 / 24, "n_confirmed": 7, "n_greedy_phonemes": 8, "n_frames": 24}
    assert half == {"lm_agreement": 4 / 24, "n_confirmed": 4, "n_greedy_phonemes": 4, "n_frames": 24}
    assert silent == {"lm_agreement": 0.0, "n_confirmed": 0, "n_greedy_phonemes": 0, "n_frames": 12}
    assert C.keep_better([confused, clean]) == 1  # a round that reads more that its sentences keep replaces the start
    assert C.keep_better([clean, confused]) == 0  # one that reads worse does not,
    assert C.keep_better([clean, half]) == 0  # nor one that reads less,
    assert C.keep_better([clean, dict(clean)]) == 0  # nor one that is only as good
    assert C.keep_better([silent, half, clean, confused]) == 2


def _unlabelled_args(base_run: Path, data_dir: Path, out: Path, *extra: str):
    return _args(base_run, data_dir, out, "--unsupervised", "--lexicon_words", "train", "--init", "last", *extra)


def _strip_labels(source: Path, target: Path) -> None:
    """A copy of a session file with what the test layout holds: features and trial attributes only."""
    with h5py.File(source, "r") as f, h5py.File(target, "w") as g:
        for name, group in f.items():
            copy = g.create_group(name)
            copy.create_dataset("input_features", data=group["input_features"][()])
            for key in ("n_time_steps", "session", "block_num", "trial_num"):
                copy.attrs[key] = group.attrs[key]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return rnn_model.read_checkpoint(run_dir / "checkpoint" / "best_checkpoint.pt")["model_state_dict"]


def test_unlabelled_calibration_on_a_test_layout_file_moves_only_the_new_day_layer(holdout_dir: Path, base_run: Path,
                                                                                   tmp_path: Path):
    with h5py.File(holdout_dir / NEW_SESSION / "data_test.hdf5", "r") as f:  # labels physically absent
        assert len(f) == 10 and all(set(g) == {"input_features"} and "seq_len" not in g.attrs for g in f.values())
    out = tmp_path / "unlabelled"
    result = C.run(_unlabelled_args(base_run, holdout_dir, out, "--split", "test", "--n_sentences", "10", "--steps", "10",
                                    "--holdout_fraction", "0"))
    first_round = result["by_n"][0]["rounds"][0]
    assert result["labels_available"] is False and first_round["pseudo_per"] is None
    assert first_round["n_kept"] == 5 and first_round["n_steps"] == 10
    assert (out / "calibration.json").is_file() and (out / "config.yaml").is_file()
    base, calibrated = rnn_model.read_checkpoint(base_run)["model_state_dict"], _weights(out)
    assert set(calibrated) == set(base) | {"day_weights.2", "day_biases.2"}
    for key, value in base.items():
        assert torch.equal(calibrated[key], value), key  # shared weights and the trained days: bit-for-bit
    assert not torch.equal(calibrated["day_weights.2"], base["day_weights.1"])  # started as day 1's copy, then trained


def test_pseudo_labels_never_read_a_label(holdout_dir: Path, base_run: Path, tmp_path: Path):
    # The same session file with and without its labels gives the same weights.
    blind = tmp_path / "blind"
    for session in TRAIN_SESSIONS:  # the LM's text: the model's training sessions
        (blind / session).parent.mkdir(exist_ok=True)
        (blind / session).symlink_to(holdout_dir / session)
    (blind / NEW_SESSION).mkdir()
    _strip_labels(holdout_dir / NEW_SESSION / "data_train.hdf5", blind / NEW_SESSION / "data_train.hdf5")
    extra = ["--n_sentences", "12", "--steps", "10", "--rounds", "2"]
    labelled = C.run(_unlabelled_args(base_run, holdout_dir, tmp_path / "labelled", *extra))
    unlabelled = C.run(_unlabelled_args(base_run, blind, tmp_path / "unlabelled", *extra))
    a, b = _weights(tmp_path / "labelled"), _weights(tmp_path / "unlabelled")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Each round trained alike (the same held-out losses at every check), and the layer kept at the end
    # was chosen alike, from figures of the trials' features only.
    assert [r["holdout_checks"] for r in labelled["by_n"][0]["rounds"]] == \
        [r["holdout_checks"] for r in unlabelled["by_n"][0]["rounds"]]
    assert all(len(r["holdout_checks"]) == 2 for r in labelled["by_n"][0]["rounds"])  # steps 0 and 10: the rounds trained
    assert labelled["by_n"][0]["kept_round"] == unlabelled["by_n"][0]["kept_round"]
    assert [(c["round"], c["n_confirmed"]) for c in labelled["by_n"][0]["candidates"]] == \
        [(c["round"], c["n_confirmed"]) for c in unlabelled["by_n"][0]["candidates"]]
    # Labels that happen to exist score the pseudo-labels afterwards; without them nothing is scored.
    rounds = labelled["by_n"][0]["rounds"]
    assert labelled["labels_available"] and all(0 <= r["pseudo_per"] <= 1 for r in rounds)
    assert not unlabelled["labels_available"] and unlabelled["by_n"][0]["rounds"][1]["pseudo_per"] is None
    assert [t["text"] for r in rounds for t in r["trials"]] == \
        [t["text"] for r in unlabelled["by_n"][0]["rounds"] for t in r["trials"]]


def test_unlabelled_calibration_that_makes_the_day_worse_keeps_its_start(holdout_dir: Path, base_run: Path, tmp_path: Path):
    # On this data the aligned latent's labels are poor (no spectral knee in its frame covariance): training on them
    # raises the day's PER, and the held-out trials' CTC against the same labels prefers the trained layer.
    out = tmp_path / "align"
    result = C.run(_unlabelled_args(base_run, holdout_dir, out, "--objective", "align", "--n_sentences", "30", "--steps", "30"))
    row = result["by_n"][0]
    trained = row["rounds"][0]
    assert trained["kept_step"] > 0 and trained["per_after"] > row["per_init"], trained  # what the CTC check kept
    # Fewer of the trained layer's phonemes of the held-out trials are kept by their LM-corrected sentences: the start stays.
    start, first = row["candidates"]
    assert (start["round"], first["round"]) == (0, 1) and start["lm_agreement"] > first["lm_agreement"]
    assert start["per"] == row["per_init"] and first["per"] == trained["per_after"]
    assert row["kept_round"] == 0 and row["per_after"] == row["per_init"]
    assert torch.equal(_weights(out)["day_weights.2"], rnn_model.read_checkpoint(base_run)["model_state_dict"]["day_weights.1"])


def test_unlabelled_calibration_lowers_the_new_sessions_per(near_day: tuple[Path, Path], tmp_path: Path):
    # Pseudo-labels (the default objective) from 60 unlabelled trials, two rounds, starting from the last day's layer.
    data_dir, base = near_day
    out = tmp_path / "unlabelled"
    result = C.run(C.build_parser().parse_args([
        "--model_path", str(base), "--data_dir", str(data_dir), "--session", NEAR_SESSION, "--out", str(out),
        "--unsupervised", "--lexicon_words", "train", "--init", "last", "--n_sentences", "60", "--steps", "30",
        "--rounds", "2", "--keep_fraction", "0.8", "--sweep", "0",
    ]))
    before, row = result["by_n"]
    assert before["n"] == 0 and before["per_after"] == before["per_init"]  # N = 0: the uncalibrated day
    assert row["per_after"] < row["per_init"] and row["per_after"] < row["per_identity"], row
    assert [r["round"] for r in row["rounds"]] == [1, 2]
    assert all(r["pseudo_per"] < row["per_init"] for r in row["rounds"])  # scored after the fact, never read
    assert row["kept_round"] > 0 and (out / "calibration.png").is_file()


def test_nearest_day_without_labels_is_the_lowest_loss_against_its_own_pseudo_labels(holdout_dir: Path, base_run: Path,
                                                                                     tmp_path: Path):
    result = C.run(_args(base_run, holdout_dir, tmp_path / "nearest", "--unsupervised", "--lexicon_words", "train",
                         "--init", "nearest", "--split", "test", "--n_sentences", "8", "--steps", "2"))
    row = result["by_n"][0]
    losses = row["init_day_losses"]
    assert len(losses) == len(TRAIN_SESSIONS) and all(0 < loss < float("inf") for loss in losses)
    assert row["init_used"] == "nearest" and row["init_day"] == TRAIN_SESSIONS[losses.index(min(losses))]
    # The choice repeats the decoding under each trained day (6 of the 8 trials: 2 are held out).
    start = C.load_start(str(base_run), upstream=False)
    index = C.unlabelled_trial_index(str(holdout_dir), NEW_SESSION, "test", day=2, n_trials=6, cfg=start.cfg)
    trials = C.load_trials(index, start.cfg, torch.device("cpu"))
    decoder_args = _args(base_run, holdout_dir, tmp_path / "x", "--unsupervised", "--lexicon_words", "train", "--n_sentences", "8")
    decoder, lexicon, _ = C.build_pseudo_label_decoder(decoder_args, start, tmp_path)
    assert C.nearest_day_unlabelled(start, NEW_SESSION, trials, decoder, lexicon, torch.device("cpu")) == \
        (TRAIN_SESSIONS.index(row["init_day"]), losses)


def test_consistency_objective_trains_both_day_layers_of_the_triple_and_nothing_else(holdout_dir: Path, tmp_path: Path):
    # A triple decoder (untrained) of the two training sessions, as a run directory.
    cfg = make_config(holdout_dir, tmp_path / "triple", f"dataset.sessions=[{','.join(TRAIN_SESSIONS)}]")
    torch.manual_seed(0)
    model = rnn_model.build_model(cfg.model, n_days=2)
    C.save_run(tmp_path / "triple", model=model, cfg=cfg, sessions=TRAIN_SESSIONS, data_dir=str(holdout_dir), step=0,
               val_per=1.0, val_loss=1.0)
    out = tmp_path / "calibrated"
    result = C.run(_unlabelled_args(tmp_path / "triple", holdout_dir, out, "--objective", "consistency", "--split", "test",
                                    "--n_sentences", "6", "--steps", "3", "--holdout_fraction", "0"))
    assert result["by_n"][0]["rounds"][0]["n_kept"] == 6  # every trial trains: no selection without decoding
    base, calibrated = model.state_dict(), _weights(out)
    moved = {k for k in calibrated if k not in base or not torch.equal(calibrated[k], base[k])}
    day_layers = {k.rpartition(".")[0] for k in base if "day_weights" in k}
    assert len(day_layers) == 2  # the noise model's and the clean model's day layers
    assert moved == {f"{layer}.{name}.2" for layer in [n.rpartition(".")[0] for n in day_layers] for name in ("day_weights", "day_biases")}


def test_unlabelled_calibration_of_an_upstream_model_directory(holdout_dir: Path, base_run: Path, tmp_path: Path):
    cfg = load_config(base_run / "config.yaml")
    upstream = tmp_path / "upstream"
    (upstream / "checkpoint").mkdir(parents=True)
    args = {
        "model": {"n_input_features": cfg.model.n_input_features, "n_units": cfg.model.n_units, "rnn_dropout": 0.0,
                  "n_layers": cfg.model.n_layers, "patch_size": cfg.model.patch_size, "patch_stride": cfg.model.patch_stride,
                  "input_network": {"input_layer_dropout": 0.0}},
        "dataset": {"sessions": TRAIN_SESSIONS, "dataset_dir": str(holdout_dir), "n_classes": 41,
                    "feature_subset": list(cfg.dataset.feature_subset),
                    "data_transforms": {"white_noise_std": 0.5, "constant_offset_std": 0.0, "random_cut": 0, "smooth_data": False}},
    }
    (upstream / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args))
    base = rnn_model.read_checkpoint(base_run)["model_state_dict"]
    torch.save({"model_state_dict": {f"_orig_mod.{k}": v for k, v in base.items()}}, upstream / "checkpoint" / "best_checkpoint")
    out = tmp_path / "calibrated"
    C.run(_unlabelled_args(upstream, holdout_dir, out, "--upstream", "--split", "test", "--n_sentences", "8", "--steps", "5",
                           "--holdout_fraction", "0"))
    calibrated = _weights(out)
    assert all(torch.equal(calibrated[k], v) for k, v in base.items())
    assert not torch.equal(calibrated["day_weights.2"], base["day_weights.1"])


# --- calibration from the aligned neural latent (--objective align) -------------------------------


def test_fit_latent_keeps_the_components_before_the_spectrums_knee():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(4000, 5, generator=g, dtype=torch.float64) * torch.tensor([4.0, 3.5, 3.0, 2.5, 2.0], dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64))[0]  # (40, 5) orthonormal
    frames = signal @ mixing.T + 0.5 * torch.randn(4000, 40, generator=g, dtype=torch.float64)
    latent = C.fit_latent([frames[:2000], frames[2000:]], 0)
    assert latent.basis.shape == (40, 5)
    # The components span the signal's subspace, and their scales are its standard deviations (plus the noise's).
    assert torch.linalg.matrix_norm(latent.basis.T @ mixing, ord=2) > 0.99
    torch.testing.assert_close(latent.scales, torch.tensor([4.0, 3.5, 3.0, 2.5, 2.0], dtype=torch.float64), rtol=0.1, atol=0.0)
    assert C.fit_latent([frames], 3).basis.shape == (40, 3)


def test_procrustes_and_em_recover_the_rotation_between_two_days_latents():
    g = torch.Generator().manual_seed(0)
    k, n_classes = 6, 20
    means = 2.0 * torch.randn(n_classes, k, generator=g, dtype=torch.float64)  # the trained day's classes
    truth = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0]  # new day -> trained day
    classes = torch.randint(n_classes, (3000,), generator=g)
    points = (means[classes] + 0.3 * torch.randn(3000, k, generator=g, dtype=torch.float64)) @ truth  # the new day's latent
    weights = torch.ones(n_classes, dtype=torch.float64)
    torch.testing.assert_close(C.procrustes(means, means @ truth, weights), truth)  # exact class means: exact rotation
    # Class means of the new day as a poor decoder places them (a third of the way to other classes'):
    # Procrustes starts near the truth, EM ends on it.
    blurred = (2 * means + means[torch.randperm(n_classes, generator=g)]) / 3 @ truth
    start = C.procrustes(means, blurred, weights)
    rotation, _ = C.fit_rotation(points, means, weights / n_classes, start)
    assert torch.linalg.matrix_norm(rotation - truth) < 0.1 < torch.linalg.matrix_norm(start - truth)


def test_align_reads_no_label_and_moves_only_the_new_day_layer(holdout_dir: Path, base_run: Path, tmp_path: Path):
    blind = tmp_path / "blind"
    blind.mkdir()
    for session in TRAIN_SESSIONS:  # the trained day aligned to: the model's last session
        (blind / session).symlink_to(holdout_dir / session)
    (blind / NEW_SESSION).mkdir()
    _strip_labels(holdout_dir / NEW_SESSION / "data_train.hdf5", blind / NEW_SESSION / "data_train.hdf5")
    extra = ["--objective", "align", "--n_sentences", "20", "--steps", "10", "--align_dims", "8", "--holdout_fraction", "0"]
    labelled = C.run(_unlabelled_args(base_run, holdout_dir, tmp_path / "labelled", *extra))
    unlabelled = C.run(_unlabelled_args(base_run, blind, tmp_path / "unlabelled", *extra))
    a, b = _weights(tmp_path / "labelled"), _weights(tmp_path / "unlabelled")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = rnn_model.read_checkpoint(base_run)["model_state_dict"]
    assert set(a) == set(base) | {"day_weights.2", "day_biases.2"}
    assert all(torch.equal(a[k], v) for k, v in base.items())
    assert not torch.equal(a["day_weights.2"], base["day_weights.1"])
    row = labelled["by_n"][0]
    assert row["alignment"]["dims"] == 8 and row["alignment"]["reference_day"] == TRAIN_SESSIONS[-1]
    assert row["rounds"][0]["labels"] == "latent" and row["rounds"][0]["n_kept"] == row["rounds"][0]["n_pseudo_labelled"]
    assert 0 <= row["rounds"][0]["pseudo_per"] and unlabelled["by_n"][0]["rounds"][0]["pseudo_per"] is None
    assert labelled["lm"] is None  # one round from a fixed start, nothing held out: nothing decoded, no LM built
