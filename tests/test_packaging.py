"""Packaging: `pip install .` ships every top-level module, so the trainer and evaluator import
outside the checkout; what the tests need is reachable from the extras run_tests.sh installs; the
core dependencies admit the torch versions run_tests.sh tests (the XLA extras keep torch_xla's).

    .venv/bin/python -m pytest tests/test_packaging.py -q
"""

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    return {Requirement(spec).name.replace("_", "-"): Requirement(spec) for spec in specs}


def test_py_modules_are_exactly_the_top_level_modules():
    listed = _pyproject()["tool"]["setuptools"]["py-modules"]
    on_disk = sorted(path.stem for path in ROOT.glob("*.py"))
    assert sorted(listed) == on_disk, {"missing": sorted(set(on_disk) - set(listed)), "extra": sorted(set(listed) - set(on_disk))}


def test_test_extra_holds_what_the_llm_tests_import():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "transformers" in _requirements(extras["llm"]) and "transformers" in _requirements(extras["test"])


def test_core_torch_admits_both_tested_versions_and_the_xla_extras_keep_torch_2_9():
    project = _pyproject()["project"]
    torch = _requirements(project["dependencies"])["torch"].specifier
    latest = re.search(r'^TORCH_LATEST="torch==([\d.]+)"', (ROOT / "run_tests.sh").read_text(), flags=re.M).group(1)
    assert torch.contains("2.9.0") and torch.contains(latest)
    assert not torch.contains("2.8.0")
    assert not any(torch.contains(v) for v in ("2.15.0", "3.0.0")), "an upper bound that run_tests.sh has tested"
    for extra in ("xla", "tpu"):
        pins = _requirements(project["optional-dependencies"][extra])
        assert str(pins["torch"].specifier) == "==2.9.0" and str(pins["torch-xla"].specifier) == "==2.9.0", extra
    python = SpecifierSet(project["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14") if python.contains(v)] == ["3.11", "3.12", "3.13"]


def test_the_test_command_runs_the_suite_on_both_stacks():
    """run_tests.sh (the README's test command, what CI runs): the XLA stack in .venv, then the
    newest torch without torch_xla in .venv-torch-latest, each through setup_env.sh."""
    lines = [line for line in (ROOT / "run_tests.sh").read_text().splitlines() if not line.lstrip().startswith("#")]
    setups = [line.split() for line in lines if line.startswith("bash setup_env.sh")]
    assert setups == [["bash", "setup_env.sh", '"xla,plots,tensorboard,test"'],
                      ["bash", "setup_env.sh", '"plots,tensorboard,test"', ".venv-torch-latest", '"$TORCH_LATEST"']]
    assert [line.split()[0] for line in lines if " -m pytest tests " in line] == [
        ".venv/bin/python", ".venv-torch-latest/bin/python"]
    assert "bash run_tests.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash run_tests.sh" in (ROOT / "README.md").read_text()


def test_build_outputs_and_the_second_environment_are_ignored_by_git():
    paths = ["build/lib/rnn_model.py", ".venv-torch-latest/bin/python", "brain_to_text_triple_gru.egg-info/PKG-INFO"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == paths
