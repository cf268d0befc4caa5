"""Every command the documents show is one this repository accepts.

    python -m pytest tests/test_docs.py -q

Reads the fenced bash blocks of TPU_SETUP_GUIDE.md and README.md, including commands passed to
`gcloud ... --command`, and checks each `python SCRIPT.py ...` and `accelerate launch ...` line
with the script's own argument parser (and Accelerate's), its config file and `--set`
overrides with load_config when the file is in the repository, and each `pip install -e
".[extras]"` against pyproject.toml. Nothing is trained.
"""

import argparse
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from config import ConfigError, load_config
from conftest import REPO_ROOT

DOCS = ["TPU_SETUP_GUIDE.md", "README.md"]
_OPERATORS = ("&&", "||", "|", "&", ";")


def _shell_lines(text: str) -> list[str]:
    """Lines of the fenced bash blocks, continuation lines joined."""
    blocks = re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, flags=re.S | re.M)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def _simple_commands(line: str) -> list[list[str]]:
    """Tokens of each command in a shell line: comments and redirections dropped, split at && ; | &."""
    line = re.sub(r"\s\d?>>?&?\s*[^\s&;|\"']+", " ", line)  # > file, 2> file, 2>&1 (also inside quotes)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [tokens for tokens in commands if tokens]


def _repository_commands(tokens: list[str]) -> list[list[str]]:
    """`python SCRIPT.py ...`, `accelerate launch ...` and `pip install -e ...` commands, also
    inside the --command that a gcloud line runs on the VM."""
    found = []
    for i, token in enumerate(tokens):
        inner = token.split("=", 1)[1] if token.startswith("--command=") else None
        if token == "--command" and i + 1 < len(tokens):
            inner = tokens[i + 1]
        if inner:
            found += [c for command in _simple_commands(inner) for c in _repository_commands(command)]
    while tokens and (re.match(r"^[A-Z_]+=", tokens[0]) or tokens[0] == "nohup"):  # VAR=value, nohup
        tokens = tokens[1:]
    is_python = len(tokens) > 1 and Path(tokens[0]).name.startswith("python") and tokens[1].endswith(".py")
    if is_python or tokens[:2] == ["accelerate", "launch"] or tokens[:3] == ["pip", "install", "-e"]:
        found.append(tokens)
    return found


def _all_commands() -> list[tuple[str, list[str]]]:
    return [(doc, command) for doc in DOCS for line in _shell_lines((REPO_ROOT / doc).read_text())
            for tokens in _simple_commands(line) for command in _repository_commands(tokens)]


class _Parsed(Exception):
    """Raised in place of returning from parse_args, so a script's main() stops after parsing."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def _parse_in_main(module_name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Arguments as parsed by a script whose parser lives inside main() (make_synthetic_data.py)."""
    import importlib

    module = importlib.import_module(module_name)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [f"{module_name}.py", *args])
        try:
            module.main()
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError(f"{module_name}.main() did not parse its arguments")


