"""Runs never mix in one output_dir: a fresh run refuses a used directory, `--resume auto` continues
only the same run, pruning removes only the run's own periodic checkpoints, and the demo's command
continues an interrupted run when it is run again.

    pytest tests/test_run_dir.py
"""

import json
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

import checkpoints
import rnn_trainer
import train_model
from conftest import REPO_ROOT, make_config, tiny_config_dict


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _write_config(data_dir: Path, run_dir: Path, path: Path, **top: object) -> Path:
    values = tiny_config_dict(str(data_dir), str(run_dir))
    values.update(top)
    path.write_text(yaml.safe_dump(values))
    return path


def _contents(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _main_fails(argv: list[str], capsys) -> str:
    """train_model.main(argv) exits with status 2 and one line on stderr; that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train_model.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_fresh_run_refuses_a_directory_that_holds_a_run_and_leaves_it_untouched(
    data_dir: Path, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"
    first = _write_config(data_dir, run_dir, tmp_path / "a.yaml", checkpoint_every_steps=1, keep_checkpoints=1)
    train_model.main(["--config_path", str(first)])
    before = _contents(run_dir)
    assert "config.yaml" in before and "checkpoint/last_checkpoint.pt" in before
    AcceleratorState._reset_state(reset_partial_state=True)

    second = _write_config(data_dir, run_dir, tmp_path / "b.yaml", seed=8)
    line = _main_fails(["--config_path", str(second)], capsys)
    assert line.startswith(f"train_model.py: {run_dir} already holds a run")
    assert f"--resume {run_dir}" in line and "--resume auto" in line and "output_dir" in line
    assert _contents(run_dir) == before  # byte for byte, nothing added

    only_a_log = tmp_path / "log_only"
    only_a_log.mkdir()
    (only_a_log / "train.log").write_text("a line of another run\n")
    line = _main_fails(["--config_path", str(second), "--set", f"output_dir={only_a_log}"], capsys)
    assert str(only_a_log) in line and "train.log" in line
    assert _contents(only_a_log) == {"train.log": b"a line of another run\n"}


def test_resume_auto_refuses_a_checkpoint_of_another_model_shape_or_seed(data_dir: Path, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    config = _write_config(data_dir, run_dir, tmp_path / "a.yaml", num_training_batches=2)
    train_model.main(["--config_path", str(config), "--resume", "auto"])
    before = _contents(run_dir)
    for override, key in [("model.n_units=32", "model.n_units 16 there, 32 here"), ("seed=8", "seed 7 there, 8 here")]:
        AcceleratorState._reset_state(reset_partial_state=True)
        line = _main_fails(["--config_path", str(config), "--resume", "auto", "--set", override], capsys)
        assert str(run_dir / "checkpoint" / "last_checkpoint.pt") in line and key in line, line
        assert _contents(run_dir) == before

    # The same run, extended: a longer schedule is the same run and continues from step 2.
    AcceleratorState._reset_state(reset_partial_state=True)
    train_model.main(["--config_path", str(config), "--resume", "auto", "--set", "num_training_batches=3"])
    assert torch.load(run_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)["step"] == 3
    assert "resumed" in (run_dir / "train.log").read_text()


def test_pruning_keeps_periodic_checkpoints_the_run_did_not_write(data_dir: Path, tmp_path: Path):
    """Another run's periodic checkpoints in the directory (copied in by hand): keep_checkpoints
    counts and removes only this run's own."""
    foreign = tmp_path / "foreign"
    rnn_trainer.train(make_config(data_dir, foreign, "num_training_batches=5", "checkpoint_every_steps=2",
                                  "keep_checkpoints=5"))
    AcceleratorState._reset_state(reset_partial_state=True)
    run_dir = tmp_path / "run"
    cfg = make_config(data_dir, run_dir, "num_training_batches=2", "batches_per_val_step=2")
    rnn_trainer.train(cfg)  # steps 1-2, no periodic checkpoint yet
    copied = {}
    for name, as_name in (("step_00000002.pt", "step_00000001.pt"), ("step_00000004.pt", "step_00000002.pt")):
        data = (foreign / "checkpoint" / name).read_bytes()
        target = run_dir / "checkpoint" / as_name
        target.write_bytes(data)
        copied[target.name] = data
    AcceleratorState._reset_state(reset_partial_state=True)
    # Resumed from last_checkpoint.pt (step 2) by name: it writes steps 3, 6, 9 and keeps two.
    cfg = make_config(data_dir, run_dir, "num_training_batches=10", "batches_per_val_step=100",
                      "checkpoint_every_steps=3", "keep_checkpoints=2")
    rnn_trainer.train(cfg, resume_dir=str(run_dir))
    names = sorted(p.name for p in (run_dir / "checkpoint").glob("step_*.pt"))
    assert names == [*sorted(copied), "step_00000006.pt", "step_00000009.pt"]
    for name, data in copied.items():
        assert (run_dir / "checkpoint" / name).read_bytes() == data
    last = torch.load(run_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)
    own = torch.load(run_dir / "checkpoint" / "step_00000009.pt", weights_only=False)
    assert last["run_id"] == own["run_id"]
    assert {"step_00000006.pt", "step_00000009.pt"} <= set(own["periodic_checkpoints"])
    assert not set(copied) & set(own["periodic_checkpoints"])


def _demo_train_command() -> list[str]:
    """run_demo.sh's training command, as its arguments to train_model.py."""
    text = (REPO_ROOT / "run_demo.sh").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if re.search(r"\btrain_model\.py\b", line)]
    assert len(lines) == 1, lines
    tokens = shlex.split(lines[0])
    return tokens[tokens.index("train_model.py") + 1:]


