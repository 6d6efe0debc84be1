"""The cell grid of a video: decoded frames cut into cells (4x4 pixels and up), and how cells and pixels map
onto the model's square working grid through the same rotation, resize and crop/letterbox as the pictures."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from ..processing import SquarePlan

# FFmpeg's scaler works in threads of its own unless told not to: each conversion then hands slices to them
# and waits. The work per frame is small and the callers are already one thread per core (the decoding
# thread, the workers, `ove encode`'s loader processes): one thread took the CPU time of the conversions of
# 64 sampled frames from 18.0 to 16.0 ms (RGBA, 1280x720) and 4.9 to 3.0 ms (luma cells, 640x272).
SCALER_THREADS = 1
MV_GRID = 4  # motion vectors come in blocks of >= 4x4 pixels on a 4-pixel grid
CELL = MV_GRID  # the smallest cell of the per-frame maps
WORK_PER_PATCH = 4  # work pixels per patch side: scores at (rows*4)^2, e.g. 64x64 for 224/14


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
        pixels = rgb.reformat(frame, format="rgba", threads=SCALER_THREADS).to_ndarray()
        if self.turns:
            pixels = np.ascontiguousarray(np.rot90(pixels, self.turns))
        return self.plan.resample(pixels)[:3]

    def __call__(self, cells: np.ndarray) -> np.ndarray:
        """Cell grid `[..., cells]` -> working grid `[..., work, work]`."""
        display = np.rot90(cells, self.turns, axes=(-2, -1)) if self.turns else cells
        # rows, then columns: a quarter of the time of one indexing with both (measured at 64x64)
        work = display[..., self.rows, :][..., self.cols].astype(np.float32, copy=False)
        return work if self.fills else np.where(self.valid, work, np.float32(0))

    @cached_property
    def fills(self) -> bool:
        """Whether every work pixel shows picture (no letterbox padding)."""
        return bool(self.valid.all())


def _overlaps(cells: int, cell: int, length: int, resized: int, offset: int, patch: int, patches: int) -> np.ndarray:
    """`[patches, cells]`: along one axis, how many square pixels of patch i cell j covers (cell j spans
    decoded pixels [j*cell, (j+1)*cell) of `length`, resized to `resized` and shifted by -`offset`)."""
    edges = np.minimum(np.arange(cells + 1) * cell, length) * resized / length - offset
    bounds = np.arange(patches + 1) * patch
    low = np.maximum(bounds[:-1, None], edges[None, :-1])
    high = np.minimum(bounds[1:, None], edges[None, 1:])
    return np.clip(high - low, 0, None)


@dataclass
class _CellsToPatches:
    """Sums a map on the cell grid (decoded orientation) over each patch of the model's square, every cell
    weighted by the area it covers there: `rows @ cells @ cols.T`, exact for a map constant over each cell,
    where sampling it at the working grid's pixels gives each patch 16 samples."""

    turns: int
    rows: np.ndarray  # [patch rows, cell rows], display orientation
    cols: np.ndarray  # [patch cols, cell cols]

    @classmethod
    def for_map(cls, wmap: "_WorkMap", cell: int, patch_size: int) -> "_CellsToPatches":
        plan = wmap.plan
        offset = 1 if plan.mode == "crop" else -1  # crop: square = picture - top; letterbox: + top
        patches = plan.size // patch_size
        cell_rows, cell_cols = _cell_shape(plan.height, plan.width, cell)
        rows = _overlaps(cell_rows, cell, plan.height, plan.resized_height, offset * plan.top, patch_size, patches)
        cols = _overlaps(cell_cols, cell, plan.width, plan.resized_width, offset * plan.left, patch_size, patches)
        return cls(wmap.turns, rows.astype(np.float32), cols.astype(np.float32))

    def __call__(self, cells: np.ndarray) -> np.ndarray:
        display = np.rot90(cells, self.turns) if self.turns else cells
        return self.rows @ display.astype(np.float32) @ self.cols.T


def luma_cells(frame, cell: int = CELL, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """Mean luma (0..255, full range) of each `cell`x`cell`-pixel cell of a decoded frame, as float32
    [ceil(H/cell), ceil(W/cell)]. FFmpeg's area scaler averages the cells and converts any pixel format
    (10-bit, limited or full range) to the same 8-bit full-range grey."""
    ch, cw = _cell_shape(frame.height, frame.width, cell)
    gray = (reformatter or VideoReformatter()).reformat(frame, width=cw, height=ch, format="gray", interpolation="AREA",
                                                        threads=SCALER_THREADS)
    return gray.to_ndarray().astype(np.float32)
