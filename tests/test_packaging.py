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
    setups = [line.split()[:5] for line in lines if line.startswith("bash setup_env.sh")]
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


def _run_tests_with_stubs(tmp_path: Path, *, xla_suite: int, latest_setup: int, latest_suite: int):
    """run_tests.sh in a copy of the checkout whose setup_env.sh and virtualenvs are stand-ins that
    log their calls and exit with the given statuses; its exit status and the calls in order."""
    import shutil

    shutil.copy(ROOT / "run_tests.sh", tmp_path / "run_tests.sh")
    (tmp_path / "setup_env.sh").write_text(
        'echo "setup ${2:-.venv}" >> calls\n'
        f'if [ "${{2:-.venv}}" = .venv-torch-latest ]; then sleep 1; echo "no wheel for torch"; exit {latest_setup}; fi\n')
    for venv, status in ((".venv", xla_suite), (".venv-torch-latest", latest_suite)):
        python = tmp_path / venv / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(f'#!/usr/bin/env bash\necho "pytest {venv} $*" >> calls\nexit {status}\n')
        python.chmod(0o755)
    proc = subprocess.run(["bash", "run_tests.sh", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    return proc.returncode, (tmp_path / "calls").read_text().splitlines(), proc.stderr


def test_run_tests_runs_both_suites_and_fails_when_either_does(tmp_path: Path):
    cases = {(0, 0, 0): 0, (1, 0, 0): 1, (0, 0, 1): 1, (5, 0, 0): 5}  # 5: pytest collected nothing
    for (xla_suite, latest_setup, latest_suite), expected in cases.items():
        case = tmp_path / f"{xla_suite}{latest_setup}{latest_suite}"
        case.mkdir()
        status, calls, _ = _run_tests_with_stubs(case, xla_suite=xla_suite, latest_setup=latest_setup,
                                                 latest_suite=latest_suite)
        assert status == expected, (xla_suite, latest_suite)
        assert calls[0] == "setup .venv" and calls[-1] == "pytest .venv-torch-latest -m pytest tests -q"
        assert sorted(calls[1:3]) == ["pytest .venv -m pytest tests -q", "setup .venv-torch-latest"]
    case = tmp_path / "setup_fails"
    case.mkdir()
    status, calls, stderr = _run_tests_with_stubs(case, xla_suite=0, latest_setup=1, latest_suite=0)
    assert status == 1 and not any(call.startswith("pytest .venv-torch-latest") for call in calls)
    assert "no wheel for torch" in stderr and "setting up .venv-torch-latest (torch==2.14.1) failed" in stderr
