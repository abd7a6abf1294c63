"""Mixed precision: the autocast dtype of a run and dynamic loss scaling for fp16.

The parameters stay in float32 and are the master weights. The forward pass runs under
torch.autocast, so matmuls and attention compute in bf16 or fp16 while LayerNorm, the residual
stream and the loss stay in fp32. The gradients land in the float32 gradient buffer, where they
accumulate over micro-batches and are reduced over dp.

fp16 has 5 exponent bits, so small gradients underflow to zero. Dynamic loss scaling multiplies
the loss by a large factor before backward and divides the gradients by it before the update.
When the scaled gradients overflow (the global norm is inf or NaN), the step is skipped and the
factor halved; after `growth_interval` steps in a row without overflow it is doubled.
"""

from __future__ import annotations

import math

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """Return the autocast dtype of `train.mixed_precision` (None: no autocast)."""
    if mixed_precision is None:
        return None
    return AUTOCAST_DTYPES[mixed_precision]


class DynamicLossScaler:
    """The loss scale for fp16 training and its update rule (see the module doc)."""

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0):
        self.scale = initial_scale
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._good_steps = 0

    def state_dict(self) -> dict:
        """Return the scale and the count of finite steps since it last changed (plain numbers,
        stored in a checkpoint's metadata)."""
        return {"scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, saved: dict) -> None:
        self.scale = float(saved["scale"])
        self._good_steps = int(saved["good_steps"])

    def update(self, grad_norm: float) -> bool:
        """Update the scale after a backward pass whose gradient norm was `grad_norm`.

        Returns whether the gradients are finite, which is whether the step may be taken.
        """
        if not math.isfinite(grad_norm):
            self.scale = max(self.min_scale, self.scale / 2)
            self._good_steps = 0
            return False
        self._good_steps += 1
        if self._good_steps == self.growth_interval:
            self.scale *= 2
            self._good_steps = 0
        return True
