"""Quality of a selection: how well the kept patches rebuild the sampled frames (replenishment PSNR)."""

from __future__ import annotations

import math

import torch


def replenish(frames: torch.Tensor, kept: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Rebuild frames `[T, 3, H, W]` from kept patches `[T, rows, cols]`: frame 0 whole, then each unkept
    patch repeats the last kept version at its place (what a viewer of the patch list could know)."""
    t, _, h, w = frames.shape
    mask = kept.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    out = torch.empty_like(frames)
    out[0] = frames[0]
    for i in range(1, t):
        out[i] = torch.where(mask[i], frames[i], out[i - 1])
    return out


def replenishment_psnr(frames: torch.Tensor, kept: torch.Tensor, patch_size: int) -> float:
    """PSNR (dB, peak 1) of `replenish(frames, kept)` against the frames, over all sampled frames."""
    mse = float((replenish(frames, kept, patch_size) - frames).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)
