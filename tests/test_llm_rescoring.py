"""n-best rescoring with a causal LM: a tiny GPT-2 trained here for a few seconds on the grammar's
training sentences (no download: its word-level tokenizer is built with the `tokenizers` library),
saved with save_pretrained and read back through --llm.

    .venv/bin/python -m pytest tests/test_llm_rescoring.py -q
"""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate_model
from dataset import SIL_ID, read_labels
from evaluate_model_helpers import Hypothesis, TrialRecord, save_logits
from ensemble import chosen, pool_hypotheses, select
from llm_rescoring import CausalLMScorer
from make_synthetic_data import generate_sentences

transformers = pytest.importorskip("transformers")
SESSIONS = ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"]


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 over the grammar's words, trained 100 steps on 400 grammar sentences."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from decoding import train_tiny_llm

    sentences = generate_sentences(400, np.random.default_rng(0))
    return train_tiny_llm(sentences, tmp_path_factory.mktemp("tiny_llm"), n_steps=100)


def test_scores_are_sentence_log_probabilities_whatever_the_batch(tiny_llm: Path):
    scorer = CausalLMScorer(tiny_llm, batch_size=3)
    texts = ["the cat", "a dog saw the big red ball", "we"]
    batched = scorer.score(texts)
    one_by_one = [CausalLMScorer(tiny_llm, batch_size=1).score([t])[0] for t in texts]
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-4)  # padding changes nothing
    # By hand: log p(w1 | <s>) + ... + log p(</s> | ... wn).
    ids = [0, *scorer.tokenizer(texts[1], add_special_tokens=False)["input_ids"], 0]
    with torch.no_grad():
        log_probs = scorer.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    by_hand = sum(float(log_probs[i, ids[i + 1]]) for i in range(len(ids) - 1))
    assert batched[1] == pytest.approx(by_hand, abs=1e-4)


def test_rescoring_formula_and_llm_reranks_an_ungrammatical_ngram_best(tiny_llm: Path):
    good = generate_sentences(1, np.random.default_rng(5))[0]
    bad = " ".join(reversed(good.split()))  # the same words, no grammar
    n = len(good.split())
    # The n-gram LM (made up here) prefers the ungrammatical order by 1 (log10 units, weight 1).
    pool = pool_hypotheses([[Hypothesis(bad, acoustic=-10.0, ngram=-5.0, n_words=n, phonemes=(1,)),
                             Hypothesis(good, acoustic=-10.0, ngram=-6.0, n_words=n, phonemes=(2,))]])
    pool.acoustic = np.array([[-10.0], [-10.0]])
    pool.llm = np.array(CausalLMScorer(tiny_llm).score([bad, good]))
    assert pool.llm[1] > pool.llm[0] + 2.0, pool.llm  # the LM learnt the grammar
    # acoustic + lm_weight * ngram + llm_weight * llm + word_score * n_words: the good sentence wins
    # exactly when 2 * (-6) + 0.5 * llm_good - n > 2 * (-5) + 0.5 * llm_bad - n.
    expected = good if 0.5 * (pool.llm[1] - pool.llm[0]) > 2.0 else bad
    assert chosen(pool, select(pool, np.array([1.0]), lm_weight=2.0, llm_weight=0.5, word_score=-1.0))[0] == expected
    weights = dict(lm_weight=1.0, word_score=0.0)
    assert chosen(pool, select(pool, np.array([1.0]), llm_weight=0.0, **weights))[0] == bad  # the n-gram's choice
    assert chosen(pool, select(pool, np.array([1.0]), llm_weight=1.0, **weights))[0] == good  # re-ranked by the LLM


def _clean_logits_file(data_dir: Path, path: Path) -> None:
    """The val trials' phoneme labels as confident logits (3 frames per phoneme, blanks between)."""
    sentences, labels = read_labels(str(data_dir), SESSIONS, "val")
    records = []
    for i, (sentence, label) in enumerate(zip(sentences, labels)):
        frames = [c for p in label for c in (p, p, 0)] + [SIL_ID]
        logits = np.zeros((len(frames), 41), dtype=np.float32)
        logits[np.arange(len(frames)), frames] = 8.0
        # A little noise: exactly tied paths would leave the beam's order to flashlight's internals.
        logits += np.random.default_rng(i).normal(scale=0.3, size=logits.shape).astype(np.float32)
        records.append(TrialRecord(SESSIONS[1], 1, 1, i, logits, list(label), sentence))
    save_logits(path, records, SESSIONS, "val")


