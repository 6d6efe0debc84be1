"""Codec-style patch selection: keep the patches of a video where something moves or changes.

One streaming decode pass (`scan_video`) samples `num_frames` frames at `linspace(0, N-1, num_frames)` and,
while decoding, turns the bitstream's motion vectors and the decoded luma into per-pixel maps at a small
working resolution (4x4 work pixels per patch). Frames nobody needs are not decoded when nothing is
predicted from them (most B-frames), and worker threads resize the sampled frames, measure their luma and
work out the motion while decoding goes on. `patch_scores` turns the maps into per-patch scores with a
policy, `choose_patches` keeps frame 0 whole plus a global top-K, and `select_patches` packs the kept
patches into the model's patch-list form (`CodecClip`).

Policies:
- "reference": the published LMM pipeline (REFERENCE section 4): each sampled frame's own L0 motion vectors,
  camera motion removed by the per-frame median, `clip(m / P95(m))`, plus a residual energy scaled by its
  per-frame P95, averaged. Stock FFmpeg exports no residuals: the stand-in is the motion-compensated
  residual `|Y_t - warp(Y_t-1, v / d)|` of the decoded luma, the previous decoded frame warped by the
  frame's vectors divided by the distance d to its previous I/P frame (the usual reference).
- "balanced" (default): motion accumulated since the previous sampled frame (the camera-free L0 motion of
  the I/P frames in between, each predicted from the one before, plus the sampled frame's own) and the luma
  change since that sampled frame, each scaled by one clip-level P95 (with floors) instead of
  per-frame P95, so a nearly static frame stays low instead of being stretched to 1; key frames need no
  special case (their change is measured on pixels); a flat (static) video falls back to uniform whole frames.
Codecs whose decoders export no motion vectors (HEVC, VP9, AV1, ...) get motion from block matching between
the sampled frames' luma cells (see `block_motion`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from functools import lru_cache
from dataclasses import dataclass, field

import numpy as np
import torch
from av.video.reformatter import VideoReformatter
import torch.nn.functional as F

from .processing import (
    PatchClip,
    collate_patch_lists,
    grid_positions,
    FrameGeometry,
    normalize,
    RESIZE_MODES,
    SquarePlan,
    temporal_slots,
)
from .video import VideoDecodeError, VideoFile, motion_vectors, quarter_turns, sample_indices

__all__ = [
    "POLICIES",
    "CodecClip",
    "VideoDecodeError",
    "VideoScan",
    "choose_patches",
    "collate_patch_lists",
    "patch_scores",
    "replenish",
    "replenishment_psnr",
    "sample_frames",
    "save_selection",
    "scan_video",
    "select_patches",
    "uniform_frames_mask",
]

POLICIES = ("balanced", "reference")
DEFAULT_POLICY = "balanced"
MV_GRID = 4  # motion vectors come in blocks of >= 4x4 pixels on a 4-pixel grid
CELL = MV_GRID  # the smallest cell of the per-frame maps
WORKER_NICENESS = 5  # added to the worker threads' nice value (`_start_worker`)
WORK_PER_PATCH = 4  # work pixels per patch side: scores at (rows*4)^2, e.g. 64x64 for 224/14


# ----------------------------------------------------------------------------------------------------------
# Geometry: decoded frame (4x4 cells) -> working grid, through the same rotation/resize/crop as the pixels
# ----------------------------------------------------------------------------------------------------------


def _cell_shape(height: int, width: int, cell: int) -> tuple[int, int]:
    return -(-height // cell), -(-width // cell)


def _cell_size(plan: SquarePlan, work: int) -> int:
    """Decoded pixels per cell side: 4 (the smallest motion block) on small frames, growing in steps of 4 up
    to about one work pixel on large ones, so per-frame work follows the working grid, not the resolution."""
    decoded_per_work = plan.size / plan.scale / work
    return max(CELL, CELL * int(decoded_per_work // CELL))


def _work_index(plan: SquarePlan, work: int, cell: int):
    """For each work pixel, the (row, col) of the display-orientation cell it lies on, and which work pixels
    show picture (False = letterbox padding). Same geometry as the pixels (`SquarePlan`)."""
    size, nh, nw = plan.size, plan.resized_height, plan.resized_width
    centres = (np.arange(work) + 0.5) * size / work - 0.5  # work pixel centres on the size x size square
    sign = 1 if plan.mode == "crop" else -1
    ys, xs = centres + sign * plan.top, centres + sign * plan.left
    valid = ((ys >= -0.5) & (ys < nh - 0.5))[:, None] & ((xs >= -0.5) & (xs < nw - 0.5))[None, :]
    cells = _cell_shape(plan.height, plan.width, cell)
    rows = np.clip(((ys + 0.5) * plan.height / nh) // cell, 0, cells[0] - 1).astype(np.int64)
    cols = np.clip(((xs + 0.5) * plan.width / nw) // cell, 0, cells[1] - 1).astype(np.int64)
    return rows, cols, valid


@dataclass
class _WorkMap:
    """Maps cell-grid arrays of one video (decoded orientation) onto the square working grid, and decoded
    frames onto the model's square."""

    turns: int
    plan: SquarePlan  # of the upright (display) picture
    cell: int  # decoded pixels per cell side
    rows: np.ndarray
    cols: np.ndarray
    valid: np.ndarray

    @property
    def scale(self) -> float:
        """Model pixels per decoded pixel."""
        return self.plan.scale

    @classmethod
    def for_frame(cls, height: int, width: int, turns: int, size: int, work: int, mode: str) -> "_WorkMap":
        display = (width, height) if turns % 2 else (height, width)
        plan = SquarePlan.for_picture(*display, size, mode)
        cell = _cell_size(plan, work)
        return cls(turns, plan, cell, *_work_index(plan, work, cell))

    def picture(self, frame, rgb: VideoReformatter) -> torch.Tensor:
        """The decoded frame upright and resampled for the model's square (`SquarePlan.resample`, uint8), the
        same pixels `resize_frames` gives. Converting to RGB at full resolution first matters: letting FFmpeg
        scale and convert 4:2:0 in one step measured 3-9 dB further from the true frames on 640x360 and
        1280x720. RGBA, not RGB: torch's uint8 resampling works on 4 channels, and handing it 3 made it pad
        every pixel first (a third of the resampling time at 640x360); the alpha channel is dropped after."""
        pixels = rgb.reformat(frame, format="rgba").to_ndarray()
        if self.turns:
            pixels = np.ascontiguousarray(np.rot90(pixels, self.turns))
        return self.plan.resample(pixels)[:3]

    def __call__(self, cells: np.ndarray) -> np.ndarray:
        """Cell grid `[..., cells]` -> working grid `[..., work, work]`."""
        display = np.rot90(cells, self.turns, axes=(-2, -1)) if self.turns else cells
        return np.where(self.valid, display[..., self.rows[:, None], self.cols[None, :]], 0).astype(np.float32)


