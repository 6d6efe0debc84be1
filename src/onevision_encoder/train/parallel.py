"""How the backbone is spread over the ranks: one process, DDP (a replica per rank) or FSDP (each rank holds
a shard of every layer, `torch.distributed.fsdp.fully_shard`), behind one small interface for the loop and
the checkpoints.

Either way, gradients are *summed* over ranks, not averaged: the Partial-FC loss already gives each rank the
gradient of the global batch's mean loss through its own samples (see `loss.py`), so the sum is the
gradient of the step, whatever the number of ranks. States are read and written as full (unsharded) state
dicts keyed by parameter name (`torch.distributed.checkpoint.state_dict`), so a checkpoint does not depend
on the strategy or the number of ranks that wrote it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .loss import sum_gradients_hook

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Backbone:
    """The model as trained (`module`: plain, DDP-wrapped, or FSDP-sharded in place) and as saved (`model`)."""

    def __init__(self, model: nn.Module, strategy: str, world_size: int, device: torch.device):
        self.model, self.strategy, self.world_size = model, strategy, world_size
        self.module = model
        if world_size > 1 and strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.module.register_comm_hook(None, sum_gradients_hook)
        elif world_size > 1 and strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule, fully_shard

            for layer in model.encoder.layers:
                fully_shard(layer)
            fully_shard(model)
            for part in model.modules():
                if isinstance(part, FSDPModule):
                    part.set_gradient_divide_factor(1.0)
                    part.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum

    def unwrap(self) -> None:
        """Drop the DDP wrapper, and with it DDP's hold on the process group (`Ranks.close` says why); the
        model stays as it is (FSDP shards in place)."""
        if self.strategy == "ddp":
            self.module = self.model

    def __call__(self, **inputs):
        return self.module(**inputs)

    def syncing(self, sync: bool):
        """Context of one backward: `sync=False` keeps the gradients on this rank, to be summed with those of a
        later backward (the heads before the last of a step)."""
        if self.world_size == 1 or sync:
            if self.strategy == "fsdp" and self.world_size > 1:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return self.module.no_sync()
        self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def clip_gradients(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # Full states, the same whatever the strategy; collective under FSDP (every rank calls them)

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=FULL)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        return get_optimizer_state_dict(self.model, optimizer, options=FULL)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
