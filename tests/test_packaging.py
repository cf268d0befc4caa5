"""Packaging: `pip install .` ships every top-level module, so the trainer and evaluator import
outside the checkout; and what the tests need is reachable from the extras run_tests.sh installs.

    .venv/bin/python -m pytest tests/test_packaging.py -q
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_py_modules_are_exactly_the_top_level_modules():
    listed = _pyproject()["tool"]["setuptools"]["py-modules"]
    on_disk = sorted(path.stem for path in ROOT.glob("*.py"))
    assert sorted(listed) == on_disk, {"missing": sorted(set(on_disk) - set(listed)), "extra": sorted(set(listed) - set(on_disk))}


def test_test_extra_holds_what_the_llm_tests_import():
    extras = _pyproject()["project"]["optional-dependencies"]
    names = lambda specs: {spec.split(">")[0].split("=")[0].split("[")[0].strip() for spec in specs}  # noqa: E731
    assert "transformers" in names(extras["llm"]) and "transformers" in names(extras["test"])
