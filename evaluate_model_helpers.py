"""Decoding and scoring helpers shared by the trainer's validation and by evaluate_model.py.

Greedy CTC decoding and edit-distance counting live here so that the trainer's validation PER
and the evaluator's PER come from one definition.

Used as a library: `from evaluate_model_helpers import greedy_ctc_decode, count_edits`.
"""

from collections.abc import Sequence

import editdistance
import torch


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
