"""Motion without motion vectors (HEVC, VP9, AV1 ...): block matching between frames' luma cells."""

from __future__ import annotations

from concurrent.futures import Future
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .cells import CELL, _WorkMap

RADIUS, BLOCK = 4, 4  # the search: +-4 cells, over blocks of 4x4 cells (+-16 and 16 pixels for 4-pixel cells)


@lru_cache(maxsize=4)
def _search(radius: int):
    """The shifts (dy, dx) block matching tries, nearest first (ties go to the smallest shift, so flat areas
    read as still), each one's index into the (2r+1)^2 grid of shifts, and its SAD penalty factor."""
    n = 2 * radius + 1
    span = range(-radius, radius + 1)
    shifts = torch.tensor(sorted(((dy, dx) for dy in span for dx in span), key=lambda s: abs(s[0]) + abs(s[1])))
    grid_index = (shifts[:, 0] + radius) * n + shifts[:, 1] + radius
    penalty = 1 + 1e-3 * shifts.abs().sum(1).float()
    return shifts, grid_index, penalty.view(-1, 1, 1)


def block_motion(previous: np.ndarray, current: np.ndarray, radius: int = RADIUS, block: int = BLOCK, cell: int = CELL):
    """Motion (vx, vy) in decoded pixels per cell of `current`, from block matching against `previous`.

    For codecs whose decoder exports no motion vectors. Works on luma cells (`cell` pixels a side): blocks
    of `block`x`block` cells (16x16 pixels for 4-pixel cells) searched over +-`radius` cells (+-16 pixels)
    by sum of absolute differences, the SAD raised by 0.1% per cell of shift so that near-ties go to the
    smaller shift. All shifts at once in torch: a strided view of the padded previous frame per shift,
    one subtraction, block sums by adding the block's rows, then its columns (about 0.6 ms at 160x90 cells).
    Luma cells of 8-bit means (`luma_cells`) are whole numbers: their sums are exact in 16-bit integers,
    which took a quarter off the time of float32 (the same motion: the pinned selections); other cells
    (the "reference" maps' plane means) stay in float32.
    """
    h, w = current.shape
    v = (_block_shifts(previous, current, radius, block) * cell).float()
    v = v.permute(2, 0, 1).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return v[1, :h, :w].numpy(), v[0, :h, :w].numpy()


def _block_shifts(previous: np.ndarray, current: np.ndarray, radius: int, block: int, whole: bool | None = None
                  ) -> torch.Tensor:
    """`[blocks high, blocks wide, 2]`: each block's best shift (dy, dx) in cells (`block_motion`). whole:
    whether the cells are whole numbers in 0..255 (checked when not given)."""
    h, w = current.shape
    n = 2 * radius + 1
    bh, bw = -(-h // block), -(-w // block)
    height, width = bh * block, bw * block
    if whole is None:
        whole = all(np.array_equal(c, np.trunc(c)) and np.abs(c).max(initial=0) <= 255 for c in (previous, current))
    exact = torch.float32 if not whole else torch.int16 if block * block * 255 < 2**15 else torch.int32
    padded = torch.from_numpy(np.ascontiguousarray(previous, np.float32))[None]
    padded = F.pad(padded, (radius, radius + width - w, radius, radius + height - h), mode="replicate")[0].to(exact)
    s0, s1 = padded.stride()
    shifted = padded.as_strided((n, n, height, width), (s0, s1, s0, s1))  # [dy + r, dx + r]: moved by (dy, dx)
    target = torch.zeros(height, width, dtype=exact)
    target[:h, :w] = torch.from_numpy(current)
    diff = torch.sub(shifted, target, out=torch.empty(n, n, height, width, dtype=exact)).abs_()
    diff[:, :, h:], diff[:, :, :, w:] = 0, 0  # cells past the frame's edge count nothing
    # Block sums: the block's rows first (contiguous adds), then its columns on a quarter of the data (strided
    # adds): 2x faster than columns first.
    sad = _added_up(diff.view(n * n, bh, block, width), 2)
    sad = _added_up(sad.view(n * n, bh, bw, block), 3)
    shifts, grid_index, penalty = _search(radius)
    # the first minimum, in search order (`min(0)`, documented to give the first, ran 4x faster than argmin)
    return shifts[torch.mul(sad.index_select(0, grid_index), penalty).min(0).indices]


def _added_up(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` summed over a short `dim` one slice after another: faster than `sum(dim)` here (whose integer sums
    also widen to int64), and the same order of float additions whatever the shape."""
    parts = x.unbind(dim)
    total = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
    for part in parts[2:]:
        total += part
    return total


def _block_motion_since(previous: Future, current: Future, wmap: _WorkMap, out: np.ndarray) -> None:
    """Write the camera-free magnitude of the `block_motion` from `previous`'s luma cells to `current`'s
    (Futures of jobs submitted earlier to the same worker pool: taken first, so they finish) to `out`, on the
    working grid in model pixels. `_camera_free_magnitude` of the cells, worked out per block (a block's
    cells share its motion, so the median over cells is one over blocks weighted by their cells inside)."""
    cells = current.result()
    shifts = _block_shifts(previous.result(), cells, RADIUS, BLOCK, whole=True).numpy()  # luma cells: 0..255
    h, w = cells.shape
    inside = np.minimum(BLOCK, h - np.arange(shifts.shape[0]) * BLOCK)[:, None] * np.minimum(
        BLOCK, w - np.arange(shifts.shape[1]) * BLOCK)[None, :]
    v = shifts.astype(np.float32) * np.float32(wmap.cell)  # [bh, bw, (y, x)] in decoded pixels
    camera = [_shift_median(shifts[..., axis], inside, RADIUS) * np.float32(wmap.cell) for axis in (0, 1)]
    magnitude = np.hypot(v[..., 1] - camera[1], v[..., 0] - camera[0])
    out[...] = wmap(np.repeat(np.repeat(magnitude, BLOCK, 0), BLOCK, 1)[:h, :w]) * wmap.scale


def _shift_median(shifts: np.ndarray, counts: np.ndarray, radius: int) -> np.float32:
    """`np.median` of whole shifts in -radius..radius, each repeated `counts` times (the middle one, or the
    mean of the two), from a count per shift."""
    ends = np.cumsum(np.bincount(shifts.ravel() + radius, counts.ravel(), minlength=2 * radius + 1))
    n = int(ends[-1])
    low, high = np.searchsorted(ends, [(n - 1) // 2, n // 2], side="right") - radius
    return np.float32((low + high) / 2)


def _camera_free_magnitude(vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """|v - median(v)| per cell: the per-component median over the frame stands for camera motion."""
    return np.hypot(vx - np.median(vx), vy - np.median(vy))

