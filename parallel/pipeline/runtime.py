"""Run one rank's action list: forwards, backwards and the point-to-point transfers between them.

The runtime is independent of the model. It calls `forward(stage, microbatch, inputs)`, which
returns the stage output, or on the last stage the micro-batch's scaled loss, and runs autograd
on what that returns. Receives are posted as non-blocking irecvs when their action comes up (the
communication pass places them ahead of need) and waited for only when a compute action consumes
the tensor; sends are non-blocking and waited for at the end of the step. Each stage's stashed
input and output are dropped as soon as its backward (B or I) has run.

An I action runs the backward with the weight gradients of the linear layers queued (see
`parallel.weight_grad`) in a queue of its own (stage, micro-batch); the W action of that pair runs
the queue. A run that ends with a queue not run raises.

With `record` set, the runtime appends one `Record` per action it executes to `trace`: for a
compute action the time it computed (after its inputs arrived), for a send or receive the time it
was posted. Times are seconds from the start of the run, taken after a barrier over the pipeline
group so that the ranks' clocks start together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from parallel import comm
from parallel.launch import set_status
from parallel.mesh import Group
from parallel.pipeline.actions import Action, Schedule
from parallel.weight_grad import deferring_weight_grads, run_deferred

_DESCRIPTIONS = {
    "F": "forward", "B": "backward", "I": "backward for inputs", "W": "backward for weights",
    "SF": "sending activations", "RF": "posting receive of activations",
    "SB": "sending gradients", "RB": "posting receive of gradients",
}


@dataclass(frozen=True)
class Record:
    """One executed action and when it ran, in seconds from the start of the run."""

    action: Action
    start: float
    end: float


@dataclass
class _Transfers:
    """Tensors in flight or handed over on this rank during one run, keyed by (stage, mb)."""

    forward_inputs: dict = field(default_factory=dict)  # input of a stage's forward
    output_grads: dict = field(default_factory=dict)  # gradient of a stage's output
    to_send: dict = field(default_factory=dict)  # ("F" | "B", stage, mb) -> tensor to send
    sends: list = field(default_factory=list)  # (work, tensor) until the end of the run


class PipelineRuntime:
    """Executes schedules for one pipeline rank.

    forward(stage, mb, inputs) -> output or scaled loss; `first_inputs(mb)` gives the first
    stage's input. `activation_shape` and `dtype` describe the tensors passed between stages.
    """

    def __init__(self, pp_group: Group, pp_rank: int, forward: Callable, first_inputs: Callable,
                 activation_shape: tuple[int, ...], dtype: torch.dtype, device):
        self.pp_group = pp_group
        self.pp_rank = pp_rank
        self.forward = forward
        self.first_inputs = first_inputs
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.device = device
        self.step = 0
        self.max_stashed = 0  # most micro-batches stashed at once during the last run
        self.max_stashed_per_stage: dict[int, int] = {}  # the same, per stage
        self.record = False  # fill `trace` during each run
        self._start: float | None = None  # when the current compute action began
        self.trace: list[Record] = []
        self.pending_weight_grads = 0  # (stage, mb) queues left unrun by the last run

    def run(self, schedule: Schedule, train: bool = True) -> torch.Tensor:
        """Run this rank's actions of `schedule`; return the sum of the last stage's losses
        (zero on ranks without the last stage)."""
        self._schedule = schedule
        self._last = schedule.num_stages - 1
        self._transfers = _Transfers()
        self._stash: dict = {}
        self._deferred: dict = {}  # (stage, mb) -> queued weight-gradient work of its I action
        self.max_stashed = 0
        self.max_stashed_per_stage = {}
        self.trace = []
        if self.record:
            comm.all_reduce(torch.zeros(1, device=self.device), self.pp_group)  # a barrier
        self._clock_start = time.perf_counter()
        loss = torch.zeros((), dtype=torch.float64, device=self.device)

        with torch.set_grad_enabled(train):
            for action in schedule.actions[self.pp_rank]:
                set_status(f"step {self.step}: {action} ({_DESCRIPTIONS[action.kind]})")
                self._start = None
                if action.kind == "F":
                    out = self._forward(action, train)
                    if action.stage == self._last:
                        loss += out.detach().to(loss.dtype)
                elif action.kind in ("B", "I"):
                    self._backward(action)
                elif action.kind == "W":
                    self._weight_backward(action)
                elif action.kind in ("RF", "RB"):
                    self._post_receive(action)
                elif action.kind in ("SF", "SB"):
                    self._post_send(action)
                else:
                    raise NotImplementedError(
                        f"action {action}: kind {action.kind!r} is not supported by this runtime"
                    )
                if self.record:
                    self._record(action)

        set_status(f"step {self.step}: waiting for sends to complete")
        for work, _ in self._transfers.sends:
            work.wait()
        leftover = list(self._stash)
        unrun = list(self._deferred)
        self.pending_weight_grads = len(unrun)
        self._transfers = None
        self._stash = {}
        self._deferred = {}
        if train and leftover:
            raise RuntimeError(f"schedule {schedule.name!r} left stages without a backward: {leftover}")
        if unrun:
            raise RuntimeError(f"schedule {schedule.name!r} left weight gradients queued without "
                               f"their W action: (stage, micro-batch) {unrun}")
        return loss

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the kernels, not their launch
        return time.perf_counter() - self._clock_start

    def _record(self, action: Action) -> None:
        end = self._now()
        start = self._start if self._start is not None else end
        self.trace.append(Record(action, start, end))

    # ------------------------------------------------------------------------------------------

    def _forward(self, action: Action, train: bool) -> torch.Tensor:
        stage, mb = action.stage, action.microbatch
        if stage == 0:
            inputs = self.first_inputs(mb)
        else:
            inputs = self._take(self._transfers.forward_inputs, (stage, mb), action)
            if train:
                inputs.requires_grad_()
        self._mark_start()
        out = self.forward(stage, mb, inputs)

        if train:
            self._stash[(stage, mb)] = (inputs, out)
            self.max_stashed = max(self.max_stashed, len(self._stash))
            on_stage = sum(1 for s, _ in self._stash if s == stage)
            self.max_stashed_per_stage[stage] = max(self.max_stashed_per_stage.get(stage, 0), on_stage)
        if stage < self._last:
            if self._owner(stage + 1) == self.pp_rank:
                self._transfers.forward_inputs[(stage + 1, mb)] = out.detach()
            else:
                self._transfers.to_send[("F", stage, mb)] = out.detach()
        return out

    def _backward(self, action: Action) -> None:
        """Run a full backward (B) or one with the weight gradients queued for later (I)."""
        stage, mb = action.stage, action.microbatch
        inputs, out = self._stash.pop((stage, mb))
        grad = None
        if stage != self._last:
            grad = self._take(self._transfers.output_grads, (stage, mb), action)
        self._mark_start()
        if action.kind == "I":
            queue = self._deferred.setdefault((stage, mb), [])
            with deferring_weight_grads(queue):
                torch.autograd.backward(out, grad)
        else:
            torch.autograd.backward(out, grad)
        if stage > 0:
            if self._owner(stage - 1) == self.pp_rank:
                self._transfers.output_grads[(stage - 1, mb)] = inputs.grad
            else:
                self._transfers.to_send[("B", stage, mb)] = inputs.grad

    def _weight_backward(self, action: Action) -> None:
        key = (action.stage, action.microbatch)
        if key not in self._deferred:
            raise RuntimeError(f"action {action}: no weight gradients are queued for it; its I "
                               f"action has not run on this rank")
        self._mark_start()
        run_deferred(self._deferred.pop(key))

    def _mark_start(self) -> None:
        if self.record:
            self._start = self._now()

    def _post_receive(self, action: Action) -> None:
        stage, mb = action.stage, action.microbatch
        buffer = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        if action.kind == "RF":
            peer, target, key = self._owner(stage - 1), self._transfers.forward_inputs, (stage, mb)
            tag = self._tag("F", stage - 1, mb)
        else:
            peer, target, key = self._owner(stage + 1), self._transfers.output_grads, (stage, mb)
            tag = self._tag("B", stage + 1, mb)
        work = comm.irecv(buffer, self.pp_group.global_rank(peer), self.pp_group, tag)
        target[key] = (work, buffer)

    def _post_send(self, action: Action) -> None:
        stage, mb = action.stage, action.microbatch
        direction = "F" if action.kind == "SF" else "B"
        tensor = self._transfers.to_send.pop((direction, stage, mb), None)
        if tensor is None:
            raise RuntimeError(f"action {action}: nothing to send; its compute action has not run")
        peer = self._owner(stage + 1) if direction == "F" else self._owner(stage - 1)
        tensor = tensor.contiguous()
        work = comm.isend(tensor, self.pp_group.global_rank(peer), self.pp_group,
                          self._tag(direction, stage, mb))
        self._transfers.sends.append((work, tensor))

    def _take(self, table: dict, key, action: Action) -> torch.Tensor:
        """Return a received or handed-over tensor, waiting for its transfer if needed."""
        if key not in table:
            raise RuntimeError(f"action {action}: its input was never received; the schedule lacks "
                               f"a receive before it")
        entry = table.pop(key)
        if isinstance(entry, tuple):
            work, buffer = entry
            set_status(f"step {self.step}: {action} waiting for its input from another stage")
            work.wait()
            set_status(f"step {self.step}: {action} ({_DESCRIPTIONS[action.kind]})")
            return buffer
        return entry

    def _owner(self, stage: int) -> int:
        return self._schedule.stage_ranks[stage]

    def _tag(self, direction: str, sender_stage: int, mb: int) -> int:
        """Return a tag unique to one transfer within a step, so receives may be posted in any order."""
        # NOTE: NCCL ignores tags and matches the sends and receives between two ranks in the
        # order they are posted; neither the communication pass nor the verifier orders them so.
        return (2 * sender_stage + (direction == "B")) * self._schedule.num_microbatches + mb
