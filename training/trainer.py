"""One rank's training state and its training step.

`Trainer` builds this rank's chunks of the model for the schedule's stage placement, initializes
them independently of the layout, and runs steps:

  1. every rank draws the same global batch and takes its dp slice, split into micro-batches;
  2. the pipeline runtime walks this rank's action list (forwards under autocast when mixed
     precision is on, backwards, transfers);
  3. the tied embedding's gradients are summed between the first and last stage, and with
     sequence parallelism the gradients of replicated parameters over the TP group;
  4. gradients are averaged over dp (with ZeRO-1 reduce-scattered, each rank averaging its
     shard), the global norm is computed with every parameter counted once, gradients are
     clipped, and AdamW steps (with ZeRO-1 on the shard, then the parameters are all-gathered);
  5. the loss (the mean over every token of the global batch) is agreed on by all ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model.build import build_chunks, initialize, named_parameters, partition_layers
from model.gpt import ForwardContext
from parallel import comm
from parallel.data_parallel import GradientBuffer
from parallel.distributed_optimizer import DistributedOptimizer
from parallel.layers import sum_sequence_parallel_grads
from parallel.mesh import Mesh
from parallel.pipeline.passes import add_communication, order_transfers_by_pair
from parallel.pipeline.verify import verify
from parallel.pipeline.runtime import PipelineRuntime
from parallel.pipeline.schedules import forward_only
from parallel.pipeline.sources import prepare_schedule
from training import state
from training.config import RunConfig
from training.data import TokenBatches
from training.optim import build_optimizer, clip_and_unscale, global_grad_norm, learning_rate, update_gradients
from training.precision import DynamicLossScaler, autocast_dtype

log = logging.getLogger("microtron")

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class StepStats:
    step: int  # the step just taken, counting from 0
    loss: float
    lr: float
    grad_norm: float
    skipped: bool = False  # fp16 gradients overflowed: no update, and a lower loss scale


class Trainer:
    def __init__(self, config: RunConfig, mesh: Mesh, tokens: np.ndarray, device=torch.device("cpu")):
        self.config = config
        self.mesh = mesh
        self.device = torch.device(device)
        self.dtype = DTYPES[config.train.dtype]
        layout = config.layout

        self.schedule = prepare_schedule(layout.schedule, layout.pp, layout.micro_batches,
                                         layout.virtual_stages, layout.max_stash)
        self.eval_schedule = order_transfers_by_pair(add_communication(
            forward_only(layout.pp, layout.micro_batches, self.schedule.stage_ranks)))
        verify(self.eval_schedule, train=False)
        self.stages = self.schedule.stages_of(mesh.pp_rank)
        self.layer_ranges = partition_layers(config.model.n_layer, self.schedule.num_stages,
                                             layout.layers_per_stage)
        self.holds_first_stage = 0 in self.stages
        self.holds_last_stage = self.schedule.num_stages - 1 in self.stages
        # The tied embedding has two copies when the first and last stage are on different ranks.
        self.tied_copies = self.schedule.stage_ranks[0] != self.schedule.stage_ranks[-1]

        train = config.train
        self.chunks = build_chunks(config.model, mesh.tp, self.stages, self.layer_ranges,
                                   dtype=self.dtype, device=self.device,
                                   sequence_parallel=layout.sequence_parallel,
                                   recompute=train.recompute, recompute_layers=train.recompute_layers)
        initialize(self.chunks, config.model, train.seed, mesh.tp)
        self.named_params = list(named_parameters(self.chunks))
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.named_params, train, mesh.dp)
        if isinstance(self.optimizer, DistributedOptimizer):
            self.grads = self.optimizer.grads
        else:
            self.grads = GradientBuffer(self.params, mesh.dp, bucket_bytes=int(train.grad_bucket_mb * 2**20))
            self.grads.overlap_with_backward(held_back=self._grads_changed_after_backward())
        self.autocast_dtype = autocast_dtype(train.mixed_precision)
        self.loss_scaler = DynamicLossScaler() if train.mixed_precision == "fp16" else None

        self.batches = TokenBatches(tokens, config.seq_len, config.data.val_fraction, train.seed)
        self.local_batch = train.global_batch // layout.dp
        self.micro_batch = config.micro_batch_size
        # Stages pass the residual stream: (b, s, h), or (b, s / tp, h) with sequence parallelism,
        # in the parameter dtype (autocast leaves the residual stream in fp32).
        local_seq = config.seq_len // mesh.tp.size if layout.sequence_parallel else config.seq_len
        self.runtime = PipelineRuntime(
            mesh.pp, mesh.pp_rank, self._forward, self._first_inputs,
            activation_shape=(self.micro_batch, local_seq, config.model.n_embd),
            dtype=self.dtype, device=self.device,
        )
        self.step = 0
        self._inputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._training = True

    # ------------------------------------------------------------------------------------------
    # The step

    def train_step(self) -> StepStats:
        step = self.step
        loss_scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        loss = self.compute_gradients()

        norm = float(global_grad_norm(self.named_params, self.mesh, self.holds_first_stage,
                                      self.optimizer)) / loss_scale
        lr = learning_rate(step, self.config.train)
        skipped = self.loss_scaler is not None and not self.loss_scaler.update(norm)
        if skipped:
            if self.mesh.rank == 0:
                log.warning("step %d: fp16 gradients overflowed; skipped the update and lowered the "
                            "loss scale to %g", step + 1, self.loss_scaler.scale)
        else:
            clip_and_unscale(update_gradients(self.params, self.optimizer), norm,
                             self.config.train.grad_clip, loss_scale)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()

        self.step += 1
        return StepStats(step, loss, lr, norm, skipped)

    def compute_gradients(self) -> float:
        """Run the forward and backward passes of step `self.step` and reduce the gradients
        (tied embedding, sequence parallelism, dp); return the loss of the global batch.

        The gradients keep the fp16 loss scale, if any.
        """
        self._load_microbatches(*self.batches.train_batch(self.step, self.config.train.global_batch))
        self.grads.zero()

        self._training = True
        self.runtime.step = self.step
        local_loss = self.runtime.run(self.schedule, train=True)

        self._sum_tied_embedding_grads()
        sum_sequence_parallel_grads(self.params, self.mesh.tp)
        if isinstance(self.optimizer, DistributedOptimizer):
            self.optimizer.reduce_gradients()
        else:
            self.grads.average()
        return self._global_loss(local_loss) / self._loss_scale()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Return the mean loss over `eval_batches` held-out global batches. Changes no state
        that training depends on."""
        self._training = False
        num = self.config.train.eval_batches
        total = 0.0
        for index in range(num):
            self._load_microbatches(*self.batches.val_batch(index, num, self.config.train.global_batch))
            total += self._global_loss(self.runtime.run(self.eval_schedule, train=False))
        self._training = True
        return total / num

    # ------------------------------------------------------------------------------------------
    # Pieces of the step

    def _load_microbatches(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep this dp rank's slice of the global batch, split into micro-batches."""
        start = self.mesh.dp_rank * self.local_batch
        local = slice(start, start + self.local_batch)
        self._inputs = list(inputs[local].to(self.device).split(self.micro_batch))
        self._targets = list(targets[local].to(self.device).split(self.micro_batch))

    def _first_inputs(self, microbatch: int) -> torch.Tensor:
        return self._inputs[microbatch]

    def _forward(self, stage: int, microbatch: int, inputs: torch.Tensor) -> torch.Tensor:
        chunk = self.chunks[stage]
        ctx = ForwardContext(
            seed=self.config.train.seed,
            step=self.step,
            sample_offset=self.mesh.dp_rank * self.local_batch + microbatch * self.micro_batch,
            global_batch=self.config.train.global_batch,
            loss_scale=self._loss_scale() / (self.local_batch * self.config.seq_len),
            training=self._training,
        )
        targets = self._targets[microbatch] if chunk.last else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            return chunk(inputs, ctx, targets)

    def _loss_scale(self) -> float:
        """Return the factor of fp16 loss scaling in training steps (1 otherwise)."""
        if self.loss_scaler is None or not self._training:
            return 1.0
        return self.loss_scaler.scale

    def _grads_changed_after_backward(self) -> list[nn.Parameter]:
        """Return the parameters whose gradients `compute_gradients` still sums after the
        pipeline's backward passes: the tied embedding and the sequence-parallel LayerNorms."""
        changed = []
        if self.tied_copies and (self.holds_first_stage or self.holds_last_stage):
            changed.append(dict(self.named_params)["transformer.wte.weight"])
        if self.mesh.tp.size > 1:
            changed += [p for p in self.params if getattr(p, "sequence_parallel", False)]
        return changed

    def _sum_tied_embedding_grads(self) -> None:
        if not self.tied_copies or not (self.holds_first_stage or self.holds_last_stage):
            return
        wte = dict(self.named_params)["transformer.wte.weight"]
        comm.all_reduce(wte.grad, self.mesh.embedding)

    def _global_loss(self, local_loss: torch.Tensor) -> float:
        """Return the loss of the global batch on every rank: the last stage's sum over its
        micro-batches, shared along the pipeline, averaged over the dp replicas."""
        loss = local_loss.reshape(1).to(torch.float64)
        comm.all_reduce(loss, self.mesh.pp)
        comm.all_reduce(loss, self.mesh.dp)
        return float(loss) / self.mesh.dp.size

    # ------------------------------------------------------------------------------------------
    # Full, layout-free state

    def gather_model(self) -> dict | None:
        """Return every parameter as a full tensor under its global name, on global rank 0."""
        return state.gather_model(self.named_params, self.mesh)

    def gather_gradients(self) -> dict | None:
        """Return every gradient as a full tensor under its global name, on global rank 0.

        Call after `compute_gradients`. Not available with the distributed optimizer, whose
        ranks keep only their shard of the reduced gradients.
        """
        if isinstance(self.optimizer, DistributedOptimizer):
            raise RuntimeError("gather_gradients needs whole gradients on every replica; the "
                               "distributed optimizer keeps only a shard of them per dp rank")
        return state.gather_gradients(self.named_params, self.mesh)

    def gather_optimizer(self) -> dict | None:
        return state.gather_optimizer(self.optimizer, self.named_params, self.mesh)

    def load_model(self, full: dict) -> None:
        state.load_model(self.named_params, full, self.mesh)

    def load_optimizer(self, full: dict) -> None:
        state.load_optimizer(self.optimizer, self.named_params, full, self.mesh)

    def describe_stages(self) -> str:
        """Return the stage placement and layer ranges, for the start-up log."""
        parts = []
        for stage, layers in enumerate(self.layer_ranges):
            rank = self.schedule.stage_ranks[stage]
            parts.append(f"stage {stage} (pp rank {rank}): {_layer_span(layers)}")
        return "; ".join(parts)


def _layer_span(layers: range) -> str:
    """Return 'layer 3', 'layers 0-4' or 'no layers' for a stage's range of layers."""
    if len(layers) == 0:
        return "no layers"
    if len(layers) == 1:
        return f"layer {layers.start}"
    return f"layers {layers.start}-{layers.stop - 1}"
