"""Layout-free checkpoints: the folder format, atomic saving, verification and pruning.

A checkpoint is a folder `step-NNNNNNN` whose tensors are full (not split over ranks) and keyed
by the global parameter names of the single-process model, so it loads into any layout:

    model.pt       {name: tensor} for every parameter
    optimizer.pt   AdamW state {"<name>.exp_avg": ..., "<name>.exp_avg_sq": ..., "step": ...};
                   absent when the checkpoint was imported from Hugging Face weights
    rng.pt         the random-generator states of every rank, {"rank<r>.<generator>": tensor}
    vocab.json,    the GPT-2 tokenizer, when the checkpoint was imported from a Hugging Face
    merges.txt     folder that has one
    meta.json      format version, step, model config, the layout it was saved from, the run
                   config, and the size and SHA-256 digest of each file above

Saving writes the folder under a temporary name, fsyncs it and renames it into place. Then it
rewrites the `latest` file, also by rename. A crash at any point therefore leaves the previous
checkpoint intact and a `latest` that names a complete checkpoint (the one exception, a save
that replaces a checkpoint of the same step, is marked in `_move_into_place`). Loading checks
the format version, each file's size and digest, and the tensor types, and unpickles with
`weights_only=True`, which admits only tensors and plain containers and so runs no code from
the file. Errors name the file and what is wrong with it.

Why not torch.distributed.checkpoint (DCP), as of torch 2.13: DCP reshards tensors described as
DTensors (or the deprecated ShardedTensor), whose pieces are boxes (offsets and lengths) of the
global tensor. Here a rank's slice of a fused QKV weight is three separate boxes (the Q, K and V
rows of its heads); the last TP rank's vocabulary slice carries zero padding rows that are not
part of the global tensor; and the tied embedding has copies on two pipeline ranks. Each of
these would need a wrapper built before saving and undone after loading. More decisively, DCP's
FileSystemReader reads its `.metadata` file with `pickle.load`, which runs whatever code the file
names, and loading must never do that. So global rank 0 gathers full tensors and writes them
alone (see `training/state.py` for the gather).
NOTE: that design holds the whole model and its AdamW state in rank 0's CPU memory while
saving, and every rank maps the full files when loading, so the full state must fit in the
memory of one host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("microtron")

FORMAT_VERSION = 2
LATEST = "latest"
META = "meta.json"
MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"

_NAME = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"

# Model config fields that fix the parameter shapes or change what the model computes; a
# checkpoint loads only into a model whose fields agree. Dropout and the initializer may differ.
ARCHITECTURE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                       "layer_norm_epsilon")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or made for another model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. `optimizer` and `rng` are None when the folder has none."""

    path: Path
    meta: dict
    model: dict
    optimizer: dict | None
    rng: dict | None

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


# ----------------------------------------------------------------------------------------------
# Saving


