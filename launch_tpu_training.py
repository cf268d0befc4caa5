"""Train on a TPU host: one process, one SPMD program over the host's devices (spmd.py).

    python launch_tpu_training.py --config rnn_args.yaml --num_cores 8 [--set key=value ...] [--resume RUN_DIR]
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python launch_tpu_training.py --config rnn_args.yaml --num_cores 2 ...

--num_cores (default: the config's num_tpu_cores) is how many devices the run spans: 1 (one
device, no sharding) or all of the host's devices, whose global batch is dataset.batch_size per
device, split along its rows over them; any other value stops the launch with one line naming the
devices found and the possible values. A step on N devices equals a one-device step accumulating
the same N replicas' batches. With PJRT_DEVICE=CPU the same program runs over CPU_NUM_DEVICES CPU
devices. Without a TPU runtime (PJRT_DEVICE TPU or unset) it prints one line naming what is
missing and exits with status 1; a bad config, --num_cores, data directory or checkpoint ends the
launch with one line and status 2. The trainer runs in this process: SIGTERM / SIGINT to it save
checkpoint/last_checkpoint.pt after the step in flight and exit 143 / 130.

On a pod slice every host runs the same command (`gcloud ... ssh --worker=all`), --num_cores
counting one host's devices: one SPMD program over all hosts' devices, the first host writing the
run, which must then live on storage every host reads (a gs:// bucket). A signal to any host's
process stops all of them after the same step (one step after the signal, TPU_SETUP_GUIDE.md).
"""

import argparse
import glob
import importlib.util
import os
import sys
from pathlib import Path

_GOOGLE_PCI_VENDOR_ID = "0x1ae0"


def _n_tpu_chips() -> int:
    """TPU chips attached through PCI (what torch_xla's runtime looks for), without importing it."""
    n_chips = 0
    for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor_path).read_text().strip() == _GOOGLE_PCI_VENDOR_ID:
                n_chips += 1
        except OSError:
            continue
    return n_chips


def missing_tpu_runtime() -> str | None:
    """One line naming what this machine lacks to run on TPU, or None when it has it all. With
    PJRT_DEVICE=CPU only torch_xla is needed: the same program runs over CPU_NUM_DEVICES CPU devices."""
    missing = []
    if importlib.util.find_spec("torch_xla") is None:
        missing.append("torch_xla is not installed")
    if os.environ.get("PJRT_DEVICE") == "CPU":
        return "launch_tpu_training.py: " + missing[0] if missing else None
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        missing.append("libtpu is not installed (pip install 'torch_xla[tpu]')")
    if _n_tpu_chips() == 0:
        missing.append("no TPU chip is attached to this machine")
    pjrt_device = os.environ.get("PJRT_DEVICE", "TPU")
    if pjrt_device != "TPU":
        missing.append(f"PJRT_DEVICE={pjrt_device} (needs TPU)")
    if not missing:
        return None
    return "launch_tpu_training.py: no TPU runtime: " + "; ".join(missing)


def _train(config_values: dict, resume_dir: str | None, *, n_devices: int) -> None:
    """The trainer in this process; over several devices as one SPMD program (spmd.py). The config
    comes resolved (overrides applied)."""
    import spmd
    from config import config_from_dict

    if n_devices > 1:
        spmd.enable()  # before the trainer creates its first XLA tensor
    import rnn_trainer

    cfg = config_from_dict(config_values)
    cfg.use_tpu = True
    rnn_trainer.train(cfg, resume_dir=resume_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args.yaml", help="yaml config")
    parser.add_argument(
        "--num_cores", type=int, default=None,
        help="devices of this host the run spans: 1 or all of them (default: the config's num_tpu_cores)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR|auto",
                        help="continue this run directory; auto: the config's output_dir if it holds a checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    missing = missing_tpu_runtime()
    if missing:
        print(missing, file=sys.stderr)
        return 1
    from config import ConfigError, config_to_dict, load_config
    from storage import StorageError

    try:
        cfg = load_config(args.config, args.set)
    except (ConfigError, StorageError) as error:
        print(f"launch_tpu_training.py: {error}", file=sys.stderr)
        return 2
    num_cores = cfg.num_tpu_cores if args.num_cores is None else args.num_cores
    import spmd

    error = spmd.device_count_error(num_cores)
    if error:
        print(f"launch_tpu_training.py: --num_cores {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("PJRT_DEVICE", "TPU")
    os.environ["USE_TORCH_XLA"] = "1"
    import rnn_trainer
    from dataset import DataError
    from rnn_model import CheckpointError

    try:
        _train(config_to_dict(cfg), args.resume, n_devices=num_cores)
    except (DataError, ConfigError, CheckpointError, StorageError, FileNotFoundError) as error:
        print(f"launch_tpu_training.py: {error}", file=sys.stderr)
        return 2
    except rnn_trainer.TrainingInterrupted as stop:
        return 128 + stop.signum  # the state was saved after the step in flight
    return 0


if __name__ == "__main__":
    sys.exit(main())
