"""Test of benchmarks/ablation.py on a tiny model: one row per variant and budget, the time budget's
step counts, the schedule scaling, the adversarial terms really off in triple_no_adv, and the
bidirectional variants really bidirectional.

    python -m pytest tests/test_ablation.py -q
"""

import json
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from config import config_from_dict, save_config
from conftest import REPO_ROOT
from conftest import tiny_config_dict

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablation  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_schedule_is_scaled_to_the_run_length():
    # The demo config: 400 steps, lr decay over 400, warm-ups of 50 steps.
    overrides = ablation.schedule_overrides(str(REPO_ROOT / "rnn_args_demo.yaml"), [], n_steps=200)
    assert overrides == [
        "optimizer.lr_warmup_steps=25", "optimizer.lr_decay_steps=200", "optimizer.lr_warmup_steps_day=25",
        "optimizer.lr_decay_steps_day=200", "adversarial.warmup_steps=25",
    ]


def test_ablation_rows_for_every_variant_and_budget(data_dir: Path, tmp_path: Path, capsys):  # noqa: F811
    config_path = tmp_path / "tiny.yaml"
    save_config(config_from_dict(tiny_config_dict(str(data_dir), str(tmp_path / "unused"))), config_path)
    rows = ablation.main(["--data_dir", str(data_dir), "--config", str(config_path), "--steps", "4",
                          "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["variant"], r["budget"]) for r in lines] == [(r["variant"], r["budget"]) for r in rows]
    variants = ["baseline", "triple", "triple_no_adv", "baseline_bidirectional", "triple_bidirectional"]
    n_variants = len(variants)
    assert len(rows) == 2 * n_variants and out.count("\n| ") == 2 + 2 * n_variants  # header, rule, a row per run
    by_steps = {r["variant"]: r for r in rows[:n_variants]}
    assert [r["variant"] for r in rows] == variants * 2
    assert all(r["steps"] == 4 and r["budget"] == "4 steps" for r in by_steps.values())
    assert by_steps["triple"]["n_parameters"] == by_steps["triple_no_adv"]["n_parameters"]
    assert by_steps["triple"]["n_parameters"] > by_steps["baseline"]["n_parameters"]
    for name in ("baseline", "triple"):  # a second direction for every speech GRU, its config saved
        assert by_steps[f"{name}_bidirectional"]["n_parameters"] > by_steps[name]["n_parameters"]
        assert "bidirectional: true" in (tmp_path / "runs" / f"{name}_bidirectional_steps" / "config.yaml").read_text()
    assert all(0.0 <= r["val_per"] < 2.0 and r["ms_per_step"] > 0 for r in rows)

    # The baseline's steps at its fastest window's step time; each variant's steps at its own.
    budget = 4 * by_steps["baseline"]["ms_per_step_best"] / 1000.0
    assert all(r["ms_per_step_best"] <= r["ms_per_step"] for r in rows)
    for row in rows[n_variants:]:
        assert row["budget"] == f"{budget:.0f} s"
        # At least one step: on a loaded machine a variant's best step can outlast the whole budget.
        expected = max(1.0, 1000.0 * budget / by_steps[row["variant"]]["ms_per_step_best"])
        assert abs(row["steps"] - expected) <= 0.5 + 0.01 * expected
    assert rows[n_variants] == {**by_steps["baseline"], "budget": rows[n_variants]["budget"]}  # its own budget: reused

    # triple_no_adv: the total loss is the clean CTC alone; in triple the adversarial terms count.
    def train_records(name):
        path = tmp_path / "runs" / name / "metrics.jsonl"
        return [r for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]

    assert all(r["train/loss"] == r["train/ctc_clean"] for r in train_records("triple_no_adv_steps"))
    assert any(r["train/loss"] != r["train/ctc_clean"] for r in train_records("triple_steps"))


def test_steps_only_runs_no_time_budget(data_dir: Path, tmp_path: Path):  # noqa: F811
    config_path = tmp_path / "tiny.yaml"
    save_config(config_from_dict(tiny_config_dict(str(data_dir), str(tmp_path / "unused"))), config_path)
    rows = ablation.main(["--data_dir", str(data_dir), "--config", str(config_path), "--steps", "2", "--steps_only",
                          "--variants", "baseline_bidirectional", "--out", str(tmp_path / "runs")])
    assert [(r["variant"], r["budget"], r["steps"]) for r in rows] == [("baseline_bidirectional", "2 steps", 2)]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["baseline_bidirectional_steps"]
