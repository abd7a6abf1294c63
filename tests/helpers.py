"""Helpers for tests that run real gloo ranks in separate processes.

Every job gets a process-group timeout, so a bug fails its test instead of stalling the suite, and
the rendezvous store listens on a port the OS picks, so parallel pytest-xdist workers never
collide.
"""

from __future__ import annotations

import functools

import pytest
import torch

from parallel.launch import run_ranks, set_label
from parallel.mesh import Layout, Mesh
from training.config import load_run_config, validate
from training.data import load_corpus
from training.trainer import Trainer

TIMEOUT_S = 60.0

# A tiny model and batch for layout tests; float64 so that layouts agree to ~1e-12.
TINY = {
    "model.preset": "tiny",
    "train.global_batch": 8,
    "train.seq_len": 16,
    "train.dtype": "float64",
    "train.warmup_steps": 1,
    "train.steps": 3,
    "train.lr": 1e-2,
    "train.eval_batches": 2,
}


def run_config(overrides: dict):
    """Build and validate a run config from the tiny defaults plus dotted `overrides`."""
    config = load_run_config(None, {**TINY, **overrides})
    validate(config)
    return config


@functools.lru_cache(maxsize=None)
def corpus_tokens():
    return load_corpus(None).tokens


def make_trainer(rank: int, overrides: dict) -> Trainer:
    config = run_config(overrides)
    mesh = Mesh(config.layout.mesh, rank)
    set_label(mesh.describe())
    return Trainer(config, mesh, corpus_tokens())


def train_job(rank: int, world_size: int, overrides: dict, steps: int, record_after: tuple = (1, 3)):
    """Train `steps` steps; return, on every rank, losses, grad norms and (rank 0) the full
    parameters after each step listed in `record_after`."""
    trainer = make_trainer(rank, overrides)
    losses, norms, snapshots = [], [], {}
    for _ in range(steps):
        stats = trainer.train_step()
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
        if trainer.step in record_after:
            snapshots[trainer.step] = trainer.gather_model()
    return {"losses": losses, "norms": norms, "params": snapshots}


def run_job(fn, layout: Layout, *args, timeout_s: float = TIMEOUT_S):
    """Run `fn(rank, world_size, *args)` on one process per rank of `layout`."""
    return run_ranks(fn, layout.world_size, args, timeout_s=timeout_s)


@functools.lru_cache(maxsize=None)
def _reference(frozen_overrides: tuple, steps: int, record_after: tuple):
    torch.set_num_threads(1)
    overrides = dict(frozen_overrides)
    overrides.update({"layout.tp": 1, "layout.pp": 1, "layout.dp": 1, "layout.micro_batches": 1,
                      "layout.schedule": "1f1b", "layout.layers_per_stage": None,
                      "layout.virtual_stages": 1})
    return train_job(0, 1, overrides, steps, record_after)


# Options that change memory and communication but not what a step computes: the reference runs
# without them.
MEMORY_ONLY_KEYS = ("train.recompute", "train.recompute_layers", "train.distributed_optimizer",
                    "train.grad_bucket_mb")


def reference(overrides: dict, steps: int = 3, record_after: tuple = (1, 3)):
    """Return `train_job`'s result for the single-process model, in this process."""
    model_keys = {k: v for k, v in overrides.items()
                  if not k.startswith("layout.") and k not in MEMORY_ONLY_KEYS}
    return _reference(tuple(sorted(model_keys.items())), steps, record_after)


def assert_params_close(actual: dict, expected: dict, rtol: float = 1e-9, atol: float = 1e-12):
    assert sorted(actual) == sorted(expected), "parameter names differ from the single-process model"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def assert_matches_reference(overrides: dict, steps: int = 3):
    """Train `steps` steps in the layout of `overrides`; assert that every rank's losses and the
    full parameters after steps 1 and 3 match the single-process model."""
    layout = Layout(overrides.get("layout.tp", 1), overrides.get("layout.pp", 1),
                    overrides.get("layout.dp", 1))
    results = run_job(train_job, layout, overrides, steps)
    expected = reference(overrides, steps)
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-10), f"rank {rank}"
    for step in (1, 3):
        if step <= steps:
            assert_params_close(results[0]["params"][step], expected["params"][step])
    return results, expected
