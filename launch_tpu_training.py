"""Start one training replica per TPU device through torch_xla's launcher (torch_xla.launch).

    python launch_tpu_training.py --config rnn_args.yaml --num_cores 8 [--set key=value ...] [--resume RUN_DIR]

--num_cores (default: the config's num_tpu_cores) is how many replicas this host starts. torch_xla
replicates over one device or over all of the host's TPU devices, so it is 1 or that number; any
other value stops the launch with one line naming the devices found and the possible values.
Without a TPU runtime it prints one line naming what is missing and exits with status 1; a bad
config, --num_cores, data directory or checkpoint (in any replica) ends the launch with one line
and status 2.
"""

import argparse
import glob
import importlib.util
import os
import signal
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


def local_tpu_devices() -> int:
    """The TPU devices torch_xla.launch replicates over on this host (two per chip on v2 and v3,
    one on later chips), counted without starting the XLA runtime: the replicas open it."""
    from torch_xla._internal import tpu

    return tpu.num_available_devices()


def _replica(index: int, config_values: dict, resume_dir: str | None) -> None:
    """Body of each replica: torch_xla.launch passes the replica index first. The config comes
    resolved (overrides applied), so replicas do not read and check the file again."""
    from config import config_from_dict
    import rnn_trainer

    cfg = config_from_dict(config_values)
    cfg.use_tpu = True
    rnn_trainer.train(cfg, resume_dir=resume_dir)


def _forward_stop_signals() -> None:
    """SIGTERM / SIGINT to the launcher go on to every replica process, which saves after its step
    in flight and exits; the launcher then returns 143 / 130. Without this the launcher would die at
    once and leave the replicas running as orphans. With one replica (debug_single_process) the
    trainer runs in this process and sets its own handlers over these."""
    import multiprocessing

    def forward(signum: int, frame: object) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rnn_args.yaml", help="yaml config")
    parser.add_argument(
        "--num_cores", type=int, default=None,
        help="replicas on this host: 1 or all of its TPU devices (default: the config's num_tpu_cores)",
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
    if num_cores != 1:
        n_devices = local_tpu_devices()
        if num_cores != n_devices:
            possible = ", ".join(str(n) for n in sorted({1, n_devices}))
            print(f"launch_tpu_training.py: --num_cores {num_cores}: found {n_devices} TPU device(s) on this host; "
                  f"possible values: {possible}", file=sys.stderr)
            return 2
    os.environ["PJRT_DEVICE"] = "TPU"
    import torch_xla

    import rnn_trainer
    from dataset import DataError
    from rnn_model import CheckpointError

    _forward_stop_signals()
    try:
        # torch_xla.launch replicates over all local devices, or one in debug_single_process mode.
        # It ignores what _replica returns, but re-raises here an exception raised in a replica.
        torch_xla.launch(_replica, args=(config_to_dict(cfg), args.resume), debug_single_process=num_cores == 1)
    except (DataError, ConfigError, CheckpointError, StorageError, FileNotFoundError) as error:
        print(f"launch_tpu_training.py: {error}", file=sys.stderr)
        return 2
    except rnn_trainer.TrainingInterrupted as stop:
        return 128 + stop.signum  # every replica saved and left after the same step
    return 0


if __name__ == "__main__":
    sys.exit(main())
