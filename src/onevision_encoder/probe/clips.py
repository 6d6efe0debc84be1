"""How the probe reads a clip: TSN frame sampling or codec selection, into the patch-list form.

- Frames mode: N frames by TSN segments (segment length s = (n-1)/N; a random offset inside each segment
  for augmented training, the segment centre otherwise), short side to the encoder's size (bicubic),
  centre crop, the encoder's normalisation. Our model gets t = round(idx/(n-1)·63) on its 64-slot grid;
  other encoders get the frame ordinal 0..N-1.
- Codec mode (our model only): `select_patches` over 64 frames with the budget (and `whole_frames`, frame
  0 by default), as `ove encode` does.

`ProbeClips` is also an `ove encode` reader (`mode`, `frames`, `budget`, sizes, `item_mode`, `describe`,
`load`), so the cache is made by the `Encoder` itself: sharded, resumable, failures recorded.
Augmentation (training only) is a colour jitter: brightness, contrast and saturation factors in
1 ± 0.125, one draw per clip (the published brightness was a factor in ±0.125, which blacks clips out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..codec import select_patches
from ..encode.inputs import Sample
from ..processing import CLIP_MEAN, CLIP_STD, PatchClip, grid_positions, patchify, resize_frames
from ..codec.video import VideoDecodeError, VideoFile, quarter_turns

JITTER = 0.125
TEMPORAL_SLOTS = 64


def tsn_indices(total: int, num: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame numbers of `num` TSN segments over `total` frames: int(s·i + U(0, s)) with rng, int(s·i + s/2)
    without (s = (total-1)/num); fewer frames than segments gives 0..total-1 padded with the last."""
    if total < num:
        return np.concatenate([np.arange(total), np.full(num - total, total - 1)]).astype(np.int64)
    s = (total - 1) / num
    offsets = rng.uniform(0, s, num) if rng is not None else np.full(num, s / 2)
    return (s * np.arange(num) + offsets).astype(np.int64)


def time_slots(indices: np.ndarray, total: int) -> torch.Tensor:
    """Our model's time slot of each frame number: clamp(round(idx/(total-1)·63), 0, 63)."""
    scale = (TEMPORAL_SLOTS - 1) / max(total - 1, 1)
    return torch.from_numpy(np.clip(np.round(indices * scale), 0, TEMPORAL_SLOTS - 1).astype(np.int64))


def read_frames(path: str, num: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 frames `[num, H, W, 3]`, their frame numbers, the clip's frame count), decoding only what is
    needed. A sampled frame that never comes (truncated file) repeats the nearest one that did."""
    with VideoFile(path) as video:
        info = video.info(timestamps=True)
        indices = tsn_indices(info.frame_count, num, rng)
        wanted, got = set(indices.tolist()), {}
        for number, frame in video.frames(False, wanted.__contains__, info.presentation_numbers):
            if number in wanted:
                got[number] = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), quarter_turns(frame)))
                if len(got) == len(wanted):
                    break
    if not got:
        raise VideoDecodeError(path, "none of the sampled frames could be decoded")
    decoded = np.array(sorted(got))
    nearest = [int(decoded[np.abs(decoded - i).argmin()]) for i in indices]
    return np.stack([got[n] for n in nearest]), indices, info.frame_count


def colour_jitter(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in 1 ± JITTER on patches `[K, 3, p*p]` in 0..1."""
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, 3)
    grey = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).unsqueeze(1)
    x = pixels * brightness
    x = (x - grey.mean() * brightness) * contrast + grey.mean() * brightness
    x = grey * brightness + (x - grey * brightness) * saturation
    return x.clamp_(0, 1)


@dataclass(frozen=True)
class ProbeClips:
    """The probe's reader. mode: "tsn" (frames) or "codec"; frames: N (TSN) or the codec's sampled frames;
    ordinal_time: t = frame ordinal (other encoders) instead of our model's slot."""

    mode: str
    frames: int
    budget: int | None
    patch_size: int
    video_size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    ordinal_time: bool = False
    whole_frames: tuple[int, ...] = (0,)  # codec mode: sampled frames kept whole

    @property
    def image_size(self) -> int:  # part of the reader interface; the probe reads videos only
        return self.video_size

    def item_mode(self, path: str) -> str:
        return self.mode

    def describe(self, mode: str) -> dict:
        return {"mode": mode, "frames": self.frames, "budget": self.budget, "size": self.video_size,
                **({"whole_frames": list(self.whole_frames)} if mode == "codec" else {})}

    def load(self, path: str, rng: np.random.Generator | None = None, jitter: bool = False) -> PatchClip:
        """One clip as a normalised patch list. rng: random TSN offsets (training); jitter: colour jitter
        drawn from rng. Without rng: segment centres, no jitter (evaluation, and the cache)."""
        p = self.patch_size
        if self.mode == "codec":
            clip = select_patches(path, num_frames=self.frames, budget=self.budget, size=self.video_size, patch_size=p,
                                  whole_frames=self.whole_frames)
            pixels = _unnormalize(clip.pixel_values, CLIP_MEAN, CLIP_STD)
            positions = clip.patch_positions
        else:
            frames, indices, total = read_frames(path, self.frames, rng)
            squares, _ = resize_frames(frames, self.video_size)
            pixels = patchify(squares, p).flatten(0, 1).unflatten(-1, (3, -1))
            times = torch.arange(self.frames) if self.ordinal_time else time_slots(indices, total)
            rows = self.video_size // p
            positions = grid_positions(times, rows, rows)
        if jitter and rng is not None:
            pixels = colour_jitter(pixels, rng)
        mean = torch.tensor(self.mean).view(3, 1)
        std = torch.tensor(self.std).view(3, 1)
        return PatchClip(((pixels - mean) / std).flatten(1), positions, path=path)


def _unnormalize(patches: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised patches `[K, 3*p*p]` -> pixels `[K, 3, p*p]` in 0..1."""
    x = patches.unflatten(-1, (3, -1))
    return x * torch.tensor(std).view(3, 1) + torch.tensor(mean).view(3, 1)


class TrainingClips(Dataset):
    """Clips read afresh every epoch (augmented runs): item i's randomness depends only on (seed, epoch, i),
    so the clips are the same whatever the number of workers and ranks. Failures come back as errors."""

    def __init__(self, paths: list[str], reader: ProbeClips, seed: int, epoch: int | None, jitter: bool):
        self.paths, self.reader, self.seed, self.epoch, self.jitter = paths, reader, seed, epoch, jitter

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        sample = Sample(i, self.paths[i], self.reader.mode)
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.epoch is not None else None
        try:
            sample.clip = self.reader.load(self.paths[i], rng, self.jitter)
        except Exception as e:  # noqa: BLE001 - one unreadable clip is recorded, the run goes on
            sample.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return sample
