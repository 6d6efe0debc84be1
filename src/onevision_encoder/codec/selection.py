"""Choosing and packing: the kept patches of a scored scan (`choose_patches`), packed into the model's
patch-list form (`CodecClip`); `select_patches` and `sample_frames`, the two ways from a file to a patch list."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..processing import PatchClip, grid_positions, normalize, temporal_slots
from .scan import VideoScan, _check_geometry, scan_video
from .scores import DEFAULT_POLICY, POLICIES, patch_scores
from .workers import _torch_single_threaded


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


def check_whole_frames(whole_frames: Sequence[int], num_frames: int) -> tuple[int, ...]:
    """The sampled-frame indices to keep whole, checked: integers in [0, num_frames), each once, sorted.
    Raises ValueError naming the offending entry."""
    if isinstance(whole_frames, (str, bytes)) or not hasattr(whole_frames, "__iter__"):
        raise ValueError(f"whole_frames must be a list of sampled-frame indices, got {whole_frames!r}")
    indices = list(whole_frames)
    for i in indices:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"whole_frames must hold integer frame indices, got {i!r}")
        if not 0 <= i < num_frames:
            raise ValueError(f"whole frame {i} is out of range: the sampled frames are 0..{num_frames - 1}")
    repeated = sorted({int(i) for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"whole_frames names frame(s) {repeated} more than once")
    return tuple(sorted(int(i) for i in indices))


def _check_budget_holds(budget: int, whole, per_frame: int) -> None:
    if budget < len(whole) * per_frame:
        raise ValueError(f"budget {budget} is smaller than the {len(whole)} whole frame(s) {list(whole)} "
                         f"({len(whole) * per_frame} patches); raise it or keep fewer frames whole")


@_torch_single_threaded()
def choose_patches(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budget: int,
    whole_frames: Sequence[int] = (0,),
    static_fallback: bool = False,
    patch_size: int = 14,
) -> torch.Tensor:
    """Kept-patch mask `[T, rows, cols]`: the sampled frames `whole_frames` whole (every patch, padding
    included), then the global top scores of the other patches among `valid` ones until `budget` patches in
    all (ties go to the earlier patch). static_fallback: when fewer patches than the remaining budget are
    informative, the rest goes to whole frames spread evenly over the clip instead of to near-zero scores."""
    t, rows, cols = scores.shape
    whole = list(check_whole_frames(whole_frames, t))
    _check_budget_holds(budget, whole, rows * cols)
    kept = torch.zeros(t, rows, cols, dtype=torch.bool)
    kept[whole] = True
    candidates = valid.expand(t, rows, cols) & ~kept
    flat = scores.flatten().numpy()
    order = np.argsort(-flat, kind="stable")
    order = order[candidates.flatten().numpy()[order]]
    remaining = min(budget - int(kept.sum()), len(order))
    if static_fallback:
        order = _with_uniform_fill(order, flat, valid, whole, t, remaining, patch_size)
    kept.view(-1)[torch.from_numpy(order[:remaining].copy())] = True
    return kept


def _with_uniform_fill(order, flat, valid, whole: list[int], num_frames: int, remaining: int,
                       patch_size: int) -> np.ndarray:
    """Candidate order for a (mostly) static video: the informative patches first, then whole frames spread
    evenly between the frames kept whole for what is left of the budget, then everything else by score."""
    informative = order[flat[order] >= INFORMATIVE_MEAN_SCORE * patch_size**2]
    free = num_frames - len(whole)
    if len(informative) >= remaining or free < 1:
        return order
    rows, cols = valid.shape
    per_frame = int(valid.sum())
    wanted = min(free, -(-(remaining - len(informative)) // per_frame))
    frames = _spread_frames(whole, num_frames, wanted)
    picture = (frames[:, None] * rows * cols + np.flatnonzero(valid.flatten().numpy())[None, :]).ravel()
    fill = picture[~np.isin(picture, informative)]
    rest = order[~np.isin(order, np.concatenate([informative, fill]))]
    return np.concatenate([informative, fill, rest])


def _spread_frames(whole: list[int], num_frames: int, wanted: int) -> np.ndarray:
    """`wanted` more frames spread over the clip as if the `whole` ones were picks too: each goes, in turn,
    to the stretch whose frames lie farthest from a pick (the open stretches before the first and after the
    last pick end on frames 0 and T-1; between picks they sit evenly). Frame 0 whole and 3 more of 64 ->
    21, 42, 63."""
    last = num_frames - 1
    # (start, end, open end: "start", "end" or None, picks inside)
    stretches = [(a, b, None) for a, b in zip(whole, whole[1:]) if b - a > 1]
    if whole[0] > 0:
        stretches.insert(0, (whole[0], 0, "start"))  # measured from the first pick back to frame 0
    if whole[-1] < last:
        stretches.append((whole[-1], last, "end"))
    picks = [0] * len(stretches)

    def farthest(i: int) -> float:  # the greatest distance from a frame of stretch i to its nearest pick
        a, b, opening = stretches[i]
        length = abs(b - a)
        if picks[i] >= (length if opening else length - 1):
            return -1.0  # every frame of the stretch picked
        if opening is None:
            return length / (2 * (picks[i] + 1))
        return length / (2 * picks[i]) if picks[i] else length

    for _ in range(wanted):
        best = max(range(len(stretches)), key=lambda i: (farthest(i), -i))
        picks[best] += 1
    frames = []
    for (a, b, opening), k in zip(stretches, picks):
        steps = np.arange(1, k + 1) / (k if opening else k + 1)
        frames.extend(np.round(a + (b - a) * steps).astype(np.int64).tolist())
    return np.unique(np.array([f for f in frames if f not in whole], np.int64))


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
    # the kept patches' uint8 pictures ([K, 3, p, p], the layout `patchify` gives), then floats for those only
    kept_pictures = scan.kept_pictures(kept)
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
    whole_frames: Sequence[int] | None = None,
) -> CodecClip:
    """Codec-style patch selection of a video file, in one streaming decode pass.

    Samples `num_frames` frames at `linspace(0, N-1, num_frames)`, scores every patch (`policy`), keeps
    the sampled frames `whole_frames` whole (default [0]; the published training data kept [0, 16, 32, 48]
    of 64) and the top-scoring patches of the others, `budget` patches in all: a count, or a fraction
    (0, 1] of num_frames*rows*cols. A budget above the candidates keeps them all. resize: "crop" (short
    side to `size`, centre crop) or "letterbox" (long side to `size`, centred; padding patches are never
    chosen outside the whole frames). keep_first_frame=False: the same as whole_frames=[] (kept for
    earlier callers). keep_frames: attach the sampled frames (`clip.frames`, 0..1) for display.
    Raises ValueError for bad arguments and VideoDecodeError for unreadable files.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_geometry(size, patch_size, resize)
    if whole_frames is None:
        whole_frames = (0,) if keep_first_frame else ()
    elif not keep_first_frame:
        raise ValueError("give whole_frames or keep_first_frame=False, not both (whole_frames=[] keeps no frame whole)")
    whole = check_whole_frames(whole_frames, num_frames)
    rows = size // patch_size
    count = _budget_count(budget, num_frames * rows * rows)
    _check_budget_holds(count, whole, rows * rows)
    # only the kept patches get pictures (`scan_video`: pictures=False); keep_frames paints the whole frames
    # the same way, so the patches are the same with or without it
    scan = scan_video(path, num_frames, size, patch_size, resize, motion=True, progress=progress, policy=policy,
                      pictures=False)
    scores = patch_scores(scan, policy)
    kept = choose_patches(scores, scan.valid, count, whole, policy == "balanced", patch_size)
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
