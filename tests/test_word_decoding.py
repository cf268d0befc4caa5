"""Phoneme -> word decoding: text normalisation, lexicon, ARPA language model, beam search.

    .venv/bin/python -m pytest tests/test_word_decoding.py -q
"""

import math
from collections import Counter
from pathlib import Path

import kenlm
import numpy as np
import pytest
import torch

from dataset import PHONEMES
from evaluate_model_helpers import (
    SIL_ID,
    BeamSearchOptions,
    PronunciationLookup,
    WordBeamDecoder,
    build_lexicon,
    count_edits,
    greedy_ctc_decode,
    load_cmudict,
    normalize_text,
    read_arpa_vocab,
    split_words,
    write_arpa,
)
from make_synthetic_data import generate_sentences, phonemize


def ids(*symbols: str) -> tuple[int, ...]:
    return tuple(PHONEMES.index(s) for s in symbols)


def test_normalize_text_matches_upstream_rules():
    # Upstream's rule: keep letters, '-', space, apostrophe; '- ' -> ' '; drop '--'; " '" -> "'";
    # lower case; strip; collapse spaces.
    assert normalize_text("Hello, World!") == "hello world"
    assert normalize_text("Well--no") == "wellno"  # '--' deleted, not a word break
    # '- ' is replaced before '--' is looked for: a spaced dash keeps its first hyphen as a word.
    assert normalize_text("I don't know -- maybe   twenty-one.") == "i don't know - maybe twenty-one"
    assert normalize_text("Rock 'n roll, 42 times") == "rock'n roll times"
    assert normalize_text("well - no") == "well no"  # '- ' becomes a space
    assert normalize_text("a -b") == "a -b"  # a hyphen not followed by a space survives
    assert normalize_text("so -") == "so -"  # at the end nothing follows it: upstream keeps it
    assert normalize_text("---x") == "-x"  # '--' removed once, left to right
    assert normalize_text("  The   END.  ") == "the end"


def test_split_words_cuts_at_silence():
    assert split_words([7, 3, 40, 40, 21, 0, 25, 40]) == [(7, 3), (21, 25)]
    assert split_words([40]) == []


def test_cmudict_stress_removed_and_non_words_dropped():
    cmu = load_cmudict()
    assert len(cmu) > 100_000
    assert ids("HH", "AH", "L", "OW") in cmu["hello"] and ids("HH", "EH", "L", "OW") in cmu["hello"]
    assert "a." not in cmu and "don't" in cmu
    # 'read' has two stressed variants that differ in vowel, not only in stress: both kept, once each.
    assert sorted(cmu["read"]) == sorted([ids("R", "IY", "D"), ids("R", "EH", "D")])


def test_lexicon_adds_training_words_and_reports_oov():
    sentences = ["The zorblax sat.", "A glimber cat"]
    labels = [
        list(ids("DH", "AH")) + [SIL_ID] + list(ids("Z", "AO", "R", "B")) + [SIL_ID] + list(ids("S", "AE", "T")) + [SIL_ID],
        list(ids("AH")) + [SIL_ID] + list(ids("G", "L", "IH", "M")),  # two chunks for three words
    ]
    lexicon = build_lexicon(sentences, labels, cmudict_words="train")
    # Out of CMUdict, but the labels split into one chunk per word: pronunciation from the labels.
    assert lexicon.pronunciations["zorblax"] == [ids("Z", "AO", "R", "B")]
    # Out of CMUdict and the labels do not align with the words: skipped and reported.
    assert "glimber" not in lexicon.pronunciations and lexicon.oov_words == ["glimber"]
    assert lexicon.n_label_words == 1
    # 'train' keeps only CMUdict words of the training text.
    assert set(lexicon.pronunciations) == {"the", "zorblax", "sat", "a", "cat"}
    full = build_lexicon(sentences, labels, cmudict_words="all")
    assert "zorblax" in full.pronunciations and "hello" in full.pronunciations


def test_arpa_matches_hand_worked_kneser_ney(tmp_path: Path):
    # Bigram KN of "a b", "a c", worked by hand:
    # unigram continuation counts a=1 b=1 c=1 </s>=2, vocab {a,b,c,</s>,<unk>}, D1 = 3/(3+2) = 0.6,
    # gamma() = 0.6*4/5 = 0.48: p(a) = 0.4/5 + 0.48/5 = 0.176, p(</s>) = 0.376, p(<unk>) = 0.096.
    # bigram counts {2,1,1,1,1}: D2 = 4/6; p(b|a) = (1-2/3)/2 + (2/3*2/2)*0.176 = 0.28400.
    path = tmp_path / "lm.arpa"
    stats = write_arpa(["A b.", "a c"], path, order=2)
    assert stats["vocab_size"] == 5 and stats["ngram_counts"] == [6, 5]
    model = kenlm.Model(str(path))
    scores = [s for s, _, _ in model.full_scores("a b", bos=True, eos=True)]
    p_a_given_bos = (2 - 2 / 3) / 2 + (2 / 3 * 1 / 2) * 0.176
    p_eos_given_b = (1 - 2 / 3) / 1 + (2 / 3 * 1 / 1) * 0.376
    assert scores == pytest.approx([math.log10(p_a_given_bos), math.log10(0.284), math.log10(p_eos_given_b)], abs=1e-5)
    assert read_arpa_vocab(path) == {"<s>", "</s>", "<unk>", "a", "b", "c"}


