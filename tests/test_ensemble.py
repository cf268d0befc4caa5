"""Model combination per sentence (ensemble.py): CTC scores of candidates against torch's ctc_loss,
pooling, one member reproducing its beam search, ensembles of noisy members on synthetic
posteriors, weights picked on val and read back for test.

    .venv/bin/python -m pytest tests/test_ensemble.py -q
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate_model
from dataset import PHONEMES, SIL_ID, read_labels
from ensemble import (chosen, combine_records, ctc_log_likelihoods, error_rates, pick_weights, pool_hypotheses,
                      propose_sentences, score_pool, select, weight_grid)
from evaluate_model_helpers import (BeamSearchOptions, Hypothesis, TrialRecord, WordBeamDecoder, build_lexicon, load_logits,
                                    save_logits, write_arpa)
from make_synthetic_data import generate_sentences, phonemize

SESSIONS = ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]


def noisy_logits(class_ids: list[int], rng: np.random.Generator, p_sub: float) -> np.ndarray:
    """A confused model: a fraction p_sub of the phonemes lose to a random class (the true one stays
    runner-up), two frames per phoneme then a blank, Gaussian noise on every logit."""
    frames = []
    for p in class_ids:
        frame = np.zeros(len(PHONEMES), np.float32)
        frame[p] = 6.0
        if rng.random() < p_sub:
            frame[int(rng.integers(1, len(PHONEMES)))], frame[p] = 6.0, 4.5
        blank = np.zeros(len(PHONEMES), np.float32)
        blank[0] = 6.0
        frames += [frame, frame, blank]
    return np.stack(frames) + rng.standard_normal((len(frames), len(PHONEMES))).astype(np.float32)


@pytest.fixture(scope="module")
def grammar(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], WordBeamDecoder]:
    """30 held-out sentences of the synthetic grammar and a beam search over its 400 training sentences."""
    rng = np.random.default_rng(0)
    train, held_out = generate_sentences(400, rng), generate_sentences(30, rng)
    lexicon = build_lexicon(train, [phonemize(s.split()) for s in train], cmudict_words="train")
    arpa = tmp_path_factory.mktemp("lm") / "lm.arpa"
    write_arpa(train, arpa, order=3, vocabulary=lexicon.pronunciations)
    return held_out, WordBeamDecoder(lexicon, arpa, BeamSearchOptions(beam_size=30))


def member(sentences: list[str], logits: list[np.ndarray]) -> list[TrialRecord]:
    return [TrialRecord(SESSIONS[1], 1, 1, i, x, list(phonemize(s.split())), s) for i, (s, x) in enumerate(zip(sentences, logits))]


def wer(records: list[TrialRecord], texts: list[str]) -> float:
    return error_rates(records, texts, [r.true_phonemes for r in records])[0]


def sequence_texts(members: list[list[TrialRecord]], decoder: WordBeamDecoder, weights: list[float]) -> list[str]:
    pools, _, _ = propose_sentences(members, decoder, n_best=10)
    return [chosen(p, select(p, np.array(weights), lm_weight=1.0, word_score=0.0))[0] for p in pools]


def test_a_members_ctc_score_of_a_candidate_is_torchs_ctc_loss_negated():
    rng = np.random.default_rng(0)
    members = [rng.normal(size=(30, 41)).astype(np.float32) * 3 for _ in range(2)]
    candidates = [(5, 7, SIL_ID), (5, 5, 9, SIL_ID), (), tuple(range(1, 29)), tuple(int(p) for p in rng.integers(1, 41, 12))]
    pool = pool_hypotheses([[Hypothesis(f"s{i}", 0.0, 0.0, 1, c) for i, c in enumerate(candidates)]])
    score_pool(pool, members)
    for m, logits in enumerate(members):
        log_probs = torch.from_numpy(logits).double().log_softmax(-1)
        for v, phonemes in enumerate(pool.phonemes):  # one at a time, in float64
            expected = -F.ctc_loss(log_probs, torch.tensor([list(phonemes)], dtype=torch.long), torch.tensor([30]),
                                   torch.tensor([len(phonemes)]), reduction="sum").item()
            assert pool.acoustic[v, m] == pytest.approx(expected, rel=1e-6)  # log-softmax in float32, as decoded
    assert np.isfinite(pool.acoustic).all()  # the empty sentence and 28 distinct phonemes fit 30 frames
    assert ctc_log_likelihoods(members[0], [(3,) * 16])[0] == -np.inf  # 16 equal phonemes need 31 frames
    # The blank penalty enters the score as the beam search sees it.
    penalised = torch.from_numpy(members[0]).double().log_softmax(-1)
    penalised[:, 0] -= 2.0
    expected = -F.ctc_loss(penalised, torch.tensor([[5, 7, SIL_ID]]), torch.tensor([30]), torch.tensor([3]), reduction="sum").item()
    assert ctc_log_likelihoods(members[0], [(5, 7, SIL_ID)], blank_penalty=2.0)[0] == pytest.approx(expected, rel=1e-6)


def test_pooling_keeps_distinct_sentences_in_order_of_first_proposal():
    h = lambda text, phonemes, ngram=-1.0: Hypothesis(text, -5.0, ngram, len(text.split()), phonemes)  # noqa: E731
    first = [h("the cat", (1, 2, 40, 3, 4, 40), -2.0), h("a cat", (5, 40, 3, 4, 40))]
    second = [h("a cat", (5, 40, 3, 4, 40)), h("the cat", (1, 2, 40, 3, 4, 40), -9.0), h("the cat", (1, 6, 40, 3, 4, 40)), h("cat", (3, 4, 40))]
    pool = pool_hypotheses([first, second])
    assert pool.texts == ["the cat", "a cat", "cat"]
    assert pool.ngram.tolist() == [-2.0, -1.0, -1.0]  # the sentence's first proposal stands
    # "the cat" with a second pronunciation is a second variant of the same sentence, not a new sentence.
    assert pool.sentence_of.tolist() == [0, 1, 0, 2] and pool.phonemes[2] == (1, 6, 40, 3, 4, 40)
    assert pool.proposed_by.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    pool.acoustic = np.array([[-3.0, -9.0], [-4.0, -4.0], [-9.0, -1.0], [-1.0, -1.0]])
    # Member 2 left out (weight 0): its proposals are out too, so "cat" cannot win on member 1's score.
    assert chosen(pool, select(pool, np.array([1.0, 0.0]), lm_weight=0.0, word_score=0.0))[0] == "the cat"
    assert chosen(pool, select(pool, np.array([1.0, 1.0]), lm_weight=0.0, word_score=0.0)) == ("cat", [3, 4, 40])


def test_weight_grid_starts_equal_and_holds_each_member_alone():
    grid = [w.tolist() for w in weight_grid(2)]
    assert grid[0] == [0.5, 0.5] and sorted(map(tuple, grid[1:])) == [(0.0, 1.0), (1 / 3, 2 / 3), (2 / 3, 1 / 3), (1.0, 0.0)]
    assert len(weight_grid(3)) == 19 and len(weight_grid(4)) == 15 and len(weight_grid(8)) == 17  # 3^3 - 1 less scaled repeats, 2^4 - 1, 1 + 8 + 8
    for n in (3, 5, 8):
        assert all(abs(w.sum() - 1) < 1e-12 for w in weight_grid(n)) and any(w.max() == 1.0 for w in weight_grid(n))


def test_one_member_alone_reproduces_its_own_beam_search(grammar):
    sentences, decoder = grammar
    rng = np.random.default_rng(1)
    records = member(sentences, [noisy_logits(phonemize(s.split()), rng, p_sub=0.4) for s in sentences])
    beam = [decoder.decode(r.logits) for r in records]
    # Where the beam's best ties exactly with other sentences (homophones the LM cannot tell apart),
    # flashlight's order among them varies from run to run: there any of the tied sentences may win.
    texts = sequence_texts([records], decoder, [1.0])
    n_clear = 0
    for r, text, best in zip(records, texts, beam):
        nbest = decoder.decode_nbest(r.logits, 10)
        tied = {h.text for h in nbest if abs(h.acoustic + h.ngram - nbest[0].acoustic - nbest[0].ngram) < 1e-6}
        assert text == best if len(tied) == 1 else text in tied
        n_clear += len(tied) == 1
    assert n_clear >= 15
    assert 0 < wer(records, beam)  # the member makes errors: the comparison is not vacuous


def test_sequence_ensemble_of_noisy_members(grammar):
    sentences, decoder = grammar
    rng = np.random.default_rng(2)
    a = member(sentences, [noisy_logits(phonemize(s.split()), rng, p_sub=0.5) for s in sentences])
    # One member is the other with noise added: the ensemble, weights picked on the trials, is not
    # worse than the better member decoded alone by the same rule.
    b = member(sentences, [r.logits + rng.normal(scale=1.5, size=r.logits.shape).astype(np.float32) for r in a])
    pools, _, _ = propose_sentences([a, b], decoder, n_best=10)
    rule, weights, tries = pick_weights([a, b], decoder, pools, ["sequence"])
    # A member of weight 0 neither proposes nor scores: one-hot weights are that member alone.
    alone = [wer(a, [chosen(p, select(p, np.array(w), lm_weight=1.0, word_score=0.0))[0] for p in pools]) for w in ([1, 0], [0, 1])]
    assert alone[0] < alone[1]
    picked = wer(a, [chosen(p, select(p, np.array(weights), lm_weight=1.0, word_score=0.0))[0] for p in pools])
    assert rule == "sequence" and picked == min(t["wer"] for t in tries) <= min(alone)
    # Members whose errors are independent: equal weights beat each member's beam search and the frame average.
    c = member(sentences, [noisy_logits(phonemize(s.split()), rng, p_sub=0.5) for s in sentences])
    singles = [wer(a, [decoder.decode(r.logits) for r in m]) for m in (a, c)]
    frame = wer(a, [decoder.decode(r.logits) for r in combine_records([a, c], "prob")])
    assert wer(a, sequence_texts([a, c], decoder, [1.0, 1.0])) < min(*singles, frame)


@pytest.fixture(scope="module")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding an untrained (seeded) tiny baseline."""
    import rnn_model
    from config import save_config
    from test_evaluate import tiny_config

    run = tmp_path_factory.mktemp("run")
    (run / "checkpoint").mkdir()
    cfg = tiny_config(data_dir, run, model_type="baseline")
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save({"model_state_dict": rnn_model.build_model(cfg.model, n_days=3).state_dict(), "sessions": SESSIONS},
               run / "checkpoint" / "best_checkpoint.pt")
    return run


