"""Deferred weight gradients, for schedules that split the backward pass.

Zero-bubble schedules (Qi et al. 2024) run a backward in two actions: I computes the gradient with
respect to the stage input, which the previous stage is waiting for, and W computes the weight
gradients later, to fill what would otherwise be a bubble. Inside `deferring_weight_grads(queue)`
the linear layers of `parallel.layers` compute their input gradient as usual, but they append
their weight-gradient computation to `queue` instead of running it. `run_deferred(queue)` then
runs the queued work.
Other parameters (LayerNorm, embeddings, biases outside linear layers) get their gradients during
the I action, because they cost little.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

_queue: list[Callable[[], None]] | None = None


@contextlib.contextmanager
def deferring_weight_grads(queue: list[Callable[[], None]]):
    """Queue the weight-gradient work of every linear layer's backward run inside the block."""
    global _queue
    previous, _queue = _queue, queue
    try:
        yield queue
    finally:
        _queue = previous


def active_queue() -> list[Callable[[], None]] | None:
    """Return the queue that backward passes must defer weight gradients to, if any."""
    return _queue


def run_deferred(queue: list[Callable[[], None]]) -> None:
    """Run and clear the queued weight-gradient computations, oldest first.

    They run without autograd recording: their inputs are saved activations that require grad,
    and a recorded result could not be added in place into a parameter's gradient.
    """
    with torch.no_grad():
        for compute in queue:
            compute()
    queue.clear()


def accumulate_grad(param, grad) -> None:
    """Add `grad` to `param.grad` in place (it may be a view into a gradient buffer), then tell
    the parameter's gradient buffer, if it watches contributions (`on_grad_accumulated`)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)
    notify = getattr(param, "on_grad_accumulated", None)
    if notify is not None:
        notify(param)
