"""Model combination for the evaluator: members run (or read from saved logits) over the same
trials, then combined per frame or per sentence, with weights given, read or picked on val.

    python evaluate_model.py --model_path RUN_A RUN_B RUN_C --combine sequence --weights auto \
        --data_dir data/synthetic --split val --out runs/eval_val     # writes runs/eval_val/weights.json
    python evaluate_model.py --model_path RUN_A RUN_B RUN_C --weights runs/eval_val/weights.json \
        --data_dir data/synthetic --split test --out runs/eval_test

Per frame (`prob`, `logprob`) the members' posteriors are averaged and decoded as one model. Per
sentence (`sequence`) each member proposes its n-best sentences with the lexicon beam search, the
distinct sentences are pooled per trial, and each is scored by every member's CTC log-likelihood of
its phoneme sequence, summed over all alignments (torch's ctc_loss on that member's own
log-probabilities), weighted, plus the n-gram LM, the word score and optionally a causal LM.
CTC models are peaky and each seed puts its spikes on frames of its own, so averaging unlike
members per frame blurs the spikes toward blank; the likelihood of a whole sentence does not
depend on where a member places its spikes. Members may even run on different frame grids.

Used as a library by evaluate_model.py; tested by tests/test_ensemble.py.
"""

import argparse
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import rnn_model
import storage
from dataset import SIL_ID, DataError, build_eval_loader, discover_sessions, session_files
from evaluate_model_helpers import (
    BeamSearchOptions,
    Hypothesis,
    TrialRecord,
    WordBeamDecoder,
    blank_penalised_log_probs,
    compute_logits,
    count_edits,
    greedy_ctc_decode,
    load_logits,
    normalize_text,
    save_logits,
)

FRAME_RULES = ("prob", "logprob")
COMBINE_RULES = (*FRAME_RULES, "sequence")


# ----------------------------------------------------------------------------------------------
# Members: loaded, checked against each other and the data, run over the split


