"""The pictures of the kept patches only, made from the decoded frames once the choice is made
(`KeptPatchPainter`).

Making the whole model picture of every sampled frame (RGB at full resolution, then resampling) cost a
selection more than anything but decoding, yet an eighth of the patches are kept (K = 2048 of 64x256). So the
sampled frames are held as decoded, 8-bit planar YUV (the part of each plane that patches can reach, copied
into a reused buffer: `_Buffers`), and each kept patch is resampled from the planes around it, then
converted to RGB.

The filter is PIL's antialiased bicubic (what `SquarePlan.resample` follows) as float weights per output
row and column of the square. Chroma is taken the way FFmpeg's RGB conversion takes it, each chroma sample
standing for the luma pixels it covers: its weights are the luma weights summed over those pixels. So
resampling the planes and converting afterwards is, up to rounding and clipping, the same linear map as
converting at full resolution and resampling then. `tests/codec/test_patch_pictures.py` measures the
difference to `resize_frames` of FFmpeg's RGB frames (about one level on average: FFmpeg's fast converter
itself lands about one level below the exact BT.601/709 conversion used here).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from ..processing import SquarePlan
from .workers import _worker_pool

# The 8-bit planar YUV formats painted from their planes: (horizontal, vertical) chroma subsampling
PLANAR_YUV = {
    "yuv420p": (2, 2), "yuvj420p": (2, 2), "yuv422p": (2, 1), "yuvj422p": (2, 1), "yuv444p": (1, 1),
    "yuvj444p": (1, 1),
}
# (Kr, Kb) by FFmpeg colorspace number; any other (unspecified included) is BT.601, as in FFmpeg's scaler
LUMA_WEIGHTS = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
BT601 = (0.299, 0.114)


def bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """PIL's bicubic kernel."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def axis_weights(length: int, resized: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's antialiased bicubic along an axis of `length` pixels resized to `resized`, for the resized pixels
    `first .. first+count-1` (clamped onto the axis: letterbox padding may take any). Returns each output
    pixel's first input pixel `[count]` and its weights `[count, taps]` (each row sums to 1)."""
    scale = length / resized
    support, inverse = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    centres = (np.clip(np.arange(first, first + count), 0, resized - 1) + 0.5) * scale
    low = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    high = np.minimum((centres + support + 0.5).astype(np.int64), length)
    offsets = np.arange(int((high - low).max()))
    weights = bicubic((low[:, None] + offsets - centres[:, None] + 0.5) * inverse)
    weights = np.where(offsets < (high - low)[:, None], weights, 0.0)
    return low, weights / weights.sum(1, keepdims=True)