def _check_script(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse `args` as `script` does; for the trainers also load the config with its overrides."""
    import calibrate_session
    import evaluate_model
    import launch_tpu_training
    import train_model

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # benchmarks/ablation.py

    parsers = {
        "train_model.py": train_model.parse_args,
        "launch_tpu_training.py": launch_tpu_training.build_parser().parse_args,
        "evaluate_model.py": evaluate_model.build_parser().parse_args,
        "calibrate_session.py": calibrate_session.build_parser().parse_args,
        "make_synthetic_data.py": lambda a: _parse_in_main("make_synthetic_data", a, monkeypatch),
        "dataset.py": lambda a: _parse_in_main("dataset", a, monkeypatch),
        "ablation.py": lambda a: _parse_in_main("ablation", a, monkeypatch),
    }
    assert script in parsers, f"no argument check for {script}"
    args_ns = parsers[script](args)
    config = getattr(args_ns, "config_path", None) or getattr(args_ns, "config", None)
    if config and (REPO_ROOT / config).is_file():
        load_config(REPO_ROOT / config, args_ns.set)


@pytest.mark.parametrize("doc, tokens", _all_commands(), ids=lambda v: v if isinstance(v, str) else shlex.join(v)[:70])
def test_documented_command_is_accepted(doc, tokens, monkeypatch):
    if tokens[:3] == ["pip", "install", "-e"]:
        extras = re.fullmatch(r"\.\[(.*)\]", tokens[3]).group(1).split(",")
        defined = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert set(extras) <= set(defined), (doc, extras)
        return
    if tokens[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(tokens[2:])
        if launch.config_file:
            assert (REPO_ROOT / launch.config_file).is_file(), launch.config_file
        script, args = launch.training_script, launch.training_script_args
    else:
        script, args = tokens[1], tokens[2:]
    assert (REPO_ROOT / script).is_file(), script
    try:
        _check_script(Path(script).name, args, monkeypatch)
    except SystemExit as error:  # argparse's way of rejecting arguments
        pytest.fail(f"{doc}: {shlex.join(tokens)} is rejected (exit {error.code})")


def test_the_guide_shows_the_three_ways_to_train_and_the_install():
    commands = [shlex.join(tokens) for doc, tokens in _all_commands() if doc == "TPU_SETUP_GUIDE.md"]
    assert "pip install -e '.[tpu,plots]'" in commands
    assert any(c.startswith("python launch_tpu_training.py") and "--num_cores 8" in c for c in commands)
    accelerate = "accelerate launch --config_file accelerate_config_tpu.yaml train_model.py"
    assert any(c.startswith(accelerate) for c in commands)
    assert any(c.startswith("python train_model.py --config_path rnn_args.yaml") for c in commands)
    assert any("--resume" in c and c.startswith("python launch_tpu_training.py") for c in commands)


def test_a_wrong_option_in_a_documented_command_would_fail(monkeypatch):
    with pytest.raises(SystemExit):
        _check_script("launch_tpu_training.py", ["--config", "rnn_args.yaml", "--num_gpus", "8"], monkeypatch)
    with pytest.raises(ConfigError, match="dataset.batch_sise"):
        _check_script("train_model.py", ["--config_path", "rnn_args.yaml", "--set", "dataset.batch_sise=8"],
                      monkeypatch)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_documents_reach_a_file_and_heading():
    docs = [*DOCS, "TPU_MODEL_SUMMARY.md"]
    links = [(doc, target) for doc in docs
             for target in re.findall(r"\]\(([A-Za-z_]+\.md(?:#[\w-]+)?)\)", (REPO_ROOT / doc).read_text())]
    assert len(links) >= 10
    for doc, target in links:
        name, _, anchor = target.partition("#")
        text = (REPO_ROOT / name).read_text()
        prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a '# comment' in a code block is no heading
        anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
        assert not anchor or anchor in anchors, f"{doc}: {target}"


def _guide_section(number: int) -> str:
    text = (REPO_ROOT / "TPU_SETUP_GUIDE.md").read_text()
    return re.search(rf"^## {number}\. .*?(?=^## )", text, flags=re.S | re.M).group(0)


def _spot_loop() -> str:
    """The restart loop of the guide's section 8, as the shell function it defines."""
    blocks = re.findall(r"^```bash\n(.*?)^```", _guide_section(8), flags=re.S | re.M)
    loops = [block for block in blocks if "train_on_spot()" in block]
    assert len(loops) == 1, "section 8 defines train_on_spot() in one bash block"
    return loops[0]


# A stand-in for gcloud: `ssh ... bash train.sh` exits with the next status of `statuses`, `describe`
# prints the next state of `states` (GONE: fails as for a deleted VM), `tail` prints the log's last line.
_FAKE_GCLOUD = r"""
gcloud() {
    echo "gcloud $*" >> calls
    case "$*" in
        *"bash train.sh"*) local status; status=$(head -n 1 statuses); sed -i 1d statuses; return "$status" ;;
        *" describe "*) local state; state=$(head -n 1 states); sed -i 1d states
                        if [ "$state" = GONE ]; then echo "NOT_FOUND" >&2; return 1; fi; echo "$state" ;;
        *"tail -n 1"*) echo "train_model.py: data/hdf5_data_final: no session folders" ;;
    esac
}
"""


def _run_spot_loop(tmp_path: Path, statuses: list[int], states: list[str]) -> tuple[int, list[str], str]:
    """The guide's loop against the fake gcloud: its return status, the gcloud calls, its stderr."""
    import subprocess

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "statuses").write_text("".join(f"{s}\n" for s in statuses))
    (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
    (tmp_path / "install.sh").write_text("echo install\n")
    script = f"{_FAKE_GCLOUD}\n{_spot_loop()}\ntrain_on_spot\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert (tmp_path / "statuses").read_text() == "", "the loop stopped before the scripted runs were used"
    return proc.returncode, calls, proc.stderr


def _kinds(calls: list[str]) -> list[str]:
    kinds = {"bash train.sh": "train", " describe ": "describe", " delete ": "delete", " create ": "create",
             "bash -s": "install", "tail -n 1": "tail"}
    return [next(kind for key, kind in kinds.items() if key in call) for call in calls]


def test_the_spot_loop_retries_only_a_preempted_run(tmp_path: Path):
    # SIGTERM saved the step (143) on a VM still there: run train.sh again, no new VM.
    status, calls, _ = _run_spot_loop(tmp_path / "a", [143, 0], ["READY"])
    assert status == 0 and _kinds(calls) == ["train", "describe", "train"]
    # Preempted: the ssh session is cut (255) and the VM is PREEMPTED, or it is gone: a new VM.
    for state in ("PREEMPTED", "GONE"):
        status, calls, _ = _run_spot_loop(tmp_path / state, [255, 0], [state])
        assert status == 0 and _kinds(calls) == ["train", "describe", "delete", "create", "install", "train"]


@pytest.mark.parametrize("exit_status", [1, 2, 130])
def test_the_spot_loop_stops_on_any_other_status_with_the_logs_last_line(tmp_path: Path, exit_status: int):
    status, calls, stderr = _run_spot_loop(tmp_path, [exit_status], ["READY"])
    assert status == exit_status and _kinds(calls) == ["train", "describe", "tail"]
    assert stderr.splitlines() == [f"train.sh exited with status {exit_status}:",
                                   "train_model.py: data/hdf5_data_final: no session folders"]


# Devices per one-host TPU VM (section 1's table); --num_cores must match the type the loop creates.
TPU_DEVICES = {"v4-8": 4, "v5p-8": 4, "v5litepod-8": 8, "v6e-8": 8}


def test_the_spot_example_pairs_the_tpu_type_with_its_number_of_devices():
    section = _guide_section(8)
    types = set(re.findall(r"--accelerator-type=(\S+)", _spot_loop()))
    cores = {int(n) for n in re.findall(r"launch_tpu_training\.py .*--num_cores (\d+)", section)}
    assert len(types) == 1 and len(cores) == 1, (types, cores)
    assert TPU_DEVICES[types.pop()] == cores.pop()
    table = dict(re.findall(r"^\| `([\w-]+)`(?: \(v5e\))? \| (\d+) \|", _guide_section(1), flags=re.M))
    assert {name: int(n) for name, n in table.items()} == TPU_DEVICES
