"""Scores: a scan's maps fused into one score per patch under a policy.

- "reference": the published LMM pipeline (REFERENCE section 4): each sampled frame's own L0 motion vectors,
  camera motion removed by the per-frame median, `clip(m / P95(m))`, plus a residual energy scaled by its
  per-frame P95, averaged. Stock FFmpeg exports no residuals: the stand-in is the motion-compensated
  residual `|Y_t - warp(Y_t-1, v / d)|` of the decoded luma, the previous decoded frame warped by the
  frame's vectors divided by the distance d to its previous I/P frame (the usual reference).
- "balanced" (default): motion accumulated since the previous sampled frame (the camera-free L0 motion of
  the I/P frames in between, each predicted from the one before, plus the sampled frame's own) and the luma
  change since that sampled frame, each scaled by one clip-level P95 (with floors) instead of per-frame P95,
  so a nearly static frame stays low instead of being stretched to 1; key frames need no special case (their
  change is measured on pixels); a flat (static) video falls back to uniform whole frames
  (`selection.choose_patches`).
Codecs whose decoders export no motion vectors (HEVC, VP9, AV1, ...) get motion from block matching between
the sampled frames' luma cells (`block_matching.block_motion`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .cells import WORK_PER_PATCH
from .workers import _torch_single_threaded

if TYPE_CHECKING:
    from .scan import VideoScan

POLICIES = ("balanced", "reference")
DEFAULT_POLICY = "balanced"


def _patch_sums(maps: np.ndarray, patch_size: int) -> torch.Tensor:
    """Sum each patch's work pixels, scaled to a sum over its model pixels: [T, work, work] -> [T, rows, cols]."""
    t, w, _ = maps.shape
    n = w // WORK_PER_PATCH
    sums = torch.from_numpy(maps).view(t, n, WORK_PER_PATCH, n, WORK_PER_PATCH).sum((2, 4))  # 3x NumPy's speed
    return sums * (patch_size / WORK_PER_PATCH) ** 2


def _picture_values(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The values of `maps[..., valid]`, as a copy of their own (the percentiles reorder it in place). The
    work pixels that show picture are a rectangle (`_work_index`): slicing it out measured 25x faster than
    gathering through the mask."""
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    return maps[..., rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()


def _per_frame_p95(maps: np.ndarray, valid: np.ndarray, floor: float) -> np.ndarray:
    p95 = np.percentile(_picture_values(maps, valid).reshape(len(maps), -1), 95, axis=1, overwrite_input=True)
    return np.clip(maps / np.maximum(p95.astype(np.float32), floor)[:, None, None], 0, 1)


def _clip_p95(maps: np.ndarray, valid: np.ndarray, floor: float) -> np.ndarray:
    p95 = float(np.percentile(_picture_values(maps[1:], valid), 95, overwrite_input=True)) if len(maps) > 1 else 0.0
    return np.clip(maps / max(p95, floor), 0, 1)


# Floors of the clip-level scaling: motion below 1 model pixel between samples and luma changes below 8 levels
# are what codec noise and re-encoding produce on still content; they must not be stretched to full score.
MOTION_FLOOR_PX = 1.0
CHANGE_FLOOR = 8.0


@_torch_single_threaded()
def patch_scores(scan: VideoScan, policy: str = DEFAULT_POLICY) -> torch.Tensor:
    """Per-patch scores `[T, rows, cols]` of a scan under `policy` ("balanced" or "reference")."""
    valid = scan.work_valid
    measured = scan.own_motion if policy == "reference" else scan.motion_since
    if policy in POLICIES and measured is None:
        raise ValueError(f"this scan did not measure what policy {policy!r} scores (made with motion=False "
                         "or for another policy)")
    if policy == "reference":
        fused = (_per_frame_p95(scan.own_motion, valid, 1e-6) + _per_frame_p95(scan.residual, valid, 1.0)) / 2
    elif policy == "balanced":
        fused = (_clip_p95(scan.motion_since, valid, MOTION_FLOOR_PX) + _clip_p95(scan.change_since, valid, CHANGE_FLOOR)) / 2
    else:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    fused[0] = 0  # frame 0 has no predecessor: it is kept whole or not at all
    return _patch_sums(fused * valid, scan.patch_size)