def _worker_pool(workers: int) -> ThreadPoolExecutor | None:
    """`workers` threads running torch on one thread each (torch's intra-op threads are per calling thread:
    more, and OpenMP teams oversubscribe the cores), a little below the calling thread's scheduling priority
    (`_start_worker`); None for none (`_submit` then runs jobs inline)."""
    return ThreadPoolExecutor(workers, initializer=_start_worker) if workers else None


def _start_worker() -> None:
    torch.set_num_threads(1)
    # A little below the decoding thread for the scheduler (Linux gives each thread its own nice value):
    # where threads outnumber free cores, the decoder, the selection's critical path, waits less for the
    # workers. On 2 cores, 640x360 H.264 went from 1.70x to 1.48x decode-only time; nice 19 starved the
    # workers beside HEVC's own decoding threads (1.69x -> 1.88x), nice 5 did not.
    if sys.platform.startswith("linux"):
        with suppress(OSError):
            thread = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(19, nice + WORKER_NICENESS))


def _submit(pool: ThreadPoolExecutor | None, fn, *args, **kwargs) -> Future:
    """`pool.submit(fn, ...)`, or with no pool, `fn(...)` run now in the calling thread: a Future either way."""
    if pool is not None:
        return pool.submit(fn, *args, **kwargs)
    done = Future()
    done.set_result(fn(*args, **kwargs))
    return done


