"""Dropout draws the same masks under every layout, so parallel training equals serial training
with dropout on, in the loss and in every gradient."""

from __future__ import annotations

import pytest
import torch

from parallel.dropout import GlobalSlice, hashed_dropout, keep_mask
from parallel.mesh import Layout
from tests.helpers import make_trainer, run_job


def test_slice_mask_equals_slice_of_global_mask():
    full = keep_mask(7, (4, 6, 8), GlobalSlice((4, 6, 8), (0, 0, 0)), 0.3, "cpu")
    part = keep_mask(7, (2, 3, 8), GlobalSlice((4, 6, 8), (1, 3, 0)), 0.3, "cpu")
    assert torch.equal(part, full[1:3, 3:6])
    assert 0.2 < 1 - full.float().mean() < 0.4


def test_dropout_saves_nothing_and_backward_uses_same_mask():
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    where = GlobalSlice((2, 8, 16), (0, 0, 0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = hashed_dropout(x, 0.25, 99, where)
    assert saved == [], "dropout must regenerate its mask instead of saving it"
    y.sum().backward()
    mask = keep_mask(99, x.shape, where, 0.25, "cpu")
    torch.testing.assert_close(y, x.detach() * mask / 0.75)
    torch.testing.assert_close(x.grad, mask.double() / 0.75)


def _gradients_job(rank, world_size, overrides):
    trainer = make_trainer(rank, overrides)
    loss = trainer.compute_gradients()
    return {"loss": loss, "grads": trainer.gather_gradients()}


_LAYOUTS = {
    "tp2-pp2-dp1": {"layout.tp": 2, "layout.pp": 2},
    "tp1-pp2-dp2": {"layout.pp": 2, "layout.dp": 2},
    "tp2-pp2-sp": {"layout.tp": 2, "layout.pp": 2, "layout.sequence_parallel": True},
}


@pytest.mark.parametrize("name", list(_LAYOUTS))
def test_dropout_gradients_match_single_process(name):
    overrides = {"model.dropout": 0.1, "layout.micro_batches": 2, **_LAYOUTS[name]}
    layout = Layout(overrides.get("layout.tp", 1), overrides.get("layout.pp", 1),
                    overrides.get("layout.dp", 1))
    results = run_job(_gradients_job, layout, overrides)

    torch.set_num_threads(1)
    single = _gradients_job(0, 1, {"model.dropout": 0.1})
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-12), f"rank {rank}"
    grads = results[0]["grads"]
    assert sorted(grads) == sorted(single["grads"])
    for param_name, expected in single["grads"].items():
        torch.testing.assert_close(grads[param_name], expected, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, n=param_name: f"{n}: {m}")
    # Dropout is really on: the masked gradient differs from the gradient without dropout.
    without = _gradients_job(0, 1, {"model.dropout": 0.0})
    assert not torch.allclose(single["grads"]["transformer.wpe.weight"],
                              without["grads"]["transformer.wpe.weight"])