def present_sessions(model_sessions: Sequence[str], data_dir: str, split: str) -> list[str]:
    """The model's sessions that have a folder in data_dir (any subset may be scored, by name);
    a session with `split` data that the model has no day layer for is refused."""
    on_disk = discover_sessions(data_dir)
    with_split = [s for s, p in zip(on_disk, session_files(data_dir, on_disk, split)) if p is not None]
    unknown = [s for s in with_split if s not in model_sessions]
    if unknown:
        raise DataError(
            f"{data_dir}: {len(unknown)} session(s) with {split} data are not in the model's session list "
            f"(no day layer for them): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    present = [s for s in model_sessions if s in on_disk]
    if not present:
        raise DataError(f"{data_dir}: none of the model's {len(model_sessions)} sessions (e.g. {model_sessions[0]}) "
                        "has a folder here; is this the dataset the model was trained on?")
    return present


def eval_loader(member: rnn_model.TrainedModel, data_dir: str, present: Sequence[str], split: str, *, batch_size: int,
                static_shapes: bool) -> torch.utils.data.DataLoader:
    """The split's trials of the present sessions, each batch carrying the model's day index of its
    session (its position in the model's list, not in `present`)."""
    return build_eval_loader(
        data_dir, present, split, batch_size=batch_size, feature_subset=member.feature_subset,
        # Fixed shapes on XLA: the training buckets and full batches, so few graphs compile.
        static_shapes=static_shapes, time_buckets=member.time_buckets,
        patch_size=member.model.patch_size, patch_stride=member.model.patch_stride,
        day_indices=[member.sessions.index(s) for s in present],
    )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    if name == "xla":
        # Imported only here: torch_xla replaces nn.GRU process-wide, which breaks CPU GRUs.
        import torch_xla

        return torch_xla.device()
    return torch.device(name)


def load_member(path: str, upstream: bool) -> rnn_model.TrainedModel:
    """One ensemble member; an upstream directory is recognised by checkpoint/args.yaml without config.yaml."""
    detected = storage.isfile(storage.join(path, "checkpoint", "args.yaml")) and not storage.isfile(storage.join(path, "config.yaml"))
    return (rnn_model.load_upstream_model if upstream or detected else rnn_model.load_run_model)(path)


def check_members(loaded: Sequence[rnn_model.TrainedModel], names: Sequence[str], same_grid: bool) -> None:
    """Members must share a session list (day index = position) and, to combine per frame, a frame grid."""
    grids = [(m.model.patch_size, m.model.patch_stride) for m in loaded]
    if same_grid and len(set(grids)) > 1:
        raise DataError("models on different frame grids cannot be combined per frame (--combine sequence can): " + ", ".join(
            f"{n} (patch {size}, stride {stride})" for n, (size, stride) in zip(names, grids)))
    for m, name in zip(loaded[1:], names[1:]):
        if m.sessions != loaded[0].sessions:
            raise DataError(f"{name} and {names[0]} were trained on different session lists; day indices would not match")


def run_members(args: argparse.Namespace, loaded: Sequence[rnn_model.TrainedModel], out: Path, speed: dict) -> tuple[list, dict]:
    """Each model's records (with --tta, its averaged posteriors), each saved to its own logits file."""
    if not loaded:
        return [], {}
    present = present_sessions(loaded[0].sessions, args.data_dir, args.split)
    device = resolve_device(args.device)
    members, start = [], time.perf_counter()
    for k, member in enumerate(loaded):
        loader = eval_loader(member, args.data_dir, present, args.split, batch_size=args.batch_size, static_shapes=device.type == "xla")
        tta = (args.tta, args.tta_seed) if args.tta else None
        members.append(compute_logits(member, loader, device, use_bf16=args.bf16, tta=tta))
        out.mkdir(parents=True, exist_ok=True)
        # One file per model, so adding a model to an ensemble later reruns only that model.
        save_logits(out / ("logits.npz" if len(loaded) == 1 else f"logits_{k}.npz"), members[-1], loaded[0].sessions, args.split)
    speed["model"] = len(members[0]) / max(time.perf_counter() - start, 1e-9)
    return members, {"loaded": loaded[0], "loader": loader, "device": device, "present": present}


def collect_members(args: argparse.Namespace, rule: str, out: Path, speed: dict) -> tuple[list[list[TrialRecord]], list[str], list[str], dict]:
    """Every member's records (--logits_in files first, then --model_path models), their names, the
    model's session list, and handles of the last model run (its loader, device, present sessions)."""
    from_files = [load_logits(path) for path in args.logits_in]
    for path, (_, _, split) in zip(args.logits_in, from_files):
        if split != args.split:
            raise DataError(f"{path} holds {split} logits, but --split {args.split} was asked for")
    # Every model is loaded and checked (frame grid, sessions) before the first one runs.
    loaded = [load_member(path, args.upstream) for path in args.model_path]
    check_members(loaded, args.model_path, same_grid=rule != "sequence")
    sessions = loaded[0].sessions if loaded else from_files[0][1]
    for path, (_, file_sessions, _) in zip(args.logits_in, from_files):
        if file_sessions != sessions:
            raise DataError(f"{path} and {(args.model_path or args.logits_in)[0]} come from models trained on different "
                            "session lists; day indices would not match")
    run, handles = run_members(args, loaded, out, speed)
    members = [records for records, _, _ in from_files] + run
    names = [f"logits {p}" for p in args.logits_in] + list(args.model_path)
    if not members[0]:
        raise DataError(f"no {args.split} trials found")
    check_same_trials(members, names, same_frames=rule != "sequence")
    if "present" not in handles:  # saved logits only: the model's sessions in data_dir give the training sentences
        handles["present"] = [s for s in sessions if args.data_dir and storage.isdir(storage.join(args.data_dir, s))] or sessions
    return members, names, sessions, handles


def check_same_trials(members: Sequence[Sequence[TrialRecord]], names: Sequence[str], same_frames: bool) -> None:
    """Members must hold the same trials in the same order (and, per frame, as many frames each)."""
    first = members[0]
    for records, name in zip(members[1:], names[1:]):
        if len(records) != len(first):
            raise DataError(f"{name} has {len(records)} trials, {names[0]} has {len(first)}: not the same split and data")
        for a, b in zip(first, records):
            if (a.session, a.block_num, a.trial_num) != (b.session, b.block_num, b.trial_num):
                raise DataError(f"{name}: trial {b.session} block {b.block_num} trial {b.trial_num} where {names[0]} "
                                f"has {a.session} block {a.block_num} trial {a.trial_num}: not the same trials")
            if same_frames and len(a.logits) != len(b.logits):
                raise DataError(f"{name} and {names[0]} give {a.session} block {a.block_num} trial {a.trial_num} "
                                f"{len(b.logits)} and {len(a.logits)} frames: their frame grids differ")


# ----------------------------------------------------------------------------------------------
# Per frame


def combine_posteriors(members: Sequence[np.ndarray], rule: str = "prob", weights: Sequence[float] | None = None) -> np.ndarray:
    """One trial's (T, C) logits from each model -> the ensemble's (T, C) log-probabilities.

    'prob': log sum_m w_m softmax(x_m), the arithmetic mean of the posteriors (what cut PER most
    on the 2023 data); 'logprob': sum_m w_m log_softmax(x_m), the geometric mean (unnormalised;
    decoding renormalises per frame). Weights default to equal and are normalised to sum 1.
    """
    if rule not in FRAME_RULES:
        raise ValueError(f"frame combination rule must be one of {FRAME_RULES}, got {rule!r}")
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(members), dtype=torch.float64)
    if len(w) != len(members):
        raise ValueError(f"{len(members)} models but {len(w)} weights")
    w = w / w.sum()
    log_probs = torch.stack([torch.as_tensor(m, dtype=torch.float64).log_softmax(dim=-1) for m in members])  # (M, T, C)
    if rule == "prob":
        combined = torch.logsumexp(log_probs + w.log()[:, None, None], dim=0)  # (M, T, C) -> (T, C)
    else:
        combined = (log_probs * w[:, None, None]).sum(dim=0)  # (M, T, C) -> (T, C)
    return combined.float().numpy()


