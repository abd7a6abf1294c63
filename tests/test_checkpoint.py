"""The checkpoint folder format: atomic saving, the `latest` pointer, pruning, and rejection of
damaged, foreign and unsafe files with messages that name the file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training import checkpoint, state
from training.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parent.parent


def _tensors(step: int) -> tuple[dict, dict, dict]:
    model = {"transformer.wte.weight": torch.full((4, 3), float(step)),
             "transformer.ln_f.bias": torch.arange(3.0) + step}
    optimizer = {"transformer.wte.weight.exp_avg": torch.zeros(4, 3),
                 "transformer.wte.weight.exp_avg_sq": torch.ones(4, 3), "step": torch.tensor(step)}
    rng = {"rank0.torch": torch.get_rng_state()}
    return model, optimizer, rng


def _save(folder: Path, step: int, keep: int = 0) -> Path:
    model, optimizer, rng = _tensors(step)
    return checkpoint.save(folder, step, model, optimizer, rng, {"model": {"n_layer": 1}}, keep=keep)


def test_save_load_round_trip(tmp_path):
    path = _save(tmp_path, 7)
    assert path == tmp_path / "step-0000007"
    assert (tmp_path / "latest").read_text().strip() == "step-0000007"

    loaded = checkpoint.load(tmp_path)
    model, optimizer, rng = _tensors(7)
    assert loaded.step == 7
    assert loaded.meta["format_version"] == checkpoint.FORMAT_VERSION
    assert sorted(loaded.meta["files"]) == ["model.pt", "optimizer.pt", "rng.pt"]
    for name, tensor in model.items():
        assert torch.equal(loaded.model[name], tensor), name
    for name, tensor in optimizer.items():
        assert torch.equal(loaded.optimizer[name], tensor), name
    assert torch.equal(loaded.rng["rank0.torch"], rng["rank0.torch"])


def test_load_skips_optimizer_on_request(tmp_path):
    _save(tmp_path, 1)
    loaded = checkpoint.load(tmp_path, optimizer=False, rng=False)
    assert loaded.optimizer is None
    assert loaded.rng is None


def test_latest_names_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert checkpoint.load(tmp_path).step == 3
    assert checkpoint.load(tmp_path / "step-0000002").step == 2


def test_keep_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-0000004", "step-0000005"]
    assert checkpoint.load(tmp_path).step == 5


def test_saving_same_step_replaces_it(tmp_path):
    _save(tmp_path, 4)
    model, optimizer, rng = _tensors(9)
    checkpoint.save(tmp_path, 4, model, optimizer, rng, {"model": {}})
    loaded = checkpoint.load(tmp_path)
    assert torch.equal(loaded.model["transformer.wte.weight"], model["transformer.wte.weight"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _draws() -> tuple:
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian behind, part of the state
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random(),
            random.gauss(0.0, 1.0))


def test_rng_states_round_trip(tmp_path):
    random.gauss(0.0, 1.0)
    saved = state.capture_rng_states(torch.device("cpu"))
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)}, rng={f"rank0.{k}": v for k, v in saved.items()},
                    meta={"model": {}})
    expected = _draws()

    loaded = checkpoint.load(tmp_path).rng
    state.restore_rng_states(state.rank_rng_states(loaded, 0), torch.device("cpu"))
    assert _draws() == expected
    assert state.rank_rng_states(loaded, 1) is None


# ----------------------------------------------------------------------------------------------
# Damaged, foreign and unsafe files


def test_truncated_file_rejected(tmp_path):
    path = _save(tmp_path, 1)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(tmp_path)
    message = str(error.value)
    assert str(path / "model.pt") in message
    assert "truncated" in message


def test_corrupted_file_rejected(tmp_path):
    path = _save(tmp_path, 1)
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(tmp_path)
    message = str(error.value)
    assert str(path / "optimizer.pt") in message
    assert "corrupted" in message


def test_truncated_metadata_rejected(tmp_path):
    path = _save(tmp_path, 1)
    text = (path / "meta.json").read_text()
    (path / "meta.json").write_text(text[:len(text) // 2])
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(tmp_path)
    assert str(path / "meta.json") in str(error.value)
    assert "not valid JSON" in str(error.value)


def test_missing_file_rejected(tmp_path):
    path = _save(tmp_path, 1)
    (path / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.pt is missing"):
        checkpoint.load(tmp_path)


def test_other_format_version_rejected(tmp_path):
    path = _save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        checkpoint.load(tmp_path)


class _RunsCode:
    """Unpickling this object would create the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_never_runs(tmp_path):
    path = _save(tmp_path, 1)
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _RunsCode(str(marker))}, path / "model.pt")
    torch.load(path / "model.pt", weights_only=False)  # the payload works when unpickled
    assert marker.exists()
    marker.unlink()
    # Record the digest of the foreign file, as an attacker who rewrote meta.json would.
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model.pt"] = checkpoint._describe_file(path / "model.pt")
    (path / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(CheckpointError) as error:
        checkpoint.load(tmp_path)
    assert "weights-only" in str(error.value)
    assert str(path / "model.pt") in str(error.value)
    assert not marker.exists(), "loading ran pickled code"


def test_foreign_tensor_file_rejected(tmp_path):
    path = _save(tmp_path, 1)
    torch.save([torch.zeros(2)], path / "model.pt")
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model.pt"] = checkpoint._describe_file(path / "model.pt")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a checkpoint tensor file"):
        checkpoint.load(tmp_path)


def test_folder_without_checkpoint_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Hugging Face model folder"):
        checkpoint.load(tmp_path)


def test_model_config_mismatch_rejected(tmp_path):
    _save(tmp_path, 1)
    meta = checkpoint.read_meta(tmp_path)
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 1, config 2"):
        checkpoint.check_model_config(meta, {"n_layer": 2}, "here")


# ----------------------------------------------------------------------------------------------
# Crashes while saving


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_save = torch.save

    def save_then_fail(obj, path, *args, **kwargs):
        if Path(path).name == "optimizer.pt":
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a file")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2)
    monkeypatch.undo()

    assert checkpoint.load(tmp_path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001"]


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {repo!r})
    from training import checkpoint

    folder = Path({folder!r})
    model = {{"w": torch.arange(6.0)}}
    checkpoint.save(folder, 1, model, meta={{"model": {{}}}})
    real_save = torch.save

    def slow_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04 the first bytes of a file")
            f.flush()
            (folder / "writing").touch()
            time.sleep(60)

    torch.save = slow_save
    checkpoint.save(folder, 2, {{"w": torch.zeros(6)}}, meta={{"model": {{}}}})
""")


def test_killed_save_keeps_previous(tmp_path):
    folder = tmp_path / "run"
    script = _KILLED_WRITER.format(repo=str(REPO), folder=str(folder))
    writer = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (folder / "writing").exists():
            assert writer.poll() is None, "the writer exited before its second save"
            assert time.monotonic() < deadline, "the writer never started its second save"
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()

    assert any(p.name.startswith(".tmp-step-0000002") for p in folder.iterdir())
    loaded = checkpoint.load(folder)
    assert loaded.step == 1
    assert torch.equal(loaded.model["w"], torch.arange(6.0))

    # The next save removes what the killed one left behind.
    checkpoint.save(folder, 3, {"w": torch.ones(6)}, meta={"model": {}})
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    assert checkpoint.load(folder).step == 3
