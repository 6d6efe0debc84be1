"""AdamW with the usual weight-decay exclusions, and a learning rate that is a pure function of the step.

The published schedule ("polynomial, power 2, with warm-up") decays about linearly in practice and switches
to the true power-2 curve when a run resumes, because its state is a counter that is not saved. Here the
rate is `learning_rate(step)`: resuming at step s gives exactly the rate an uninterrupted run has there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    if optim.warmup_steps is not None:
        return min(optim.warmup_steps, total_steps)
    return int(round(optim.warmup_fraction * total_steps))


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Rate of optimiser step `step` (0-based): linear warm-up from lr/warmup to lr over the warm-up steps,
    then `min_lr + (lr - min_lr) * (1 - progress) ** power`, progress going from 0 (first step after the
    warm-up) to 1 (one past the last step, so the last step still learns a little)."""
    warm = warmup_steps(optim, total_steps)
    if step < warm:
        return optim.lr * (step + 1) / warm
    decay_steps = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / decay_steps)
    return optim.min_lr + (optim.lr - optim.min_lr) * (1.0 - progress) ** optim.power


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases and the pooling head's probe: parameters that set an offset or a scale, which
    weight decay would pull towards zero for no regularising gain."""
    return param.ndim < 2 or name.endswith(".bias") or name.endswith("head.probe")


def parameter_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """The backbone's AdamW groups: decayed weights and, unless `decay_everything` (as published), the
    non-decayed ones."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if not optim.decay_everything and _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _adamw(groups: list[dict], optim: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def backbone_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    return _adamw(parameter_groups(model, optim), optim)


def centre_optimizer(centres: list[nn.Parameter], optim: OptimConfig) -> torch.optim.AdamW:
    """The heads' centres, decayed as published. An optimiser of their own: its state is per rank (a shard
    each), the backbone's is the same on every rank."""
    return _adamw([{"params": list(centres), "weight_decay": optim.weight_decay, "name": "centres"}], optim)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_centres(centres: nn.Parameter, max_norm: float, sum_over_ranks) -> float:
    """Clip one head's centre gradient by its norm over all shards (the head's whole matrix); returns it."""
    if centres.grad is None:
        return 0.0
    squared = sum_over_ranks(centres.grad.detach().float().pow(2).sum())
    norm = math.sqrt(float(squared))
    if norm > max_norm:
        centres.grad.mul_(max_norm / (norm + 1e-6))
    return norm
