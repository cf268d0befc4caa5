#!/usr/bin/env bash
# The demo, from nothing: set up .venv, write synthetic data in the Dryad layout, train the
# demo config on CPU, evaluate the best checkpoint (PER, WER with a word n-gram LM).
# Run it again after an interruption (Ctrl-C) and training continues where it stopped.
# Usage: bash run_demo.sh
set -euo pipefail
cd "$(dirname "$0")"
bash setup_env.sh "plots"
# The demo runs on CPU; keep accelerate from picking torch_xla if it is installed.
export USE_TORCH_XLA=0
.venv/bin/python make_synthetic_data.py --out data/synthetic
.venv/bin/python train_model.py --config_path rnn_args_demo.yaml --resume auto
.venv/bin/python evaluate_model.py --model_path trained_models/demo --data_dir data/synthetic \
    --split val --out trained_models/demo/eval_val
