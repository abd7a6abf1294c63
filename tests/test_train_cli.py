"""Checkpointing through scripts/train.py: periodic saves, --keep, --resume in the same and in
another layout, and errors reported before any rank starts."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training import checkpoint
from training.cli import _warn_about_earlier_checkpoints
from training.config import load_run_config

REPO = Path(__file__).resolve().parent.parent

CONFIG = {
    "model": {"vocab_size": 256, "n_positions": 32, "n_embd": 32, "n_layer": 4, "n_head": 4},
    "layout": {"tp": 1, "pp": 2, "dp": 1, "micro_batches": 2},
    "train": {"steps": 6, "global_batch": 8, "seq_len": 16, "warmup_steps": 1, "lr": 1e-2,
              "eval_interval": 0, "eval_batches": 1},
    "run": {"sample_tokens": 0, "progress": False},
}


def _train(tmp_path, *args):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config),
                           *args], capture_output=True, text=True, timeout=300)


def _losses(log_json: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log_json.read_text().splitlines())}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    done = _train(tmp_path, "--out", str(tmp_path / "run"), "--save-interval", "2", "--keep", "2",
                  "--log-json", str(tmp_path / "log.jsonl"))
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_save_interval_and_keep(straight_run):
    names = [p.name for p in checkpoint.list_checkpoints(straight_run / "run")]
    assert names == ["step-0000004", "step-0000006"]
    meta = checkpoint.read_meta(straight_run / "run")
    assert meta["step"] == 6
    assert meta["layout"]["pp"] == 2
    assert meta["tokenizer"] == "bytes"
    assert meta["data"] == {"seed": 1234, "next_step": 6, "sequences_seen": 48}


def test_resume_same_layout_exact(straight_run, tmp_path):
    done = _train(tmp_path, "--resume", str(straight_run / "run" / "step-0000004"),
                  "--out", str(tmp_path / "run"), "--log-json", str(tmp_path / "log.jsonl"))
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr

    expected = _losses(straight_run / "log.jsonl")
    resumed = _losses(tmp_path / "log.jsonl")
    assert sorted(resumed) == [4, 5]
    assert [resumed[s] for s in (4, 5)] == [expected[s] for s in (4, 5)]
    final = checkpoint.load(tmp_path / "run")
    reference = checkpoint.load(straight_run / "run")
    assert final.step == 6
    for name, tensor in reference.model.items():
        assert torch.equal(final.model[name], tensor), name
    for name, tensor in reference.optimizer.items():
        assert torch.equal(final.optimizer[name], tensor), name


def test_resume_other_layout(straight_run, tmp_path):
    done = _train(tmp_path, "--resume", str(straight_run / "run" / "step-0000004"), "--tp", "2",
                  "--pp", "1", "--micro-batches", "1", "--out", str(tmp_path / "run"),
                  "--log-json", str(tmp_path / "log.jsonl"))
    assert done.returncode == 0, done.stderr
    expected = _losses(straight_run / "log.jsonl")
    resumed = _losses(tmp_path / "log.jsonl")
    assert [resumed[s] for s in (4, 5)] == pytest.approx([expected[s] for s in (4, 5)], rel=1e-5)
    final = checkpoint.load(tmp_path / "run")
    assert final.meta["layout"]["tp"] == 2
    reference = checkpoint.load(straight_run / "run")
    for name, tensor in reference.model.items():
        torch.testing.assert_close(final.model[name], tensor, rtol=1e-4, atol=1e-5)


def test_damaged_checkpoint_rejected_before_start(straight_run, tmp_path):
    damaged = tmp_path / "run"
    source = straight_run / "run" / "step-0000006"
    damaged.mkdir()
    for file in source.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    data = (damaged / "model.pt").read_bytes()
    (damaged / "model.pt").write_bytes(data[:-100])

    done = _train(tmp_path, "--resume", str(damaged))
    assert done.returncode == 2
    assert f"{damaged / 'model.pt'} is truncated" in done.stderr
    assert "starting" not in done.stderr, "ranks started before the checkpoint was checked"


def test_model_override_contradicting_checkpoint_rejected(straight_run, tmp_path):
    done = _train(tmp_path, "--init-from", str(straight_run / "run"), "--set", "model.n_layer=2",
                  "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "model.n_layer=2 contradicts the checkpoint" in done.stderr


def test_new_run_warns_about_earlier_checkpoints(tmp_path, caplog):
    earlier = tmp_path / "step-0000600"
    earlier.mkdir()
    (earlier / "meta.json").write_text("{}")
    config = load_run_config(None, {"run.out": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="microtron"):
        _warn_about_earlier_checkpoints(config)
    assert "already contains 1 checkpoint(s) of an earlier run (the newest: step-0000600)" in caplog.text

    caplog.clear()
    empty = load_run_config(None, {"run.out": str(tmp_path / "new")})
    _warn_about_earlier_checkpoints(empty)
    assert caplog.text == ""
