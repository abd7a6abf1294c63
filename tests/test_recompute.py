"""Activation recomputation changes memory, not results: each mode takes the single-process step."""

from __future__ import annotations

import pytest

from tests.helpers import assert_matches_reference, run_config
from training.config import ConfigError

_CASES = {
    # selective with dropout on: the recomputed core must draw the same dropout mask
    "selective": {"layout.tp": 2, "layout.pp": 2, "train.recompute": "selective", "model.dropout": 0.1},
    "full": {"layout.tp": 2, "layout.pp": 2, "layout.sequence_parallel": True,
             "train.recompute": "full", "model.dropout": 0.1},
    "full-first-block": {"layout.pp": 2, "train.recompute": "full", "train.recompute_layers": 1},
}


@pytest.mark.parametrize("case", list(_CASES))
def test_recompute_matches_single_process(case):
    assert_matches_reference({"layout.micro_batches": 4, **_CASES[case]})


def test_recompute_layers_needs_full_mode():
    with pytest.raises(ConfigError, match="recompute_layers=2 applies only to recompute=full"):
        run_config({"train.recompute": "selective", "train.recompute_layers": 2})
    with pytest.raises(ConfigError, match="recompute=some must be none, selective or full"):
        run_config({"train.recompute": "some"})
