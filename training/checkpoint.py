"""Layout-free checkpoints.

A checkpoint is a folder `step-NNNNNNN` holding full tensors under the global names of the
single-process model, so it loads into any layout:

    model.pt       {name: tensor} for every parameter
    optimizer.pt   {"<name>.exp_avg": ..., "<name>.exp_avg_sq": ..., "step": ...}
    meta.json      format version, step, model config, the layout it was saved from, run config

Global rank 0 writes the folder under a temporary name and renames it into place when complete,
then updates the `latest` file, so a crash mid-save leaves the previous checkpoint intact. Loading
uses weights-only unpickling, which cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

FORMAT_VERSION = 1
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or made for another model."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save(folder: str | Path, step: int, model: dict, optimizer: dict, meta: dict) -> Path:
    """Write a checkpoint for `step` into `folder` atomically; return its path. Call on one rank."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(model, tmp / "model.pt")
    torch.save(optimizer, tmp / "optimizer.pt")
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomically(folder / LATEST, final.name + "\n")
    return final


def resolve(path: str | Path) -> Path:
    """Return the checkpoint folder that `path` names: a checkpoint, or a run folder whose
    `latest` file names one."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "meta.json").is_file():
            return target
        raise CheckpointError(f"{latest} names {target.name}, which is not a complete checkpoint")
    raise CheckpointError(f"{path} is neither a checkpoint folder (no meta.json) nor a run folder "
                          f"with a '{LATEST}' file")


def load(path: str | Path) -> tuple[dict, dict, dict]:
    """Return (model, optimizer, meta) of the checkpoint that `path` names."""
    folder = resolve(path)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / 'meta.json'} is not valid JSON: {error}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format version {meta.get('format_version')} is not "
                              f"supported (expected {FORMAT_VERSION})")
    model = _load_tensors(folder / "model.pt")
    optimizer = _load_tensors(folder / "optimizer.pt")
    return model, optimizer, meta


def _load_tensors(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as error:  # torch raises several types for damaged files
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error})") from None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
