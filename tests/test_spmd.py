"""One SPMD program per host (spmd.py): N devices in one process, the global batch split along its
rows, each device holding one replica's batch.

    python -m pytest tests/test_spmd.py -q

The XLA tests run launch_tpu_training.py's main() in PJRT_DEVICE=CPU subprocesses with
CPU_NUM_DEVICES=2 (run_xla_script): the program a TPU host runs, on two CPU devices.
"""

import json
import re

import pytest
import torch

from conftest import QUIET_TRANSFORMS, make_config, requires_xla, run_xla_script
from dataset import build_dataloaders


def test_a_host_loader_stacks_the_replicas_batches_along_rows(data_dir, tmp_path):
    """Device r's rows are exactly what replica r's own loader yields, for every micro-batch."""
    cfg = make_config(data_dir, tmp_path, "dataset.static_shapes=true", "dataset.time_buckets=[256,512]",
                      "dataset.num_dataloader_workers=0")
    host, _, _ = build_dataloaders(cfg, n_steps=3, start_step=1, batches_per_step=2, n_replicas=2, n_shards=2)
    replicas = [build_dataloaders(cfg, n_steps=3, start_step=1, batches_per_step=2, n_replicas=2, rank=r)[0]
                for r in range(2)]
    n_rows = cfg.dataset.batch_size
    n_steps = 0
    for stacked, *own in zip(host, *replicas):
        n_steps += 1
        assert len(stacked) == 2  # micro-batches
        for micro, batch in enumerate(stacked):
            for rank, replica_step in enumerate(own):
                for key, value in replica_step[micro].items():
                    rows = batch[key][rank * n_rows : (rank + 1) * n_rows]
                    if key == "input_features":  # padded to the step's longest micro-batch of any replica
                        rows = rows[:, : value.shape[1]]
                        assert not batch[key][rank * n_rows : (rank + 1) * n_rows, value.shape[1]:].any()
                    assert torch.equal(rows, value), (micro, rank, key)
    assert n_steps == 2


def test_the_hosts_of_a_pod_slice_load_their_rows_of_one_global_batch(data_dir, tmp_path):
    """Two hosts of 2 devices: host h's rows are rows 2h.. of what one host of 4 devices loads,
    padded to the same length (the step's longest bucket over both hosts), and each host's val
    loader yields every val batch (replicated inputs are the same on every host)."""
    cfg = make_config(data_dir, tmp_path, "dataset.static_shapes=true", "dataset.time_buckets=[128,192,256,384,512]",
                      "dataset.num_dataloader_workers=0", "dataset.batch_size=1")
    kwargs = {"n_steps": 6, "batches_per_step": 2, "n_replicas": 4}
    whole, val_whole, _ = build_dataloaders(cfg, n_shards=4, **kwargs)
    hosts = [build_dataloaders(cfg, rank=2 * h, n_shards=2, n_hosts=2, **kwargs) for h in range(2)]
    alone = build_dataloaders(cfg, rank=2, n_shards=2, **kwargs)[0]  # host 1 padding for itself only
    n_rows = cfg.dataset.batch_size
    padded_for_the_other_host = 0
    for step, (global_step, step0, step1, own) in enumerate(zip(whole, hosts[0][0], hosts[1][0], alone)):
        for micro, batch in enumerate(global_step):
            for h, host_step in enumerate((step0, step1)):
                for key, value in host_step[micro].items():
                    assert torch.equal(value, batch[key][2 * h * n_rows : 2 * (h + 1) * n_rows]), (step, micro, h, key)
        padded_for_the_other_host += step1[0]["input_features"].shape[1] > own[0]["input_features"].shape[1]
    assert padded_for_the_other_host > 0  # the data exercise it: host 1 alone would have padded less
    val_batches = [batch["trial_nums"].tolist() for batch in val_whole]
    for _, val_loader, _ in hosts:
        assert [batch["trial_nums"].tolist() for batch in val_loader] == val_batches


def test_a_host_loader_needs_static_shapes(data_dir, tmp_path):
    from config import ConfigError

    cfg = make_config(data_dir, tmp_path, "dataset.static_shapes=false")
    with pytest.raises(ConfigError, match="static_shapes"):
        build_dataloaders(cfg, n_steps=2, batches_per_step=1, n_replicas=2, n_shards=2)


