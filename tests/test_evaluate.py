"""Evaluator: greedy decoding and PER by hand, agreement with the trainer's validation PER,
upstream checkpoints, saved logits, the submission CSV and the errors bad input gets.

    .venv/bin/python -m pytest tests/test_evaluate.py -q
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import evaluate_model
import rnn_model
from config import config_from_dict, save_config
from evaluate_model_helpers import count_edits, error_rates_by, greedy_ctc_decode, load_logits, read_corpus_map, write_submission

SESSIONS = ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]  # the first one is train-only


def one_hot_logits(path: list[int], n_classes: int = 41) -> torch.Tensor:
    logits = torch.zeros(len(path), n_classes)
    logits[torch.arange(len(path)), torch.tensor(path)] = 5.0
    return logits


# ---------------------------------------------------------------------------------- by hand


def test_greedy_decode_collapses_repeats_drops_blanks_and_respects_lengths():
    paths = [[0, 5, 5, 0, 5, 3, 3, 40, 40, 0], [7, 7, 0, 7, 0, 0, 9, 9, 12, 12]]
    logits = torch.stack([one_hot_logits(p) for p in paths])
    # Row 0: 5 5 -> 5, blank splits the next 5, 3 3 -> 3, 40 40 -> 40.  Row 1 cut after 8 frames.
    assert greedy_ctc_decode(logits, torch.tensor([10, 8])) == [[5, 5, 3, 40], [7, 7, 9]]


def test_per_counts_edits_over_reference_length():
    refs = [[1, 2, 3, 40], [4, 5]]
    hyps = [[1, 3, 40], [4, 6, 7]]  # one deletion; one substitution + one insertion
    assert count_edits(refs, hyps) == (3, 6)
    rates = error_rates_by(["a", "b"], refs, hyps)
    assert rates == {"a": (1, 4, 0.25), "b": (2, 2, 1.0)}


def test_corpus_map_and_submission_format(tmp_path: Path):
    description = tmp_path / "description.csv"
    description.write_text(
        "Date,Post-implant day,Block number,Number of sentences,Corpus,Split\n"
        "2023-08-13,27,3,40,Switchboard,Train\n2023-08-13,27,4,20,Harvard,Val/Test\n"
    )
    assert read_corpus_map(description) == {("t15.2023.08.13", 3): "Switchboard", ("t15.2023.08.13", 4): "Harvard"}
    submission = tmp_path / "submission.csv"
    write_submission(submission, ["Hello, World!", "it's   a TEST."])
    assert submission.read_text().splitlines() == ["id,text", "0,hello world", "1,it's a test"]


# ---------------------------------------------------------------------------------- fixtures


def tiny_config(data_dir: Path, run_dir: Path, model_type: str = "triple"):
    return config_from_dict({
        "output_dir": str(run_dir),
        "use_amp": False,
        "model": {
            "type": model_type, "n_units": 16, "n_layers": 2, "rnn_dropout": 0.0, "input_dropout": 0.0,
            "patch_size": 14, "patch_stride": 4, "n_noise_layers": 1, "n_clean_layers": 1, "n_noisy_layers": 1,
            "noise_hidden_size": 16,
        },
        "dataset": {
            "dataset_dir": str(data_dir), "sessions": SESSIONS, "batch_size": 4, "days_per_batch": 2,
            "val_batch_size": 3, "num_dataloader_workers": 0,
        },
    })


@pytest.fixture(scope="module")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as the trainer writes it, holding an untrained (seeded) tiny model."""
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(data_dir, run)
    torch.manual_seed(0)
    model = rnn_model.build_model(cfg.model, n_days=len(SESSIONS))
    (run / "checkpoint").mkdir()
    save_config(cfg, run / "config.yaml")
    torch.save({"model_state_dict": model.state_dict(), "config": {}, "sessions": SESSIONS, "step": 0}, run / "checkpoint" / "best_checkpoint.pt")
    return run


def evaluate(argv: list[str]) -> dict:
    return evaluate_model.run(evaluate_model.build_parser().parse_args(argv))


# ---------------------------------------------------------------------------------- model runs


