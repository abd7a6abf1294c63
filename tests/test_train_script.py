"""`scripts/train.py` end to end, as a user runs it: spawned ranks, logs, checkpoint, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
            "--set", "model.n_positions=32", "--global-batch", "8", "--micro-batches", "2",
            "--set", "train.eval_interval=2", "--set", "train.eval_batches=1",
            "--set", "run.sample_tokens=20"]


def _train(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY_RUN, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_logs_saves_samples_and_resumes(tmp_path):
    out, log_json = tmp_path / "run", tmp_path / "log.jsonl"
    first = _train("--pp", "2", "--steps", "4", "--out", str(out), "--log-json", str(log_json))
    assert first.returncode == 0, first.stderr

    records = _json_lines(log_json)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_s"):
        assert all(key in r for r in records), f"every JSON record has {key}"
    assert "val_loss" in records[1], "evaluation runs every eval_interval steps"
    assert "stage 0 (pp rank 0): layer 0; stage 1 (pp rank 1): layer 1" in first.stderr
    assert "step     4/4" in first.stderr
    assert "final validation loss" in first.stderr
    assert "sample:" in first.stderr
    assert (out / "latest").read_text().strip() == "step-0000004"

    resumed = _train("--pp", "2", "--steps", "6", "--out", str(out), "--log-json", str(log_json),
                     "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert "at step 4" in resumed.stderr
    assert [r["step"] for r in _json_lines(log_json)][4:] == [4, 5]
    assert (out / "latest").read_text().strip() == "step-0000006"


@pytest.mark.parametrize("layout", [["--tp", "2", "--dp", "2"], ["--pp", "2", "--dp", "2"]],
                         ids=["tp2-dp2", "pp2-dp2"])
def test_first_losses_match_one_rank(tmp_path, layout):
    def losses(*args):
        log_json = tmp_path / f"{'-'.join(args)}.jsonl"
        result = _train("--steps", "3", "--dropout", "0", "--out", str(tmp_path / "ckpt"),
                        "--log-json", str(log_json), "--set", "run.sample_tokens=0", *args)
        assert result.returncode == 0, result.stderr
        return [r["loss"] for r in _json_lines(log_json)]

    single = losses("--tp", "1", "--pp", "1", "--dp", "1")
    parallel = losses(*layout)
    assert parallel == pytest.approx(single, rel=1e-5)


def test_rank_failure_reports_rank_and_exits_nonzero(tmp_path):
    # A checkpoint folder that exists as a file makes rank 0 fail when it saves.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = _train("--pp", "2", "--steps", "1", "--out", str(blocker))
    assert result.returncode == 1
    assert "error: the job failed" in result.stderr
    assert "rank 0 [tp0 pp0 dp0]" in result.stderr
    assert "Traceback" in result.stderr
