"""Checkpoints move between layouts, and a resumed run continues the saved one exactly.

A checkpoint saved under (tp, pp, dp) = (2, 2, 1) loads under other layouts with the same
logits, saves back bit for bit, and takes the same next step. Training six steps straight equals
three steps, a save, a resume in a new process and three more.
"""

from __future__ import annotations

import pytest
import torch

from parallel.mesh import Layout
from tests.helpers import make_trainer, run_job
from training import checkpoint
from training.generate import Decoder
from training.resume import resume, save_checkpoint

SAVED_LAYOUT = (2, 2, 1)
OTHER_LAYOUTS = [(1, 1, 1), (4, 1, 1), (1, 4, 1), (1, 2, 2)]
# The layouts differ in micro-batches too; one of them also runs another schedule.
SCHEDULES = {(1, 4, 1): "gpipe"}


def _overrides(tp, pp, dp, **extra):
    overrides = {"layout.tp": tp, "layout.pp": pp, "layout.dp": dp,
                 "layout.micro_batches": max(1, 2 * pp // dp), "train.steps": 6}
    overrides.update(extra)
    return overrides


def _probe_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(trainer) -> torch.Tensor | None:
    """Return the full logits of the probe tokens on the last stage's ranks, else None."""
    return Decoder.from_trainer(trainer).logits(_probe_tokens())


def _train_and_save_job(rank, world_size, overrides, folder, steps):
    trainer = make_trainer(rank, overrides)
    for _ in range(steps):
        trainer.train_step()
    save_checkpoint(trainer, trainer.config, folder)
    logits = _logits(trainer)
    loss = trainer.train_step().loss
    return {"logits": logits, "next_loss": loss}


def _load_save_step_job(rank, world_size, overrides, source, folder):
    """Resume from `source`, record logits, save into `folder`, then take one step."""
    trainer = make_trainer(rank, overrides)
    resume(trainer, trainer.config, source)
    logits = _logits(trainer)
    save_checkpoint(trainer, trainer.config, folder)
    loss = trainer.train_step().loss
    return {"logits": logits, "next_loss": loss, "step": trainer.step}


def _reload_job(rank, world_size, overrides, sources, folders):
    """Resume from each source in turn and save it again unchanged."""
    for source, folder in zip(sources, folders):
        trainer = make_trainer(rank, overrides)
        resume(trainer, trainer.config, source)
        save_checkpoint(trainer, trainer.config, folder)
    return None


def _last_stage_logits(results):
    found = [r["logits"] for r in results if r["logits"] is not None]
    assert found, "no rank returned logits"
    for other in found[1:]:
        assert torch.equal(other, found[0]), "ranks of the last stage disagree on the logits"
    return found[0]


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), f"{what}: the tensor names differ"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def test_checkpoint_moves_between_layouts(tmp_path):
    saved = tmp_path / "saved"
    results = run_job(_train_and_save_job, Layout(*SAVED_LAYOUT), _overrides(*SAVED_LAYOUT),
                      str(saved), 2)
    expected_logits = _last_stage_logits(results)
    expected_loss = results[0]["next_loss"]
    original = checkpoint.load(saved)
    assert original.meta["layout"]["tp"] == 2
    assert original.meta["layout"]["pp"] == 2

    copies = []
    for layout in OTHER_LAYOUTS:
        name = "tp{}-pp{}-dp{}".format(*layout)
        copy = tmp_path / name
        overrides = _overrides(*layout, **{"layout.schedule": SCHEDULES.get(layout, "1f1b")})
        results = run_job(_load_save_step_job, Layout(*layout), overrides, str(saved), str(copy))
        torch.testing.assert_close(_last_stage_logits(results), expected_logits, rtol=1e-10,
                                   atol=1e-12, msg=lambda m, n=name: f"logits under {n}: {m}")
        for rank, result in enumerate(results):
            assert result["next_loss"] == pytest.approx(expected_loss, rel=1e-10), f"{name} rank {rank}"
            assert result["step"] == 3
        reloaded = checkpoint.load(copy)
        saved_from = reloaded.meta["layout"]
        assert (saved_from["tp"], saved_from["pp"], saved_from["dp"]) == layout
        _assert_same_tensors(reloaded.model, original.model, f"model saved under {name}")
        _assert_same_tensors(reloaded.optimizer, original.optimizer, f"optimizer saved under {name}")
        copies.append(copy)

    # ... and back: each copy, loaded under the original layout and saved again, is bitwise the
    # original (for tp2 -> tp1 -> tp2 that is the copy saved under (1, 1, 1)).
    backs = [tmp_path / f"back-{copy.name}" for copy in copies]
    run_job(_reload_job, Layout(*SAVED_LAYOUT), _overrides(*SAVED_LAYOUT),
            [str(c) for c in copies], [str(b) for b in backs])
    for back in backs:
        again = checkpoint.load(back)
        _assert_same_tensors(again.model, original.model, back.name)
        _assert_same_tensors(again.optimizer, original.optimizer, back.name)
        assert again.step == original.step


# ----------------------------------------------------------------------------------------------
# Exact resume


def _straight_job(rank, world_size, overrides, steps):
    trainer = make_trainer(rank, overrides)
    losses = [trainer.train_step().loss for _ in range(steps)]
    return {"losses": losses, "model": trainer.gather_model(), "optimizer": trainer.gather_optimizer()}


def _first_half_job(rank, world_size, overrides, steps, folder):
    trainer = make_trainer(rank, overrides)
    losses = [trainer.train_step().loss for _ in range(steps)]
    save_checkpoint(trainer, trainer.config, folder)
    return {"losses": losses}


def _second_half_job(rank, world_size, overrides, folder):
    trainer = make_trainer(rank, overrides)
    resume(trainer, trainer.config, folder)
    losses = []
    while trainer.step < trainer.config.train.steps:
        losses.append(trainer.train_step().loss)
    return {"losses": losses, "model": trainer.gather_model(), "optimizer": trainer.gather_optimizer(),
            "torch_rng": torch.get_rng_state()}


# fp32 with dropout on: the data position, the dropout masks and the AdamW state must all resume.
_FP32 = {"train.dtype": "float32", "model.dropout": 0.1}


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 1)], ids=["single", "tp2-pp2"])
def test_resume_is_exact(tmp_path, layout):
    overrides = _overrides(*layout, **_FP32)
    straight = run_job(_straight_job, Layout(*layout), overrides, 6)[0]
    first = run_job(_first_half_job, Layout(*layout), overrides, 3, str(tmp_path))[0]
    second = run_job(_second_half_job, Layout(*layout), overrides, str(tmp_path))[0]

    assert first["losses"] + second["losses"] == straight["losses"]
    _assert_same_tensors(second["model"], straight["model"], "parameters after six steps")
    _assert_same_tensors(second["optimizer"], straight["optimizer"], "AdamW state after six steps")
    # Training draws nothing from torch's generator, so it is still where the save left it.
    saved_rng = checkpoint.load(tmp_path).rng["rank0.torch"]
    assert torch.equal(second["torch_rng"], saved_rng), "rank 0's torch generator was not restored"


def test_resume_in_other_layouts(tmp_path):
    saved_overrides = _overrides(*SAVED_LAYOUT, **_FP32)
    straight = run_job(_straight_job, Layout(*SAVED_LAYOUT), saved_overrides, 6)[0]
    first = run_job(_first_half_job, Layout(*SAVED_LAYOUT), saved_overrides, 3, str(tmp_path))[0]

    for layout in [(1, 1, 1), (1, 2, 2)]:
        name = "tp{}-pp{}-dp{}".format(*layout)
        second = run_job(_second_half_job, Layout(*layout), _overrides(*layout, **_FP32),
                         str(tmp_path))[0]
        losses = first["losses"] + second["losses"]
        assert losses == pytest.approx(straight["losses"], rel=1e-5), name
        for param, expected in straight["model"].items():
            torch.testing.assert_close(second["model"][param], expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=f"{name} {param}": f"{n}: {m}")
