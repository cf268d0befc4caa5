"""Decoding speed on CPU: greedy CTC vs lexicon beam search with the word n-gram LM, in trials/s.

    .venv/bin/python benchmarks/decode_speed.py [--n_trials 100 --beam_size 100 --lexicon_words all]

Logits are synthetic but sized like the real data: ~29 phonemes per sentence over ~215 frames
(875 bins of 20 ms patched with stride 4), a quarter of the phonemes confused with a random
class, Gaussian noise on every logit. The LM is a trigram of 2,000 grammar sentences whose vocabulary also holds the lexicon's words.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluate_model_helpers import (  # noqa: E402
    BeamSearchOptions,
    WordBeamDecoder,
    build_lexicon,
    count_edits,
    greedy_ctc_decode,
    write_arpa,
)
from make_synthetic_data import generate_sentences, phonemize  # noqa: E402


def realistic_logits(class_ids: list[int], rng: np.random.Generator, n_frames: int = 215) -> np.ndarray:
    """Spread the phonemes over n_frames: each phoneme gets a block of frames, blanks elsewhere."""
    logits = rng.standard_normal((n_frames, 41)).astype(np.float32)
    logits[:, 0] += 6.0
    starts = np.linspace(0, n_frames, len(class_ids) + 1).astype(int)
    for p, start in zip(class_ids, starts):
        shown = int(rng.integers(1, 41)) if rng.random() < 0.25 else p
        logits[start : start + 2, shown] += 7.0
        logits[start : start + 2, p] += 5.0
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_trials", type=int, default=100)
    parser.add_argument("--beam_size", type=int, default=100)
    parser.add_argument("--lexicon_words", choices=("all", "train"), default="all")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    train = generate_sentences(2000, rng)
    test = generate_sentences(args.n_trials, rng)
    logits = [realistic_logits(phonemize(s.split()), rng) for s in test]
    with tempfile.TemporaryDirectory() as tmp:
        arpa = Path(tmp) / "lm.arpa"
        start = time.perf_counter()
        lexicon = build_lexicon(train, [phonemize(s.split()) for s in train], cmudict_words=args.lexicon_words)
        write_arpa(train, arpa, order=3, vocabulary=lexicon.pronunciations)
        decoder = WordBeamDecoder(lexicon, arpa, BeamSearchOptions(beam_size=args.beam_size, lm_weight=1.0))
        build_s = time.perf_counter() - start

        start = time.perf_counter()
        for x in logits:
            greedy_ctc_decode(torch.from_numpy(x)[None], torch.tensor([len(x)]))
        greedy_rate = len(logits) / (time.perf_counter() - start)
        start = time.perf_counter()
        hyps = [decoder.decode(x) for x in logits]
        beam_rate = len(logits) / (time.perf_counter() - start)
    n_edits, n_words = count_edits([s.split() for s in test], [h.split() for h in hyps])
    print(f"lexicon {len(lexicon)} words, decoder built in {build_s:.1f} s")
    print(f"greedy: {greedy_rate:8.1f} trials/s")
    print(f"beam {args.beam_size} + trigram LM: {beam_rate:8.1f} trials/s (WER {n_edits / n_words:.3f})")


if __name__ == "__main__":
    main()