def test_a_stacked_batch_loss_is_the_mean_of_the_replicas_losses():
    """What data parallelism averages: each replica's masked mean, not one mean over all rows."""
    import rnn_trainer

    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])  # (B=4, T=3)
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [False, False, False]])
    replica_means = [rnn_trainer._masked_mean(values[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    stacked = rnn_trainer._masked_mean(values, mask, n_shards=2)
    torch.testing.assert_close(stacked, torch.stack(replica_means).mean())
    assert not torch.isclose(stacked, rnn_trainer._masked_mean(values, mask))  # unequal counts: not the same


# ----------------------------------------------------------------------------- on XLA's CPU backend

RUNS_CODE = """
import json, sys, tempfile, yaml
from pathlib import Path
sys.path.insert(0, "tests")
import torch, torch_xla
from accelerate.state import AcceleratorState
from conftest import tiny_config_dict
import launch_tpu_training, rnn_trainer

n_devices, shard, suffix, accumulation = {n_devices}, {shard}, {suffix!r}, {accumulation}
root = Path({root!r})
real_step, stepped = rnn_trainer.train_step, {{}}
def train_step(**kwargs):  # keeps the run's optimizer, to read its placement after the run
    stepped["optimizer"] = kwargs["optimizer"]
    return real_step(**kwargs)
rnn_trainer.train_step = train_step
for model_type in {models!r}:
    values = tiny_config_dict(str(root / "data"), str(root / f"{{model_type}}_{{n_devices}}{{suffix}}"))
    values["model"].update(type=model_type, input_dropout=0.0)
    values["dataset"].update(data_transforms={quiet!r}, static_shapes=True, time_buckets=[256, 512],
                             num_dataloader_workers=0)
    values.update(num_training_batches=4, batches_per_val_step=4, gradient_accumulation_steps=accumulation,
                  shard_optimizer_state=shard)
    path = root / f"{{model_type}}_{{n_devices}}{{suffix}}.yaml"
    path.write_text(yaml.safe_dump(values))
    assert launch_tpu_training.main(["--config", str(path), "--num_cores", str(n_devices)]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    if n_devices > 1:  # where each state tensor and weight lives after the 4 steps
        torch_xla._XLAC._xla_wait_device_ops([])
        placement = []
        inner = stepped["optimizer"].optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                placement.append({{"shape": list(p.shape), "weight": torch_xla._XLAC._get_xla_sharding_spec(p),
                                  **{{key: [torch_xla._XLAC._get_xla_sharding_spec(value),
                                           [list(t.shape) for t, _ in torch_xla._XLAC._get_local_shards([value])[0]]]
                                     for key, value in inner.state[p].items()}}}})
        (root / f"{{model_type}}_{{n_devices}}{{suffix}}.json").write_text(json.dumps(placement))
"""


def _run_dirs(root, *, n_devices: int, shard: bool = True, models=("baseline", "triple"), accumulation: int | None = None,
              suffix: str | None = None) -> None:
    """4 steps per model; by default 2 micro-batches a step in all, as accumulation or as devices."""
    suffix = ("" if shard else "_replicated") if suffix is None else suffix
    accumulation = 3 - n_devices if accumulation is None else accumulation
    run_xla_script(RUNS_CODE.format(n_devices=n_devices, shard=shard, suffix=suffix, models=models, root=str(root),
                                    quiet=QUIET_TRANSFORMS, accumulation=accumulation), n_devices=n_devices)


@pytest.fixture(scope="module")
def equal_runs(tmp_path_factory) -> dict:
    """The last checkpoints of 4 steps on 2 devices (AdamW moments sharded, the default) and on 1
    device accumulating 2, per model; the baseline's on 4 devices and on 1 device accumulating 4;
    the triple's on 2 devices with replicated moments too; and where each state tensor lived after
    the 2-device runs."""
    from make_synthetic_data import generate_dataset

    root = tmp_path_factory.mktemp("spmd")
    generate_dataset(str(root / "data"), n_sessions=3, n_train_trials=8, n_val_trials=4, n_test_trials=3, seed=0)
    for n_devices in (1, 2):
        _run_dirs(root, n_devices=n_devices)
    _run_dirs(root, n_devices=2, shard=False, models=("triple",))
    _run_dirs(root, n_devices=4, models=("baseline",), accumulation=1)
    _run_dirs(root, n_devices=1, models=("baseline",), accumulation=4, suffix="_accumulating_4")
    runs = {(model, n): torch.load(root / f"{model}_{n}" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
            for model in ("baseline", "triple") for n in (1, 2)}
    runs[("triple", "2_replicated")] = torch.load(root / "triple_2_replicated" / "checkpoint" / "last_checkpoint.pt",
                                                  weights_only=False)
    for key, name in ((4, "4"), ("1_accumulating_4", "1_accumulating_4")):
        runs[("baseline", key)] = torch.load(root / f"baseline_{name}" / "checkpoint" / "last_checkpoint.pt",
                                             weights_only=False)
    runs["placement"] = json.loads((root / "triple_2.json").read_text())
    runs["placement_replicated"] = json.loads((root / "triple_2_replicated.json").read_text())
    runs["log"] = (root / "triple_2" / "train.log").read_text()
    return runs


@requires_xla
@pytest.mark.parametrize("model_type, n_devices", [("baseline", 2), ("triple", 2), ("baseline", 4)])
def test_n_devices_step_as_one_device_accumulating_their_batches(equal_runs, model_type, n_devices):
    one = equal_runs[(model_type, 1 if n_devices == 2 else f"1_accumulating_{n_devices}")]
    many = equal_runs[(model_type, n_devices)]
    assert one["step"] == many["step"] == 4
    assert one["config"]["gradient_accumulation_steps"] == n_devices and many["config"]["gradient_accumulation_steps"] == 1
    for name, value in one["model_state_dict"].items():
        torch.testing.assert_close(many["model_state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    moments = 0
    for p, state in one["optimizer_state_dict"]["state"].items():  # DayAdamW's moments and step counts
        for key, value in state.items():
            torch.testing.assert_close(many["optimizer_state_dict"]["state"][p][key], value, rtol=1e-5, atol=1e-7)
            moments += key == "exp_avg" and bool(value.abs().sum() > 0)
    assert moments > 0  # the steps did move something
    assert one["scheduler_state_dict"] == many["scheduler_state_dict"]


@requires_xla
def test_sharded_optimizer_state_trains_as_the_replicated_one(equal_runs):
    """The triple with DayAdamW on 2 devices: AdamW moments split 2 ways or replicated, same weights."""
    sharded, replicated = equal_runs[("triple", 2)], equal_runs[("triple", "2_replicated")]
    assert sharded["config"]["shard_optimizer_state"] and not replicated["config"]["shard_optimizer_state"]
    for name, value in replicated["model_state_dict"].items():
        torch.testing.assert_close(sharded["model_state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for p, state in replicated["optimizer_state_dict"]["state"].items():  # written whole from the shards
        for key, value in state.items():
            torch.testing.assert_close(sharded["optimizer_state_dict"]["state"][p][key], value, rtol=1e-5, atol=1e-7)


@requires_xla
def test_sharded_moments_hold_half_of_each_moment_per_device_and_weights_stay_whole(equal_runs):
    sharded, replicated = equal_runs["placement"], equal_runs["placement_replicated"]
    assert any(len(entry["shape"]) == 3 for entry in sharded)  # the stacked day layers (n_days, D, D) among them
    for entry in sharded:
        shape = entry["shape"]
        assert entry["weight"] == "{replicated}", entry  # after 4 steps, weights whole on each device
        dim = next((d for d, size in enumerate(shape) if size % 2 == 0), None)  # (41,): none, kept whole
        half = [size // 2 if d == dim else size for d, size in enumerate(shape)]
        for key in ("exp_avg", "exp_avg_sq"):
            spec, shards = entry[key]
            assert shards == [half, half] and spec.startswith("{devices=" if dim is not None else "{replicated"), (key, entry)
        assert entry["step"][0] in ("", "{replicated}"), entry  # step counts: not split
    assert sum(entry["exp_avg"][0].startswith("{devices=") for entry in sharded) > len(sharded) // 2
    for entry in replicated:
        assert entry["exp_avg"][1] == [entry["shape"]] * 2, entry  # each device holds it whole
    assert "AdamW moments split over 2 devices" in equal_runs["log"]


REPORT_CODE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_dump_to={dump} --xla_dump_hlo_as_text"
sys.path.insert(0, "benchmarks")
import xla_report
xla_report.main({argv!r})
"""


@requires_xla
def test_a_two_device_run_is_one_graph_per_step_without_host_reads(tmp_path):
    argv = ["--devices", "2", "--steps", "6", "--log_every", "2", "--set", "model.n_units=16",
            "--set", "model.noise_hidden_size=16", "--set", "model.n_noise_layers=1", "--set", "model.n_clean_layers=1",
            "--set", "model.n_noisy_layers=1", "--set", "dataset.batch_size=2", "--set", "dataset.val_batch_size=4",
            "--set", "adversarial.warmup_steps=2", "--set", "gradient_accumulation_steps=2",
            "--set", "dataset.time_buckets=[256,384,512,768]"]
    out = run_xla_script(REPORT_CODE.format(dump=str(tmp_path), argv=argv), n_devices=2)
    report = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert report["devices"] == 2 and report["gradient_accumulation_steps"] == 2, report
    assert report["aten_fallbacks"] == {} and report["local_scalar_dense"] == 0, report
    assert report["graphs_per_step"] == [1] * 6, report
    # setup, one graph per training bucket, the first step's variant, one per validation bucket,
    # the random states' all_gather at the first checkpoint
    bound = 1 + len(report["train_buckets"]) + 1 + len(report["val_buckets"]) + 1
    assert 0 < report["n_compilations"] <= bound, report
    reads = report["host_reads"]
    assert reads["train_steps"] == 0 and reads["between_steps"] == 0, reads  # nothing waits on a step
    assert reads["logs"] > 0 and reads["validation"] > 0, reads  # counted where they happen
    # The partitioner splits the loops over time (GRU states, CTC alpha) too: each device runs them
    # on its own 2 rows of the 4, rather than repeating the recurrences on the whole batch.
    step_graphs = [p.read_text() for p in tmp_path.glob("*SyncTensorsGraph*after_optimizations.txt")
                   if " all-reduce(" in p.read_text()]  # the training steps (gradients summed over devices)
    carried_rows = {int(rows) for text in step_graphs  # a while's tuple: (counter, first carry, ...)
                    for rows in re.findall(r"= \(s64\[\], f32\[(\d+),[^\n]*\) while\(", text)}
    assert step_graphs and carried_rows == {2}, carried_rows
    # Nor is any (T', B, .) activation gathered over the devices (the GRUs' input projections and
    # weight gradients contract time and batch as einsums): what is gathered is parameter-sized.
    gathered = {shape for text in step_graphs for shape in re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} all-gather\(", text)}
    assert gathered and not [shape for shape in gathered if re.fullmatch(r"f32\[\d+,4,\d+\]", shape)], gathered


SIGTERM_CODE = """
import os, signal, sys, yaml
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from accelerate.state import AcceleratorState
from conftest import assert_same_training_state, tiny_config_dict
from make_synthetic_data import generate_dataset
import launch_tpu_training, rnn_trainer

root = Path({root!r})
generate_dataset(str(root / "data"), n_sessions=3, n_train_trials=8, n_val_trials=4, n_test_trials=3, seed=0)


def launch(name, *argv):
    values = tiny_config_dict(str(root / "data"), str(root / name))
    # Input dropout and white noise on: the resumed run must draw the same numbers on the devices.
    values.update(num_training_batches=4, batches_per_val_step=2, checkpoint_every_steps=2,
                  shard_optimizer_state=True)  # moments saved from their shards, loaded and split again
    values["dataset"].update(static_shapes=True, time_buckets=[256, 512])
    (root / f"{{name}}.yaml").write_text(yaml.safe_dump(values))
    status = launch_tpu_training.main(["--config", str(root / f"{{name}}.yaml"), "--num_cores", "2", *argv])
    AcceleratorState._reset_state(reset_partial_state=True)
    return status


assert launch("straight") == 0
real_step, calls = rnn_trainer.train_step, []
def step_then_signal(**kwargs):
    out = real_step(**kwargs)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's own process: it is the trainer
    return out
rnn_trainer.train_step = step_then_signal
print("STATUS", launch("run", "--resume", "auto"))
rnn_trainer.train_step = real_step
print("SAVED_AT", torch.load(root / "run/checkpoint/last_checkpoint.pt", weights_only=False)["step"])
assert launch("run", "--resume", "auto") == 0
assert_same_training_state(torch.load(root / "straight/checkpoint/last_checkpoint.pt", weights_only=False),
                           torch.load(root / "run/checkpoint/last_checkpoint.pt", weights_only=False))
print("EQUAL")
"""


@requires_xla
def test_sigterm_to_the_launcher_saves_the_step_and_auto_resume_ends_equal(tmp_path):
    out = run_xla_script(SIGTERM_CODE.format(root=str(tmp_path)), n_devices=2)
    assert "STATUS 143" in out and "SAVED_AT 3" in out, out[-2000:]
    assert out.strip().splitlines()[-1] == "EQUAL", out[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "SIGTERM: saved checkpoint/last_checkpoint.pt at step 3, stopping" in log
    assert "(DistributedType.XLA, 1 process(es) x 2 device(s))" in log  # one process for both devices


ACCELERATE_CODE = """
import os, subprocess, sys, yaml
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import tiny_config_dict  # sets USE_TORCH_XLA=0 for CPU tests: not for the launched process
from make_synthetic_data import generate_dataset

root = Path({root!r})
generate_dataset(str(root / "data"), n_sessions=3, n_train_trials=8, n_val_trials=4, n_test_trials=3, seed=0)
values = tiny_config_dict(str(root / "data"), str(root / "run"))
values.update(num_training_batches=2, batches_per_val_step=2, use_tpu=True, num_tpu_cores=2)
values["dataset"].update(static_shapes=True, time_buckets=[256, 512])
(root / "run.yaml").write_text(yaml.safe_dump(values))
command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config_tpu.yaml",
           "train_model.py", "--config_path", str(root / "run.yaml")]
proc = subprocess.run(command, capture_output=True, text=True,
                      env={{k: v for k, v in os.environ.items() if k != "USE_TORCH_XLA"}})
print(proc.stderr[-3000:])
print("STATUS", proc.returncode)
"""


@requires_xla
def test_accelerate_launch_with_the_shipped_config_runs_one_process_over_the_hosts_devices(tmp_path):
    out = run_xla_script(ACCELERATE_CODE.format(root=str(tmp_path)), n_devices=2)
    assert out.strip().splitlines()[-1] == "STATUS 0", out[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "(DistributedType.XLA, 1 process(es) x 2 device(s))" in log, log
    assert torch.load(tmp_path / "run" / "checkpoint" / "last_checkpoint.pt", weights_only=False)["step"] == 2


def test_a_checkpoint_at_a_url_is_resumed_memory_mapped(tmp_path):
    """Downloaded once to local disk and mapped, not held whole in host memory by torch.load."""
    import fsspec

    import checkpoints

    url = f"memory://{tmp_path.name}/run"
    fs = fsspec.filesystem("memory")
    with fs.open(f"{url}/checkpoint/{checkpoints.LAST_CHECKPOINT}", "wb") as handle:
        torch.save({"model_state_dict": {"w": torch.arange(1000.0)}, "step": 5}, handle)
    path, checkpoint = checkpoints.newest_checkpoint(url)
    assert path.endswith(checkpoints.LAST_CHECKPOINT) and checkpoint["step"] == 5
    weights = checkpoint["model_state_dict"]["w"]
    assert torch.equal(weights, torch.arange(1000.0))
    # Its pages come from a mapped local copy, already unlinked, not from host memory.
    maps = open("/proc/self/maps").read().splitlines()
    assert any(line.endswith(f"/{checkpoints.LAST_CHECKPOINT} (deleted)") for line in maps)
    fs.rm(url, recursive=True)
