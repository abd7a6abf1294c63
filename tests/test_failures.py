"""Invalid input fails with a clear error before any rank starts; a failing rank ends the job."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from parallel import comm
from parallel.launch import RankFailure, run_ranks, set_label, set_status
from parallel.mesh import Layout, Mesh
from training.cli import main
from training.config import ConfigError, load_run_config, validate


def _config_error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as error:
        validate(load_run_config(None, {"model.preset": "tiny", **overrides}))
    return str(error.value)


def test_heads_not_divisible_by_tp():
    message = _config_error({"layout.tp": 3})
    assert "n_head=4 is not divisible by tp=3" in message
    assert "[1, 2, 4]" in message, "the error suggests the tp values that work"


def test_hidden_size_not_divisible_by_tp():
    message = _config_error({"model.n_head": 6, "model.n_embd": 36, "model.n_inner": 100,
                             "layout.tp": 3})
    assert "MLP size 100 is not divisible by tp=3" in message


def test_more_stages_than_layers():
    message = _config_error({"layout.pp": 5})
    assert "5 stages is more than n_layer=4" in message
    assert "pp <= 4" in message


def test_batch_not_divisible_into_micro_batches_and_dp():
    message = _config_error({"train.global_batch": 10, "layout.micro_batches": 4, "layout.dp": 2})
    assert "global_batch=10" in message
    assert "multiple of 8" in message


def test_every_broken_rule_is_listed():
    message = _config_error({"layout.tp": 3, "layout.pp": 5, "train.global_batch": 7,
                             "layout.micro_batches": 2})
    assert "n_head=4" in message
    assert "5 stages" in message
    assert "global_batch=7" in message


def test_unknown_keys_and_schedules():
    assert "unknown key(s) ['tpp']" in _config_error({"layout.tpp": 2})
    assert "schedule='zigzag' is unknown" in _config_error({"layout.schedule": "zigzag"})
    with pytest.raises(ConfigError, match="unknown model config key"):
        load_run_config(None, {"model.n_layers": 2})


def test_cli_rejects_bad_layout_before_starting_ranks(capsys):
    assert main(["--tp", "3", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "n_head=4 is not divisible by tp=3" in err
    assert "starting" not in err, "no rank may start for an invalid config"


def test_cli_rejects_torchrun_world_size_mismatch(monkeypatch, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["--tp", "2", "--pp", "2", "--dp", "1"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=3" in err
    assert "= 4" in err


def test_cli_rejects_corpus_shorter_than_one_sequence(tmp_path, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_text("too short")
    assert main(["--data", str(corpus), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one sequence" in err
    assert "129" in err


def test_cli_rejects_token_ids_beyond_vocabulary(tmp_path, capsys):
    import numpy as np

    ids = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(ids)
    assert main(["--data", str(ids), "--steps", "1", "--set", "train.seq_len=16"]) == 2
    assert "token id 999" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Failing ranks


def _raise_on_rank1(rank, world_size):
    mesh = Mesh(Layout(tp=world_size), rank)
    set_label(mesh.describe())
    if rank == 0:
        set_status("waiting in an all-reduce for rank 1")
    # Rank 1 fails only once rank 0's status is posted, so that the report can show it.
    dist.barrier()
    if rank == 1:
        set_status("computing the answer")
        raise ValueError("rank 1 cannot continue")
    comm.all_reduce(torch.ones(4), mesh.tp)


def test_exception_on_one_rank_ends_the_job():
    with pytest.raises(RankFailure) as failure:
        run_ranks(_raise_on_rank1, 2, timeout_s=60)
    message = str(failure.value)
    assert "rank 1 [tp1 pp0 dp0] while computing the answer raised ValueError" in message
    assert "Traceback" in message
    assert "rank 1 cannot continue" in message
    assert "rank 0: [tp0 pp0 dp0] waiting in an all-reduce for rank 1" in message


def _die_on_rank1(rank, world_size):
    mesh = Mesh(Layout(dp=world_size), rank)
    set_label(mesh.describe())
    if rank == 1:
        set_status("step 3: 0F2 (forward)")
        os.kill(os.getpid(), signal.SIGKILL)
    set_status("waiting for rank 1")
    comm.all_reduce(torch.ones(4), mesh.dp)


def test_dead_rank_ends_the_job():
    with pytest.raises(RankFailure) as failure:
        run_ranks(_die_on_rank1, 2, timeout_s=60)
    message = str(failure.value)
    assert "rank 1 died (killed by SIGKILL) while: [tp0 pp0 dp1] step 3: 0F2 (forward)" in message


def _stuck_rank1(rank, world_size):
    mesh = Mesh(Layout(pp=world_size), rank)
    set_label(mesh.describe())
    if rank == 1:
        set_status("stuck on purpose")
        time.sleep(600)
    set_status("waiting in an all-reduce for rank 1")
    comm.all_reduce(torch.ones(4), mesh.pp)


def test_stuck_rank_times_out_and_is_named():
    with pytest.raises(RankFailure) as failure:
        run_ranks(_stuck_rank1, 2, timeout_s=3)
    message = str(failure.value)
    assert "rank 0 [tp0 pp0 dp0] while waiting in an all-reduce for rank 1 raised" in message
    assert "rank 1: [tp0 pp1 dp0] stuck on purpose" in message