def combine_records(members: Sequence[Sequence[TrialRecord]], rule: str = "prob", weights: Sequence[float] | None = None) -> list[TrialRecord]:
    """The frame ensemble's records (members checked by check_same_trials); the first member's
    labels and metadata are kept."""
    if len(members) == 1:
        return list(members[0])
    return [TrialRecord(r.session, r.day_index, r.block_num, r.trial_num,
                        combine_posteriors([m[i].logits for m in members], rule, weights), r.true_phonemes, r.sentence_label)
            for i, r in enumerate(members[0])]


# ----------------------------------------------------------------------------------------------
# Per sentence


@dataclass
class SentencePool:
    """One trial's candidates: the distinct sentences of every proposer's n-best. A sentence
    proposed with other pronunciations keeps each as a variant; variants are the rows scored."""

    texts: list[str]  # (N,) distinct sentences
    ngram: np.ndarray  # (N,) n-gram LM log10 probability
    n_words: np.ndarray  # (N,)
    sentence_of: np.ndarray  # (V,) the sentence of each variant
    phonemes: list[tuple[int, ...]]  # (V,) phoneme classes, a silence after every word
    proposed_by: np.ndarray  # (V, P) bool: which n-best lists held the variant (members first)
    acoustic: np.ndarray | None = None  # (V, M) each member's CTC log-likelihood of each variant
    llm: np.ndarray | None = None  # (N,) causal LM natural-log probability, when rescored


def pool_hypotheses(nbest_lists: Sequence[Sequence[Hypothesis]]) -> SentencePool:
    """Distinct sentences of several n-best lists, in order of first proposal."""
    texts: dict[str, Hypothesis] = {}
    variants: dict[tuple[str, tuple[int, ...]], set[int]] = {}
    for k, hypotheses in enumerate(nbest_lists):
        for h in hypotheses:
            texts.setdefault(h.text, h)
            variants.setdefault((h.text, h.phonemes), set()).add(k)
    index = {text: i for i, text in enumerate(texts)}
    proposed_by = np.zeros((len(variants), len(nbest_lists)), dtype=bool)
    for v, lists in enumerate(variants.values()):
        proposed_by[v, list(lists)] = True
    return SentencePool(
        texts=list(texts), ngram=np.array([h.ngram for h in texts.values()]), n_words=np.array([h.n_words for h in texts.values()]),
        sentence_of=np.array([index[t] for t, _ in variants], dtype=np.int64), phonemes=[p for _, p in variants], proposed_by=proposed_by,
    )