class _SquareFrames:
    """Puts the sampled frames on the model's square, and measures frames' luma cells, in worker threads
    while decoding goes on (`pool` also takes the motion sums, and the block matching of codecs without
    motion vectors).

    The RGB conversion and the resize release the GIL and, on small videos, cost about as much as decoding
    every frame: done in turn with decoding they added their whole time to the selection; the luma cells,
    in the decoding thread, cost it 0.3 ms a frame at 640x360. At most `ahead` decoded frames wait, so
    memory stays bounded by the sampled frames at the working resolution."""

    def __init__(self, wmap: _WorkMap, num_frames: int, workers: int, ahead: int = 8):
        self.wmap, self.ahead = wmap, ahead
        # uint8 until needed as floats: a quarter of the memory, and fresh float pages cost a page fault
        # each (about 20 ms for 64 frames of 224 px on the 2-core benchmark machine). A normal tensor even
        # under the caller's inference_mode, which worker threads do not inherit (they could not write it).
        with torch.inference_mode(False):
            self.pictures = torch.empty(num_frames, 3, wmap.plan.size, wmap.plan.size, dtype=torch.uint8)
        self.pool = _worker_pool(workers)
        # One FFmpeg scaler per kind and thread, reused for every frame: they are not thread-safe, and a
        # fresh scaler context per frame (what `frame.to_ndarray` makes) cost 4-10x the conversion itself.
        self.local = threading.local()
        self.pending: deque = deque()
        self.filled = np.zeros(num_frames, bool)

    def submit(self, fn, *args, **kwargs) -> Future:
        return _submit(self.pool, fn, *args, **kwargs)

    def put(self, frame, slots: list[int], cell: int | None = None, change: tuple | None = None) -> Future:
        """Put a sampled frame on its square; with `cell`, also `luma(frame, cell, change)` in the same job,
        the Future's result (each hand-off costs the decoding thread tens of microseconds)."""
        job = self.submit(self._square, frame, slots[0], cell, change)
        self._wait_behind(slots, job)
        return job

    def luma(self, frame, cell: int, change: tuple | None = None) -> Future:
        """`luma_cells(frame, cell)`, to come. change: (the Future of an earlier frame's luma cells, a
        `[work, work]` array): also write the luma change since that frame there, on the working grid."""
        job = self.submit(self._luma, frame, cell, change)
        self._wait_behind([], job)
        return job

    def finish(self) -> np.ndarray | None:
        """Wait for every frame. A slot whose frame never came (the stream ended early, or the decoder dropped
        a broken frame) repeats the nearest earlier one (the first one, for leading slots). Returns, per slot,
        the slot whose frame it shows; None if no frame came at all."""
        while self.pending:
            self._finish_oldest()
        if not self.filled.any():
            return None
        slots = np.arange(len(self.filled))
        source = np.maximum.accumulate(np.where(self.filled, slots, -1))
        source[source < 0] = np.flatnonzero(self.filled)[0]
        for slot in np.flatnonzero(source != slots):
            self.pictures[slot] = self.pictures[source[slot]]
        return source

    def close(self) -> None:
        """Stop the workers, dropping frames not started (after an error)."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def _square(self, frame, slot: int, cell: int | None, change: tuple | None) -> np.ndarray | None:
        self.wmap.plan.place(self.wmap.picture(frame, self._scaler("rgb")), self.pictures[slot])
        return None if cell is None else self._luma(frame, cell, change)

    def _luma(self, frame, cell: int, change: tuple | None) -> np.ndarray:
        luma = luma_cells(frame, cell, self._scaler("gray"))
        if change is not None:
            # The earlier frame's job came first off the queue: it is done or running, never waiting behind us.
            earlier, out = change
            out[...] = self.wmap(np.abs(luma - earlier.result()))
        return luma

    def _scaler(self, kind: str) -> VideoReformatter:
        if not hasattr(self.local, kind):
            setattr(self.local, kind, VideoReformatter())
        return getattr(self.local, kind)

    def _wait_behind(self, slots: list[int], job: Future) -> None:
        self.pending.append((slots, job))
        while len(self.pending) > self.ahead:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        slots, job = self.pending.popleft()
        job.result()
        if not slots:
            return
        for slot in slots[1:]:  # a frame sampled for several slots
            self.pictures[slot] = self.pictures[slots[0]]
        self.filled[slots] = True


class _MotionSince:
    """Camera-free motion summed over each interval between sampled frames (`_BlockCanvas`), written to
    `out[slot]` on the working grid in model pixels. Each interval's vectors are gathered as decoding goes
    and worked out `batch` intervals at a time: the work is a few dozen NumPy calls whatever their size,
    and one interval at a time spent most of the time on the calls (2.4x slower at 640x360, measured).
    Runs in `pool` (None: in the calling thread) while the main thread waits on the decoder (which releases
    the GIL); batches write disjoint slots, in any order. Holds the vectors of at most `batch` intervals."""

    def __init__(self, canvas: "_BlockCanvas", wmap: _WorkMap, out: np.ndarray, pool: ThreadPoolExecutor | None,
                 batch: int = 8):
        self.canvas, self.wmap, self.out, self.pool, self.batch = canvas, wmap, out, pool, batch
        self.jobs: deque = deque()
        self.vectors: list[np.ndarray] = []  # of the interval going on
        self.intervals: list[tuple[int, list[np.ndarray]]] = []  # (slot, vectors) ended, not worked out yet

    def add(self, vectors: np.ndarray) -> None:
        self.vectors.append(vectors)

    def end_interval(self, slot: int | None) -> None:
        """The interval going on ends at a sampled frame: its sum goes to out[slot] (None: dropped)."""
        if slot is not None:
            self.intervals.append((slot, self.vectors))
            if len(self.intervals) >= self.batch:
                self._flush()
        self.vectors = []

    def finish(self) -> None:
        self._flush()
        while self.jobs:
            self.jobs.popleft().result()

    def _flush(self) -> None:
        if self.intervals:
            self.jobs.append(_submit(self.pool, self._work_out, self.intervals))
            self.intervals = []
        while self.jobs and self.jobs[0].done():
            self.jobs.popleft().result()  # raises a worker's error here

    def _work_out(self, intervals: list[tuple[int, list[np.ndarray]]]) -> None:
        blocks = self.canvas.blocks([v for _, vectors in intervals for v in vectors])
        interval_of_frame = np.repeat(np.arange(len(intervals)), [len(vectors) for _, vectors in intervals])
        cells = _camera_free_cells(self.canvas, blocks, interval_of_frame, len(intervals))
        self.out[[slot for slot, _ in intervals]] = self.wmap(cells) * self.wmap.scale


# ----------------------------------------------------------------------------------------------------------
# Per-frame measurements on the cell grid
# ----------------------------------------------------------------------------------------------------------


def luma_cells(frame, cell: int = CELL, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """Mean luma (0..255, full range) of each `cell`x`cell`-pixel cell of a decoded frame, as float32
    [ceil(H/cell), ceil(W/cell)]. FFmpeg's area scaler averages the cells and converts any pixel format
    (10-bit, limited or full range) to the same 8-bit full-range grey."""
    ch, cw = _cell_shape(frame.height, frame.width, cell)
    gray = (reformatter or VideoReformatter()).reformat(frame, width=cw, height=ch, format="gray", interpolation="AREA")
    return gray.to_ndarray().astype(np.float32)


@dataclass
class _L0Blocks:
    """Some frames' moving past-referencing (L0) blocks as rectangles on a grid of `unit`-pixel squares:
    frame [n] which of the frames a block belongs to; motion [n] as vx + i*vy in decoded pixels (sub-pel units
    divided out by motion_scale); fraction [n] of a square that a block smaller than one covers (1 otherwise); area
    [n] in squares inside the frame (times the fraction); corners [4, n] flat indices (r0,c0), (r0,c1),
    (r1,c0), (r1,c1) into a (rows+1) x (cols+1) difference array, so that filling every rectangle is one
    bincount and two cumsums.

    The unit is a power of two from 4 to 16: codec blocks are powers of two from 4 to 16 pixels a side,
    aligned to their size inside 16x16 macroblocks, so a block either spans whole squares or lies inside
    one, and weighting the small ones by their fraction gives each square its exact area-weighted mean."""

    frames: int
    frame: np.ndarray
    motion: np.ndarray
    fraction: np.ndarray
    area: np.ndarray
    corners: np.ndarray
    steps: int = 0  # motion comes in multiples of 1/steps pixel (4: quarter-pel); 0: unknown

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
        frame, mvs = frame[moving], mvs.view(records)[moving].view(mvs.dtype)
        rows, cols = grid
        # Whole-array integer ops, one selection at the end: a boolean mask on the structured array itself
        # cost more than everything else here together.
        w, h = mvs["w"].astype(np.int32), mvs["h"].astype(np.int32)
        x0, y0 = mvs["dst_x"] - (w >> 1), mvs["dst_y"] - (h >> 1)
        shift = unit.bit_length() - 1  # >> shift: floor division by the unit
        c0, c1 = np.maximum(x0 >> shift, 0), np.minimum((x0 + w + unit - 1) >> shift, cols)
        r0, r1 = np.maximum(y0 >> shift, 0), np.minimum((y0 + h + unit - 1) >> shift, rows)
        keep = np.flatnonzero((c1 > c0) & (r1 > r0))  # inside the frame
        if len(keep) == 0:
            return None
        c0, c1, r0, r1 = c0[keep], c1[keep], r0[keep], r1[keep]
        fraction = (np.minimum(w[keep], unit) * np.minimum(h[keep], unit) / unit**2).astype(np.float32)
        scale = np.maximum(mvs["motion_scale"][keep], 1)
        motion = ((mvs["motion_x"][keep] + 1j * mvs["motion_y"][keep]) / scale).astype(np.complex64)
        steps = int(np.lcm.reduce(np.unique(scale)))  # every motion is a multiple of 1/steps pixel
        stride = cols + 1
        corners = np.stack([r0 * stride + c0, r0 * stride + c1, r1 * stride + c0, r1 * stride + c1])
        return cls(len(vectors), frame[keep], motion, fraction, (r1 - r0) * (c1 - c0) * fraction, corners, steps)

    def camera_free(self, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """|v - median(v)| of each frame's blocks, the per-component medians of a frame weighted by the area
        each block covers, grid squares without a moving L0 block (intra, still, or outside every block)
        counting as still.
        Returns per frame the value of its uncovered squares, |median|, and per block its |v - median| minus
        its frame's |median|."""
        uncovered = np.maximum(grid[0] * grid[1] - np.bincount(self.frame, self.area, self.frames), 0)
        frame = np.concatenate([self.frame, np.arange(self.frames)])  # one still entry per frame
        values = np.concatenate([self.motion, np.zeros(self.frames, np.complex64)])
        weights = np.concatenate([self.area, uncovered])
        median = (_weighted_medians(values.real, weights, frame, self.steps)
                  + 1j * _weighted_medians(values.imag, weights, frame, self.steps))
        base = np.abs(median)
        return base, (np.abs(self.motion - median[self.frame]) - base[self.frame]).astype(np.float32)


