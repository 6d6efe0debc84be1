"""Scores: a scan's maps fused into one score per patch under a policy.

- "reference": the published LMM pipeline (REFERENCE section 4): `(mv_norm + res_norm) / 2` per pixel, each
  term scaled per frame by its P95 (`reference.py` makes both on 4x4-pixel cells: the motion term as
  published, the residual term from a stand-in, since stock FFmpeg exports no residuals; the stand-in
  enters at `REFERENCE_RESIDUAL_WEIGHT`).
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

import math
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
    """The values of `maps[..., valid]`. The work pixels that show picture are a rectangle (`_work_index`):
    slicing it out measured 25x faster than gathering through the mask."""
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    return maps[..., rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def p95(values: np.ndarray) -> float:
    """`np.percentile(values, 95)`, the same number, in a fifth to a third of the time on a clip's maps
    (250,000 values). The percentile interpolates between the two order statistics at (n-1)*0.95; those are
    found among the values above a threshold that nearly all of the top 10% pass (the 90th percentile of
    about 4096 of the values, evenly spread) instead of by partitioning all of them, and the same
    interpolation then runs on the two (`np.quantile` of the pair at the same fraction goes through NumPy's
    own arithmetic). Where the threshold misses (over 95% of the values at or below it: ties, such as a map
    that is 95% still), and for small arrays, NumPy does it all."""
    values = values.ravel()
    n = len(values)
    position = (n - 1) * 0.95
    low = math.floor(position)
    if n >= 1 << 14:
        sample = np.sort(values[:: n >> 12])  # about 4096 values; sorted, as a partition slows down on ties
        above = values > sample[int(0.9 * (len(sample) - 1))]
        at_or_below = n - int(np.count_nonzero(above))  # the values above hold sorted positions at_or_below..n-1
        if at_or_below <= low:
            i = low - at_or_below
            pair = np.partition(values[above], (i, i + 1))[i : i + 2]
            return float(np.quantile(pair, position - low))
    return float(np.percentile(values, 95))


def _clip_p95(maps: np.ndarray, valid: np.ndarray, floor: float) -> np.ndarray:
    scale = p95(_picture_values(maps[1:], valid)) if len(maps) > 1 else 0.0
    return np.clip(maps / max(scale, floor), 0, 1)


# Floors of the clip-level scaling: motion below 1 model pixel between samples and luma changes below 8 levels
# are what codec noise and re-encoding produce on still content; they must not be stretched to full score.
MOTION_FLOOR_PX = 1.0
CHANGE_FLOOR = 8.0
# "reference": the weight of the residual stand-in (the P95-scaled frame difference) in place of the published
# residual term. Agreement with the published selection on the shared clip (frames 1..63): motion alone 0.81,
# weight 0.35 / 0.5 / 0.65 / 0.8 / 1: 0.855 / 0.858 / 0.853 / 0.839 / 0.806 (README, "Codec input").
REFERENCE_RESIDUAL_WEIGHT = 0.5


@_torch_single_threaded()
def patch_scores(scan: VideoScan, policy: str = DEFAULT_POLICY) -> torch.Tensor:
    """Per-patch scores `[T, rows, cols]` of a scan under `policy` ("balanced" or "reference")."""
    valid = scan.work_valid
    measured = scan.own_motion if policy == "reference" else scan.motion_since
    if policy in POLICIES and measured is None:
        raise ValueError(f"this scan did not measure what policy {policy!r} scores (made with motion=False "
                         "or for another policy)")
    if policy == "reference":  # made as patch sums (`reference.reference_maps`)
        fused = torch.from_numpy((scan.own_motion + REFERENCE_RESIDUAL_WEIGHT * scan.residual) / 2)
        fused[0] = 0
        return fused * scan.valid
    if policy == "balanced":
        fused = (_clip_p95(scan.motion_since, valid, MOTION_FLOOR_PX) + _clip_p95(scan.change_since, valid, CHANGE_FLOOR)) / 2
    else:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    fused[0] = 0  # frame 0 has no predecessor: it is kept whole or not at all
    return _patch_sums(fused * valid, scan.patch_size)
