"""Decoding stages side by side on one dataset: each single model (beam search, and its own n-best
rescored by its CTC likelihood), their ensemble per frame (mean of probabilities and of
log-probabilities) and per sentence (every member's n-best pooled and scored by every member),
weights picked by --weights auto, the ensemble with test-time augmentation, and n-best lists
rescored by a tiny causal LM; PER, WER and trials per second of each stage.

    .venv/bin/python benchmarks/decoding.py --data_dir data/synthetic \
        --models trained_models/demo_seed1 trained_models/demo_seed2 trained_models/demo_seed3 \
        --out runs/decoding_bench [--tta 4 --nbest 10 --lexicon_words train]

Every stage is a call of evaluate_model.run with fixed decoding weights (no grid search, so no
weight is tuned on the trials it is scored on), except the --weights auto row, whose member
weights and rule are picked on the very trials it scores (an optimistic figure, marked so). PER is
greedy for per-frame stages and that of the chosen sentences' phonemes for per-sentence ones. The single models' logits files are reused by
the ensembles, as a researcher adding models would. The tiny LM is a 2-layer GPT-2 trained here
for --llm_steps steps on the dataset's training sentences (`train_tiny_llm`, also the tests'
fixture); a real run points --llm at OPT-6.7B or a 7B model instead.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate_model  # noqa: E402
from dataset import discover_sessions, read_labels  # noqa: E402


def train_tiny_llm(sentences: Sequence[str], path: Path, n_steps: int = 100, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 over the sentences' words (a word-level tokenizer built with the
    `tokenizers` library, nothing downloaded), trained n_steps and saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted({w for s in sentences for w in s.split()})
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<unk>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    rows = [[0, *tokenizer(s, add_special_tokens=False)["input_ids"], 0] for s in sentences]
    width = max(map(len, rows))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=max(32, width), n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])  # -100: padding is not predicted
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(n_steps):
        batch = torch.from_numpy(np.random.default_rng([seed, step]).choice(len(rows), 32))
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def stage(name: str, argv: list[str]) -> dict:
    start = time.perf_counter()
    metrics = evaluate_model.run(evaluate_model.build_parser().parse_args(argv))
    words = metrics["words"]
    row = {
        "stage": name, "per": metrics["phonemes"]["per"], "per_of": metrics["phonemes"]["source"],
        "wer": words.get("wer"), "wer_rescored": words.get("wer_rescored"),
        "n_trials": metrics["n_trials"], "speed_trials_per_s": metrics["speed_trials_per_s"],
        "wall_s": time.perf_counter() - start,
    }
    if metrics.get("ensemble"):
        row["combined"] = {k: metrics["ensemble"][k] for k in ("rule", "weights")}
    print(f"[{name}] PER {row['per']:.4f} WER {row['wer']:.4f}" + (f" rescored {row['wer_rescored']:.4f}" if row["wer_rescored"] is not None else ""),
          file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--models", nargs="+", required=True, help="run directories, one per ensemble member")
    p.add_argument("--out", default="runs/decoding_bench")
    p.add_argument("--tta", type=int, default=4)
    p.add_argument("--nbest", type=int, default=10)
    p.add_argument("--llm_weight", type=float, default=0.5)
    p.add_argument("--llm_steps", type=int, default=300)
    p.add_argument("--llm", help="a causal LM directory to rescore with instead of training the tiny one")
    p.add_argument("--lexicon_words", choices=("all", "train"), default="train")
    p.add_argument("--beam_size", type=int, default=100)
    args = p.parse_args()
    out = Path(args.out)
    common = ["--data_dir", args.data_dir, "--split", "val", "--lexicon_words", args.lexicon_words, "--beam_size", str(args.beam_size)]
    rows = []
    for k, model in enumerate(args.models):
        rows.append(stage(f"single {Path(model).name}", ["--model_path", model, *common, "--out", str(out / f"single_{k}")]))
    cached = [str(out / f"single_{k}" / "logits.npz") for k in range(len(args.models))]
    nbest = ["--nbest", str(args.nbest)]
    for k, path in enumerate(cached):
        rows.append(stage(f"single {Path(args.models[k]).name}, own n-best CTC-scored", ["--logits_in", path, "--combine", "sequence",
                                                                                        *nbest, *common, "--out", str(out / f"single_seq_{k}")]))
    for rule in ("prob", "logprob", "sequence"):
        rows.append(stage(f"ensemble of {len(cached)} ({rule})", ["--logits_in", *cached, "--combine", rule, *nbest, *common,
                                                                  "--out", str(out / f"ensemble_{rule}")]))
    rows.append(stage(f"ensemble of {len(cached)} (sequence, + frame average's n-best)",
                      ["--logits_in", *cached, "--combine", "sequence", "--propose_frame_ensemble", *nbest, *common,
                       "--out", str(out / "ensemble_sequence_frame")]))
    rows.append(stage(f"ensemble of {len(cached)} (--weights auto, picked on these trials)",
                      ["--logits_in", *cached, "--weights", "auto", *nbest, *common, "--out", str(out / "ensemble_auto")]))
    rows.append(stage(f"ensemble (prob) + TTA x{args.tta}", ["--model_path", *args.models, "--tta", str(args.tta), *common,
                                                            "--out", str(out / "ensemble_tta")]))
    llm = args.llm
    if llm is None:
        train_sentences, _ = read_labels(args.data_dir, discover_sessions(args.data_dir), "train")
        start = time.perf_counter()
        llm = train_tiny_llm(train_sentences, out / "tiny_llm", n_steps=args.llm_steps)
        print(f"tiny LM: {len(train_sentences)} training sentences, {args.llm_steps} steps, {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    tta_logits = [str(out / "ensemble_tta" / f"logits_{k}.npz") for k in range(len(args.models))]
    rows.append(stage(f"ensemble (prob) + TTA x{args.tta} + {args.nbest}-best LM rescoring",
                      ["--logits_in", *tta_logits, *common, "--nbest", str(args.nbest), "--llm", str(llm),
                       "--llm_weight", str(args.llm_weight), "--out", str(out / "ensemble_tta_llm")]))
    rows.append(stage(f"ensemble of {len(cached)} (sequence) + tiny-LM rescoring",
                      ["--logits_in", *cached, "--combine", "sequence", *nbest, *common, "--llm", str(llm),
                       "--llm_weight", str(args.llm_weight), "--out", str(out / "ensemble_sequence_llm")]))
    (out / "decoding_bench.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'stage':<64} {'PER':>7} {'WER':>7} {'rescored':>8}  trials/s")
    for r in rows:
        speed = ", ".join(f"{k} {v:.1f}" for k, v in r["speed_trials_per_s"].items())
        rescored = f"{r['wer_rescored']:.4f}" if r["wer_rescored"] is not None else "-"
        print(f"{r['stage']:<64} {r['per']:>7.4f} {r['wer']:>7.4f} {rescored:>8}  {speed}")


if __name__ == "__main__":
    main()