def ctc_log_likelihoods(logits: np.ndarray | torch.Tensor, phonemes: Sequence[Sequence[int]], blank_penalty: float = 0.0) -> np.ndarray:
    """log P(phonemes | one trial's (T, C) logits) under CTC, summed over every alignment (torch's
    ctc_loss, negated), for each phoneme sequence; -inf where T frames cannot hold it. Each distinct
    sequence is scored once, so homophones tie exactly."""
    distinct = list(dict.fromkeys(tuple(p) for p in phonemes))
    if not distinct:
        return np.zeros(0)
    log_probs = blank_penalised_log_probs(logits, blank_penalty).double()  # (T, C), as the beam search sees it
    n = len(distinct)
    loss = F.ctc_loss(log_probs[:, None].expand(-1, n, -1), torch.tensor([p for seq in distinct for p in seq], dtype=torch.long),
                      input_lengths=torch.full((n,), len(log_probs), dtype=torch.long),
                      target_lengths=torch.tensor([len(p) for p in distinct], dtype=torch.long), reduction="none")  # (T, N, C) -> (N,)
    score = dict(zip(distinct, (-loss).tolist()))
    return np.array([score[tuple(p)] for p in phonemes])


def score_pool(pool: SentencePool, member_logits: Sequence[np.ndarray], blank_penalty: float = 0.0) -> SentencePool:
    pool.acoustic = np.stack([ctc_log_likelihoods(x, pool.phonemes, blank_penalty) for x in member_logits], axis=1)  # (V, M)
    return pool


def select(pool: SentencePool, weights: np.ndarray, *, lm_weight: float, word_score: float, llm_weight: float = 0.0) -> int:
    """The winning variant: max of sum_m w_m ctc_m + lm_weight ngram + word_score n_words + llm_weight llm
    (weights normalised to sum 1, so the acoustic term is on one model's scale). A member of weight
    0 is out of the ensemble: it neither scores nor proposes, so one-hot weights give that member alone."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    on = np.concatenate([w > 0, np.ones(pool.proposed_by.shape[1] - len(w), dtype=bool)])  # other proposers (frame average) stay
    allowed = (pool.proposed_by & on).any(axis=1)
    if not allowed.any():
        return -1
    sentence = lm_weight * pool.ngram + word_score * pool.n_words
    if llm_weight:
        sentence = sentence + llm_weight * pool.llm
    acoustic = np.where(w > 0, pool.acoustic, 0.0) @ w  # (V, M) -> (V,); a left-out member's -inf does not count
    # Exact ties (homophones the LM cannot tell apart) go to the first proposed, as in the beam search.
    return int(np.argmax(np.where(allowed, acoustic + sentence[pool.sentence_of], -np.inf)))


def chosen(pool: SentencePool, variant: int) -> tuple[str, list[int]]:
    return ("", []) if variant < 0 else (pool.texts[pool.sentence_of[variant]], list(pool.phonemes[variant]))


def sentence_choices(records: Sequence[TrialRecord], weights: Sequence[float], options: BeamSearchOptions,
                     llm_weight: float = 0.0) -> list[tuple[str, list[int]]]:
    """The text and phonemes that each record's pool (fields['pool']) ranks first."""
    return [chosen(r.fields["pool"], select(r.fields["pool"], np.asarray(weights), lm_weight=options.lm_weight,
                                            word_score=options.word_score, llm_weight=llm_weight)) for r in records]


def beam_pool(decoder: WordBeamDecoder, logits: np.ndarray, n_best: int) -> SentencePool:
    """One beam search's n-best as a pool scored by the beam's own path scores (one member)."""
    hypotheses = decoder.decode_nbest(logits, n_best)
    pool = pool_hypotheses([hypotheses])
    pool.acoustic = np.array([h.acoustic for h in hypotheses], dtype=np.float64).reshape(-1, 1)  # distinct texts: one variant each
    return pool


