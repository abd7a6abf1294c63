"""Start ranks: spawn local processes on one machine, or join a job started by torchrun.

`run_ranks` is what `scripts/train.py` uses without a torchrun environment and what the tests use
to run a function on N gloo ranks. It starts one process per rank, hosts the rendezvous store in
the calling process (on a port the OS picks, so parallel test runs never collide), and watches the
ranks. When one rank raises or dies, the others are stopped at once and `RankFailure` reports the
failing rank, its traceback, and what every rank was doing (see `set_status`).

Each rank's process group gets a timeout, so a rank that waits forever on a dead or stuck peer
raises instead of hanging.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

_STATUS_BYTES = 200  # per rank, in the shared status board

# This process's rank, label and status board; set in each spawned rank.
_rank: int | None = None
_label = ""
_board = None
_local_status = ""
_timeout: datetime.timedelta | None = None  # the timeout the default process group got


class RankFailure(RuntimeError):
    """A rank raised an exception, died, or was stopped because another rank failed."""


def set_label(label: str) -> None:
    """Set the coordinates that prefix this rank's status and errors, such as `[tp0 pp1 dp0]`."""
    global _label
    _label = label


def set_status(text: str) -> None:
    """Record what this rank is doing now; failure reports show the last status of every rank."""
    global _local_status
    _local_status = text
    if _board is not None and _rank is not None:
        data = f"{_label} {text}".encode()[:_STATUS_BYTES - 1].ljust(_STATUS_BYTES, b"\0")
        start = _rank * _STATUS_BYTES
        _board[start:start + _STATUS_BYTES] = data


def group_timeout() -> datetime.timedelta | None:
    """Return the timeout that this process's default process group was created with.

    torch.distributed gives a new group its own default timeout (30 minutes) rather than the
    default group's, so every group of the mesh must be given this one explicitly.
    """
    return _timeout


def describe_self() -> str:
    """Return this rank's number, label and status, for error messages under torchrun."""
    rank = _rank if _rank is not None else os.environ.get("RANK", "?")
    return f"rank {rank} {_label} while {_local_status or 'starting'}"


def _read_board(board, world_size: int) -> list[str]:
    raw = bytes(board[:])
    return [
        raw[r * _STATUS_BYTES:(r + 1) * _STATUS_BYTES].rstrip(b"\0").decode(errors="replace").strip()
        for r in range(world_size)
    ]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return None


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, backend: str,
               timeout_s: float, threads: int, board, errors, result_dir: str) -> None:
    """Entry point of one spawned rank."""
    global _rank, _board, _timeout
    _rank, _board = rank, board
    _timeout = datetime.timedelta(seconds=timeout_s)
    torch.set_num_threads(threads)
    set_status("joining the process group")
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        set_status("finished")
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent
        errors.put((rank, f"{_label} while {_local_status}", type(error).__name__,
                    traceback.format_exc()))
        errors.close()
        errors.join_thread()  # the report must leave before the process exits
        sys.stderr.flush()
        os._exit(1)


def run_ranks(fn: Callable, world_size: int, args: tuple = (), *, backend: str = "gloo",
              timeout_s: float = 120.0, threads_per_rank: int = 1,
              start_method: str | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` new processes; return each rank's result.

    `fn` must be importable by name (a module-level function) and its result picklable. The
    process group of every rank is initialized before `fn` runs and has `timeout_s` as its
    timeout. Raises RankFailure when a rank fails; the other ranks are then terminated.
    """
    method = start_method or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Importing torch once in the fork server makes every later rank start in milliseconds.
        context.set_forkserver_preload(["torch", "torch.distributed", "parallel", "model", "training"])

    interface = _loopback_interface()
    if backend == "gloo" and interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = interface  # all ranks are local: talk over loopback

    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    board = context.Array("c", world_size * _STATUS_BYTES, lock=False)
    errors = context.Queue()
    with tempfile.TemporaryDirectory(prefix="microtron-ranks-") as result_dir:
        processes = [
            context.Process(
                target=_rank_main, name=f"rank{rank}",
                args=(rank, world_size, store.port, fn, args, backend, timeout_s,
                      threads_per_rank, board, errors, result_dir),
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        try:
            _watch(processes, errors, board, world_size)
        finally:
            _stop(processes)
        return [torch.load(Path(result_dir) / f"rank{rank}.pt", weights_only=False)
                for rank in range(world_size)]


def _watch(processes, errors, board, world_size: int) -> None:
    """Wait for every rank to finish; raise RankFailure at the first failure."""
    while True:
        failure = None
        try:
            failure = errors.get(timeout=0.05)
        except queue.Empty:
            pass
        if failure is None:
            for rank, process in enumerate(processes):
                if process.exitcode not in (None, 0):
                    failure = (rank, None, None, None)
                    break
        if failure is not None:
            raise RankFailure(_failure_report(failure, processes, errors, board, world_size))
        if all(process.exitcode == 0 for process in processes):
            return


def _failure_report(first, processes, errors, board, world_size: int) -> str:
    """Describe the first failure, any others reported soon after, and every rank's status."""
    statuses = _read_board(board, world_size)
    time.sleep(0.2)  # let ranks that fail because of the first one report too
    failures = [first]
    while True:
        try:
            failures.append(errors.get_nowait())
        except queue.Empty:
            break

    # A rank that died is the likelier cause: its peers only noticed the closed connection.
    reported = {rank for rank, *_ in failures}
    dead = [rank for rank, process in enumerate(processes)
            if process.exitcode not in (None, 0) and rank not in reported]
    lines = []
    for rank in dead + [rank for rank, _, _, trace in failures if trace is None]:
        code = processes[rank].exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        lines.append(f"rank {rank} died ({how}) while: {statuses[rank] or 'starting'}")
    for rank, where, kind, trace in failures:
        if trace is not None:
            lines.append(f"rank {rank} {where} raised {kind}:\n{trace.rstrip()}")
    lines.append("status of every rank when the failure was seen:")
    lines += [f"  rank {r}: {text or 'not started'}" for r, text in enumerate(statuses)]
    return "\n".join(lines)


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 5
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def init_from_torchrun(backend: str, timeout_s: float) -> tuple[int, int]:
    """Join the job described by torchrun's environment; return (rank, world_size)."""
    global _rank, _timeout
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _rank = rank
    _timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=_timeout)
    return rank, world_size


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