def test_arpa_trigram_is_normalised(tmp_path: Path):
    sentences = generate_sentences(200, np.random.default_rng(3))
    path = tmp_path / "lm.arpa"
    write_arpa(sentences, path, order=3, vocabulary=["zebra", "quantum"])  # lexicon words the text lacks
    model = kenlm.Model(str(path))
    vocab = sorted(read_arpa_vocab(path) - {"<s>"})
    assert "zebra" in vocab and "quantum" in vocab
    for context in ([], ["i"], ["i", "want"], ["the", "big"], ["zebra", "quantum"]):
        state, out = kenlm.State(), kenlm.State()
        model.BeginSentenceWrite(state)
        for word in context:
            model.BaseScore(state, word, out)
            state, out = out, state
        total = sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4), context


def _clean_logits(class_ids: list[int], frames_per_phoneme: int = 3) -> np.ndarray:
    """One-hot-ish posteriors: each phoneme held for a few frames, then one blank frame."""
    frames = []
    for p in class_ids:
        frame = np.zeros(len(PHONEMES), np.float32)
        frame[p] = 8.0
        frames += [frame] * frames_per_phoneme
        blank = np.zeros(len(PHONEMES), np.float32)
        blank[0] = 8.0
        frames.append(blank)
    return np.stack(frames)


def _noisy_logits(class_ids: list[int], rng: np.random.Generator, p_sub: float = 0.25) -> np.ndarray:
    """A confused model: a quarter of the phonemes lose to a random class (silence included),
    the true class stays runner-up, and every logit gets Gaussian noise."""
    frames = []
    for p in class_ids:
        frame = np.zeros(len(PHONEMES), np.float32)
        frame[p] = 6.0
        if rng.random() < p_sub:
            frame[int(rng.integers(1, len(PHONEMES)))] = 6.0
            frame[p] = 4.5
        blank = np.zeros(len(PHONEMES), np.float32)
        blank[0] = 6.0
        frames += [frame, frame, blank]
    logits = np.stack(frames)
    return logits + rng.standard_normal(logits.shape).astype(np.float32)


@pytest.fixture(scope="module")
def grammar_setup(tmp_path_factory: pytest.TempPathFactory):
    rng = np.random.default_rng(0)
    train = generate_sentences(400, rng)
    held_out = generate_sentences(40, rng)
    lexicon = build_lexicon(train, [phonemize(s.split()) for s in train], cmudict_words="all")
    arpa = tmp_path_factory.mktemp("lm") / "train.arpa"
    write_arpa(train, arpa, order=3, vocabulary=lexicon.pronunciations)
    decoder = WordBeamDecoder(lexicon, arpa, BeamSearchOptions(beam_size=50, lm_weight=1.0, word_score=0.0))
    return train, held_out, lexicon, decoder


def test_beam_recovers_sentences_from_clean_logits(grammar_setup):
    _, held_out, _, decoder = grammar_setup
    hyps = [decoder.decode(_clean_logits(phonemize(s.split()))) for s in held_out]
    n_edits, n_words = count_edits([s.split() for s in held_out], [h.split() for h in hyps])
    # Homophones ("to"/"too") are the only possible confusion, and the trigram settles most.
    assert n_edits / n_words <= 0.02
    assert sum(h == s for h, s in zip(hyps, held_out)) >= 0.9 * len(held_out)


def test_beam_with_lm_beats_greedy_lookup_on_noisy_logits(grammar_setup):
    train, held_out, lexicon, decoder = grammar_setup
    rng = np.random.default_rng(1)
    refs = [s.split() for s in held_out]
    logits = [_noisy_logits(phonemize(s.split()), rng) for s in held_out]
    lookup = PronunciationLookup(lexicon, Counter(w for s in train for w in s.split()))
    greedy = [greedy_ctc_decode(torch.from_numpy(x)[None], torch.tensor([len(x)]))[0] for x in logits]
    lookup_wer = np.divide(*count_edits(refs, [lookup.decode(g).split() for g in greedy]))
    beam_wer = np.divide(*count_edits(refs, [decoder.decode(x).split() for x in logits]))
    assert lookup_wer > 0.2  # the noise really hurts phoneme-level decoding
    assert beam_wer < 0.5 * lookup_wer, (beam_wer, lookup_wer)


def test_homophones_beyond_trie_limit_are_handled(tmp_path: Path):
    # Seven spellings of one pronunciation: flashlight keeps six per trie node; the LM's favourite stays.
    words = ["aa", "ab", "ac", "ad", "ae", "af", "ag"]
    lexicon = build_lexicon([], use_cmudict=False)
    lexicon.pronunciations.update({w: [ids("B", "IY")] for w in words})
    arpa = tmp_path / "lm.arpa"
    write_arpa(["ag ag ag", "ag"], arpa, order=2)
    decoder = WordBeamDecoder(lexicon, arpa)
    assert decoder.decode(_clean_logits(list(ids("B", "IY")) + [SIL_ID])) == "ag"


def test_nbest_scores_add_up_to_the_beam_score_and_are_distinct(grammar_setup):
    _, held_out, _, decoder = grammar_setup
    rng = np.random.default_rng(3)
    logits = _noisy_logits(phonemize(held_out[0].split()), rng, p_sub=0.4)
    raw = decoder._search(logits)
    hypotheses = decoder.decode_nbest(logits, 5)
    assert 1 < len(hypotheses) <= 5 and len({h.text for h in hypotheses}) == len(hypotheses)
    assert hypotheses[0].text == decoder.decode(logits)
    o = decoder.options
    # flashlight's own score is the rescoring rule without the LLM (sil_score is 0 here).
    totals = [h.acoustic + o.lm_weight * h.ngram + o.word_score * h.n_words for h in hypotheses]
    assert totals[0] == pytest.approx(raw[0].score, abs=1e-3) and totals == sorted(totals, reverse=True)