def grid_trials(records: Sequence[TrialRecord], n_trials: int) -> list[TrialRecord]:
    """At most n_trials labelled records, spread over the sessions (the grid searches' trials)."""
    labelled = [r for r in records if r.sentence_label is not None]
    return labelled[:: max(1, len(labelled) // max(n_trials, 1))][:n_trials]


def propose_sentences(members: Sequence[Sequence[TrialRecord]], decoder: WordBeamDecoder, *, n_best: int,
                      add_frame_ensemble: bool = False) -> tuple[list[SentencePool], float, float]:
    """Each trial's pooled candidates, scored by every member; and trials/s of the proposing beam
    searches and of the CTC scoring."""
    pools, t_propose, t_score = [], 0.0, 0.0
    for i in tqdm(range(len(members[0])), unit="trial", desc="n-best per member + CTC scores", file=sys.stderr):
        logits = [m[i].logits for m in members]
        start = time.perf_counter()
        proposers = logits + ([combine_posteriors(logits, "prob")] if add_frame_ensemble and len(logits) > 1 else [])
        pool = pool_hypotheses([decoder.decode_nbest(x, n_best) for x in proposers])
        middle = time.perf_counter()
        pools.append(score_pool(pool, logits, decoder.options.blank_penalty))
        t_propose, t_score = t_propose + middle - start, t_score + time.perf_counter() - middle
    return pools, len(pools) / max(t_propose, 1e-9), len(pools) / max(t_score, 1e-9)


# ----------------------------------------------------------------------------------------------
# Weights: given, read from a file, or picked on labelled trials


def weight_grid(n_members: int) -> list[np.ndarray]:
    """Equal weights first, then every vector of 0, 1, 2 (0, 1 from 4 members on; one member alone
    or left out from 7 on), not all 0, normalised, without repeats."""
    grid = [np.full(n_members, 1.0 / n_members)]
    levels = (0, 1, 2) if n_members <= 3 else (0, 1)
    vectors = itertools.product(levels, repeat=n_members) if n_members <= 6 else [
        tuple(int(i == k) ^ flip for i in range(n_members)) for flip in (0, 1) for k in range(n_members)]
    for v in vectors:
        w = np.array(v, dtype=np.float64) / max(sum(v), 1)
        if sum(v) and not any(np.allclose(w, g) for g in grid):
            grid.append(w)
    return grid


def parse_weights(values: list[str] | None, n_members: int) -> tuple[str | None, list[float] | str | None]:
    """--weights as (the rule a weights file gives, or None; the weights: None for equal, a list or 'auto')."""
    if values == ["auto"]:
        return None, "auto"
    if values is not None and len(values) == 1 and not values[0].replace(".", "", 1).isdigit():
        return read_weights(values[0], n_members)
    try:
        weights = None if values is None else [float(v) for v in values]
    except ValueError:
        raise DataError(f"--weights takes numbers, 'auto' or one weights file, not {' '.join(values)}") from None
    if weights is not None and len(weights) != n_members:
        raise DataError(f"--weights has {len(weights)} values for {n_members} ensemble members")
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise DataError("--weights must be non-negative with a positive sum")
    return None, weights


def read_weights(path: str, n_members: int) -> tuple[str, list[float]]:
    """A weights.json written by --weights auto: (rule, weights), checked against the member count."""
    try:
        saved = json.loads(Path(path).read_text())
        rule, weights = saved["rule"], [float(w) for w in saved["weights"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"--weights {path}: not a weights file written by --weights auto ({error})") from None
    if rule not in COMBINE_RULES or len(weights) != n_members:
        raise DataError(f"--weights {path}: rule {rule!r} with {len(weights)} weights, for {n_members} members here "
                        f"(the file's members: {', '.join(saved.get('members', []))})")
    return rule, weights


def error_rates(records: Sequence[TrialRecord], texts: Sequence[str], phonemes: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(WER, PER) of decoded texts and phonemes against the records' labels."""
    wer = np.divide(*count_edits([normalize_text(r.sentence_label).split() for r in records], [normalize_text(t).split() for t in texts]))
    per = np.divide(*count_edits([r.true_phonemes for r in records], phonemes))
    return float(wer), float(per)


def pick_weights(members: Sequence[Sequence[TrialRecord]], decoder: WordBeamDecoder, pools: Sequence[SentencePool] | None,
                 rules: Sequence[str]) -> tuple[str, list[float], list[dict]]:
    """The rule and weights with the lowest WER on the labelled trials, and every try (its WER and
    PER: of the chosen sentences' phonemes per sentence, greedy per frame).

    Per sentence, each vector of weight_grid is tried on the pooled candidates. Per frame, each
    rule's weights are chosen by greedy PER over the same grid (a beam search per vector would be
    slow), and the rule then by the beam search's WER.
    """
    labelled = [i for i, r in enumerate(members[0]) if r.sentence_label is not None]
    if not labelled:
        raise DataError("--weights auto picks weights on labelled trials: use it on --split val")
    refs = [members[0][i] for i in labelled]
    o = decoder.options
    tries = []
    for w in weight_grid(len(members)) if "sequence" in rules else ():
        picks = [chosen(pools[i], select(pools[i], w, lm_weight=o.lm_weight, word_score=o.word_score)) for i in labelled]
        wer, per = error_rates(refs, [t for t, _ in picks], [p for _, p in picks])
        tries.append({"rule": "sequence", "weights": w.tolist(), "wer": wer, "per": per})
    for rule in [r for r in FRAME_RULES if r in rules]:
        per, w, combined = np.inf, None, None
        for weights in weight_grid(len(members)):
            records = combine_records([[m[i] for i in labelled] for m in members], rule, weights)
            greedy = [greedy_ctc_decode(blank_penalised_log_probs(r.logits, o.blank_penalty)[None], torch.tensor([len(r.logits)]))[0]
                      for r in records]
            if (rate := float(np.divide(*count_edits([r.true_phonemes for r in refs], greedy)))) < per:
                per, w, combined = rate, weights, records
        wer, _ = error_rates(refs, [decoder.decode(r.logits) for r in combined], [r.true_phonemes for r in refs])
        tries.append({"rule": rule, "weights": w.tolist(), "wer": wer, "per": per})
    best = min(tries, key=lambda t: t["wer"])  # the first of equals: per sentence, equal weights
    return best["rule"], best["weights"], tries


def combine_members(args: argparse.Namespace, members: list[list[TrialRecord]], names: list[str], decoder: WordBeamDecoder | None,
                    out: Path, speed: dict) -> tuple[list[TrialRecord], dict]:
    """The ensemble's records: per frame the combined posteriors, per sentence each trial's pool of
    candidates (fields['pool']); with --weights auto the rule and weights are first picked on the
    labelled trials and written to out/weights.json. Also returns the rule, weights and tries."""
    rule, weights, tries, pools = args.combine, args.weights, [], None
    if rule == "sequence" or weights == "auto" and "sequence" in args.rules:
        pools, speed["nbest"], speed["ctc_scores"] = propose_sentences(members, decoder, n_best=args.nbest,
                                                                       add_frame_ensemble=args.propose_frame_ensemble)
    if weights == "auto":
        start = time.perf_counter()
        rule, weights, tries = pick_weights(members, decoder, pools, args.rules)
        speed["pick_weights"] = len(members[0]) / max(time.perf_counter() - start, 1e-9)
        (out / "weights.json").write_text(json.dumps({"rule": rule, "weights": weights, "members": names, "tries": tries}, indent=2))
        print(f"--weights auto: {rule}, weights {' '.join(f'{w:.3g}' for w in weights)} (written to {out / 'weights.json'})", file=sys.stderr)
    weights = list(weights or [1.0] * len(members))
    start = time.perf_counter()
    if rule == "sequence":
        records = [dataclasses.replace(r, fields={"pool": pool}) for r, pool in zip(members[0], pools)]
    else:
        records = combine_records(members, rule, weights)
        if len(members) > 1:
            speed["combine"] = len(records) / max(time.perf_counter() - start, 1e-9)
    return records, {"rule": rule, "weights": [w / sum(weights) for w in weights], "members": names, "auto": tries}