def _weighted_medians(values: np.ndarray, weights: np.ndarray, group: np.ndarray, steps: int = 0) -> np.ndarray:
    """Per group g = 0, 1, ...: the weighted median of its values (the first value, in sorted order, at which
    the cumulative weight reaches half the group's total; weights are multiples of 1/256, so sums are exact).
    steps: when every value is a multiple of 1/steps (motion in sub-pel units), one weighted histogram per
    group finds the same medians as sorting, about 10x faster; otherwise one sort serves all groups."""
    totals = np.bincount(group, weights)
    if steps:
        keys = np.rint(values * steps).astype(np.int64)
        low, span = int(keys.min()), int(keys.max() - keys.min()) + 1
        if len(totals) * span <= 1 << 20:  # motion within a few hundred pixels
            histogram = np.bincount(group * span + (keys - low), weights, len(totals) * span)
            reached = histogram.reshape(len(totals), span).cumsum(1) >= totals[:, None] / 2
            return ((reached.argmax(1) + low) / steps).astype(values.dtype)
    order = np.lexsort((values, group))  # by group, then value
    cumulative = np.cumsum(weights[order], dtype=np.float64)
    starts = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    return values[order][np.searchsorted(cumulative, starts + totals / 2)]


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
        squares = torch.zeros(groups, self.cells[0] * self.k, self.cells[1] * self.k, dtype=torch.float64)
        if blocks is not None:
            # torch, not NumPy: 2-4x faster cumulative sums here, and it lets the decoding thread have the GIL
            values = torch.from_numpy(values * blocks.fraction.astype(np.float64))
            corners = blocks.corners if group is None else blocks.corners + group * ((rows + 1) * (cols + 1))
            diff = torch.bincount(torch.from_numpy(corners.ravel()), torch.cat([values, -values, -values, values]),
                                  groups * (rows + 1) * (cols + 1)).view(groups, rows + 1, cols + 1)
            squares[:, :rows, :cols] = diff.cumsum(1).cumsum(2)[:, :rows, :cols]
        base = torch.as_tensor(base, dtype=torch.float64).view(-1, 1, 1)
        return (self._pool(squares) / self.squares_per_cell + base).float().numpy()

    def _pool(self, squares: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return squares
        return squares.view(-1, self.cells[0], self.k, self.cells[1], self.k).sum((2, 4))


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


def block_motion(previous: np.ndarray, current: np.ndarray, radius: int = 4, block: int = 4, cell: int = CELL):
    """Motion (vx, vy) in decoded pixels per cell of `current`, from block matching against `previous`.

    For codecs whose decoder exports no motion vectors. Works on luma cells (`cell` pixels a side): blocks
    of `block`x`block` cells (16x16 pixels for 4-pixel cells) searched over +-`radius` cells (+-16 pixels)
    by sum of absolute differences, the SAD raised by 0.1% per cell of shift so that near-ties go to the
    smaller shift. All shifts at once in torch: a strided view of the padded previous frame per shift,
    one subtraction, block sums by adding the block's rows, then its columns (about 1 ms at 160x90 cells).
    """
    h, w = current.shape
    n = 2 * radius + 1
    bh, bw = -(-h // block), -(-w // block)
    height, width = bh * block, bw * block
    padded = torch.from_numpy(np.ascontiguousarray(previous, np.float32))[None]
    padded = F.pad(padded, (radius, radius + width - w, radius, radius + height - h), mode="replicate")[0]
    s0, s1 = padded.stride()
    shifted = padded.as_strided((n, n, height, width), (s0, s1, s0, s1))  # [dy + r, dx + r]: moved by (dy, dx)
    target = torch.zeros(height, width)
    target[:h, :w] = torch.from_numpy(current)
    diff = torch.sub(shifted, target, out=torch.empty(n, n, height, width)).abs_()
    diff[:, :, h:], diff[:, :, :, w:] = 0, 0  # cells past the frame's edge count nothing
    # Block sums: the block's rows first (contiguous adds), then its columns on a quarter of the data (strided
    # adds): 2x faster than columns first. Luma cells are whole numbers, so the sums are exact in any order.
    rows = diff.view(n * n, bh, block, width)
    sad = rows[:, :, 0].clone()
    for i in range(1, block):
        sad += rows[:, :, i]
    columns = sad.view(n * n, bh, bw, block)
    sad = columns[..., 0].clone()
    for i in range(1, block):
        sad += columns[..., i]
    shifts, grid_index, penalty = _search(radius)
    # the first minimum, in search order (`min(0)`, documented to give the first, ran 4x faster than argmin)
    best = shifts[sad.index_select(0, grid_index).mul_(penalty).min(0).indices]
    v = (best * cell).float().permute(2, 0, 1).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return v[1, :h, :w].numpy(), v[0, :h, :w].numpy()


def _block_motion_since(previous: Future, current: Future, wmap: _WorkMap, out: np.ndarray) -> None:
    """Write the camera-free magnitude of the `block_motion` from `previous`'s luma cells to `current`'s
    (Futures of jobs submitted earlier to the same worker pool: taken first, so they finish) to `out`, on the
    working grid in model pixels."""
    vx, vy = block_motion(previous.result(), current.result(), cell=wmap.cell)
    out[...] = wmap(_camera_free_magnitude(vx, vy)) * wmap.scale


def _camera_free_magnitude(vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """|v - median(v)| per cell: the per-component median over the frame stands for camera motion."""
    return np.hypot(vx - np.median(vx), vy - np.median(vy))


def _warp_cells(cells: np.ndarray, vx: np.ndarray, vy: np.ndarray, cell: int = CELL) -> np.ndarray:
    """Motion-compensated prediction: each cell takes the (nearest) cell its vector points to."""
    h, w = cells.shape
    rows = np.clip(np.rint(np.arange(h)[:, None] + vy / cell), 0, h - 1).astype(np.int64)
    cols = np.clip(np.rint(np.arange(w)[None, :] + vx / cell), 0, w - 1).astype(np.int64)
    return cells[rows, cols]


# ----------------------------------------------------------------------------------------------------------
# One decoding pass
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VideoScan:
    """What one decoding pass learnt about the sampled frames (maps on the square working grid).

    pictures: `[T, 3, size, size]` uint8 (resized like `resize_frames`; `frames` gives them as floats in
    0..1); geometry: where the picture lies on them; valid: `[rows, cols]` patches that show picture;
    own_motion / residual: the sampled frame's own camera-free motion (model pixels)
    and motion-compensated residual (luma 0..255) (policy "reference"); motion_since / change_since: motion
    accumulated since the previous sampled frame (I/P frames and the sample) and the luma change since it
    (policy "balanced"). Maps are `[T, work, work]`, zero for slot 0.
    """

    path: str
    frame_ids: np.ndarray
    pictures: torch.Tensor
    geometry: FrameGeometry
    valid: torch.Tensor
    patch_size: int
    motion_source: str  # "bitstream" (codec motion vectors), "block-matching" or "none"
    total_frames: int
    own_motion: np.ndarray | None = None
    residual: np.ndarray | None = None
    motion_since: np.ndarray | None = None
    change_since: np.ndarray | None = None
    work_valid: np.ndarray | None = field(default=None, repr=False)

    @property
    def frames(self) -> torch.Tensor:
        """The sampled frames as floats `[T, 3, size, size]` in 0..1 (letterbox padding in the CLIP mean)."""
        return self.geometry.to_float(self.pictures)


def _check_geometry(size: int, patch_size: int, resize: str) -> None:
    if patch_size < 1 or size < patch_size or size % patch_size:
        raise ValueError(f"size {size} must be a positive multiple of patch_size {patch_size}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


@contextmanager
def _torch_single_threaded():
    """Per-frame tensors are small: on 2 cores, OpenMP hand-offs made the per-frame tensor work 10-30x slower
    with 2 torch threads than with 1 (measured when frames were resized with torch), and the decoder wants
    the other core. The per-clip work (scores, choice, packing) is small too, and after each parallel region
    OpenMP's idle thread spins for a while (about 5 ms of a core per selection at 640x360, measured).
    Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scan_video(
    path: str | os.PathLike,
    num_frames: int = 64,
    size: int = 224,
    patch_size: int = 14,
    resize: str = "crop",
    motion: bool = True,
    progress: bool = False,
    policy: str | None = None,
) -> VideoScan:
    """Decode `path` once, keep the `num_frames` sampled frames resized, and measure motion and change.

    Memory stays at the sampled frames plus a few cell maps, whatever the video's length. The frame count
    N comes from the container (`VideoFile.info`); if decoding yields fewer frames than announced, the
    slots past the end repeat the last sampled frame (with no motion). motion=False only samples frames
    (`sample_frames`). policy: measure only what that policy scores (None: both, e.g. to compare them on
    one scan). Worker threads (resizing, luma, motion sums, block matching) are used when torch may use
    more than one thread here: not inside a DataLoader worker process, which torch limits to one.
    """
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_geometry(size, patch_size, resize)
    threads = torch.get_num_threads()
    with VideoFile(path) as video:
        return _scan(video, num_frames, size, patch_size, resize, motion, progress, policy, threads)


def _worker_count(threads: int, bitstream: bool) -> int:
    """Worker threads beside the decoding thread, given torch's thread count. H.264's decoder (slice
    threading) decodes a one-slice frame on one core: one worker fewer than torch's threads, so that the
    workers leave the decoder its core. On 2 cores, one worker for everything instead of two plus one for
    the motion sums took 640x360 H.264 from 1.52-1.62x to 1.35-1.42x decode-only time (medians of 48
    alternating runs). HEVC's decoder works on several cores of its own (wavefront), and there one worker
    fell behind it (1.70-1.84x -> 1.82-2.07x): those codecs keep torch's thread count."""
    if threads < 2:
        return 0
    return min(4, threads - 1 if bitstream else threads)


@_torch_single_threaded()
def _scan(video: VideoFile, num_frames, size, patch_size, resize, motion, progress, policy, threads) -> VideoScan:
    path = video.path
    info = video.info(timestamps=True)
    total = info.frame_count
    # Without bitstream motion vectors (HEVC, VP9, AV1...), motion comes from block matching on the luma.
    bitstream = info.exports_motion_vectors
    workers = _worker_count(threads, bitstream)
    frame_ids = sample_indices(total, num_frames)
    slots_of: dict[int, list[int]] = {}
    for slot, fid in enumerate(frame_ids.tolist()):
        slots_of.setdefault(fid, []).append(slot)
    own_maps = motion and policy in (None, "reference")  # each sampled frame's own motion and residual
    since_maps = motion and policy in (None, "balanced")  # motion and change since the previous sample
    # the residual needs the frame before each sample
    needed_before = set((frame_ids[frame_ids > 0] - 1).tolist()) if own_maps else set()
    work = (size // patch_size) * WORK_PER_PATCH

    maps = {k: np.zeros((num_frames, work, work), np.float32) for k in ("own", "res", "since", "change")}
    bar = _progress(total, path) if progress else None
    wmap = squares = None
    motion_source = ("bitstream" if bitstream else "block-matching") if motion else "none"
    accumulated = previous_luma = sampled_luma = None
    last_anchor = 0  # display number of the last I/P frame: the usual reference of the frames after it
    decoded = 0
    needed = slots_of.keys() | needed_before
    matched = []  # without bitstream motion: the block matching since the previous sample, being worked out
    stream = video.frames(motion and bitstream, needed.__contains__, info.presentation_numbers)
    try:
        for number, frame in stream:
            if bar is not None:
                bar.update(number + 1 - decoded)
            decoded = number + 1
            if number > frame_ids[-1]:
                break  # everything sampled: stop decoding
            if wmap is None:
                wmap = _WorkMap.for_frame(frame.height, frame.width, quarter_turns(frame), size, work, resize)
                cell = wmap.cell
                canvas = _BlockCanvas(frame.height, frame.width, cell)
                squares = _SquareFrames(wmap, num_frames, workers)
                accumulated = _MotionSince(canvas, wmap, maps["since"], pool=squares.pool)
            is_sampled, is_anchor = number in slots_of, frame.pict_type in (1, 2)  # I or P
            since = is_sampled and since_maps and number > 0 and sampled_luma is not None
            first = slots_of[number][0] if is_sampled else None
            # the luma change since the previous sample, worked out by the job that measures this frame's luma
            change = (sampled_luma, maps["change"][first]) if since else None
            # Luma cells (a Future) of the frames a map needs. A sampled frame's are measured in its picture's
            # job, except for "reference", which needs them at once (its maps are made here, as frames come).
            separate_luma = motion and number in needed and (own_maps or not is_sampled)
            luma = squares.luma(frame, cell, change) if separate_luma else None
            # Motion since the previous sample: each I/P frame is predicted from the I/P frame before it, so
            # their vectors chain over the interval once; B-frames (which point back to the same I/P frame,
            # and may not even be decoded) add nothing but the sample's own vectors.
            wanted = is_sampled or (since_maps and is_anchor)
            vectors = motion_vectors(frame) if motion and bitstream and wanted else None
            if vectors is not None and since_maps:
                accumulated.add(vectors)
            if is_sampled:
                if separate_luma:
                    squares.put(frame, slots_of[number])
                else:  # its result: the luma cells (None without motion)
                    luma = squares.put(frame, slots_of[number], cell if motion else None, change)
                if own_maps and number > 0 and previous_luma is not None:
                    this, before = luma.result(), previous_luma.result()
                    own, own_v = _own_motion(bitstream, vectors, this, before, number - last_anchor, cell)
                    maps["own"][first] = wmap(own) * wmap.scale
                    maps["res"][first] = wmap(np.abs(this - _warp_cells(before, *own_v, cell)))
                if since and not bitstream:
                    matched.append(squares.submit(_block_motion_since, sampled_luma, luma, wmap, maps["since"][first]))
                accumulated.end_interval(first if since and bitstream else None)
                sampled_luma = luma
            if is_anchor:  # the reference of the frames that follow
                last_anchor = number
            previous_luma = luma
        shown = squares.finish() if squares is not None else None
        if shown is None:
            raise VideoDecodeError(path, "none of the sampled frames could be decoded")
        pictures, geometry = squares.pictures, wmap.plan.geometry
        accumulated.finish()
        for job in matched:
            job.result()
    finally:
        stream.close()
        if squares is not None:
            squares.close()
        if bar is not None:
            bar.close()
    frame_ids = frame_ids[shown]  # slots whose frame never came show (and name) an earlier one
    return VideoScan(
        path=path,
        frame_ids=frame_ids,
        pictures=pictures,
        geometry=geometry,
        valid=geometry.valid_patches(patch_size),
        patch_size=patch_size,
        motion_source=motion_source,
        total_frames=total,
        own_motion=maps["own"] if own_maps else None,
        residual=maps["res"] if own_maps else None,
        motion_since=maps["since"] if since_maps else None,
        change_since=maps["change"] if since_maps else None,
        work_valid=wmap.valid,
    )


def _own_motion(bitstream: bool, vectors, luma, previous_luma, anchor_distance: int, cell: int):
    """The sampled frame's own camera-free motion magnitude and per-frame vectors (cells).

    From its motion vectors when the codec has them (none on intra frames: zero motion), the vectors
    divided by the distance to their reference for the warp; otherwise from block matching against the
    previous decoded frame.
    """
    if bitstream:
        canvas, blocks = _canvas_and_blocks(vectors, luma.shape, cell)  # worked out once for both maps
        vx, vy = _motion_cells(canvas, blocks)
        d = max(1, anchor_distance)
        return _camera_free_cells(canvas, blocks)[0], (vx / d, vy / d)
    vx, vy = block_motion(previous_luma, luma, cell=cell)
    return _camera_free_magnitude(vx, vy), (vx, vy)


def _progress(total: int, path: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=os.path.basename(path), unit="frame", leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------
# Scores and selection
# ----------------------------------------------------------------------------------------------------------


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


def _budget_count(budget: int | float, candidates: int) -> int:
    """A patch count (int > 0) or a fraction (float in (0, 1]) of the candidates -> a patch count."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a patch count (int) or a fraction (float in (0, 1]), got {budget!r}")
    if isinstance(budget, (float, np.floating)):
        if not 0 < budget <= 1:
            raise ValueError(f"a fractional budget must lie in (0, 1], got {budget}")
        return max(1, round(float(budget) * candidates))
    if budget <= 0:
        raise ValueError(f"budget must be a positive patch count, got {budget}")
    return int(budget)


def uniform_frames_mask(num_frames: int, rows: int, cols: int, budget: int) -> torch.Tensor:
    """`[T, rows, cols]` kept-mask of `budget // (rows*cols)` whole frames spread evenly (frame 0 first):
    the uniform-frame-sampling baseline for the same budget."""
    whole = max(1, min(num_frames, budget // (rows * cols)))
    kept = torch.zeros(num_frames, rows, cols, dtype=torch.bool)
    kept[np.unique(np.linspace(0, num_frames - 1, whole).round().astype(int))] = True
    return kept


# A patch is "informative" when its mean fused score reaches this; fewer informative patches than the budget
# means the video is (mostly) static, and "balanced" spends the rest on uniform whole frames.
INFORMATIVE_MEAN_SCORE = 0.05


@_torch_single_threaded()
def choose_patches(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budget: int,
    keep_first_frame: bool = True,
    static_fallback: bool = False,
    patch_size: int = 14,
) -> torch.Tensor:
    """Kept-patch mask `[T, rows, cols]`: frame 0 whole (if keep_first_frame), then the global top scores
    over frames 1.. among `valid` patches until `budget` patches in all (ties go to the earlier patch).
    static_fallback: when fewer patches than the remaining budget are informative, the rest goes to whole
    frames spread evenly over the clip instead of to near-zero scores."""
    t, rows, cols = scores.shape
    kept = torch.zeros(t, rows, cols, dtype=torch.bool)
    if keep_first_frame:
        if budget < rows * cols:
            raise ValueError(f"budget {budget} is smaller than one whole first frame ({rows * cols} patches); "
                             "raise it or pass keep_first_frame=False")
        kept[0] = True
    candidates = valid.expand(t, rows, cols).clone()
    candidates[0] &= ~kept[0]
    flat = scores.flatten().numpy()
    order = np.argsort(-flat, kind="stable")
    order = order[candidates.flatten().numpy()[order]]
    remaining = min(budget - int(kept.sum()), len(order))
    if static_fallback:
        order = _with_uniform_fill(order, flat, valid, t, remaining, patch_size)
    kept.view(-1)[torch.from_numpy(order[:remaining].copy())] = True
    return kept


def _with_uniform_fill(order, flat, valid, num_frames: int, remaining: int, patch_size: int) -> np.ndarray:
    """Candidate order for a (mostly) static video: the informative patches first, then whole frames spread
    evenly over frames 1.. for what is left of the budget, then everything else by score."""
    informative = order[flat[order] >= INFORMATIVE_MEAN_SCORE * patch_size**2]
    if len(informative) >= remaining or num_frames < 2:
        return order
    rows, cols = valid.shape
    per_frame = int(valid.sum())
    wanted = min(num_frames - 1, -(-(remaining - len(informative)) // per_frame))
    # Spread as if frame 0 (kept whole) were one of the picks: 3 more frames of 64 -> 21, 42, 63.
    frames = np.unique(np.linspace(0, num_frames - 1, wanted + 1)[1:].round().astype(np.int64))
    whole = (frames[:, None] * rows * cols + np.flatnonzero(valid.flatten().numpy())[None, :]).ravel()
    fill = whole[~np.isin(whole, informative)]
    rest = order[~np.isin(order, np.concatenate([informative, fill]))]
    return np.concatenate([informative, fill, rest])


# ----------------------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CodecClip(PatchClip):
    """A codec-selected clip: the `PatchClip` patch list plus how it was chosen.

    pixel_values `[K, C*p*p]` (CLIP-normalised), patch_positions `[K, 3]` = (t, row, col) in (t, row, col)
    order, t being the RoPE slot on the 64-slot grid (= the sampled-frame index when num_frames is 64,
    `temporal_slots(num_frames)` otherwise); frame_ids `[T]` decoded frame numbers sampled; scores
    `[T, rows, cols]`; kept `[T, rows, cols]`; time_slots `[T]`.
    """

    kept: torch.Tensor | None = None
    time_slots: torch.Tensor | None = None
    policy: str = DEFAULT_POLICY
    patch_size: int = 14
    motion_source: str = "bitstream"
    frames: torch.Tensor | None = field(default=None, repr=False)

    def to_visible_indices(self) -> dict[str, torch.Tensor]:
        """The published input form: the kept patches packed rows*cols at a time, in order, into
        pseudo-frames `pixel_values [1, C, K/(rows*cols), H, W]`, with `visible_indices [1, K]` =
        t*rows*cols + row*cols + col on the 64-slot grid. Needs K to be a multiple of rows*cols."""
        _, rows, cols = self.kept.shape
        grid, k = rows * cols, len(self)
        if k % grid:
            raise ValueError(f"{k} patches do not fill whole pseudo-frames of {grid}; use a budget that is a "
                             f"multiple of {grid}, or the patch list")
        p = self.patch_size
        x = self.pixel_values.view(k // grid, rows, cols, 3, p, p).permute(3, 0, 1, 4, 2, 5)
        video = x.reshape(1, 3, k // grid, rows * p, cols * p).contiguous()
        pos = self.patch_positions
        flat = pos[:, 0] * grid + pos[:, 1] * cols + pos[:, 2]
        return {"pixel_values": video, "visible_indices": flat.unsqueeze(0)}


@_torch_single_threaded()
def _pack(scan: VideoScan, kept: torch.Tensor, **extra) -> CodecClip:
    slots = temporal_slots(len(scan.frame_ids))  # 64 frames: slot i is frame i
    t, rows, cols = kept.shape
    frame, row, col = kept.nonzero(as_tuple=True)  # raster order of (t, row, col) = the required order
    p = scan.patch_size
    index = (frame * rows + row) * cols + col
    # one gather of the kept patches from the uint8 squares ([K, 3, p, p], the layout `patchify` gives; NumPy's
    # gather measured several times faster than torch's here), then floats for those only
    by_patch = scan.pictures.numpy().reshape(t, 3, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5)
    kept_pictures = torch.from_numpy(by_patch[frame.numpy(), row.numpy(), col.numpy()])
    geometry, inside = scan.geometry, None
    if not geometry.fills_square:  # letterbox: the pixels of each kept patch that show picture, [K, p, p]
        inside = geometry.picture_mask().view(rows, p, cols, p).transpose(1, 2)[row, col]
    kept_patches = geometry.to_float(kept_pictures, inside)
    positions = grid_positions(slots, rows, cols)
    return CodecClip(
        pixel_values=normalize(kept_patches, inplace=True).flatten(1),
        patch_positions=positions[index],
        frame_ids=torch.from_numpy(scan.frame_ids.copy()),
        path=scan.path,
        kept=kept,
        time_slots=slots,
        patch_size=scan.patch_size,
        motion_source=scan.motion_source,
        **extra,
    )


def select_patches(
    path: str | os.PathLike,
    num_frames: int = 64,
    budget: int | float = 2048,
    size: int = 224,
    patch_size: int = 14,
    policy: str = DEFAULT_POLICY,
    resize: str = "crop",
    keep_first_frame: bool = True,
    keep_frames: bool = False,
    progress: bool = False,
) -> CodecClip:
    """Codec-style patch selection of a video file, in one streaming decode pass.

    Samples `num_frames` frames at `linspace(0, N-1, num_frames)`, scores every patch (`policy`), keeps
    frame 0 whole and the top-scoring patches of the other frames, `budget` patches in all: a count, or a
    fraction (0, 1] of num_frames*rows*cols. A budget above the candidates keeps them all. resize: "crop"
    (short side to `size`, centre crop) or "letterbox" (long side to `size`, centred; padding patches are
    never chosen after frame 0). keep_frames: attach the sampled frames (`clip.frames`, 0..1) for display.
    Raises ValueError for bad arguments and VideoDecodeError for unreadable files.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_geometry(size, patch_size, resize)
    rows = size // patch_size
    count = _budget_count(budget, num_frames * rows * rows)
    scan = scan_video(path, num_frames, size, patch_size, resize, motion=True, progress=progress, policy=policy)
    scores = patch_scores(scan, policy)
    kept = choose_patches(scores, scan.valid, count, keep_first_frame, policy == "balanced", patch_size)
    return _pack(scan, kept, scores=scores, policy=policy, frames=scan.frames if keep_frames else None)


def sample_frames(
    path: str | os.PathLike, num_frames: int = 16, size: int = 224, patch_size: int = 14, resize: str = "crop"
) -> CodecClip:
    """Dense uniform frame sampling in the same patch-list form: `num_frames` whole frames at
    `linspace(0, N-1, num_frames)`, positions t = `temporal_slots(num_frames)` (16 frames -> 0, 4, ..., 63)."""
    scan = scan_video(path, num_frames, size, patch_size, resize, motion=False)
    rows = size // patch_size
    kept = torch.ones(num_frames, rows, rows, dtype=torch.bool)
    clip = _pack(scan, kept, policy="uniform")
    clip.motion_source = "none"
    return clip


def save_selection(clip: CodecClip, path: str | os.PathLike) -> None:
    """Write the selection (not the pixels) to an .npz: patch_positions, frame_ids, time_slots, scores, kept,
    plain arrays that `numpy.load` reads without pickle."""
    np.savez_compressed(
        path,
        patch_positions=clip.patch_positions.numpy(),
        frame_ids=clip.frame_ids.numpy(),
        time_slots=clip.time_slots.numpy(),
        scores=clip.scores.numpy(),
        kept=clip.kept.numpy(),
    )


# ----------------------------------------------------------------------------------------------------------
# Replenishment: how much of the sampled frames the kept patches can rebuild
# ----------------------------------------------------------------------------------------------------------


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
