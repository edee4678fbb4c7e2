"""bench/gpu_check.py, the first command for a GPU machine, cannot rot: its dry run checks every
case's job as the trainer would (in CI, on this CPU), and its judging reads the trainer's JSONL."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, python_env

sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402


def test_dry_run_checks_and_prints_every_case():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(gpu_check.CASES) and not any("config error" in x for x in lines)
    for case, line in zip(gpu_check.CASES, lines):
        assert line.startswith(f"NGPU={case.gpus} ") and case_folder_name(case) in line


def case_folder_name(case) -> str:
    return os.path.basename(gpu_check.case_folder("out", case))


def test_a_refused_case_fails_the_dry_run(capsys):
    broken = gpu_check.Case("broken", 1, ["--config", "train_configs/debug_model.toml",
                                          "--parallelism.dp_shard", "3"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.dry_run([broken], "out")
    assert stop.value.code == 1
    assert "# broken: config error: parallelism" in capsys.readouterr().out


def test_judging_reads_the_trainers_metrics(tmp_path):
    (tmp_path / "metrics").mkdir()
    records = [{"step": s, "loss": 8.0 - s, "tokens_per_s": 1000.0 * s, "mfu_pct": 10.0 * s,
                "peak_memory_gib": 2.0 + s} for s in (1, 2, 3)]
    (tmp_path / "metrics" / "rank0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    result = gpu_check.judge_training(gpu_check.Result(gpu_check.CASES[0]), str(tmp_path))
    assert result.status == "pass (loss 7.000 -> 5.000)"
    assert result.tokens_per_s == 2500.0 and result.mfu_pct == 25.0 and result.peak_gib == 5.0
    assert "| 1b-bf16 | 1 | pass (loss 7.000 -> 5.000) | 2,500 | 25.0 | 5.00 | - |" in \
        gpu_check.table([result], "test")
    records[-1]["loss"] = float("nan")
    (tmp_path / "metrics" / "rank0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    failed = gpu_check.judge_training(gpu_check.Result(gpu_check.CASES[0]), str(tmp_path))
    assert failed.status == "FAIL: last loss nan"
