"""What `ove encode` reads: finding the inputs, and turning each one into a patch list in a loader worker.

Inputs are files, folders (walked for video and image files) or lists (CSV with a `path` column, or JSONL
with a `path` key). Every input becomes one `PatchClip`:

- videos: codec-style patch selection (`codec.select_patches`, the default) or uniform frame sampling
  (`codec.sample_frames`);
- images: the model's image preprocessing (short side 448, centre crop, CLIP normalisation; other encoders:
  their size and normalisation), then cut into
  patches at positions (0, row, col). A patch list at those positions gives the model exactly the tokens of
  the dense image, so images and videos share batches through `collate_patch_lists`.

Decoding happens in `torch.utils.data.DataLoader` workers. A worker never raises for a bad input: it hands
back the error as text, so one corrupt file is recorded and the run goes on.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from ..codec import sample_frames, select_patches
from ..codec.selection import check_whole_frames
from ..processing import (CLIP_MEAN, CLIP_STD, IMAGE_SIZE, VIDEO_SIZE, PatchClip, collate_patch_lists, grid_positions,
                          image_processor, native_image, patchify, renormalize_patches)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv"}
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
LIST_EXTENSIONS = frozenset({".csv", ".jsonl"})
VIDEO_MODES = ("codec", "frames")
MODES = VIDEO_MODES + ("image",)
DEFAULT_FRAMES = {"codec": 64, "frames": 16}
DEFAULT_BUDGET = 2048


class InputError(ValueError):
    """An input given on the command line (or to `Encoder.encode`) does not exist or holds nothing to encode."""


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_image(path: str) -> bool:
    return _extension(path) in IMAGE_EXTENSIONS


def _walk_media(folder: str) -> list[str]:
    """Video and image files below `folder`, in a fixed (sorted) order so every rank sees the same list."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if _extension(name) in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
                found.append(os.path.join(root, name))
    return found


def _read_list(list_path: str) -> list[str]:
    """Paths named by a CSV (a `path` column, else the first column) or JSONL (`{"path": ...}` per line) file.

    Relative paths are taken relative to the list's folder, so a list travels with its data.
    """
    base = os.path.dirname(os.path.abspath(list_path))
    names: list[str] = []
    with open(list_path, newline="", encoding="utf-8") as f:
        if _extension(list_path) == ".jsonl":
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    names.append(entry if isinstance(entry, str) else entry["path"])
                except (ValueError, KeyError, TypeError) as e:
                    raise InputError(f"{list_path}:{line_number}: expected a JSON object with a 'path' key") from e
        else:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
            column = 0
            if rows and "path" in rows[0]:  # a header row names the column
                column = rows[0].index("path")
                rows = rows[1:]
            names = [row[column] for row in rows]
    return [os.path.join(base, name.strip()) for name in names]


