"""storage.py: atomic replacement that survives an interrupted write, locally and at fsspec URLs;
listing, appended logs, the umask's file modes and clear errors for locations that cannot be used.

    pytest tests/test_storage.py
"""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import storage
import train_model
from conftest import REPO_ROOT, tiny_config_dict


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path: Path):
    if request.param == "local":
        yield str(tmp_path)
    else:
        url = f"memory://storage-{uuid.uuid4().hex}"
        yield url
        fs, inner = fsspec.core.url_to_fs(url)
        if fs.exists(inner):
            fs.rm(inner, recursive=True)


def test_an_interrupted_write_leaves_the_previous_file_whole_and_no_temporary(root: str):
    path = storage.join(root, "checkpoint", "last_checkpoint.pt")
    storage.atomic_write(path, lambda handle: torch.save({"step": 1, "w": torch.arange(1000)}, handle))

    def interrupted(handle) -> None:
        handle.write(b"\x80" * 4096)  # half a new checkpoint, then the signal's KeyboardInterrupt
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write(path, interrupted)
    with storage.open_read(path) as handle:
        kept = torch.load(handle)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.arange(1000))
    assert storage.list_names(storage.join(root, "checkpoint"), "*") == ["last_checkpoint.pt"]


def test_listing_reading_and_appending(root: str):
    directory = storage.join(root, "checkpoint")
    assert storage.list_names(directory, "step_*.pt") == [] and not storage.isdir(directory)
    for step in (30, 4, 100):
        storage.write_text(storage.join(directory, f"step_{step:08d}.pt"), str(step))
    storage.write_text(storage.join(directory, "best_checkpoint.pt"), "best")
    assert storage.list_names(directory, "step_*.pt") == ["step_00000004.pt", "step_00000030.pt", "step_00000100.pt"]
    assert storage.read_text(storage.join(directory, "step_00000030.pt")) == "30"
    assert storage.name(storage.join(directory, "best_checkpoint.pt")) == "best_checkpoint.pt"
    storage.remove(storage.join(directory, "step_00000004.pt"))
    assert not storage.isfile(storage.join(directory, "step_00000004.pt"))

    log_path = storage.join(root, "train.log")
    first = storage.AppendFile(log_path)
    first.write("a\n")
    first.flush()
    first.close()
    second = storage.AppendFile(log_path)  # a resumed run appends to what the first one wrote
    second.write("b\n")
    second.flush()
    second.close()
    assert storage.read_text(log_path) == "a\nb\n"


@pytest.mark.parametrize("scheme", ["local", "file"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path: Path, scheme: str):
    """Under umask 022 a run's files are readable by others (evaluation under another user, a
    shared filesystem): checkpoints and config as well as the appended logs."""
    base = str(tmp_path) if scheme == "local" else f"file://{tmp_path}"
    previous = os.umask(0o022)
    try:
        storage.write_text(storage.join(base, "config.yaml"), "seed: 7\n")
        storage.atomic_write(storage.join(base, "checkpoint", "last_checkpoint.pt"), lambda f: torch.save({"step": 1}, f))
        log = storage.AppendFile(storage.join(base, "train.log"))
        log.write("step 1\n")
        log.flush()
        log.close()
        os.umask(0o027)
        storage.write_text(storage.join(base, "private.yaml"), "seed: 8\n")
    finally:
        os.umask(previous)
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in tmp_path.rglob("*") if path.is_file()}
    assert modes == {"config.yaml": "0o644", "last_checkpoint.pt": "0o644", "train.log": "0o644",
                     "private.yaml": "0o640"}


def test_join_keeps_a_urls_scheme():
    assert storage.join("gs://bucket/run/", "checkpoint", "last_checkpoint.pt") == "gs://bucket/run/checkpoint/last_checkpoint.pt"
    assert storage.join("runs/a", "config.yaml") == str(Path("runs/a/config.yaml"))


def test_a_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path):
    """The process dies for good mid-write (no handler runs): the target is still the old checkpoint."""
    path = tmp_path / "last_checkpoint.pt"
    storage.atomic_write(str(path), lambda handle: torch.save({"step": 1}, handle))
    code = textwrap.dedent(f"""
        import sys, time
        import storage
        def slow(handle):
            for _ in range(1000):
                handle.write(b"x" * 65536)
                handle.flush()
                print("writing", flush=True)
                time.sleep(0.01)
        storage.atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(path)["step"] == 1


def test_an_unusable_output_url_stops_with_one_line_and_status_2(data_dir: Path, tmp_path: Path, capsys):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(str(data_dir), "nosuchfs://bucket/run")))
    with pytest.raises(SystemExit) as stopped:
        train_model.main(["--config_path", str(config), "--resume", "auto"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuchfs://bucket/run" in err[0], err