def test_llm_rescoring_through_the_command_line(data_dir: Path, tiny_llm: Path, tmp_path: Path):
    _clean_logits_file(data_dir, tmp_path / "logits.npz")
    metrics = evaluate_model.run(evaluate_model.build_parser().parse_args([
        "--logits_in", str(tmp_path / "logits.npz"), "--data_dir", str(data_dir), "--lexicon_words", "train",
        "--beam_size", "20", "--nbest", "4", "--llm", str(tiny_llm), "--llm_batch_size", "3", "--grid_search",
        "--grid_lm_weights", "1", "--grid_word_scores", "0", "--grid_blank_penalties", "0", "--grid_llm_weights", "0,1",
        "--out", str(tmp_path / "out"),
    ]))
    grid = {g["llm_weight"]: g["wer"] for g in metrics["rescoring"]["grid"]}  # on all 8 val trials
    assert list(grid) == [0.0, 1.0] and metrics["rescoring"]["llm_weight"] == min(grid, key=grid.get)
    assert metrics["words"]["wer_rescored"] == metrics["rescoring"]["wer"] == min(grid.values())
    assert "nbest_llm" in metrics["speed_trials_per_s"]
    with (tmp_path / "out" / "per_trial.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n_trials"] and all(r["text_decoded"] and r["text_rescored"] for r in rows)
    if metrics["rescoring"]["llm_weight"] == 0.0:  # the rule without the LLM is the beam search's own ranking
        assert all(r["text_rescored"] == r["text_decoded"] for r in rows)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "WER (beam + LM)" in summary and "rescored by the LLM" in summary


def test_llm_rescoring_of_a_sequence_ensemble(data_dir: Path, tiny_llm: Path, tmp_path: Path):
    """Per sentence the LLM scores each trial's pooled sentences once; llm_weight 0 keeps the choice."""
    _clean_logits_file(data_dir, tmp_path / "logits.npz")
    metrics = evaluate_model.run(evaluate_model.build_parser().parse_args([
        "--logits_in", str(tmp_path / "logits.npz"), str(tmp_path / "logits.npz"), "--combine", "sequence", "--propose_frame_ensemble",
        "--data_dir", str(data_dir), "--lexicon_words", "train", "--beam_size", "20", "--nbest", "4", "--llm", str(tiny_llm),
        "--grid_search", "--grid_lm_weights", "0.5,1", "--grid_word_scores", "0", "--grid_llm_weights", "0,1", "--out", str(tmp_path / "out"),
    ]))
    assert len(metrics["grid_search"]) == 2 and metrics["words"]["wer"] == min(g["wer"] for g in metrics["grid_search"])
    grid = {g["llm_weight"]: g["wer"] for g in metrics["rescoring"]["grid"]}
    assert metrics["words"]["wer_rescored"] == min(grid.values()) and grid[0.0] == metrics["words"]["wer"]
    with (tmp_path / "out" / "per_trial.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(r["text_decoded"] and r["phonemes_decoded"] for r in rows)
    if metrics["rescoring"]["llm_weight"] == 0.0:
        assert all(r["text_rescored"] == r["text_decoded"] for r in rows)


def test_bad_llm_directory_exits_2_with_nothing_written(tmp_path: Path, tiny_llm: Path, capsys: pytest.CaptureFixture):
    from transformers import AutoTokenizer, ViTConfig

    not_causal = tmp_path / "vit"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(not_causal)
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(not_causal)
    logits = tmp_path / "logits.npz"
    logits.write_bytes(b"")  # never read: the LLM is checked first
    for llm, message in ((tmp_path / "missing", "no such directory"), (not_causal, "not a causal language model")):
        out = tmp_path / "out"
        assert evaluate_model.main(["--logits_in", str(logits), "--lm_text", str(logits), "--llm", str(llm), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
