"""Command-line entry point of the trainer (rnn_trainer.train).

    python train_model.py --config_path rnn_args.yaml [--set dataset.batch_size=8 ...] [--resume RUN_DIR]
    accelerate launch --config_file accelerate_config_tpu.yaml train_model.py --config_path rnn_args.yaml

With use_tpu and num_tpu_cores > 1 on a host of several XLA devices the process spans them all as
one SPMD program (spmd.py); num_tpu_cores must then equal their number (PJRT_DEVICE=CPU:
CPU_NUM_DEVICES) or be 1 (one device).

--resume RUN_DIR continues RUN_DIR from its newest checkpoint (last or periodic); without
--config_path it reads RUN_DIR/config.yaml (so `--set num_training_batches=...` can extend a
finished run). `--resume auto` (or `resume: auto` in the config) continues the config's
output_dir when it holds a checkpoint and starts fresh otherwise: rerun the same command after a
preemption. A fresh run refuses an output_dir that already holds a run, and a resumed one must be
the same run (model shape, seed). output_dir may be a bucket or any fsspec URL (gs://bucket/run
with `pip install -e ".[gcs]"`). SIGTERM / SIGINT save checkpoint/last_checkpoint.pt after the step
in flight, say on stderr how to continue, and exit with status 143 / 130. A bad config, data
directory, checkpoint or run directory ends the run with one line on stderr and exit status 2.
"""

import argparse
import os
import sys
from typing import NoReturn

import spmd
import storage
from config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config_path", default=None, help="yaml config (default rnn_args.yaml, or RUN_DIR/config.yaml with --resume)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override, repeatable"
    )
    parser.add_argument("--resume", default=None, metavar="RUN_DIR|auto",
                        help="continue this run directory; auto: the config's output_dir if it holds a checkpoint")
    return parser.parse_args(argv)


def _fail(error: Exception) -> NoReturn:
    """One line on stderr, then exit status 2. SystemExit rather than a return value: on TPU
    `accelerate launch` calls main() in each replica through torch_xla's spawn, which ignores what
    main() returns but passes a replica's SystemExit on to the launching process."""
    print(f"train_model.py: {error}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Load the config, then train. `accelerate launch` calls main() with no arguments."""
    args = parse_args(argv)
    config_path = args.config_path
    if config_path is None:
        resuming_a_dir = args.resume not in (None, "auto")
        config_path = storage.join(args.resume, "config.yaml") if resuming_a_dir else "rnn_args.yaml"
    try:
        cfg = load_config(config_path, args.set)
    except (ConfigError, storage.StorageError) as error:
        _fail(error)
    if not cfg.use_tpu:
        # Must precede the first `import accelerate`, which would otherwise import torch_xla and
        # pick the XLA backend (and torch_xla swaps nn.GRU for its scan version process-wide).
        os.environ.setdefault("USE_TORCH_XLA", "0")
    elif cfg.num_tpu_cores > 1 and "PJRT_LOCAL_PROCESS_RANK" not in os.environ and spmd.host_device_count() > 1:
        # One process for the host (accelerate_config_tpu.yaml starts one): its devices run as one
        # SPMD program (spmd.py), as under launch_tpu_training.py. Not inside a torch_xla.launch
        # replica, which holds one device of its own; a one-device host just runs on it.
        error = spmd.device_count_error(cfg.num_tpu_cores)
        if error:
            _fail(ConfigError(f"num_tpu_cores: {error}"))
        spmd.enable()
    import rnn_trainer
    from dataset import DataError
    from rnn_model import CheckpointError

    try:
        rnn_trainer.train(cfg, resume_dir=args.resume)
    except (DataError, ConfigError, CheckpointError, storage.StorageError, FileNotFoundError) as error:
        _fail(error)
    except rnn_trainer.TrainingInterrupted as stop:
        from accelerate import PartialState

        if PartialState().is_main_process:
            run_dir = args.resume if args.resume not in (None, "auto") else cfg.output_dir
            print(f"train_model.py: {stop}, saved in {run_dir}: continue with --resume {run_dir}, "
                  "or rerun the same command with --resume auto", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None  # 143 for SIGTERM, 130 for SIGINT, as schedulers expect


if __name__ == "__main__":
    main()