def save(folder: str | Path, step: int, model: dict, optimizer: dict | None = None,
         rng: dict | None = None, meta: dict | None = None, keep: int = 0,
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the checkpoint of `step` into the run folder `folder` atomically; return its path.

    Call on one rank. `extra_files` maps file names to contents stored beside the tensors (such
    as a tokenizer). `keep` > 0 then deletes all but the `keep` newest checkpoints.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_incomplete(folder)
    final = folder / checkpoint_name(step)
    tmp = folder / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        files = {MODEL: model, OPTIMIZER: optimizer, RNG: rng}
        digests = {}
        for name, tensors in files.items():
            if tensors is not None:
                torch.save(tensors, tmp / name)
                digests[name] = _describe_file(tmp / name)
        for name, content in (extra_files or {}).items():
            if name in files or name == META or Path(name).name != name:
                raise ValueError(f"extra file name {name!r} must be a plain file name other than "
                                 f"{sorted([*files, META])}")
            (tmp / name).write_bytes(content)
            digests[name] = _describe_file(tmp / name)
        full_meta = {"format_version": FORMAT_VERSION, "step": step, **(meta or {}),
                     "files": digests}
        (tmp / META).write_text(json.dumps(full_meta, indent=2) + "\n")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _move_into_place(tmp, final)
    _write_atomically(folder / LATEST, final.name + "\n")
    if keep > 0:
        prune(folder, keep)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`, replacing an older folder of that name."""
    old = None
    if final.exists():
        # A directory cannot be replaced by rename while it has files, so the old one moves
        # aside first. NOTE: a crash between these two renames leaves no folder under `final`.
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _remove_incomplete(folder: Path) -> None:
    """Delete temporary folders that an interrupted save left behind."""
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            log.warning("removing %s, left behind by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.startswith(f".{LATEST}.tmp-"):
            path.unlink(missing_ok=True)


def prune(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints in `folder` (never the one `latest` names);
    return the deleted paths."""
    folder = Path(folder)
    latest_file = folder / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    steps = list_checkpoints(folder)
    deleted = []
    for path in steps[:max(0, len(steps) - keep)]:
        if path.name != latest:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Return the complete checkpoint folders in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _describe_file(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) do not fsync directories
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Loading


def resolve(path: str | Path) -> Path:
    """Return the checkpoint folder that `path` names: a checkpoint, or a run folder whose
    `latest` file names one."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / META).is_file():
            return target
        raise CheckpointError(f"{latest} names {target.name}, which is not a complete checkpoint "
                              f"(no {target / META}); pass one of {_names(list_checkpoints(path))}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    hint = ""
    if (path / "config.json").is_file():
        hint = "; it looks like a Hugging Face model folder: import it with scripts/convert.py first"
    raise CheckpointError(f"{path} is neither a checkpoint folder (no {META}) nor a run folder "
                          f"with a '{LATEST}' file{hint}")


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths) or "(none in that folder)"


def read_meta(path: str | Path) -> dict:
    """Return the metadata of the checkpoint that `path` names, after checking its version."""
    folder = resolve(path)
    meta_path = folder / META
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path} is not valid JSON ({error}); the file is truncated "
                              f"or corrupted") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{meta_path} is not checkpoint metadata: it has no format_version")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta['format_version']} is not "
                              f"supported; this version of microtron reads version {FORMAT_VERSION}")
    for key in ("step", "model", "files"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} is missing the key {key!r}")
    if MODEL not in meta["files"]:
        raise CheckpointError(f"{meta_path} lists no {MODEL}")
    return meta


def verify(path: str | Path) -> dict:
    """Check the size and SHA-256 digest of every file that the metadata lists; return the
    metadata. Raises CheckpointError naming the first damaged or missing file."""
    folder = resolve(path)
    meta = read_meta(folder)
    for name, expected in meta["files"].items():
        _verify_file(folder / name, expected)
    return meta


def _verify_file(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        kind = "truncated" if size < expected["bytes"] else "longer than written"
        raise CheckpointError(f"{path} is {kind}: it has {size} bytes, but {expected['bytes']} "
                              f"were written")
    digest = _sha256(path)
    if digest != expected["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 digest {digest[:16]}... differs "
                              f"from the digest recorded when it was written, "
                              f"{expected['sha256'][:16]}...")


def load(path: str | Path, optimizer: bool = True, rng: bool = True) -> Checkpoint:
    """Verify and load the checkpoint that `path` names; skip the optimizer or RNG file on
    request."""
    folder = resolve(path)
    meta = verify(folder)
    files = meta["files"]
    model = _load_tensors(folder / MODEL)
    optimizer_state = _load_tensors(folder / OPTIMIZER) if optimizer and OPTIMIZER in files else None
    rng_state = _load_tensors(folder / RNG) if rng and RNG in files else None
    return Checkpoint(folder, meta, model, optimizer_state, rng_state)


def _load_tensors(path: Path) -> dict:
    try:
        # mmap: ranks that load the same file share its pages instead of copying them.
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as error:  # torch raises several types for damaged or foreign files
        raise CheckpointError(f"{path} cannot be read as a weights-only tensor file "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise CheckpointError(f"{path} is not a checkpoint tensor file: expected a dict of "
                              f"name -> tensor, found {type(tensors).__name__}")
    return tensors


def check_model_config(meta: dict, model_config: dict, where: str) -> None:
    """Raise CheckpointError when the checkpoint's model differs from `model_config` in a field
    that changes the parameters or the computation."""
    saved = meta["model"]
    differing = [f"{name}: checkpoint {saved.get(name)!r}, config {model_config.get(name)!r}"
                 for name in ARCHITECTURE_FIELDS if saved.get(name) != model_config.get(name)]
    if differing:
        raise CheckpointError(f"{where} was saved from a different model ({'; '.join(differing)}); "
                              f"use the checkpoint's model config")
