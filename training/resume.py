"""Save a trainer's state as a layout-free checkpoint, and resume or start training from one.

A resumed run continues exactly where the saved one stopped, in any layout. Batches depend only
on (seed, step) and dropout masks on (seed, step, layer, global index). Besides the step, the
state to restore is therefore the parameters, the AdamW state and the random-generator states. The learning rate is a
function of the step and the `train` section, which the checkpoint stores in its run config.

Every rank of the job calls these functions: saving gathers the full tensors on global rank 0,
which writes them, and loading cuts each rank's slice out of the full tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from training import checkpoint, state
from training.checkpoint import Checkpoint, CheckpointError
from training.config import RunConfig
from training.optim import learning_rate

log = logging.getLogger("microtron")

# Keys of the `train` section that change the training trajectory when they change on resume.
_TRAJECTORY_KEYS = ("seed", "global_batch", "seq_len", "lr", "min_lr", "warmup_steps", "steps",
                    "weight_decay", "beta1", "beta2", "eps", "grad_clip", "dtype")


def layout_record(config: RunConfig) -> dict:
    """Return the layout fields that a checkpoint records as the layout it was saved from."""
    lay = config.layout
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "schedule": lay.schedule,
            "virtual_stages": lay.virtual_stages, "micro_batches": lay.micro_batches}


def checkpoint_meta(config: RunConfig, step: int) -> dict:
    """Return the metadata of a checkpoint taken after `step` steps of the run `config`."""
    return {
        "model": config.model.to_dict(),
        "layout": layout_record(config),
        "dtype": config.train.dtype,
        "data": {"seed": config.train.seed, "next_step": step,
                 "sequences_seen": step * config.train.global_batch},
        "next_lr": learning_rate(step, config.train) if config.train.steps > 0 else None,
        "run_config": config.to_dict(),
        "torch_version": torch.__version__,
    }


def save_checkpoint(trainer, config: RunConfig, folder: str | Path, extras: dict | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Gather the trainer's full state and write it as the checkpoint of its current step.

    `extras` adds keys to the metadata and `extra_files` adds files (such as a tokenizer's).
    Collective: every rank must call it. Returns the checkpoint's path on every rank, once it
    is complete on disk.
    """
    model = trainer.gather_model()
    optimizer = trainer.gather_optimizer()
    rng = state.gather_rng_states(trainer.mesh, trainer.device)

    meta = checkpoint_meta(config, trainer.step)
    if trainer.loss_scaler is not None:
        meta["loss_scaler"] = trainer.loss_scaler.state_dict()
    path = None
    if trainer.mesh.rank == 0:
        path = checkpoint.save(folder, trainer.step, model, optimizer, rng, {**meta, **(extras or {})},
                               keep=config.run.keep, extra_files=extra_files)
        log.info("saved checkpoint %s", path)
    if trainer.mesh.layout.world_size > 1:
        shared = [str(path) if path is not None else None]
        dist.broadcast_object_list(shared, src=0)  # also keeps the ranks together until saved
        path = Path(shared[0])
    return path


def resume(trainer, config: RunConfig, path: str | Path) -> Checkpoint:
    """Load parameters, AdamW state, step and random-generator states into the trainer."""
    ckpt = checkpoint.load(path)
    checkpoint.check_model_config(ckpt.meta, config.model.to_dict(), str(ckpt.path))
    if ckpt.optimizer is None:
        raise CheckpointError(f"{ckpt.path} has no optimizer state (it contains imported weights), so "
                              f"training cannot resume from it; start from its weights with "
                              f"--init-from {ckpt.path}")
    _load_into(trainer.load_model, ckpt.model, ckpt.path / checkpoint.MODEL)
    _load_into(trainer.load_optimizer, ckpt.optimizer, ckpt.path / checkpoint.OPTIMIZER)
    trainer.step = ckpt.step
    if trainer.loss_scaler is not None and "loss_scaler" in ckpt.meta:
        trainer.loss_scaler.load_state_dict(ckpt.meta["loss_scaler"])
    _restore_rng(trainer, config, ckpt)
    if trainer.mesh.rank == 0:
        _warn_about_changes(ckpt, config)
        log.info("resumed from %s at step %d (saved under %s)", ckpt.path, trainer.step,
                 _describe_layout(ckpt.meta.get("layout", {})))
    return ckpt


def init_from(trainer, config: RunConfig, path: str | Path) -> Checkpoint:
    """Load only the parameters of a checkpoint; the run starts at step 0 with fresh AdamW state."""
    ckpt = checkpoint.load(path, optimizer=False, rng=False)
    checkpoint.check_model_config(ckpt.meta, config.model.to_dict(), str(ckpt.path))
    _load_into(trainer.load_model, ckpt.model, ckpt.path / checkpoint.MODEL)
    if trainer.mesh.rank == 0:
        log.info("initialized the model from %s", ckpt.path)
    return ckpt


def _load_into(load, tensors: dict, file: Path) -> None:
    try:
        load(tensors)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise CheckpointError(f"{file} does not fit this model: {message}") from None


def _restore_rng(trainer, config: RunConfig, ckpt: Checkpoint) -> None:
    """Restore each rank's generators when the mesh (tp, pp, dp) is the one the checkpoint was
    saved from, so that every rank has the same coordinates as the rank that saved its states.

    Under another mesh a rank has no counterpart, so its generators keep their fresh state.
    Training does not draw from them (batches, dropout and initialization derive from the seed),
    so only code that a researcher adds would notice.
    """
    saved = ckpt.meta.get("layout", {})
    now = layout_record(config)
    same_mesh = all(saved.get(axis) == now[axis] for axis in ("tp", "pp", "dp"))
    states = state.rank_rng_states(ckpt.rng, trainer.mesh.rank) if ckpt.rng and same_mesh else None
    if states is not None:
        state.restore_rng_states(states, trainer.device)
    elif trainer.mesh.rank == 0:
        log.info("random-generator states not restored: the checkpoint was saved under %s, this "
                 "run uses %s", _describe_layout(ckpt.meta.get("layout", {})),
                 _describe_layout(layout_record(config)))


def _warn_about_changes(ckpt: Checkpoint, config: RunConfig) -> None:
    saved = ckpt.meta.get("run_config", {}).get("train", {})
    now = config.to_dict()["train"]
    changed = [f"{key} {saved[key]!r} -> {now[key]!r}" for key in _TRAJECTORY_KEYS
               if key in saved and saved[key] != now[key]]
    if changed:
        log.warning("resuming with a different training config than the checkpoint's, so the run "
                    "will not continue the saved trajectory exactly: %s", "; ".join(changed))


def _describe_layout(layout: dict) -> str:
    if not layout:
        return "an unknown layout"
    return " ".join(f"{key}={layout[key]}" for key in ("tp", "pp", "dp", "schedule",
                                                       "virtual_stages") if key in layout)


def start_checkpoint(config: RunConfig) -> tuple[str, Path] | None:
    """Return ("resume" or "init_from", path) of the checkpoint that the run starts from, or None."""
    run = config.run
    if run.resume is True:
        return "resume", Path(run.out)
    if isinstance(run.resume, str) and run.resume:
        return "resume", Path(run.resume)
    if run.init_from:
        return "init_from", Path(run.init_from)
    return None
