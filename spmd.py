"""The host's XLA devices as one SPMD program: a device mesh, and the batch split along it.

torch_xla's SPMD mode (GSPMD) runs one process per host. The trainer traces its step once, for
the whole host; each micro-batch holds one replica's batch per device, stacked along rows, and is
split along its rows over a one-axis mesh of the devices, so device r computes on replica r's
batch. The weights are replicated; the partitioner sums the gradients over devices inside the
step's graph, so nothing in Python all-reduces them (Accelerate sees one process and its XLA
all-reduces are no-ops, xm.all_reduce with world_size 1). With `shard_optimizer_state` the AdamW
moments are split over the devices (shard_optimizer_state), each device holding 1/N of them.

On a pod slice every host runs the same command: the mesh spans all hosts' devices, each host's
loader holds the batches of its own devices' replicas (rows host_index x local devices onward) and
hands them over as its part of the global batch (MpDeviceLoader's minibatch input), and the hosts
form a gloo group (`enable`) over which the trainer agrees on stopping and waits for the main
host's checkpoint. The AdamW moments then stay replicated, so that the main host holds all of the
state it writes.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 python launch_tpu_training.py --num_cores 2 ...  # the same program on 2 CPU devices

Used by launch_tpu_training.py and train_model.py (enable) and rnn_trainer.py (the replica count,
the loader that feeds the devices, the optimizer state's placement); torch_xla is imported only inside the functions, so CPU runs
never load it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from config import ConfigError

DATA_AXIS = "data"  # the mesh's one axis: devices along which the batch's rows are split


def host_device_count() -> int:
    """The XLA devices of this host, counted without starting the runtime: CPU_NUM_DEVICES on
    PJRT_DEVICE=CPU, the TPU devices (two per chip on v2 and v3, one on later chips) on TPU or when
    PJRT_DEVICE is unset, one otherwise."""
    pjrt_device = os.environ.get("PJRT_DEVICE", "TPU")
    if pjrt_device == "CPU":
        return int(os.environ.get("CPU_NUM_DEVICES", "1"))
    if pjrt_device != "TPU":
        return 1
    from torch_xla._internal import tpu

    return tpu.num_available_devices() if tpu.num_available_chips() else 0


def device_count_error(num_cores: int) -> str | None:
    """None when a run may span `num_cores` devices of this host (1, or all of them), else a line
    naming the devices found and the possible values."""
    if num_cores == 1:
        return None
    n_devices = host_device_count()
    if num_cores == n_devices:
        return None
    possible = ", ".join(str(n) for n in sorted({1, n_devices}))
    return (f"{num_cores} devices: found {n_devices} {os.environ.get('PJRT_DEVICE', 'TPU')} device(s) on this host; "
            f"possible values: {possible}")


def enable() -> None:
    """Switch torch_xla to SPMD mode; before the first XLA tensor exists (before the Accelerator).

    On a pod slice (several hosts, each running the same command) this also joins the hosts in a
    torch.distributed gloo group through torch_xla's `xla://` rendezvous (world: the hosts, rank:
    the host's process index, the store on the host running process 0): the trainer agrees on
    stopping and waits for the main host's checkpoint over it, on the hosts' CPUs.
    """
    import torch_xla.runtime as xr

    if not xr.is_spmd():  # a second use_spmd would replicate the tensors already placed
        xr.use_spmd()
    if xr.process_count() > 1 and not torch.distributed.is_initialized():
        import torch_xla.distributed.xla_backend  # noqa: F401  registers the xla:// rendezvous

        torch.distributed.init_process_group("gloo", init_method="xla://")


def is_enabled() -> bool:
    """True when this process runs torch_xla in SPMD mode (enable() was called)."""
    import sys

    if "torch_xla" not in sys.modules:
        return False
    import torch_xla.runtime as xr

    return xr.is_spmd()


def n_devices() -> int:
    """Devices the program spans: every device of every host (the mesh's size)."""
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count()


@functools.cache
def mesh() -> Any:
    """The one-axis mesh over all devices, in device-id order."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    n = n_devices()
    return xs.Mesh(np.arange(n), (n,), (DATA_AXIS,))


def host_count() -> int:
    """Hosts running the program (processes, one per host), 1 outside SPMD."""
    if not is_enabled():
        return 1
    import torch_xla.runtime as xr

    return xr.process_count()


def host_index() -> int:
    """This host's place among the program's hosts (its process index), 0 outside SPMD."""
    if not is_enabled():
        return 0
    import torch_xla.runtime as xr

    return xr.process_index()


def check_hosts_start_alike(start_step: int, *, output_dir: str) -> None:
    """ConfigError unless every host of a pod slice starts at the same step: a host that cannot read
    the checkpoint the others resume from (output_dir on one host's own disk) would start afresh."""
    if host_count() == 1:
        return
    steps: list[Any] = [None] * host_count()
    torch.distributed.all_gather_object(steps, start_step)
    if len(set(steps)) > 1:
        raise ConfigError(f"{output_dir}: the hosts would start at steps {steps}; on a pod slice output_dir "
                          "must be storage every host reads (e.g. a gs:// bucket)")


def replicas_of_this_process() -> int:
    """The replicas whose batches this process loads: under SPMD one per device of this host (the
    host's rows of the global batch), else 1."""
    if not is_enabled():
        return 1
    import torch_xla.runtime as xr

    return xr.addressable_runtime_device_count()


# MpDeviceLoader's queues, in loader items (a training item is one step's micro-batches): the host
# queue holds items read ahead, the device queue items already sent; one more item is in transfer
# and one in use. torch_xla's defaults (16 and 8) would keep up to 17 steps of input in each
# chip's memory; TPU_MODEL_SUMMARY.md counts these bytes.
LOADER_PREFETCH_ITEMS = 4
DEVICE_PREFETCH_ITEMS = 1


def device_loader(loader: Any, device: torch.device, *, shard_rows: bool = False) -> Any:
    """On XLA, `loader` behind a background thread that moves its batches to the device ahead of
    use (MpDeviceLoader); with `shard_rows` each tensor goes out split along its rows over the
    mesh, each device receiving its own rows only. Elsewhere the loader itself."""
    if device.type != "xla":
        return loader
    import torch_xla.distributed.parallel_loader as pl

    return pl.MpDeviceLoader(loader, device, loader_prefetch_size=LOADER_PREFETCH_ITEMS,
                             device_prefetch_size=DEVICE_PREFETCH_ITEMS,
                             input_sharding=BatchSharding() if shard_rows else None)


class BatchSharding:
    """input_sharding for torch_xla's MpDeviceLoader: every tensor of a batch split along dim 0 over
    the mesh, whatever its rank (xs.ShardingSpec applies to one rank only; the loader calls
    xla_spec(t) per tensor and reads minibatch, torch_xla.core.xla_model.send_cpu_data_to_device)."""

    def __init__(self) -> None:
        self._specs: dict[int, Any] = {}
        # On a pod slice each host's loader holds only its own devices' rows of the global batch.
        self.minibatch = host_count() > 1

    def xla_spec(self, tensor: torch.Tensor) -> Any:
        import torch_xla.distributed.spmd as xs

        rank = tensor.dim()
        if rank not in self._specs:
            self._specs[rank] = xs.ShardingSpec(mesh(), (DATA_AXIS,) + (None,) * (rank - 1), minibatch=self.minibatch)
        return self._specs[rank].xla_spec(tensor)


def shard_dim(shape: torch.Size | tuple[int, ...], n: int) -> int | None:
    """The first dimension of `shape` that `n` devices split evenly, or None (then replicated)."""
    return next((dim for dim, size in enumerate(shape) if size % n == 0), None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Split each parameter's AdamW moments (every state tensor shaped like its parameter) over the
    mesh along `shard_dim`; a moment with no such dimension and the step counts stay replicated.
    Returns the bytes each device no longer holds.

    Creates the state first (DayAdamW.init_state), so that it is annotated before the first
    traced step; call again after loading a state dict, whose tensors arrive replicated. The
    weights are annotated as replicated: unannotated, an in-place update computed from sharded
    moments leaves the step's graph with the moments' sharding (measured on torch_xla 2.9), and
    the next step would gather them and compile once more. The partitioner computes each update
    from the moments' shards and gathers what the weights need, within the step's graph.
    """
    import torch_xla.distributed.spmd as xs

    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
    if hasattr(inner, "init_state"):
        inner.init_state()
    if not getattr(inner, "_state_dict_from_shards", False):
        inner.register_state_dict_post_hook(_state_dict_from_shards)
        inner._state_dict_from_shards = True
    n = n_devices()
    saved = 0
    for group in inner.param_groups:
        for param in group["params"]:
            if param.dim():
                xs.mark_sharding(param, mesh(), (None,) * param.dim())  # replicated
            for value in inner.state.get(param, {}).values():
                dim = shard_dim(value.shape, n) if torch.is_tensor(value) and value.shape == param.shape else None
                if dim is None:
                    continue
                xs.mark_sharding(value, mesh(), tuple(DATA_AXIS if d == dim else None for d in range(value.dim())))
                saved += value.numel() * value.element_size() * (n - 1) // n
    return saved


def _is_split(value: Any) -> bool:
    """True for an XLA tensor split over devices (tiled), not replicated."""
    import torch_xla
    import torch_xla.distributed.spmd as xs

    if not (torch.is_tensor(value) and value.device.type == "xla"):
        return False
    return torch_xla._XLAC._get_xla_sharding_type(value) == xs.ShardingType.TILED


def _state_dict_from_shards(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state_dict post-hook: each split tensor of the state as a host tensor assembled from
    its devices' shards. `.cpu()` of a split tensor would compile and run, at every checkpoint,
    one program per tensor that gathers it whole on every device; the shards' transfers compile
    nothing. The state's own dicts are the optimizer's live ones, so they are copied, not changed."""
    import torch_xla

    state = state_dict["state"]
    split = [value for entry in state.values() for value in entry.values() if _is_split(value)]
    if not split:
        return state_dict
    torch_xla._XLAC._xla_sync_multi(split, [], wait=True)  # the shards exist once pending updates ran
    host = {}
    for value in split:
        whole = torch.empty(value.shape, dtype=value.dtype)
        shards = torch_xla._XLAC._get_local_shards([value])[0]  # [(host tensor, device)]
        places = torch_xla._XLAC._get_local_shard_replica_and_indices([value])[0]  # [(replica, slices)]
        for (shard, _), (_, index) in zip(shards, places):
            whole[tuple(index)] = shard
        host[id(value)] = whole
    state_dict["state"] = {key: {name: host.get(id(value), value) for name, value in entry.items()}
                           for key, entry in state.items()}
    return state_dict