def discover_inputs(inputs) -> list[str]:
    """Absolute paths of everything to encode, in input order, each once.

    A missing input or a folder without video/image files is an `InputError`. Files named by a list are
    not checked here: a missing one is recorded as that input's failure, like a corrupt one.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for given in map(os.fspath, inputs):
        if os.path.isdir(given):
            found = _walk_media(given)
            if not found:
                raise InputError(f"{given}: no video or image files in this folder")
            paths.extend(found)
        elif os.path.isfile(given):
            paths.extend(_read_list(given) if _extension(given) in LIST_EXTENSIONS else [given])
        else:
            raise InputError(f"{given}: no such file or folder")
    if not paths:
        raise InputError("nothing to encode: the inputs name no files")
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


@dataclass(frozen=True)
class Preprocessing:
    """How inputs become patch lists. `mode` is how videos are read ("codec" or "frames"), or "image" to
    accept images only; images always get the image preprocessing: a centre crop of `image_size`, or with
    image_size "native" their own size rounded to whole patches (`native_image`, downscaled to fit its
    maximum pixel count)."""

    mode: str = "codec"
    frames: int | None = DEFAULT_FRAMES["codec"]
    budget: int | None = DEFAULT_BUDGET
    patch_size: int = 14
    video_size: int = VIDEO_SIZE
    image_size: int | str = IMAGE_SIZE  # "native": images at their own size (`resolution="native"`)
    mean: tuple[float, ...] = CLIP_MEAN  # the encoder's normalisation (readers give CLIP-normalised pixels)
    std: tuple[float, ...] = CLIP_STD
    whole_frames: tuple[int, ...] = (0,)  # codec mode: sampled frames kept whole (`select_patches`)

    @classmethod
    def with_defaults(cls, mode: str = "codec", frames: int | None = None, budget: int | None = None,
                      whole_frames=None, **sizes) -> "Preprocessing":
        """`frames` and `budget` left out get the published defaults of `mode` (64 frames and 2048 patches
        for codec, 16 frames for frames, none for image); `whole_frames`, frame 0 (codec mode only)."""
        if mode in DEFAULT_FRAMES and frames is None:
            frames = DEFAULT_FRAMES[mode]
        if mode == "codec" and budget is None:
            budget = DEFAULT_BUDGET
        if whole_frames is not None and mode != "codec":
            raise ValueError(f"whole_frames only applies to mode 'codec', not {mode!r}")
        return cls(mode, frames, budget, **sizes, whole_frames=(0,) if whole_frames is None else whole_frames)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "image":
            if self.frames is not None:
                raise ValueError("frames only apply to the video modes 'codec' and 'frames', not 'image'")
        elif self.frames is None or self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.mode == "codec":
            # Selection keeps the whole frames whole, so the budget holds at least their patches.
            object.__setattr__(self, "whole_frames", check_whole_frames(self.whole_frames, self.frames))
            per_frame = (self.video_size // self.patch_size) ** 2
            least, candidates = len(self.whole_frames) * per_frame, self.frames * per_frame
            whole = "one whole frame" if len(self.whole_frames) == 1 else f"{len(self.whole_frames)} whole frames"
            if self.budget is None or not least <= self.budget <= candidates:
                raise ValueError(f"budget must be between {least} ({whole}) and {candidates} "
                                 f"({self.frames} frames of {self.video_size} px in {self.patch_size} px "
                                 f"patches), got {self.budget}")
        elif self.budget is not None:
            raise ValueError(f"budget only applies to mode 'codec', not {self.mode!r}")
        if self.image_size != "native" and not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be a pixel count or 'native', got {self.image_size!r}")
        for name in ("video_size",) + (("image_size",) if self.image_size != "native" else ()):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of the patch size {self.patch_size}")

    def item_mode(self, path: str) -> str:
        return "image" if self.mode == "image" or is_image(path) else self.mode

    def describe(self, mode: str) -> dict:
        """What an item read in `mode` records about how it was read."""
        if mode == "image":
            return {"mode": "image", "frames": None, "budget": None, "size": self.image_size}
        return {"mode": mode, "frames": self.frames, "budget": self.budget, "size": self.video_size,
                **({"whole_frames": list(self.whole_frames)} if mode == "codec" else {})}

    def load(self, path: str) -> PatchClip:
        clip = self._load_clip(path)
        if (tuple(self.mean), tuple(self.std)) != (CLIP_MEAN, CLIP_STD):
            clip.pixel_values = renormalize_patches(clip.pixel_values, self.mean, self.std)
        return clip

    def _load_clip(self, path: str) -> PatchClip:
        mode = self.item_mode(path)
        if mode == "image":
            if _extension(path) in VIDEO_EXTENSIONS:
                raise ValueError("a video file (mode 'image' encodes images only)")
            return self._load_image(path)
        if mode == "codec":
            return select_patches(path, num_frames=self.frames, budget=self.budget, size=self.video_size,
                                  patch_size=self.patch_size, whole_frames=self.whole_frames)
        return sample_frames(path, num_frames=self.frames, size=self.video_size, patch_size=self.patch_size)

    def _load_image(self, path: str) -> PatchClip:
        from PIL import Image

        with Image.open(path) as image:
            if self.image_size == "native":
                pixels = native_image(image, self.patch_size, downscale=True)
            else:
                pixels = _image_processor(self.image_size)(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        rows, cols = pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size
        return PatchClip(patchify(pixels, self.patch_size), grid_positions(torch.zeros(1, dtype=torch.long), rows, cols),
                         path=path)


@lru_cache(maxsize=None)
def _image_processor(size: int):
    """One processor per size and process: building one per image would dominate small images."""
    return image_processor(size)


@dataclass
class Sample:
    """One input after its worker is done with it: a patch list, or the reason there is none."""

    index: int
    path: str
    mode: str
    clip: PatchClip | None = None
    error: str | None = None


class EncodeDataset(Dataset):
    """Item i = the input `paths[i]` read by `preprocessing`; failures come back as `Sample.error`."""

    def __init__(self, paths: list[str], preprocessing: Preprocessing):
        self.paths = paths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        path = self.paths[i]
        sample = Sample(i, path, self.preprocessing.item_mode(path))
        try:
            sample.clip = self.preprocessing.load(path)
        except Exception as e:  # noqa: BLE001 - any failure of one input is that input's, recorded and skipped
            sample.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return sample


@dataclass
class Batch:
    """A collated batch: the model inputs of the samples that loaded, plus the ones that failed."""

    loaded: list[Sample]
    failed: list[Sample]
    inputs: dict[str, torch.Tensor] | None

    def pin_memory(self) -> "Batch":
        if self.inputs is not None:
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        return self


def collate_samples(samples: list[Sample]) -> Batch:
    """Pads the loaded samples' patch lists into one batch (run in the worker, so the main process only
    moves tensors). Clip pixels are dropped from the samples once they are in the batch."""
    loaded = [s for s in samples if s.error is None]
    failed = [s for s in samples if s.error is not None]
    inputs = collate_patch_lists([s.clip for s in loaded]) if loaded else None
    for s in loaded:
        s.clip = None
    return Batch(loaded, failed, inputs)
