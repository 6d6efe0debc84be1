"""One decoding pass over a video (`scan_video`): the sampled frames on the model's square, and the maps the
policies score, measured while decoding goes on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..processing import RESIZE_MODES, FrameGeometry
from .block_matching import _block_motion_since
from .cells import CELL, WORK_PER_PATCH, _CellsToPatches, _WorkMap
from .motion import _BlockCanvas, _MotionSince
from .patch_pictures import KeptPatchPainter
from .reference import reference_maps
from .scores import POLICIES
from .video import VideoDecodeError, VideoFile, motion_vectors, quarter_turns, sample_indices
from .workers import _SquareFrames, _torch_single_threaded


@dataclass
class VideoScan:
    """What one decoding pass learnt about the sampled frames (maps on the square working grid).

    pictures: `[T, 3, size, size]` uint8 (resized like `resize_frames`; `frames` gives them as floats in
    0..1), or None when the scan holds the decoded frames instead (`painter`; `kept_pictures` paints the
    patches asked for); geometry: where the picture lies on them; valid: `[rows, cols]` patches that show picture;
    own_motion / residual: the sampled frame's own motion term and residual stand-in, each scaled per
    frame by its P95 (0..1 a pixel) and summed over each patch, `[T, rows, cols]` (`reference.reference_maps`;
    policy "reference"); motion_since / change_since: motion
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
    painter: KeptPatchPainter | None = field(default=None, repr=False)
    shown: np.ndarray | None = field(default=None, repr=False)  # per slot, the slot whose frame it shows

    @property
    def frames(self) -> torch.Tensor:
        """The sampled frames as floats `[T, 3, size, size]` in 0..1 (letterbox padding in the CLIP mean)."""
        if self.pictures is not None:
            return self.geometry.to_float(self.pictures)
        t, (rows, cols), p = len(self.frame_ids), self.valid.shape, self.patch_size
        patches = self.kept_pictures(torch.ones(t, rows, cols, dtype=torch.bool))
        squares = patches.view(t, rows, cols, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(t, 3, rows * p, cols * p)
        return self.geometry.to_float(squares)

    def kept_pictures(self, kept: torch.Tensor) -> torch.Tensor:
        """uint8 `[K, 3, p, p]`: the pictures of the kept patches (`kept [T, rows, cols]`, bool), in
        `kept.nonzero()` order, gathered from `pictures` or painted from the held frames."""
        if self.pictures is None:
            return self.painter.paint(kept, self.shown)
        t, rows, cols = kept.shape
        p = self.patch_size
        frame, row, col = (i.numpy() for i in kept.nonzero(as_tuple=True))
        # NumPy's gather measured several times faster than torch's here
        by_patch = self.pictures.numpy().reshape(t, 3, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5)
        return torch.from_numpy(by_patch[frame, row, col])


def _check_geometry(size: int, patch_size: int, resize: str) -> None:
    if patch_size < 1 or size < patch_size or size % patch_size:
        raise ValueError(f"size {size} must be a positive multiple of patch_size {patch_size}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def scan_video(
    path: str | os.PathLike,
    num_frames: int = 64,
    size: int = 224,
    patch_size: int = 14,
    resize: str = "crop",
    motion: bool = True,
    progress: bool = False,
    policy: str | None = None,
    pictures: bool = True,
) -> VideoScan:
    """Decode `path` once, keep the `num_frames` sampled frames resized, and measure motion and change.

    Memory stays at the sampled frames plus a few cell maps, whatever the video's length. The frame count
    N comes from the container (`VideoFile.info`); if decoding yields fewer frames than announced, the
    slots past the end repeat the last sampled frame (with no motion). motion=False only samples frames
    (`sample_frames`). policy: measure only what that policy scores (None: both, e.g. to compare them on
    one scan). pictures=False: make no pictures while decoding; the scan holds the sampled frames as decoded
    (about 1.5 bytes a pixel each, for 8-bit 4:2:0) and paints only the patches asked for afterwards
    (`VideoScan.kept_pictures`), which costs a selection a fraction of the CPU time of making every picture.
    Formats without planar 8-bit YUV, and frames too large to hold 64 of (`HELD_FRAMES_BYTES`), get pictures
    anyway. Which way a video goes depends on the video only, never on the thread count, so that a clip's
    pixels are the same in every process.
    Worker threads (resizing, luma, motion sums, block matching) are used when torch may use
    more than one thread here: not inside a DataLoader worker process, which torch limits to one.
    """
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_geometry(size, patch_size, resize)
    threads = torch.get_num_threads()
    with VideoFile(path) as video:
        return _scan(video, num_frames, size, patch_size, resize, motion, progress, policy, threads, pictures)


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
def _scan(video: VideoFile, num_frames, size, patch_size, resize, motion, progress, policy, threads,
          pictures) -> VideoScan:
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
    # the residual stand-in needs the frame before each sample
    needed_before = set((frame_ids[frame_ids > 0] - 1).tolist()) if own_maps else set()
    work = (size // patch_size) * WORK_PER_PATCH

    maps = {k: np.zeros((num_frames, work, work), np.float32) for k in ("since", "change")}
    rows = size // patch_size
    maps.update({k: np.zeros((num_frames, rows, rows), np.float32) for k in ("own", "res")})  # patch sums
    bar = _progress(total, path) if progress else None
    wmap = squares = painter = None
    motion_source = ("bitstream" if bitstream else "block-matching") if motion else "none"
    accumulated = previous_plane = sampled_luma = None
    decoded = 0
    needed = slots_of.keys() | needed_before
    jobs = []  # maps being worked out: block matching since the previous sample, "reference" maps
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
                painter = None if pictures else _painter(frame, wmap, patch_size, num_frames, workers > 0)
                squares = _SquareFrames(wmap, num_frames, workers, hold=painter and painter.hold)
                accumulated = _MotionSince(canvas, wmap, maps["since"], pool=squares.pool)
                # "reference" works on 4x4-pixel cells, as published, summed over each patch's area
                fine = _CellsToPatches.for_map(wmap, CELL, patch_size)
                coarse = (cell, _CellsToPatches.for_map(wmap, cell, patch_size))
            is_sampled, is_anchor = number in slots_of, frame.pict_type in (1, 2)  # I or P
            since = is_sampled and since_maps and number > 0 and sampled_luma is not None
            first = slots_of[number][0] if is_sampled else None
            # the luma change since the previous sample, worked out by the job that measures this frame's luma
            change = (sampled_luma, maps["change"][first]) if since else None
            # "reference": the full-resolution luma (a Future) of the samples and of the frames before them
            plane = squares.plane(frame) if own_maps and number in needed else None
            # Motion since the previous sample: each I/P frame is predicted from the I/P frame before it, so
            # their vectors chain over the interval once; B-frames (which point back to the same I/P frame,
            # and may not even be decoded) add nothing but the sample's own vectors.
            wanted = is_sampled or (since_maps and is_anchor)
            # "balanced" reads moving L0 blocks only; "reference" every vector of the sampled frames
            vectors = motion_vectors(frame, moving_l0=not own_maps) if motion and bitstream and wanted else None
            if vectors is not None and since_maps:
                accumulated.add(vectors)
            if is_sampled:
                # its result: the luma cells ("balanced"; None otherwise)
                luma = squares.put(frame, slots_of[number], cell if since_maps else None, change)
                if own_maps and number > 0 and previous_plane is not None:
                    jobs.append(squares.submit(reference_maps, plane, previous_plane, vectors, bitstream, fine,
                                               coarse, maps["own"][first], maps["res"][first]))
                if since and not bitstream:
                    jobs.append(squares.submit(_block_motion_since, sampled_luma, luma, wmap, maps["since"][first]))
                accumulated.end_interval(first if since and bitstream else None)
                sampled_luma = luma
            previous_plane = plane
        shown = squares.finish() if squares is not None else None
        if shown is None:
            raise VideoDecodeError(path, "none of the sampled frames could be decoded")
        geometry = wmap.plan.geometry
        accumulated.finish()
        for job in jobs:
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
        pictures=squares.pictures,
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
        painter=painter,
        shown=shown,
    )


# Held decoded frames of a scan that paints its kept patches afterwards: 64 frames of 1080p 4:2:0 (200 MB)
# are held; 4K ones get their pictures while decoding instead.
HELD_FRAMES_BYTES = 256 << 20


def _painter(frame, wmap, patch_size: int, num_frames: int, parallel: bool) -> KeptPatchPainter | None:
    """A painter for the kept patches of this video, or None where pictures must be made while decoding."""
    held = KeptPatchPainter.held_bytes(frame, num_frames)
    if held is None or held > HELD_FRAMES_BYTES:
        return None
    return KeptPatchPainter(wmap.plan, patch_size, frame, wmap.turns, num_frames, parallel)


def _progress(total: int, path: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=os.path.basename(path), unit="frame", leave=False, dynamic_ncols=True)
