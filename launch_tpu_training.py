"""Start one training replica per TPU device through torch_xla's launcher (torch_xla.launch).

    python launch_tpu_training.py --config rnn_args.yaml --num_cores 8 [--set key=value ...] [--resume RUN_DIR]

Without a TPU runtime it prints one line naming what is missing and exits with status 1; a bad
config, data directory or checkpoint in any replica ends the launch with one line and status 2.
torch_xla replicates over either one device or all of them, so --num_cores is 1 or the number
of local TPU devices.
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
    """One line naming what this machine lacks to run on TPU, or None when it has it all."""
    missing = []
    if importlib.util.find_spec("torch_xla") is None:
        missing.append("torch_xla is not installed")
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


def _replica(index: int, config_path: str, overrides: list[str], resume_dir: str | None) -> None:
    """Body of each replica: torch_xla.launch passes the replica index first."""
    from config import load_config
    import rnn_trainer

    cfg = load_config(config_path, overrides)
    cfg.use_tpu = True
    rnn_trainer.train(cfg, resume_dir=resume_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args.yaml", help="yaml config")
    parser.add_argument(
        "--num_cores", type=int, default=None, help="1 or all local TPU devices (default: num_tpu_cores)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run directory")
    args = parser.parse_args(argv)

    missing = missing_tpu_runtime()
    if missing:
        print(missing, file=sys.stderr)
        return 1
    from config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"launch_tpu_training.py: {error}", file=sys.stderr)
        return 2
    num_cores = args.num_cores or cfg.num_tpu_cores
    os.environ["PJRT_DEVICE"] = "TPU"
    import torch_xla

    from dataset import DataError
    from rnn_model import CheckpointError

    try:
        # torch_xla.launch replicates over all local devices, or one in debug_single_process mode.
        # It ignores what _replica returns, but re-raises here an exception raised in a replica.
        torch_xla.launch(_replica, args=(args.config, args.set, args.resume), debug_single_process=num_cores == 1)
    except (DataError, ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"launch_tpu_training.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
