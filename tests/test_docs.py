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
    line = re.sub(r"\s\d?>>?&?\s*[^\s&;|]+", " ", line)  # > file, 2> file, 2>&1
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
