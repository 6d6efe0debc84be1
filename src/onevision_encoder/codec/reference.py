"""The per-frame maps of policy "reference": what the published LMM pipeline's reader gives (REFERENCE
section 4), as far as stock FFmpeg allows.

Motion, exactly as published: each sampled frame's own list-0 vectors on a grid of 4x4-pixel cells, each in
whole pixels truncated toward zero (FFmpeg's exported `src - dst`), every exported partition filling the
cells it covers (intra blocks, I-frames and cells no L0 vector reaches stay 0); camera motion removed by the
per-component median over all cells, zeros included; `m = |v - median|` scaled by its P95 over the frame
with a floor of 1e-6, so that a frame whose P95 truncates to 0 gets a binary map (every moving cell 1).

Residual, a stand-in: the published reader's "residual" is a by-product of its patched decoder (128 + the
coded residual of coded blocks, predictions drifting forward elsewhere, deblocked, then read with RGB and BGR
swapped) that stock decoding cannot give. The stand-in is the frame difference: the mean of |Y_t - Y_{t-1}|
over each 4x4 cell of the full-resolution luma, the sampled frame against the frame decoded just before it,
scaled by its P95 (floor 1). It agreed best with the published selection of the candidates measured (see
`scores.REFERENCE_RESIDUAL_WEIGHT` and the README).

Codecs whose decoders export no motion vectors get block-matched motion instead (no published selection
exists for them to agree with).
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import torch
import torch.nn.functional as F

from .block_matching import _camera_free_magnitude, block_motion
from .cells import CELL, _cell_shape, _CellsToPatches

MOTION_P95_FLOOR = 1e-6  # as published: a P95 of 0 makes the map binary
RESIDUAL_P95_FLOOR = 1.0  # as published for |Y_res - 128|, in luma levels


def whole_pixel_l0_cells(mvs: np.ndarray | None, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(vx, vy) int32 `[rows, cols]` on 4x4-pixel cells: each list-0 partition's `src - dst` (whole pixels,
    truncated toward zero by FFmpeg) over the w/4 x h/4 cells around dst/4, cells outside the frame dropped;
    zero where no L0 vector reaches (intra blocks, L1-only blocks, frames without vectors)."""
    vx, vy = np.zeros((rows, cols), np.int32), np.zeros((rows, cols), np.int32)
    if mvs is None or len(mvs) == 0:
        return vx, vy
    dx = mvs["src_x"].astype(np.int32) - mvs["dst_x"]
    dy = mvs["src_y"].astype(np.int32) - mvs["dst_y"]
    # Only moving L0 partitions write anything: the grid starts at zero. Partitions do not overlap.
    moving = np.flatnonzero((mvs["source"] < 0) & ((dx != 0) | (dy != 0)))
    if len(moving) == 0:
        return vx, vy
    w, h = mvs["w"][moving].astype(np.int64) >> 2, mvs["h"][moving].astype(np.int64) >> 2
    c0 = (mvs["dst_x"][moving].astype(np.int64) >> 2) - (w >> 1)
    r0 = (mvs["dst_y"][moving].astype(np.int64) >> 2) - (h >> 1)
    # every cell of every partition at once: partition b's k-th cell is (r0 + k // w, c0 + k % w)
    sizes = w * h
    block = np.repeat(np.arange(len(moving)), sizes)
    k = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    r, c = r0[block] + k // w[block], c0[block] + k % w[block]
    inside = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
    cells = r[inside] * cols + c[inside]
    vx.flat[cells] = dx[moving][block[inside]]
    vy.flat[cells] = dy[moving][block[inside]]
    return vx, vy


def scaled_by_p95(values: np.ndarray, floor: float) -> np.ndarray:
    """`clip(values / max(P95(values), floor), 0, 1)`, the P95 over the whole frame."""
    return np.clip(values / max(float(np.percentile(values, 95)), floor), 0, 1).astype(np.float32)


def reference_motion(mvs: np.ndarray | None, rows: int, cols: int) -> np.ndarray:
    """The published motion term `[rows, cols]` (0..1) of one frame from its motion vectors."""
    vx, vy = whole_pixel_l0_cells(mvs, rows, cols)
    return scaled_by_p95(np.hypot(vx - np.median(vx), vy - np.median(vy)), MOTION_P95_FLOOR)


def cell_means(plane: np.ndarray, cell: int) -> np.ndarray:
    """Mean of each `cell`x`cell` cell of a 2-D array (edge cells: the mean of what lies inside), float32.
    torch's average pooling: NumPy's sum over a strided [rows, cell, cols, cell] view took 8 ms on a 1280x720
    frame, 15x longer (the sums are of whole numbers, exact either way)."""
    x = torch.from_numpy(np.ascontiguousarray(plane)).to(torch.float32)[None]
    return F.avg_pool2d(x, cell, ceil_mode=True)[0].numpy()


def frame_difference(plane: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The residual stand-in `[H/4, W/4]`: mean |Y_t - Y_{t-1}| over each 4x4 cell (uint8 luma planes)."""
    return cell_means(np.abs(plane.astype(np.int16) - previous), CELL)


def reference_maps(plane: Future, previous: Future, vectors: np.ndarray | None, bitstream: bool,
                   fine: _CellsToPatches, coarse: tuple[int, _CellsToPatches], motion_out: np.ndarray,
                   residual_out: np.ndarray) -> None:
    """Write one sampled frame's motion and residual terms, summed over each patch (`[rows, cols]`, the
    per-pixel terms 0..1), to `motion_out` and `residual_out`. plane, previous: Futures of the
    full-resolution luma of the frame and of the frame before it (jobs submitted earlier to the same pool);
    fine: the patch sums of 4-pixel cells; coarse: the block matching's cell size and its patch sums (codecs
    without motion vectors)."""
    this, before = plane.result(), previous.result()
    if bitstream:
        motion_out[...] = fine(reference_motion(vectors, *_cell_shape(*this.shape, CELL)))
    else:
        cell, sums = coarse
        vx, vy = block_motion(cell_means(before, cell), cell_means(this, cell), cell=cell)
        motion_out[...] = sums(scaled_by_p95(_camera_free_magnitude(vx, vy), MOTION_P95_FLOOR))
    residual_out[...] = fine(scaled_by_p95(frame_difference(this, before), RESIDUAL_P95_FLOOR))