@pytest.fixture(scope="module")
def logits_files(data_dir: Path, run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The val trials' labels as confident logits (2 frames per phoneme, a blank after each), with a
    little noise (clean.npz) and much (noisy.npz), with the trials' own metadata."""
    out = tmp_path_factory.mktemp("logits")
    evaluate_model.run(evaluate_model.build_parser().parse_args(["--model_path", str(run_dir), "--data_dir", str(data_dir),
                                                                 "--no_words", "--out", str(out / "run")]))
    records, _, _ = load_logits(out / "run" / "logits.npz")
    for name, noise, seed in (("clean", 0.3, 0), ("noisy", 3.0, 1)):
        rng = np.random.default_rng(seed)
        for r in records:
            frames = [c for p in r.true_phonemes for c in (p, p, 0)]
            r.logits = np.zeros((len(frames), 41), dtype=np.float32)
            r.logits[np.arange(len(frames)), frames] = 6.0
            r.logits += rng.normal(scale=noise, size=r.logits.shape).astype(np.float32)
        save_logits(out / f"{name}.npz", records, SESSIONS, "val")
    return out / "clean.npz", out / "noisy.npz"


def test_sequence_combination_and_weights_through_the_command_line(data_dir: Path, logits_files: tuple[Path, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture):
    clean, noisy = logits_files
    common = ["--data_dir", str(data_dir), "--lexicon_words", "train", "--beam_size", "20", "--nbest", "5"]
    run = lambda *argv: evaluate_model.run(evaluate_model.build_parser().parse_args([*common, *argv]))  # noqa: E731
    metrics = run("--logits_in", str(clean), str(noisy), "--combine", "sequence", "--out", str(tmp_path / "seq"))
    assert metrics["ensemble"]["rule"] == "sequence" and metrics["ensemble"]["weights"] == [0.5, 0.5]
    assert metrics["phonemes"]["source"] == "phonemes of the chosen sentences" and metrics["n_trials"] == 8
    assert {"nbest", "ctc_scores", "select"} <= set(metrics["speed_trials_per_s"])
    assert "PER (phonemes of the chosen sentences)" in (tmp_path / "seq" / "summary.txt").read_text()
    # auto: picked on these labelled trials, written, and read back as the rule and weights.
    auto = run("--logits_in", str(clean), str(noisy), "--weights", "auto", "--out", str(tmp_path / "auto"))
    saved = json.loads((tmp_path / "auto" / "weights.json").read_text())
    assert [saved["rule"], saved["weights"]] == [auto["ensemble"]["rule"], auto["ensemble"]["weights"]]
    assert {t["rule"] for t in saved["tries"]} == {"prob", "logprob", "sequence"}
    assert auto["words"]["wer"] == min(t["wer"] for t in saved["tries"]) <= metrics["words"]["wer"]
    again = run("--logits_in", str(clean), str(noisy), "--weights", str(tmp_path / "auto" / "weights.json"), "--out", str(tmp_path / "again"))
    assert again["ensemble"]["rule"] == saved["rule"] and again["words"]["wer"] == auto["words"]["wer"]
    # Refused with one line: a file for other members, a rule the file contradicts, auto without labels or words.
    other_rule = "prob" if saved["rule"] != "prob" else "sequence"
    capsys.readouterr()
    cases = [
        (["--logits_in", str(clean), "--weights", str(tmp_path / "auto" / "weights.json")], "for 1 members here"),
        (["--logits_in", str(clean), str(noisy), "--weights", str(tmp_path / "auto" / "weights.json"), "--combine", other_rule],
         "the weights file holds weights for"),
        (["--logits_in", str(clean), str(noisy), "--weights", "auto", "--split", "test"], "--weights auto needs labelled trials"),
        (["--logits_in", str(clean), "--combine", "sequence", "--no_words"], "drop --no_words"),
    ]
    for argv, message in cases:
        assert evaluate_model.main([*common, *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate_model.py: ") and message in err[0], err
        assert not (tmp_path / "bad").exists()


def test_sequence_combination_of_a_run_with_tta_and_saved_logits(data_dir: Path, run_dir: Path, logits_files: tuple[Path, Path],
                                                                 tmp_path: Path):
    metrics = evaluate_model.run(evaluate_model.build_parser().parse_args([
        "--logits_in", str(logits_files[0]), "--model_path", str(run_dir), "--tta", "2", "--combine", "sequence",
        "--data_dir", str(data_dir), "--lexicon_words", "train", "--beam_size", "10", "--nbest", "3", "--out", str(tmp_path)]))
    assert metrics["n_trials"] == 8 and metrics["tta"]["n_copies"] == 2 and (tmp_path / "logits.npz").is_file()
    # On another frame grid than the file's, the run is still a member; its n-best is pooled too.
    assert metrics["ensemble"]["members"] == [f"logits {logits_files[0]}", str(run_dir)] and 0 <= metrics["words"]["wer"] <= 1