def test_evaluation_per_equals_trainer_validation_per(data_dir: Path, run_dir: Path, tmp_path: Path):
    import checkpoints
    import rnn_trainer
    from dataset import build_dataloaders

    cfg = tiny_config(data_dir, run_dir)
    model = rnn_model.build_model(cfg.model, n_days=len(SESSIONS))
    checkpoints.load_checkpoint(run_dir / "checkpoint" / "best_checkpoint.pt", model=model)
    _, val_loader, sessions = build_dataloaders(cfg, n_steps=1)
    expected = rnn_trainer.evaluate(model, val_loader, cfg=cfg, n_days=len(sessions))

    # A different batch size from the trainer's: padding must not change a trial's logits.
    metrics = evaluate(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--split", "val",
                        "--batch_size", "5", "--no_words", "--out", str(tmp_path)])
    assert metrics["n_trials"] == expected["n_trials"] == 8
    assert metrics["phonemes"]["per"] == pytest.approx(expected["per"], abs=1e-12)
    by_session = {SESSIONS.index(s): v["rate"] for s, v in metrics["phonemes"]["by_session"].items()}
    assert by_session == pytest.approx(expected["per_by_day"], abs=1e-12)
    assert 0 < metrics["phonemes"]["per"]  # an untrained model: the comparison is not vacuous


def test_val_words_logits_roundtrip_and_corpus_table(data_dir: Path, run_dir: Path, tmp_path: Path):
    description = tmp_path / "description.csv"
    rows = ["Date,Post-implant day,Block number,Number of sentences,Corpus,Split"]
    corpus = {SESSIONS[1]: "Harvard", SESSIONS[2]: "Switchboard"}
    rows += [f"{s[4:].replace('.', '-')},0,{b},1,{c},Val/Test" for s, c in corpus.items() for b in range(1, 8)]
    description.write_text("\n".join(rows) + "\n")
    common = ["--split", "val", "--lexicon_words", "train", "--beam_size", "20", "--description_csv", str(description)]
    first = evaluate(["--model_path", str(run_dir), "--data_dir", str(data_dir), *common,
                      "--grid_search", "--grid_lm_weights", "0.5,1", "--grid_word_scores", "0", "--grid_blank_penalties", "0",
                      "--out", str(tmp_path / "a")])
    for name in ("logits.npz", "per_trial.csv", "metrics.json", "summary.txt", "per_session.png", "lm.arpa"):
        assert (tmp_path / "a" / name).is_file(), name
    assert len(first["grid_search"]) == 2 and 0 <= first["words"]["wer_greedy_lookup"]
    assert first["words"]["wer"] == min(g["wer"] for g in first["grid_search"])  # the grid covered all val trials
    assert set(first["phonemes"]["by_corpus"]) == {"Harvard", "Switchboard"}
    assert set(first["words"]["by_session"]) == set(SESSIONS[1:])
    # Re-scoring the saved logits with the saved LM reproduces the numbers without the model.
    second = evaluate(["--logits_in", str(tmp_path / "a" / "logits.npz"), "--lm_arpa", str(tmp_path / "a" / "lm.arpa"),
                       "--data_dir", str(data_dir), *common,
                       "--lm_weight", str(first["decoder"]["lm_weight"]), "--word_score", str(first["decoder"]["word_score"]),
                       "--blank_penalty", str(first["decoder"]["blank_penalty"]),
                       "--out", str(tmp_path / "b")])
    assert second["phonemes"] == first["phonemes"] and second["words"] == first["words"]


def test_test_split_writes_submission_in_session_then_trial_order(data_dir: Path, run_dir: Path, tmp_path: Path):
    metrics = evaluate(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--split", "test",
                        "--lexicon_words", "train", "--beam_size", "10", "--out", str(tmp_path)])
    with (tmp_path / "submission.csv").open() as f:
        rows = list(csv.reader(f))
    with (data_dir / "test_sentences.csv").open() as f:
        answers = list(csv.DictReader(f))  # the generator's answer key, in session then trial order
    assert rows[0] == ["id", "text"]
    assert len(rows) - 1 == metrics["n_trials"] == len(answers) == 6
    assert [int(r[0]) for r in rows[1:]] == list(range(6))
    assert all(r[1] == r[1].lower() and all(c.isalpha() or c in " '-" for c in r[1]) for r in rows[1:])
    with (tmp_path / "per_trial.csv").open() as f:
        order = [(r["session"], int(r["block_num"]), int(r["trial_num"])) for r in csv.DictReader(f)]
    assert order == [(a["session"], int(a["block_num"]), int(a["trial_num"])) for a in answers]


