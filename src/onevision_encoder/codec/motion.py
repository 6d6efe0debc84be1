"""Motion from the bitstream: the L0 motion vectors of decoded frames filled over the blocks they cover,
camera motion (the per-frame median) taken out, and motion summed over the intervals between sampled frames."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .cells import CELL, MV_GRID, _cell_shape, _WorkMap
from .workers import _submit


class _MotionSince:
    """Camera-free motion summed over each interval between sampled frames (`_BlockCanvas`), written to
    `out[slot]` on the working grid in model pixels. Each interval's vectors are gathered as decoding goes
    and worked out several intervals at a time: the work is a few dozen NumPy calls whatever their size, and
    one interval at a time spent most of the time on the calls (2.4x slower at 640x360, measured).
    Runs in `pool` while the main thread waits on the decoder (which releases the GIL), 8 intervals a batch,
    so that the last batch, worked out once decoding has ended, is small. In the calling thread (pool None,
    `ove encode`'s loaders) a batch holds up to `batch_blocks` blocks or 64 intervals: on small frames
    (176x144, a hundred blocks a frame) batches of 8 intervals still spent most of their time on the calls.
    Batches write disjoint slots, in any order, and give the same maps whatever their size."""

    def __init__(self, canvas: "_BlockCanvas", wmap: _WorkMap, out: np.ndarray, pool: ThreadPoolExecutor | None,
                 batch_intervals: int | None = None, batch_blocks: int = 1 << 16):
        self.canvas, self.wmap, self.out, self.pool = canvas, wmap, out, pool
        self.batch_intervals = batch_intervals or (8 if pool is not None else 64)
        self.batch_blocks = batch_blocks if pool is None else float("inf")
        self.jobs: deque = deque()
        self.vectors: list[np.ndarray] = []  # of the interval going on
        self.intervals: list[tuple[int, list[np.ndarray]]] = []  # (slot, vectors) ended, not worked out yet
        self.blocks = 0  # in `intervals`

    def add(self, vectors: np.ndarray) -> None:
        self.vectors.append(vectors)

    def end_interval(self, slot: int | None) -> None:
        """The interval going on ends at a sampled frame: its sum goes to out[slot] (None: dropped)."""
        if slot is not None:
            self.intervals.append((slot, self.vectors))
            self.blocks += sum(len(v) for v in self.vectors)
            if len(self.intervals) >= self.batch_intervals or self.blocks >= self.batch_blocks:
                self._flush()
        self.vectors = []

    def finish(self) -> None:
        self._flush()
        while self.jobs:
            self.jobs.popleft().result()

    def _flush(self) -> None:
        if self.intervals:
            self.jobs.append(_submit(self.pool, self._work_out, self.intervals))
            self.intervals, self.blocks = [], 0
        while self.jobs and self.jobs[0].done():
            self.jobs.popleft().result()  # raises a worker's error here

    def _work_out(self, intervals: list[tuple[int, list[np.ndarray]]]) -> None:
        blocks = self.canvas.blocks([v for _, vectors in intervals for v in vectors])
        interval_of_frame = np.repeat(np.arange(len(intervals)), [len(vectors) for _, vectors in intervals])
        cells = _camera_free_cells(self.canvas, blocks, interval_of_frame, len(intervals))
        self.out[[slot for slot, _ in intervals]] = self.wmap(cells) * self.wmap.scale


@dataclass
class _L0Blocks:
    """Some frames' moving past-referencing (L0) blocks as rectangles on a grid of `unit`-pixel squares:
    frame [n] which of the frames a block belongs to; motion [n] as vx + i*vy in decoded pixels (sub-pel units
    divided out by motion_scale); steps (motion comes in multiples of 1/steps pixel, 4 for quarter-pel) and
    keys, the motion in those steps (vx * steps, vy * steps: two integer arrays [n]); fraction [n] of a square
    that a block smaller than one covers (1 otherwise); area [n] in squares inside the frame (times the
    fraction); corners [4, n] flat indices (r0,c0), (r0,c1), (r1,c0), (r1,c1) into a (rows+1) x (cols+1)
    difference array, so that filling every rectangle is one bincount and two cumsums.

    The unit is a power of two from 4 to 16: codec blocks are powers of two from 4 to 16 pixels a side,
    aligned to their size inside 16x16 macroblocks, so a block either spans whole squares or lies inside
    one, and weighting the small ones by their fraction gives each square its exact area-weighted mean."""

    frames: int
    frame: np.ndarray
    motion: np.ndarray
    steps: int
    keys: tuple[np.ndarray, np.ndarray]
    fraction: np.ndarray
    area: np.ndarray
    corners: np.ndarray

    @classmethod
    def of(cls, vectors: list[np.ndarray | None], grid: tuple[int, int], unit: int = MV_GRID) -> "_L0Blocks | None":
        """The moving blocks of frames given by their motion vectors (one array per frame, None for none).
        Frame i is the i-th array, also when some have no vectors (they count as still); None if no frame has a
        moving block."""
        present = [v for v in vectors if v is not None and len(v)]
        if not present:
            return None
        frame = np.repeat(np.arange(len(vectors)), [0 if v is None else len(v) for v in vectors])
        # joined and taken as opaque records: NumPy joins and indexes structured arrays field by field, 10-25x
        # slower
        records = f"V{present[0].dtype.itemsize}"
        mvs = np.concatenate([v.view(records) for v in present]).view(present[0].dtype)
        # Moving L0 blocks only: a still block adds nothing to any map, and its area counts as still anyway, as
        # the squares no block covers do (`camera_free`). Most blocks are still where the camera is (90% on
        # the 640x360 "objects" clip of the benchmark), and everything below then works on a tenth of them.
        moving = np.flatnonzero((mvs["source"] < 0) & ((mvs["motion_x"] | mvs["motion_y"]) != 0))
        if len(moving) == 0:
            return None
        if len(moving) < len(mvs):  # "balanced" hands over moving L0 blocks only (`motion_vectors`): no copy
            frame, mvs = frame[moving], mvs.view(records)[moving].view(mvs.dtype)
        rows, cols = grid
        # Whole-array integer ops, one selection at the end: a boolean mask on the structured array itself
        # cost more than everything else here together.
        w, h = mvs["w"].astype(np.int32), mvs["h"].astype(np.int32)
        x0, y0 = mvs["dst_x"] - (w >> 1), mvs["dst_y"] - (h >> 1)
        shift = unit.bit_length() - 1  # >> shift: floor division by the unit
        c0, c1 = np.maximum(x0 >> shift, 0), np.minimum((x0 + w + unit - 1) >> shift, cols)
        r0, r1 = np.maximum(y0 >> shift, 0), np.minimum((y0 + h + unit - 1) >> shift, rows)
        inside = (c1 > c0) & (r1 > r0)
        if not inside.any():
            return None
        if not inside.all():  # as a rule every block is
            keep = np.flatnonzero(inside)
            frame, mvs, w, h = frame[keep], mvs.view(records)[keep].view(mvs.dtype), w[keep], h[keep]
            c0, c1, r0, r1 = c0[keep], c1[keep], r0[keep], r1[keep]
        fraction = np.minimum(w, unit) * np.minimum(h, unit) / unit**2  # float64, exact (multiples of 1/256)
        scale = np.maximum(mvs["motion_scale"], 1)
        low, high = int(scale.min()), int(scale.max())  # one scale a stream, as a rule (4: quarter-pel)
        keys = mvs["motion_x"], mvs["motion_y"]
        steps = low if low == high else int(np.lcm.reduce(np.unique(scale).astype(np.int64)))
        if low != high:  # every motion a multiple of 1/steps pixel
            keys = tuple(k * (steps // scale) for k in keys)
        motion = np.empty(len(mvs), np.complex64)
        motion.real, motion.imag = keys[0] / steps, keys[1] / steps  # the same numbers as motion_x / motion_scale
        row_edges, col_edges = np.stack([r0, r1]), np.stack([c0, c1])
        corners = (row_edges[:, None] * (cols + 1) + col_edges[None]).reshape(4, -1)  # (r0,c0), (r0,c1), ...
        area = (r1 - r0) * (c1 - c0) * fraction
        return cls(len(vectors), frame, motion, steps, keys, fraction, area, corners)

    def camera_free(self, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """|v - median(v)| of each frame's blocks, the per-component medians of a frame weighted by the area
        each block covers, grid squares without a moving L0 block (intra, still, or outside every block)
        counting as still.
        Returns per frame the value of its uncovered squares, |median|, and per block its |v - median| minus
        its frame's |median|."""
        covered = np.bincount(self.frame, self.area, self.frames)
        uncovered = np.maximum(grid[0] * grid[1] - covered, 0)
        frame = np.concatenate([self.frame, np.arange(self.frames)])  # one still entry per frame
        weights = np.concatenate([self.area, uncovered])
        still = np.zeros(self.frames, np.int64)
        keys = [np.concatenate([k, still]) for k in self.keys]
        totals = covered + uncovered  # each frame's weight, summed in the order of `weights`
        median = (_weighted_medians(keys[0], weights, frame, totals)
                  + 1j * _weighted_medians(keys[1], weights, frame, totals)) / self.steps
        median = median.astype(np.complex64)
        base = np.abs(median)
        return base, (np.abs(self.motion - median[self.frame]) - base[self.frame]).astype(np.float32)


def _weighted_medians(keys: np.ndarray, weights: np.ndarray, group: np.ndarray, totals: np.ndarray,
                      histogram_cells: int = 1 << 20) -> np.ndarray:
    """Per group g = 0, 1, ...: the weighted median of its integer keys (the first key, in sorted order, at
    which the cumulative weight reaches half the group's total `totals[g]`; weights are multiples of 1/256, so
    sums are exact). While the histograms take at most `histogram_cells` (motion within a few hundred pixels, in
    sub-pel steps), one weighted histogram per group finds them, about 10x faster than sorting; beyond, one sort
    serves all groups."""
    low, span = int(keys.min()), int(keys.max() - keys.min()) + 1
    if len(totals) * span <= histogram_cells:
        histogram = np.bincount(group * span + (keys - low), weights, len(totals) * span)
        reached = histogram.reshape(len(totals), span).cumsum(1) >= totals[:, None] / 2
        return reached.argmax(1) + low
    order = np.lexsort((keys, group))  # by group, then key
    cumulative = np.cumsum(weights[order], dtype=np.float64)
    starts = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    return keys[order][np.searchsorted(cumulative, starts + totals / 2)]


class _BlockCanvas:
    """Fills block rectangles on a grid of `unit`-pixel squares (`_L0Blocks`) and reads them out as means
    over `cell`-pixel cells. The unit is the largest power of two up to 16 that divides the cell: 4 pixels
    on small frames, 16 on 1080p, where a 4-pixel grid made the read-outs cost more than the blocks.

    Filling goes through a difference array: each block adds its value at two corners and subtracts it at
    the other two, and two cumulative sums give every grid square the sum of the blocks covering it: one
    bincount for all the blocks of all the frames given, whatever their number."""

    def __init__(self, height: int, width: int, cell: int = CELL):
        self.unit = min(16, cell & -cell)  # cells are multiples of 4, so this is 4, 8 or 16
        self.grid = _cell_shape(height, width, self.unit)
        self.cells = _cell_shape(height, width, cell)
        self.k = cell // self.unit  # grid squares per cell side
        inside = torch.zeros(1, self.cells[0] * self.k, self.cells[1] * self.k, dtype=torch.float64)
        inside[:, : self.grid[0], : self.grid[1]] = 1
        self.squares_per_cell = self._pool(inside)

    def blocks(self, vectors: list[np.ndarray | None]) -> _L0Blocks | None:
        return _L0Blocks.of(vectors, self.grid, self.unit)

    def fill(self, blocks: _L0Blocks | None, values: np.ndarray | None = None, base: float | np.ndarray = 0.0,
             group: np.ndarray | None = None, groups: int = 1) -> np.ndarray:
        """float32 `[groups, *cells]`: per group of blocks (`group` [n]; by default one group), the mean over
        each cell's squares of `values` [n] filled over the blocks' rectangles (each weighted by its fraction
        of a square), plus `base` (one for all, or one per group) everywhere."""
        rows, cols = self.grid
        padded = (self.cells[0] * self.k, self.cells[1] * self.k)  # the grid in whole cells
        squares = None
        if blocks is not None:
            # torch, not NumPy: 2-4x faster cumulative sums here, and it lets the decoding thread have the GIL
            values = torch.from_numpy(values * blocks.fraction)
            corners = blocks.corners if group is None else blocks.corners + group * ((rows + 1) * (cols + 1))
            diff = torch.bincount(torch.from_numpy(corners.ravel()), torch.cat([values, -values, -values, values]),
                                  groups * (rows + 1) * (cols + 1)).view(groups, rows + 1, cols + 1)
            squares = diff.cumsum(1).cumsum(2)[:, :rows, :cols]
        if squares is None or (rows, cols) != padded:  # no blocks, or cells past the frame's edge
            whole = torch.zeros(groups, *padded, dtype=torch.float64)
            if squares is not None:
                whole[:, :rows, :cols] = squares
            squares = whole
        base = torch.as_tensor(base, dtype=torch.float64).view(-1, 1, 1)
        return (self._pool(squares) / self.squares_per_cell + base).float().numpy()

    def _pool(self, squares: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return squares
        return squares.reshape(-1, self.cells[0], self.k, self.cells[1], self.k).sum((2, 4))


def _motion_cells(canvas: _BlockCanvas, blocks: _L0Blocks | None) -> tuple[np.ndarray, np.ndarray]:
    if blocks is None:
        return canvas.fill(None)[0], canvas.fill(None)[0]
    return canvas.fill(blocks, blocks.motion.real)[0], canvas.fill(blocks, blocks.motion.imag)[0]


def _camera_free_cells(
    canvas: _BlockCanvas, blocks: _L0Blocks | None, frame_group: np.ndarray | None = None, groups: int = 1
) -> np.ndarray:
    """`[groups, *cells]`: per group of frames (`frame_group` [frames]; by default one group), the camera-free
    motion magnitude summed over the group's frames (`_L0Blocks.camera_free`); frames without L0 blocks add
    nothing. The hot path of the selection."""
    if blocks is None:
        return canvas.fill(None, groups=groups)
    base, values = blocks.camera_free(canvas.grid)
    if frame_group is None:
        frame_group = np.zeros(blocks.frames, np.int64)
    return canvas.fill(blocks, values, np.bincount(frame_group, base, groups), frame_group[blocks.frame], groups)


def _canvas_and_blocks(mvs: np.ndarray | None, cell_shape: tuple[int, int], cell: int):
    canvas = _BlockCanvas(cell_shape[0] * cell, cell_shape[1] * cell, cell)
    return canvas, canvas.blocks([mvs])


def motion_cells(
    mvs: np.ndarray | None, cell_shape: tuple[int, int], cell: int = CELL
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell L0 (past-reference) motion (vx, vy) in decoded pixels: each block fills the cells it covers
    (the mean where a cell holds several), cells without a past-referencing block (intra) stay zero.
    Sub-pel units divided out by motion_scale. cell_shape is that of a frame `cell * cell_shape` pixels."""
    return _motion_cells(*_canvas_and_blocks(mvs, cell_shape, cell))


def camera_free_motion(mvs: np.ndarray | None, cell_shape: tuple[int, int], cell: int = CELL) -> np.ndarray:
    """Per-cell |v - median(v)| of the frame's L0 motion (`_camera_free_magnitude(*motion_cells(...))`), with
    the per-component medians taken over the blocks weighted by the area they cover, cells without a moving
    L0 block counting as still: the moving blocks (up to about a thousand a 640x360 frame), not every cell."""
    return _camera_free_cells(*_canvas_and_blocks(mvs, cell_shape, cell))[0]
