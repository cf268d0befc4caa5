"""Data parallelism on the CPU: two gloo processes through Accelerate start and stay in sync, and a
two-process run resumed from a periodic checkpoint ends equal to an uninterrupted one.

    python -m pytest tests/test_distributed.py -q

Runs `USE_TORCH_XLA=0 torchrun --standalone --nproc_per_node 2` on a tiny config in a subprocess.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import assert_same_training_state, tiny_config_dict

REPO_ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import rnn_trainer
from config import load_config

build_replica_model = rnn_trainer._build_replica_model


def recording_build(*args, **kwargs):  # the set-up as train() calls it; keeps the weights as built
    model = build_replica_model(*args, **kwargs)
    torch.save(model.state_dict(), os.path.join(sys.argv[2], f"initial{{os.environ['RANK']}}.pt"))
    return model


rnn_trainer._build_replica_model = recording_build
result = rnn_trainer.train(load_config(sys.argv[1]))
state = result["model"].state_dict()
torch.save({{"state": state, "step": result["step"]}}, os.path.join(sys.argv[2], f"rank{{os.environ['RANK']}}.pt"))
"""


def _torchrun(worker: Path, config_path: Path, out: Path) -> None:
    env = dict(os.environ, USE_TORCH_XLA="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(config_path), str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_gloo_processes_hold_identical_weights(data_dir: Path, tmp_path: Path):
    values = tiny_config_dict(str(data_dir), str(tmp_path / "run"))
    # Two micro-batches per step: DDP must skip its all-reduce in the first backward only.
    values.update(num_training_batches=2, batches_per_train_log=1, batches_per_val_step=2,
                  gradient_accumulation_steps=2)
    values["model"]["rnn_dropout"] = 0.1  # replicas draw different dropout masks; weights must still agree
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(values))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO_ROOT)))

    _torchrun(worker, config_path, tmp_path)

    # Equal before the first step as built, not only because DDP broadcasts rank 0's weights.
    initial0, initial1 = torch.load(tmp_path / "initial0.pt"), torch.load(tmp_path / "initial1.pt")
    assert initial0.keys() == initial1.keys()
    for name, value in initial0.items():
        assert torch.equal(value, initial1[name]), name
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["step"] == rank1["step"] == 2
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    log = (tmp_path / "run" / "train.log").read_text()
    assert "2 process(es)" in log  # really data parallel, and only the main process wrote the log
    assert log.count("step 2/2") == 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    for name, value in checkpoint["model_state_dict"].items():
        assert torch.equal(value, rank0["state"][name]), name


def test_two_replicas_resumed_from_a_periodic_checkpoint_end_equal_to_an_uninterrupted_run(
    data_dir: Path, tmp_path: Path
):
    """Each replica draws its own dropout masks and noise: every replica's random states must come
    back on resume, not only the main process's."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO_ROOT)))

    def config(run: str) -> Path:
        values = tiny_config_dict(str(data_dir), str(tmp_path / run))
        values.update(num_training_batches=4, batches_per_train_log=1, batches_per_val_step=4,
                      checkpoint_every_steps=2, resume="auto")
        values["model"]["rnn_dropout"] = 0.1
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    _torchrun(worker, config("straight"), tmp_path)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")  # as a preemption at step 2 leaves it
    for name in ("last_checkpoint.pt", "best_checkpoint.pt"):
        (tmp_path / "resumed" / "checkpoint" / name).unlink()
    periodic = torch.load(tmp_path / "resumed" / "checkpoint" / "step_00000002.pt", weights_only=False)
    assert len(periodic["rng_states"]) == 2  # one entry per replica
    _torchrun(worker, config("resumed"), tmp_path)

    assert "resumed" in (tmp_path / "resumed" / "train.log").read_text()
    a = torch.load(tmp_path / "straight" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    assert a["step"] == 4
    assert_same_training_state(a, b)


SIGNALLED_WORKER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import rnn_trainer, train_model

real_step, calls = rnn_trainer.train_step, []


def step_then_signal(**kwargs):  # only rank 1 is signalled, after its step {k}
    out = real_step(**kwargs)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == {k}:
        os.kill(os.getpid(), signal.SIGTERM)
    return out


rnn_trainer.train_step = step_then_signal
try:
    train_model.main(["--config_path", sys.argv[1], "--resume", "auto"])
except SystemExit as stop:
    open(os.path.join(sys.argv[2], f"exit{{os.environ['RANK']}}"), "w").write(str(stop.code))
    raise
"""


def test_a_signal_to_one_process_stops_both_after_the_same_step_and_resume_ends_equal(data_dir: Path, tmp_path: Path):
    """The stop is agreed one step behind (an asynchronous gloo vote, no wait on the step in flight):
    a SIGTERM to rank 1 after step 2 stops both processes after step 3, with its checkpoint."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO_ROOT)))

    def config(run: str) -> Path:
        values = tiny_config_dict(str(data_dir), str(tmp_path / run))
        values.update(num_training_batches=5, batches_per_train_log=1, batches_per_val_step=5, resume="auto")
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    _torchrun(worker, config("straight"), tmp_path)
    signalled = tmp_path / "signalled.py"
    signalled.write_text(SIGNALLED_WORKER.format(repo=str(REPO_ROOT), k=2))
    env = dict(os.environ, USE_TORCH_XLA="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(signalled), str(config("run")), str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert [(tmp_path / f"exit{rank}").read_text() for rank in (0, 1)] == ["143", "143"], proc.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("SIGTERM: saved checkpoint/last_checkpoint.pt at step 3, stopping") == 1, log
    assert torch.load(tmp_path / "run" / "checkpoint" / "last_checkpoint.pt", weights_only=False)["step"] == 3

    _torchrun(worker, config("run"), tmp_path)  # the same command, rerun: continues at step 3
    a = torch.load(tmp_path / "straight" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "run" / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 5
    assert_same_training_state(a, b)
