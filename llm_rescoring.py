"""Rescoring a beam search's n-best word hypotheses with a causal language model.

Any Hugging Face causal LM saved in a local directory (config, weights, tokenizer) scores each
hypothesis by the natural-log probability of its words followed by end-of-sentence; the
hypotheses are then ranked by

    acoustic + lm_weight * ngram + llm_weight * llm + word_score * n_words

(acoustic: the path's summed log-probabilities; ngram: the n-gram LM's log10 probability, with
the beam search's own weight; llm: this module's score). Nothing is downloaded: the directory
is read with local_files_only. Needs the optional extra: `pip install '.[llm]'` (transformers).

    python evaluate_model.py --model_path RUN_DIR --data_dir DATA --split val --nbest 50 \
        --llm /models/opt-6.7b --llm_device cuda --grid_search --out eval_llm

Used as a library: `CausalLMScorer(path).score(["the cat sat", "cat the sat"])`.
"""

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ensemble
from dataset import DataError
from ensemble import beam_pool, sentence_choices
from evaluate_model_helpers import TrialRecord, WordBeamDecoder


class CausalLMScorer:
    """Sentence log-probabilities from a local causal LM, in padded batches (bf16 on CUDA)."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"--llm {path}: no such directory (a Hugging Face model saved with save_pretrained)")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise DataError("--llm needs the transformers package: pip install '.[llm]'") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise DataError("--llm_device cuda: no CUDA device is available")
        # bf16 on CUDA halves the memory (a 7B model: ~14 GB); float32 on CPU, where bf16 matmuls are slow.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"--llm {path}: not a causal language model directory ({reason})") from None
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        # Sentence boundaries: BOS opens (GPT-2 and OPT use their EOS token for it), EOS closes.
        self.start_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        self.end_id = self.tokenizer.eos_token_id

    def _token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.start_id] if self.start_id is not None else []) + ids + ([self.end_id] if self.end_id is not None else [])

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> list[float]:
        """Natural-log probability of each text's tokens (and end of sentence) given its start."""
        scores: list[float] = []
        for begin in range(0, len(texts), self.batch_size):
            rows = [self._token_ids(t) for t in texts[begin : begin + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            log_probs = logits[:, :-1].float().log_softmax(dim=-1).cpu()  # (B, L-1, V): predicts tokens 1..L-1
            token_scores = log_probs.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]  # (B, L-1, V) -> (B, L-1)
            scores.extend(token_scores.sum(dim=1).tolist())
        return scores


def rescore_with_llm(
    records: Sequence[TrialRecord], scorer: CausalLMScorer, decoder: WordBeamDecoder, *, rule: str, weights: Sequence[float],
    n_best: int, llm_weight: float, grid_llm_weights: Sequence[float] | None = None, grid_trials: int = 200,
) -> dict:
    """Every record's sentences scored by the causal LM and fields['text_rescored'] chosen by the
    rule above (ensemble.select; with several members their weighted CTC scores are the acoustic
    term). Per frame the sentences are the beam search's n_best, per sentence the records' pools.
    With grid_llm_weights, llm_weight is the one of lowest WER on up to grid_trials labelled trials."""
    for r in tqdm(records, unit="trial", desc="n-best + LLM", file=sys.stderr):
        if rule != "sequence":
            r.fields["pool"] = beam_pool(decoder, r.logits, n_best)
        r.fields["pool"].llm = np.array(scorer.score(r.fields["pool"].texts))
    weights = weights if rule == "sequence" else [1.0]  # per frame the one acoustic score is the beam path's
    rescoring = {"nbest": n_best}
    if grid_llm_weights:
        tried = ensemble.grid_trials(records, grid_trials)
        rescoring["grid"] = []
        for w in grid_llm_weights:
            picks = sentence_choices(tried, weights, decoder.options, w)
            rescoring["grid"].append({"llm_weight": w, "wer": ensemble.error_rates(tried, [t for t, _ in picks], [p for _, p in picks])[0]})
        llm_weight = min(rescoring["grid"], key=lambda g: g["wer"])["llm_weight"]
        rescoring["grid"] = [{**g, "chosen": g["llm_weight"] == llm_weight} for g in rescoring["grid"]]
    for r, (text, _) in zip(records, sentence_choices(records, weights, decoder.options, llm_weight)):
        r.fields["text_rescored"] = text
    return {**rescoring, "llm_weight": llm_weight}