@dataclass
class PatchWindows:
    """Along one axis of a plane: where each patch's window starts (`first [patches]`, in plane samples)
    and the weights of its output pixels over the window (`weights [patches, patch, taps]`)."""

    first: np.ndarray
    weights: torch.Tensor

    @classmethod
    def of(cls, starts: np.ndarray, weights: np.ndarray, patch: int, length: int, factor: int) -> "PatchWindows":
        """Per-pixel `axis_weights` grouped `patch` pixels at a time, on a plane subsampled by `factor` (a
        sample covers `factor` pixels and gets the sum of their weights). Windows lie inside the plane."""
        samples = -(-length // factor)
        patches = len(starts) // patch
        starts = starts.reshape(patches, patch)
        pixels = starts[:, :, None] + np.arange(weights.shape[1])  # [patches, patch, pixel taps]
        sample = np.minimum(pixels // factor, samples - 1)
        first = sample.min((1, 2))
        taps = int((sample.max((1, 2)) - first).max()) + 1
        first = np.minimum(first, samples - taps)
        grouped = np.zeros((patches, patch, taps))
        patch_index = np.broadcast_to(np.arange(patches)[:, None, None], sample.shape)
        pixel_index = np.broadcast_to(np.arange(patch)[None, :, None], sample.shape)
        np.add.at(grouped, (patch_index, pixel_index, sample - first[:, None, None]), weights.reshape(sample.shape))
        return cls(first, torch.from_numpy(grouped.astype(np.float32)))


def yuv_to_rgb(colorspace: int, full_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix `[3, 3]`, offset `[3]`): `rgb = matrix @ yuv + offset` for 8-bit YUV of an FFmpeg colorspace
    number, limited (16-235/240) or full range."""
    kr, kb = LUMA_WEIGHTS.get(colorspace, BT601)
    kg = 1.0 - kr - kb
    luma, chroma = (1.0, 1.0) if full_range else (255 / 219, 255 / 224)
    matrix = np.array([
        [luma, 0.0, 2 * (1 - kr) * chroma],
        [luma, -2 * kb * (1 - kb) / kg * chroma, -2 * kr * (1 - kr) / kg * chroma],
        [luma, 2 * (1 - kb) * chroma, 0.0],
    ])
    black = np.array([0.0 if full_range else 16.0, 128.0, 128.0])
    return torch.tensor(matrix, dtype=torch.float32), torch.tensor(-matrix @ black, dtype=torch.float32)


@dataclass
class _PlaneGeometry:
    """One plane of the upright picture as held: the part the windows reach (`origin`, `shape`: the crop's
    margins are never read, so never copied), and the windows relative to it."""

    full: tuple[int, int]  # (height, width) of the whole plane
    origin: tuple[int, int]
    shape: tuple[int, int]
    rows: PatchWindows
    cols: PatchWindows  # weights padded with zero output pixels (`_padded`)

    @classmethod
    def of(cls, full: tuple[int, int], rows: PatchWindows, cols: PatchWindows) -> "_PlaneGeometry":
        top, left = int(rows.first.min()), int(cols.first.min())
        bottom = int((rows.first + rows.weights.shape[2]).max())
        right = int((cols.first + cols.weights.shape[2]).max())
        return cls(full, (top, left), (bottom - top, right - left),
                   PatchWindows(rows.first - top, rows.weights), PatchWindows(cols.first - left, _padded(cols.weights)))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def _padded(weights: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """`[patches, patch, taps]` weights with zero rows added up to a multiple of `multiple` output pixels: the
    products then run on whole vector widths (a 14-column product measured 2.3x slower than a 16-column one on
    the benchmark machine's one-thread sgemm); the pixels past the patch are cut off after."""
    patches, patch, taps = weights.shape
    padded = torch.zeros(patches, -(-patch // multiple) * multiple, taps)
    padded[:, :patch] = weights
    return padded


class _Buffers:
    """Reused uint8 buffers for held frames. The decoded frames themselves are not held: each one held keeps
    the decoder from reusing its buffer, and the fresh pages of 64 new ones cost about a quarter of a
    decode-everything pass in page faults (64 frames of 720p: 20,000 faults, 50 ms, measured). Copied into a
    buffer that the next scan in the process takes again, their pages are faulted in once. At most `spare`
    buffers wait, the largest ones: a process that has selected keeps up to `scan.HELD_FRAMES_BYTES` for
    the next selection."""

    spare = 1
    free: list[np.ndarray] = []
    lock = threading.Lock()

    @classmethod
    def take(cls, size: int) -> np.ndarray:
        with cls.lock:
            fitting = [i for i, b in enumerate(cls.free) if b.size >= size]
            if fitting:
                return cls.free.pop(min(fitting, key=lambda i: cls.free[i].size))
        return np.empty(size, np.uint8)

    @classmethod
    def give(cls, buffer: np.ndarray) -> None:
        with cls.lock:
            cls.free = sorted(cls.free + [buffer], key=lambda b: b.size)[-cls.spare :]


class KeptPatchPainter:
    """Paints kept patches from the sampled frames of one video: `hold(frame, slots)` for each sampled frame
    as it is decoded (its planes are copied upright), then `paint(kept)`. The same geometry as
    `SquarePlan.resample` followed by `place`."""

    def __init__(self, plan: SquarePlan, patch_size: int, frame, turns: int, num_frames: int, parallel: bool = False):
        self.patch, self.turns, self.parallel = patch_size, turns, parallel
        sub_x, sub_y = PLANAR_YUV[frame.format.name]
        if turns % 2:
            sub_x, sub_y = sub_y, sub_x  # upright
        sign = 1 if plan.mode == "crop" else -1  # crop: square = resized - top; letterbox: + top
        rows = axis_weights(plan.height, plan.resized_height, sign * plan.top, plan.size)
        cols = axis_weights(plan.width, plan.resized_width, sign * plan.left, plan.size)
        self.planes = [_PlaneGeometry.of((-(-plan.height // fy), -(-plan.width // fx)),
                                         PatchWindows.of(*rows, patch_size, plan.height, fy),
                                         PatchWindows.of(*cols, patch_size, plan.width, fx))
                       for fy, fx in ((1, 1), (sub_y, sub_x), (sub_y, sub_x))]
        full = frame.format.name.startswith("yuvj") or int(frame.color_range) == 2
        self.matrix, self.offset = yuv_to_rgb(int(frame.colorspace), full)
        self.frame_size = sum(plane.size for plane in self.planes)
        self.num_frames = num_frames
        self.buffer = _Buffers.take(num_frames * self.frame_size)
        weakref.finalize(self, _Buffers.give, self.buffer)

    @staticmethod
    def held_bytes(frame, num_frames: int) -> int | None:
        """The bytes `num_frames` such frames take held at most (their whole planes: a crop holds less), or
        None if their pixel format cannot be painted from its planes (8-bit planar YUV only)."""
        if frame.format.name not in PLANAR_YUV:
            return None
        sub_x, sub_y = PLANAR_YUV[frame.format.name]
        chroma = -(-frame.height // sub_y) * -(-frame.width // sub_x)
        return num_frames * (frame.height * frame.width + 2 * chroma)

    def hold(self, frame, slots: list[int]) -> None:
        """Copy the part of a sampled frame's planes that windows reach (upright) for its slots (a frame sampled
        twice is held for each)."""
        for index, geometry in enumerate(self.planes):
            h, w = geometry.full[::-1] if self.turns % 2 else geometry.full  # as decoded
            plane = frame.planes[index]
            decoded = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w]
            upright = np.rot90(decoded, self.turns) if self.turns else decoded
            (top, left), (height, width) = geometry.origin, geometry.shape
            for slot in slots:
                np.copyto(self._plane_data(slot, index), upright[top : top + height, left : left + width])

    def _plane_data(self, slot: int, index: int) -> np.ndarray:
        start = slot * self.frame_size + self._plane_start(index)
        return self.buffer[start : start + self.planes[index].size].reshape(self.planes[index].shape)

    def _plane_start(self, index: int) -> int:
        return sum(g.size for g in self.planes[:index])

    def _windows(self, planes: tuple[int, ...], taps_y: int, taps_x: int) -> np.ndarray:
        """Every window of `taps_y` x `taps_x` samples of the held planes `planes` (consecutive, one shape),
        as one view `[slot, plane, top, left, taps_y, taps_x]` of the buffer: one gather takes them all."""
        h, w = self.planes[planes[0]].shape
        start = self._plane_start(planes[0])
        shape = (self.num_frames, len(planes), h - taps_y + 1, w - taps_x + 1, taps_y, taps_x)
        return as_strided(self.buffer[start:], shape, (self.frame_size, h * w, w, 1, w, 1), writeable=False)

    def paint(self, kept: torch.Tensor, source: np.ndarray | None = None) -> torch.Tensor:
        """uint8 `[K, 3, p, p]` of the kept patches (`kept [T, rows, cols]` bool), in `kept.nonzero()` order.
        source: per slot, the slot whose frame it shows (slots whose frame never came repeat another)."""
        slot, row, col = (i.numpy() for i in kept.nonzero(as_tuple=True))
        if source is not None:
            slot = source[slot]
        # With a core to spare, a worker thread paints the first half of the patches meanwhile (the products
        # and NumPy's gathers release the GIL).
        if not self.parallel or len(slot) < 2:
            return self._paint(slot, row, col)
        half = len(slot) // 2
        pool = _worker_pool(1)
        try:
            first = pool.submit(self._paint, slot[:half], row[:half], col[:half])
            second = self._paint(slot[half:], row[half:], col[half:])
            return torch.cat([first.result(), second])
        finally:
            pool.shutdown()

    def _paint(self, slot: np.ndarray, row: np.ndarray, col: np.ndarray) -> torch.Tensor:
        p = self.patch
        by_col = np.argsort(col, kind="stable")  # the windows of a patch column side by side
        slot, row, col = slot[by_col], row[by_col], col[by_col]
        yuv = torch.empty(3, len(slot), p, p)  # in by_col order
        self._resample((0,), slot, row, col, yuv[:1])
        self._resample((1, 2), slot, row, col, yuv[1:])  # U and V share their geometry: one batch of windows
        rgb = torch.addmm(self.offset.view(3, 1), self.matrix, yuv.view(3, -1))
        rgb = rgb.round_().clamp_(0, 255).to(torch.uint8).view(3, -1, p, p).transpose(0, 1)
        asked = np.empty_like(by_col)
        asked[by_col] = np.arange(len(by_col))
        return rgb[torch.from_numpy(asked)]  # in the order asked for: one gather of the uint8 patches

    def _resample(self, planes: tuple[int, ...], slot: np.ndarray, row: np.ndarray, col: np.ndarray,
                  out: torch.Tensor) -> None:
        """Planes of one geometry at the kept patches (sorted by column) into `out`, floats `[planes, K, p, p]`:
        each patch's window gathered, resampled along the columns (one product for the windows of a patch
        column, which share their weights), then along the rows; about a megabyte of windows at a time
        (`CHUNK_BYTES`)."""
        geometry, p = self.planes[planes[0]], self.patch
        rows, cols = geometry.rows, geometry.cols
        taps_y, (_, padded, taps_x) = rows.weights.shape[2], cols.weights.shape
        windows = self._windows(planes, taps_y, taps_x)
        for lo, hi, pieces in _chunks(col, max(1, CHUNK_BYTES // (4 * len(planes) * taps_y * taps_x))):
            # [patches, planes, taps_y, taps_x]
            pixels = torch.from_numpy(windows[slot[lo:hi], :, rows.first[row[lo:hi]], cols.first[col[lo:hi]]]).float()
            across = torch.empty(hi - lo, len(planes), taps_y, padded)
            for c, start, end in pieces:
                torch.mm(pixels[start:end].view(-1, taps_x), cols.weights[c].T, out=across[start:end].view(-1, padded))
            down = torch.matmul(rows.weights[torch.from_numpy(row[lo:hi])].unsqueeze(1), across)
            out[:, lo:hi] = down[..., :p].transpose(0, 1)


# Float windows resampled at once: they stay in the cache through both products, and the memory a painting
# takes stays the same whatever the frame size and budget (all the windows at once: 40 MB for 2048 patches at
# 720p, 120 MB for 4096 at 1080p). Painting 2048 patches of bigbuckbunny.mp4 (720p) inside a selection:
# 24-26 -> 23 ms, measured; no change on smaller frames.
CHUNK_BYTES = 1 << 20


def _chunks(values: np.ndarray, size: int):
    """`(lo, hi, pieces)` over a sorted array, in order: at most `size` entries a chunk, each piece
    `(value, start, end)` a run of equal values (or part of one) at `lo + start .. lo + end`."""
    lo, pieces = 0, []
    for value, start, end in _runs(values):
        for piece in range(start, end, size):
            piece_end = min(piece + size, end)
            if piece_end - lo > size:
                yield lo, piece, pieces
                lo, pieces = piece, []
            pieces.append((value, piece - lo, piece_end - lo))
    if pieces:
        yield lo, len(values), pieces


def _runs(values: np.ndarray):
    """(value, start, end) of each run of equal values in a sorted array."""
    edges = np.flatnonzero(np.diff(values, prepend=values[:1] - 1, append=values[-1:] + 1))
    for lo, hi in zip(edges[:-1], edges[1:]):
        yield int(values[lo]), int(lo), int(hi)
