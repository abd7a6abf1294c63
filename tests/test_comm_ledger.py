"""The communication ledger of one training step matches the closed forms of each layout.

Each case trains one step of the tiny model, then records a second step in a `comm.Ledger` and
compares every (op, group) row with the volumes of Narayanan et al. 2021:

  tp: two all-reduces forward and two backward per layer and micro-batch, each of b*s*h
      elements, so a ring moves 8*b*s*h*(t-1)/t elements per layer per micro-batch per rank.
      The first stage adds the embedding's forward all-reduce (b*s*h). The last adds the LM
      head's input-gradient all-reduce (b*s*h) and the vocab-parallel cross-entropy's two
      (b*s for the max, 2*b*s for the target logit and the sum of exponentials);
  pp: b*s*h per micro-batch per direction across each stage boundary between two ranks, the
      tied embedding's gradient summed once between the first and last stage, and the loss;
  dp: every local gradient element all-reduced exactly once per step, and the loss;
  model (tp x pp): the global gradient norm, one element.

A row that the closed form does not list, or a missing one, fails the test. The job also counts
the torch.distributed calls themselves, so a collective that bypasses `parallel.comm` (and so the
ledger) fails it too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import pytest
import torch
import torch.distributed as dist

from parallel import comm
from parallel.layers import padded_size
from parallel.mesh import Layout
from parallel.pipeline.schedules import SCHEDULES
from tests.helpers import make_trainer, run_config, run_job

MICRO_BATCHES = 2

# Public torch.distributed functions that move data or synchronize, and the aliases that
# `parallel.comm` resolved at import.
_DIST_FUNCTIONS = (
    "all_reduce", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
    "reduce_scatter_single", "broadcast", "isend", "irecv", "send", "recv", "batch_isend_irecv",
    "all_gather", "all_gather_object", "gather_object", "broadcast_object_list", "barrier",
    "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
)
_COMM_ALIASES = ("_all_gather_tensor", "_reduce_scatter_tensor")


def _counted(fn, name: str, counts: dict):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _counting_dist_calls(counts: dict):
    """Count every call of a torch.distributed communication function inside the block."""
    patched = []
    for module, names in ((dist, _DIST_FUNCTIONS), (comm, _COMM_ALIASES)):
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None:
                patched.append((module, name, fn))
                setattr(module, name, _counted(fn, name, counts))
    try:
        yield counts
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)


def _ledger_job(rank, world_size, overrides):
    trainer = make_trainer(rank, overrides)
    trainer.train_step()
    ledger, dist_calls = comm.Ledger(), {}
    with _counting_dist_calls(dist_calls), comm.recording(ledger):
        trainer.train_step()
    return {
        "rows": {(op, group): (calls, elements, num_bytes)
                 for op, group, calls, elements, num_bytes, _ in ledger.rows()},
        "volume": {key: ledger.volume(*key) for key in ledger.calls},
        "timed": set(ledger.seconds),
        "dist_calls": sum(dist_calls.values()),
        "stages": trainer.stages,
        "stage_ranks": trainer.schedule.stage_ranks,
        "pp_rank": trainer.mesh.pp_rank,
        "layers": sum(len(trainer.layer_ranges[s]) for s in trainer.stages),
        "first": trainer.holds_first_stage,
        "last": trainer.holds_last_stage,
        "local_params": sum(p.numel() for p in trainer.params),
        "buckets": len(trainer.grads.buckets),
    }


def _boundary_crossings(stages, stage_ranks, pp_rank) -> tuple[int, int]:
    """Return (sends, receives) of this rank per micro-batch: one per direction across each
    boundary between one of its stages and a stage on another rank."""
    last = len(stage_ranks) - 1
    sends = receives = 0
    for s in stages:
        if s < last and stage_ranks[s + 1] != pp_rank:
            sends += 1  # activations forward
            receives += 1  # their gradient back
        if s > 0 and stage_ranks[s - 1] != pp_rank:
            receives += 1
            sends += 1
    return sends, receives


def _expected_rows(info: dict, config) -> dict:
    """Return {(op, group): (calls, elements)} of one training step on this rank."""
    lay, model = config.layout, config.model
    t, p, d, m = lay.tp, lay.pp, lay.dp, lay.micro_batches
    b, s, h = config.micro_batch_size, config.seq_len, model.n_embd
    bsh = b * s * h
    rows = {}
    if t > 1:
        calls = m * (4 * info["layers"] + info["first"] + 3 * info["last"])
        elements = m * (4 * info["layers"] * bsh + info["first"] * bsh
                        + info["last"] * (bsh + b * s + 2 * b * s))
        rows[("all_reduce", "tp")] = (calls, elements)
    if t * p > 1:
        rows[("all_reduce", "model")] = (1, 1)
    if p > 1:
        rows[("all_reduce", "pp")] = (1, 1)
        sends, receives = _boundary_crossings(info["stages"], info["stage_ranks"], info["pp_rank"])
        rows[("send", "pp")] = (m * sends, m * sends * bsh)
        rows[("recv", "pp")] = (m * receives, m * receives * bsh)
        if info["first"] or info["last"]:
            rows[("all_reduce", "embedding")] = (1, padded_size(model.vocab_size, t) // t * h)
    if d > 1:
        rows[("all_reduce", "dp")] = (info["buckets"] + 1, info["local_params"] + 1)
    return rows


def _check_ledger(overrides: dict):
    config = run_config(overrides)
    lay = config.layout
    results = run_job(_ledger_job, Layout(lay.tp, lay.pp, lay.dp), overrides)
    b, s, h = config.micro_batch_size, config.seq_len, config.model.n_embd
    for rank, info in enumerate(results):
        expected = _expected_rows(info, config)
        actual = {key: (calls, elements) for key, (calls, elements, _) in info["rows"].items()}
        assert sorted(actual) == sorted(expected), f"rank {rank}: (op, group) rows differ"
        for key in expected:
            assert actual[key] == expected[key], f"rank {rank} {key}: (calls, elements)"
        for key, (_, elements, num_bytes) in info["rows"].items():
            assert num_bytes == 8 * elements, f"rank {rank} {key}: float64 bytes"
        assert info["timed"] <= set(info["rows"]), f"rank {rank}: time of an unrecorded op"
        calls = sum(calls for calls, _, _ in info["rows"].values())
        assert info["dist_calls"] == calls, f"rank {rank}: torch.distributed calls outside the ledger"

        if lay.tp > 1:
            # The layers' share of the ring volume: 8*b*s*h*(t-1)/t per layer per micro-batch.
            t, m = lay.tp, lay.micro_batches
            ends = info["first"] * b * s * h + info["last"] * (b * s * h + 3 * b * s)
            layers_volume = info["volume"][("all_reduce", "tp")] - 2 * m * ends * (t - 1) / t
            expected_volume = info["layers"] * m * 8 * b * s * h * (t - 1) / t
            assert layers_volume == pytest.approx(expected_volume, rel=1e-12), f"rank {rank}"
    return results


def _overrides(tp, pp, dp, schedule="1f1b", virtual_stages=1):
    return {"layout.tp": tp, "layout.pp": pp, "layout.dp": dp, "layout.schedule": schedule,
            "layout.micro_batches": MICRO_BATCHES, "layout.virtual_stages": virtual_stages}


_LAYOUTS = list(itertools.product((1, 2), (1, 2), (1, 2)))


@pytest.mark.parametrize("tp,pp,dp", _LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in _LAYOUTS])
def test_ledger_matches_closed_forms(tp, pp, dp):
    _check_ledger(_overrides(tp, pp, dp))


_ZOO_CASES = [  # (schedule, tp, virtual stages, sends per micro-batch on each rank)
    # Stages 0 and 2 on rank 0, 1 and 3 on rank 1: three boundaries cross, in both directions.
    ("interleaved-1f1b", 1, 2, 3),
    # The I action runs the TP all-reduces of the input gradients, the W action none.
    ("zb-h1", 2, 1, 1),
]


@pytest.mark.parametrize("schedule,tp,virtual_stages,sends", _ZOO_CASES,
                         ids=[case[0] for case in _ZOO_CASES])
def test_ledger_schedule_zoo_pp2(schedule, tp, virtual_stages, sends):
    if schedule not in SCHEDULES:
        pytest.skip(f"schedule {schedule!r} is not in this version's schedule zoo")
    results = _check_ledger(_overrides(tp, 2, 1, schedule, virtual_stages))
    for info in results:
        assert info["rows"][("send", "pp")][0] == sends * MICRO_BATCHES


def test_ledger_times_only_while_recording():
    ledger = comm.Ledger()
    with comm.recording(ledger):
        pass
    assert ledger.rows() == []
    assert ledger.total_seconds() == 0.0
    tensor = torch.zeros(4, dtype=torch.float64)
    ledger.record("all_reduce", "tp", tensor, group_size=4)
    assert ledger.volume("all_reduce", "tp") == pytest.approx(2 * 4 * 3 / 4)
    ledger.record("send", "pp", tensor)
    assert ledger.volume("send", "pp") == 4