def test_rerunning_the_demo_after_an_interruption_continues_the_run(
    data_dir: Path, tmp_path: Path, monkeypatch, capsys
):
    """run_demo.sh's training command, stopped by Ctrl-C after step 2 and run again, continues at
    step 2: no step is trained or logged twice, and the stopped run said how to go on."""
    args = _demo_train_command()
    assert args[args.index("--config_path") + 1] == "rnn_args_demo.yaml"
    run_dir = tmp_path / "demo"
    tiny = _write_config(data_dir, run_dir, tmp_path / "demo.yaml", batches_per_train_log=1)
    args[args.index("--config_path") + 1] = str(tiny)

    real_step, calls = rnn_trainer.train_step, []

    def step_then_ctrl_c(**kwargs):
        out = real_step(**kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(rnn_trainer, "train_step", step_then_ctrl_c)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train_model.main(args)
    assert stopped.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"train_model.py: SIGINT at step 2, saved in {run_dir}: continue with --resume {run_dir}, "
                       "or rerun the same command with --resume auto")
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)

    train_steps = lambda: [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                           if "train/loss" in line]  # noqa: E731
    train_model.main(args)  # bash run_demo.sh, again
    assert train_steps() == [1, 2, 3, 4]
    assert f"resumed {run_dir} at step 2" in (run_dir / "train.log").read_text()
    AcceleratorState._reset_state(reset_partial_state=True)
    train_model.main(args)  # and once more after it finished: nothing is trained again
    assert train_steps() == [1, 2, 3, 4]


def test_resume_auto_without_a_checkpoint_starts_over_only_a_run_of_the_same_config(
    data_dir: Path, tmp_path: Path, capsys
):
    """A run killed before its first checkpoint left config.yaml and train.log: rerunning its
    command starts it over; another run's command is refused."""
    from config import save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(make_config(data_dir, run_dir), run_dir / "config.yaml")
    (run_dir / "train.log").write_text("device cpu\n")
    config = _write_config(data_dir, run_dir, tmp_path / "a.yaml", num_training_batches=1)
    line = _main_fails(["--config_path", str(config), "--resume", "auto", "--set", "seed=8"], capsys)
    assert str(run_dir / "config.yaml") in line and "seed 7 there, 8 here" in line
    assert (run_dir / "train.log").read_text() == "device cpu\n"
    AcceleratorState._reset_state(reset_partial_state=True)
    train_model.main(["--config_path", str(config), "--resume", "auto"])
    assert torch.load(run_dir / "checkpoint" / "last_checkpoint.pt", weights_only=False)["step"] == 1


def test_a_run_resumed_from_a_checkpoint_that_names_no_periodic_ones_prunes_those_in_its_directory(
    data_dir: Path, tmp_path: Path
):
    """Checkpoints written before runs named their periodic checkpoints: the run's directory holds
    only its own, so they are adopted and pruned as before."""
    rnn_trainer.train(make_config(data_dir, tmp_path, "num_training_batches=2", "checkpoint_every_steps=1",
                                  "keep_checkpoints=5"))
    last_path = tmp_path / "checkpoint" / "last_checkpoint.pt"
    last = torch.load(last_path, weights_only=False)
    del last["run_id"], last["periodic_checkpoints"]
    torch.save(last, last_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    rnn_trainer.train(make_config(data_dir, tmp_path, "num_training_batches=4", "checkpoint_every_steps=1",
                                  "keep_checkpoints=1"), resume_dir=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("step_*.pt")) == ["step_00000003.pt"]