def test_upstream_checkpoint_gives_the_same_logits(data_dir: Path, tmp_path: Path):
    args = {
        "model": {"n_input_features": 512, "n_units": 16, "rnn_dropout": 0.0, "rnn_trainable": True, "n_layers": 2,
                  "patch_size": 14, "patch_stride": 4, "input_network": {"input_layer_dropout": 0.2}},
        "dataset": {"sessions": SESSIONS, "dataset_dir": str(data_dir), "n_classes": 41,
                    "data_transforms": {"white_noise_std": 1.0, "smooth_data": True, "smooth_kernel_std": 2, "smooth_kernel_size": 100}},
    }
    torch.manual_seed(1)
    model = rnn_model.GRUDecoder(512, 16, len(SESSIONS), 41, n_layers=2, patch_size=14, patch_stride=4).eval()
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args))
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # as saved from torch.compile
    torch.save({"model_state_dict": state, "val_PER": 0.5}, tmp_path / "checkpoint" / "best_checkpoint")

    loaded = rnn_model.load_upstream_model(tmp_path)
    assert loaded.transforms.smooth_data and loaded.transforms.smooth_kernel_std == 2
    x = torch.randn(2, 60, 512)
    day = torch.tensor([2, 1])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, day), model(x, day))
    metrics = evaluate(["--model_path", str(tmp_path), "--upstream", "--data_dir", str(data_dir), "--split", "val",
                        "--no_words", "--out", str(tmp_path / "eval")])
    assert metrics["n_trials"] == 8 and np.isfinite(metrics["phonemes"]["per"])


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_gets_one_clear_error(data_dir: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert evaluate_model.main(["--model_path", str(tmp_path), "--data_dir", str(data_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate_model.py: ") and "checkpoint not found" in err[0], err  # as every entry point

    # A model trained on two sessions cannot decode a third session's data (no day layer for it).
    short = tmp_path / "short_run"
    (short / "checkpoint").mkdir(parents=True)
    cfg = tiny_config(data_dir, short)
    cfg.dataset.sessions = SESSIONS[:2]
    save_config(cfg, short / "config.yaml")
    model = rnn_model.build_model(cfg.model, n_days=2)
    torch.save({"model_state_dict": model.state_dict(), "sessions": SESSIONS[:2]}, short / "checkpoint" / "best_checkpoint.pt")
    assert evaluate_model.main(["--model_path", str(short), "--data_dir", str(data_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not in the model's session list" in err and SESSIONS[2] in err and "Traceback" not in err

    assert evaluate_model.main(["--logits_in", str(tmp_path / "nope.npz"), "--no_words", "--out", str(tmp_path / "o")]) == 2
    assert "logits file not found" in capsys.readouterr().err
    assert evaluate_model.main(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--split", "test",
                                "--grid_search", "--out", str(tmp_path / "o")]) == 2
    assert "--grid_search needs labelled trials" in capsys.readouterr().err


def test_a_directory_with_some_of_the_models_sessions_scores_those(data_dir: Path, tmp_path: Path):
    """Sessions are matched by name: a folder holding only the model's third session is scored with
    that session's day layer (the day layers differ here, so a wrong one changes the logits)."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    cfg = tiny_config(data_dir, run, model_type="baseline")
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = rnn_model.build_model(cfg.model, n_days=len(SESSIONS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "day_biases" in name:
                parameter.normal_()
    torch.save({"model_state_dict": model.state_dict(), "sessions": SESSIONS}, run / "checkpoint" / "best_checkpoint.pt")
    subset = tmp_path / "one_session"
    subset.mkdir()
    (subset / SESSIONS[2]).symlink_to(data_dir / SESSIONS[2])
    full = evaluate(["--model_path", str(run), "--data_dir", str(data_dir), "--no_words", "--out", str(tmp_path / "full")])
    part = evaluate(["--model_path", str(run), "--data_dir", str(subset), "--no_words", "--out", str(tmp_path / "part")])
    assert part["trials_by_session"] == {SESSIONS[2]: 4} and part["phonemes"]["by_session"] == {SESSIONS[2]: full["phonemes"]["by_session"][SESSIONS[2]]}
    whole = {(r.session, r.trial_num): r.logits for r in load_logits(tmp_path / "full" / "logits.npz")[0]}
    records, sessions, _ = load_logits(tmp_path / "part" / "logits.npz")
    assert sessions == SESSIONS and [r.day_index for r in records] == [2] * 4
    for r in records:
        np.testing.assert_array_equal(r.logits, whole[(r.session, r.trial_num)])


def test_help_describes_every_option_and_no_empty_default(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        evaluate_model.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in evaluate_model.build_parser()._actions:
        assert action.help, action.option_strings  # every option says what it does
    assert "default: None" not in text and "default: []" not in text
    lm_text = text[text.index("--lm_text LM_TEXT text file"): text.index("--lm_arpa LM_ARPA ready")]
    assert lm_text.count("default") == 1, lm_text
    assert "--out OUT output directory" in text


def test_metrics_json_is_plain_json(run_dir: Path, data_dir: Path, tmp_path: Path):
    evaluate(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--no_words", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["split"] == "val" and "per" in metrics["phonemes"]


# ---------------------------------------------------------------------------------- robustness


def _val_logits(loaded, data_dir: Path, batch_size: int, **options) -> list[np.ndarray]:
    """Per-trial val logits of a loaded run at `batch_size`; `options` go to compute_logits."""
    from dataset import build_eval_loader
    from evaluate_model_helpers import compute_logits

    loader = build_eval_loader(str(data_dir), loaded.sessions, "val", batch_size=batch_size, patch_size=14, patch_stride=4)
    return [r.logits for r in compute_logits(loaded, loader, torch.device("cpu"), **options)]


def test_perturbed_logits_are_seeded_per_trial_whatever_the_batching(data_dir: Path, run_dir: Path):
    loaded = rnn_model.load_run_model(run_dir)

    def logits(batch_size: int, perturbation=None) -> list[np.ndarray]:
        return _val_logits(loaded, data_dir, batch_size, perturbation=perturbation)

    clean = logits(4)
    noisy = logits(4, ("white_noise", 1.0, 0))
    assert all(not np.allclose(a, b) for a, b in zip(clean, noisy))
    for a, b in zip(noisy, logits(3, ("white_noise", 1.0, 0))):  # other batch-mates and padding
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    other_seed = logits(4, ("white_noise", 1.0, 1))
    assert any(not np.allclose(a, b) for a, b in zip(noisy, other_seed))


def test_robustness_sweep_writes_per_by_level_and_compares_runs(data_dir: Path, run_dir: Path, tmp_path: Path):
    first = evaluate(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--split", "val", "--no_words",
                      "--perturb", "channel_dropout", "--levels", "0,0.5", "--out", str(tmp_path / "a")])
    levels = first["robustness"]["levels"]
    assert [e["level"] for e in levels] == [0.0, 0.5]
    assert levels[0]["per"] == first["phonemes"]["per"]  # level 0 is the clean evaluation
    saved = json.loads((tmp_path / "a" / "robustness.json").read_text())
    assert saved == first["robustness"] and saved["kind"] == "channel_dropout"
    again = evaluate(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--split", "val", "--no_words",
                      "--perturb", "channel_dropout", "--levels", "0,0.5", "--batch_size", "3",
                      "--compare", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert again["robustness"]["levels"] == levels  # same seed, same perturbations, any batching
    assert (tmp_path / "b" / "per_channel_dropout.png").stat().st_size > 0
    assert evaluate_model.main(["--model_path", str(run_dir), "--data_dir", str(data_dir), "--no_words",
                                "--perturb", "bursts", "--compare", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2


# ---------------------------------------------------------------------------------- ensembles and TTA


def test_combination_rules_follow_their_formulas():
    from ensemble import combine_posteriors

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 41)), rng.normal(size=(6, 41))
    p_a, p_b = torch.from_numpy(a).softmax(-1).numpy(), torch.from_numpy(b).softmax(-1).numpy()
    np.testing.assert_allclose(combine_posteriors([a, b], "prob", [1, 3]), np.log(0.25 * p_a + 0.75 * p_b), atol=1e-5)
    np.testing.assert_allclose(combine_posteriors([a, b], "logprob", [1, 3]), 0.25 * np.log(p_a) + 0.75 * np.log(p_b), atol=1e-5)
    np.testing.assert_allclose(combine_posteriors([a, b], "prob"), np.log(0.5 * p_a + 0.5 * p_b), atol=1e-5)  # equal weights
    for rule in ("prob", "logprob"):  # one member, or two copies: that model's log-probabilities
        np.testing.assert_allclose(combine_posteriors([a], rule), np.log(p_a), atol=1e-5)
        np.testing.assert_allclose(combine_posteriors([a, a], rule), np.log(p_a), atol=1e-5)


def _texts(out: Path) -> list[tuple[str, str]]:
    with (out / "per_trial.csv").open() as f:
        return [(r["phonemes_decoded"], r["text_decoded"]) for r in csv.DictReader(f)]


def test_ensemble_of_one_model_or_two_copies_equals_the_model(data_dir: Path, run_dir: Path, tmp_path: Path):
    common = ["--data_dir", str(data_dir), "--split", "val", "--lexicon_words", "train", "--beam_size", "10"]
    single = evaluate(["--model_path", str(run_dir), *common, "--out", str(tmp_path / "one")])
    for rule in ("prob", "logprob"):
        out = tmp_path / f"two_{rule}"
        double = evaluate(["--model_path", str(run_dir), str(run_dir), "--combine", rule, *common, "--out", str(out)])
        assert double["phonemes"]["per"] == single["phonemes"]["per"] and double["words"]["wer"] == single["words"]["wer"]
        assert _texts(out) == _texts(tmp_path / "one")
        assert (out / "logits_0.npz").is_file() and (out / "logits_1.npz").is_file()  # one cache per model
    # The cached logits join an ensemble without rerunning their model; several files combine too.
    cached = str(tmp_path / "one" / "logits.npz")
    for members in (["--logits_in", cached, "--model_path", str(run_dir)], ["--logits_in", cached, cached]):
        mixed = evaluate([*members, "--weights", "1", "2", *common, "--out", str(tmp_path / "mixed")])
        assert mixed["phonemes"]["per"] == single["phonemes"]["per"] and _texts(tmp_path / "mixed") == _texts(tmp_path / "one")


def test_ensemble_bad_input_exits_2_before_any_model_runs(
    data_dir: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a model ran before the ensemble was checked")

    import ensemble

    monkeypatch.setattr(ensemble, "compute_logits", must_not_run)
    other_grid = tmp_path / "stride2"
    (other_grid / "checkpoint").mkdir(parents=True)
    cfg = tiny_config(data_dir, other_grid)
    cfg.model.patch_stride = 2
    save_config(cfg, other_grid / "config.yaml")
    torch.save({"model_state_dict": rnn_model.build_model(cfg.model, n_days=3).state_dict(), "sessions": SESSIONS},
               other_grid / "checkpoint" / "best_checkpoint.pt")
    short = tmp_path / "short"
    (short / "checkpoint").mkdir(parents=True)
    cfg = tiny_config(data_dir, short)
    cfg.dataset.sessions = SESSIONS[:2]
    save_config(cfg, short / "config.yaml")
    torch.save({"model_state_dict": rnn_model.build_model(cfg.model, n_days=2).state_dict(), "sessions": SESSIONS[:2]},
               short / "checkpoint" / "best_checkpoint.pt")
    out = tmp_path / "out"
    cases = [
        (["--model_path", str(run_dir), str(other_grid)], f"{other_grid} (patch 14, stride 2)"),
        (["--model_path", str(run_dir), str(short)], "different session lists"),
        (["--model_path", str(run_dir), str(run_dir), "--weights", "1"], "--weights has 1 values for 2"),
    ]
    for members, message in cases:
        assert evaluate_model.main([*members, "--data_dir", str(data_dir), "--no_words", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # nothing written


def test_tta_of_one_clean_copy_is_plain_decoding_and_independent_of_batching(data_dir: Path, run_dir: Path):
    loaded = rnn_model.load_run_model(run_dir)

    def logits(batch_size: int, tta=None) -> list[np.ndarray]:
        return _val_logits(loaded, data_dir, batch_size, tta=tta)

    plain = logits(4)
    loaded.transforms.white_noise_std, loaded.transforms.constant_offset_std = 0.0, 0.0
    for a, b in zip(plain, logits(4, tta=(1, 0))):
        np.testing.assert_allclose(torch.from_numpy(a).log_softmax(-1).numpy(), b, atol=1e-5)
    loaded.transforms.white_noise_std, loaded.transforms.constant_offset_std = 1.0, 0.2
    noisy = logits(4, tta=(3, 0))
    assert all(not np.allclose(torch.from_numpy(a).log_softmax(-1).numpy(), b, atol=1e-3) for a, b in zip(plain, noisy))
    for a, b in zip(noisy, logits(3, tta=(3, 0))):  # other batch-mates and padding: the same copies
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_blank_penalty_lengthens_greedy_output():
    from evaluate_model_helpers import blank_penalised_log_probs

    # Frames: phoneme 5 clear, then blank narrowly ahead of phoneme 7.
    logits = torch.tensor([[0.0] * 41, [0.0] * 41])
    logits[0, 5], logits[1, 0], logits[1, 7] = 4.0, 3.0, 2.5
    assert greedy_ctc_decode(blank_penalised_log_probs(logits)[None], torch.tensor([2]))[0] == [5]
    penalised = blank_penalised_log_probs(logits, 1.0)
    np.testing.assert_allclose(penalised[:, 0], logits.log_softmax(-1)[:, 0] - 1.0, atol=1e-6)
    assert greedy_ctc_decode(penalised[None], torch.tensor([2]))[0] == [5, 7]


def test_every_evaluator_function_is_at_most_100_lines():
    import ast

    root = Path(__file__).resolve().parent.parent
    for name in ("evaluate_model.py", "evaluate_model_helpers.py", "llm_rescoring.py", "ensemble.py"):
        tree = ast.parse((root / name).read_text())
        long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.end_lineno - f.lineno + 1 > 100]
        assert not long, (name, long)
