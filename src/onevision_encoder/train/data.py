"""Training data of one head: samples in a resumable per-rank order, loaded into patch lists.

Sources (a head's `inputs`):

- files and lists, read like `ove encode` reads them (folders walked in sorted order, CSV with a `path`
  column, JSONL with a `path` key), or an `ove encode` output folder (its encoded inputs, in its order);
  the head's `labels` file holds one row per input, in that order (what `ove concepts assign` writes for
  the features of those inputs);
- WebDataset tar shards (`.tar` files, `shard-{000..099}.tar` brace ranges, or `pipe:COMMAND` to stream
  one from object storage): a sample is the members sharing a key (the name up to its first dot), the media
  member (an image or video extension) and a `KEY.labels` member with its label ids as text.

Order: each epoch a seeded permutation of the items (of the shards, for tar sources), rank r taking every
world-th one. A stream's position is (epoch, items consumed this epoch), saved in checkpoints; nothing
else in the order is random, so a resumed stream continues exactly.

Samples become patch lists, so every form shares a batch: images at the stage's size at (0, row, col);
videos split by `video_mix` into codec-selected patches (`frames` frames, `budget` patches), frame-sampled
clips (`clip_frames` frames, one drawn from each bin of the `frames` grid, at their slots) and collages (the
same kind of frames stacked vertically as one image at t = 0). A sample that cannot be read (corrupt,
missing) is skipped, counted, and replaced by the next one of the stream.
"""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..codec import select_patches
from ..encode.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, discover_inputs
from ..processing import (collate_patch_lists, grid_positions, image_processor, normalize, patchify, resize_frames,
                          temporal_slots)
from ..codec.video import VideoFile, sample_indices
from .concepts import read_labels
from .config import HeadConfig

FORMS = ("codec", "frames", "collage")


class DataError(ValueError):
    """A head's data cannot be used: labels that do not match the inputs, labels outside the bank, ..."""


@dataclass
class StreamPosition:
    epoch: int = 0
    consumed: int = 0  # items of this rank's share of the epoch taken so far (skipped ones included)


@dataclass
class HeadBatch:
    inputs: dict[str, torch.Tensor]  # collate_patch_lists output
    labels: torch.Tensor  # [B, L] int64
    skipped: int  # samples of this batch's making that could not be read


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    """`a-{000..012}.tar` -> a-000.tar ... a-012.tar (zero padding kept), as WebDataset writes shard lists."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    return [name for i in range(int(lo), int(hi) + 1)
            for name in _expand_braces(pattern[: match.start()] + str(i).zfill(width) + pattern[match.end():])]


def is_shard(name: str) -> bool:
    return name.startswith("pipe:") or name.endswith(".tar")


def _feature_folder_paths(folder: str) -> list[str] | None:
    """The inputs of an `ove encode` output folder, in its order (which its features and labels follow)."""
    if not (os.path.isfile(os.path.join(folder, "settings.json")) and os.path.isfile(os.path.join(folder, "index.jsonl"))):
        return None
    from ..encode import load_features

    return list(load_features(folder).paths)


def list_items(inputs: list[str]) -> list[str]:
    """Paths of a head's file inputs in their fixed order (see the module docstring)."""
    paths: list[str] = []
    for given in inputs:
        encoded = _feature_folder_paths(given) if os.path.isdir(given) else None
        paths.extend(encoded if encoded is not None else discover_inputs([given]))
    return paths


def check_sample_labels(labels: np.ndarray, num_classes: int, labels_per_step: int, where: str) -> None:
    """The labels of one tar sample: at least labels_per_step, all in the bank."""
    if len(labels) < labels_per_step:
        raise DataError(f"{where}: {len(labels)} labels, fewer than labels_per_step={labels_per_step}")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{where}: label {bad} is outside the bank's {num_classes} concepts [0, {num_classes})")


def _open_shard(name: str):
    """A readable byte stream of a shard: a local file, or the output of `pipe:COMMAND`."""
    if name.startswith("pipe:"):
        process = subprocess.Popen(name[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        return process.stdout
    return open(name, "rb")


def _shard_samples(name: str):
    """(key, {extension: bytes}) of consecutive members sharing a key, streaming (`r|*`: no seeking)."""
    with _open_shard(name) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            prefix = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            extension = base.split(".", 1)[1].lower() if "." in base else ""
            if prefix != key and parts:
                yield key, parts
                parts = {}
            key = prefix
            parts[extension] = tar.extractfile(member).read()
        if parts:
            yield key, parts


# ----------------------------------------------------------------------------------------------------
# Loading one sample
# ----------------------------------------------------------------------------------------------------


_processor = lru_cache(maxsize=None)(image_processor)  # one per size: making one per image would dominate


@dataclass(frozen=True)
class Loader:
    """How a head's samples become patch lists."""

    patch_size: int
    image_size: int
    frames: int
    budget: int
    clip_frames: int
    video_size: int

    def load(self, source, extension: str, form: str, rng: random.Random):
        """source: a path, or the media bytes of a tar sample."""
        if "." + extension in IMAGE_EXTENSIONS:
            return self.image(source)
        if "." + extension not in VIDEO_EXTENSIONS:
            raise ValueError(f"not an image or video extension: {extension!r}")
        if isinstance(source, bytes):  # the decoders want a file
            with tempfile.NamedTemporaryFile(suffix="." + extension) as f:
                f.write(source)
                f.flush()
                return self.video(f.name, form, rng)
        return self.video(source, form, rng)

    def image(self, source):
        from PIL import Image

        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            pixels = _processor(self.image_size)(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        side = self.image_size // self.patch_size
        return patchify(pixels, self.patch_size), grid_positions(torch.zeros(1, dtype=torch.long), side, side)

    def video(self, path: str, form: str, rng: random.Random):
        if form == "codec":
            clip = select_patches(path, num_frames=self.frames, budget=self.budget, size=self.video_size,
                                  patch_size=self.patch_size)
            return clip.pixel_values, clip.patch_positions
        frames, slots = self._binned_frames(path, rng)
        side = self.video_size // self.patch_size
        if form == "frames":
            return patchify(frames, self.patch_size).flatten(0, 1), grid_positions(slots, side, side)
        collage = frames.transpose(0, 1).reshape(3, -1, self.video_size)  # frames one below the other
        return patchify(collage, self.patch_size), grid_positions(torch.zeros(1, dtype=torch.long), len(frames) * side, side)

    def _binned_frames(self, path: str, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """`clip_frames` normalised frames [T, 3, S, S]: the `frames`-frame grid cut into T bins, one random
        frame of each bin (the published frame sampling of video pretraining), and their slots on that grid."""
        with VideoFile(path) as video:
            info = video.info(timestamps=True)  # numbering by timestamps lets the decoder skip unneeded B-frames
            grid = sample_indices(info.frame_count, self.frames)
            bins = np.array_split(np.arange(self.frames), self.clip_frames)
            slots = [int(rng.choice(list(b))) for b in bins]
            wanted = [int(grid[s]) for s in slots]
            decoded = {}
            for number, frame in video.frames(needed=set(wanted).__contains__, numbering=info.presentation_numbers):
                if number in wanted:
                    decoded[number] = frame.to_ndarray(format="rgb24")
                if number >= wanted[-1]:
                    break
        if not decoded:
            raise ValueError("no frame decoded")
        # a frame that never came (truncated file): the nearest earlier one that did
        known = sorted(decoded)
        pictures = [decoded[max([k for k in known if k <= n] or known[:1])] for n in wanted]
        resized, _ = resize_frames(np.stack(pictures), self.video_size)
        return normalize(resized, inplace=True), temporal_slots(self.frames)[slots]


def video_forms(batch_size: int, mix) -> list[str]:
    """The form of each position of a video batch: counts by largest remainder of batch_size * fraction."""
    weights = np.array([mix.codec, mix.frames, mix.collage], dtype=np.float64)
    shares = weights / weights.sum() * batch_size
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: batch_size - counts.sum()]:
        counts[i] += 1
    return [form for form, n in zip(FORMS, counts) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# The stream of one head on one rank
# ----------------------------------------------------------------------------------------------------


class HeadStream:
    """Batches of one head for one rank, in a fixed order that a `StreamPosition` resumes exactly."""

    def __init__(self, head: HeadConfig, loader: Loader, num_classes: int, seed: int, rank: int, world_size: int):
        self.head, self.loader = head, loader
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = StreamPosition()
        self.skipped_total = 0
        self.last_failures: list[str] = []  # what the last batch skipped, one line each
        self.shards = [name for given in head.inputs for name in _expand_braces(given)] \
            if all(is_shard(i) for i in head.inputs) else None
        if self.shards is None and any(is_shard(i) for i in head.inputs):
            raise DataError(f"head {head.name}: inputs mix tar shards with files or lists; use one kind")
        if self.shards is None:
            self.paths = list_items(head.inputs)
            if head.labels is None:
                raise DataError(f"head {head.name}: file inputs need a labels file (labels: LABELS.npy)")
            self.labels = read_labels(head.labels, num_classes=num_classes)
            if len(self.labels) != len(self.paths):
                raise DataError(f"head {head.name}: {head.labels} has {len(self.labels)} rows of labels but the "
                                f"inputs hold {len(self.paths)} samples; labels must follow the inputs' order")
            if self.labels.shape[1] < head.labels_per_step:
                raise DataError(f"{head.labels}: {self.labels.shape[1]} labels a sample, fewer than labels_per_step="
                                f"{head.labels_per_step}")
            if len(self.paths) < head.batch_size:
                raise DataError(f"head {head.name}: {len(self.paths)} samples, fewer than a batch ({head.batch_size})")
        elif head.labels is not None:
            raise DataError(f"head {head.name}: tar shards carry their labels (KEY.labels); remove 'labels'")
        if head.batch_size % world_size:
            raise DataError(f"head {head.name}: batch_size {head.batch_size} (the global batch) is not a multiple "
                            f"of the {world_size} ranks")
        self.num_classes = num_classes
        self._items = None
        self._pool = ThreadPoolExecutor(head.workers) if head.workers > 0 else None

    def state(self) -> dict:
        return {"epoch": self.position.epoch, "consumed": self.position.consumed, "skipped": self.skipped_total}

    def restore(self, state: dict) -> None:
        self.position = StreamPosition(state["epoch"], state["consumed"])
        self.skipped_total = state.get("skipped", 0)
        self._items = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    # The order ----------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int, count: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(count, generator=generator).tolist()

    def _epoch_items(self, epoch: int):
        """This rank's items of `epoch`: (item id, source, extension, labels or None)."""
        if self.shards is None:
            for i in self._epoch_order(epoch, len(self.paths))[self.rank :: self.world_size]:
                path = self.paths[i]
                yield (epoch, i), path, os.path.splitext(path)[1].lower().lstrip("."), self.labels[i]
            return
        order = [self.shards[i] for i in self._epoch_order(epoch, len(self.shards))]
        # enough shards: each rank reads its own; fewer shards than ranks: every rank reads all, keeps its share
        mine, share = (order[self.rank :: self.world_size], False) if len(order) >= self.world_size else (order, True)
        n = 0
        for shard in mine:
            for key, parts in _shard_samples(shard):
                n += 1
                if share and (n - 1) % self.world_size != self.rank:
                    continue
                yield (epoch, f"{shard}:{key}"), parts, None, None

    def _next_item(self):
        while True:
            if self._items is None:
                self._items = self._epoch_items(self.position.epoch)
                for _ in range(self.position.consumed):  # replay to the saved position, reading nothing
                    next(self._items, None)
            item = next(self._items, None)
            if item is not None:
                self.position.consumed += 1
                return item
            if self.position.consumed == 0:
                raise DataError(f"head {self.head.name}: rank {self.rank} has no samples (fewer shards or "
                                "samples than ranks?)")
            self.position = StreamPosition(self.position.epoch + 1, 0)
            self._items = None

    # Loading ------------------------------------------------------------------------------------

    def _load(self, item, form: str):
        """(patches, positions, labels) of an item, or the error that stopped it."""
        item_id, source, extension, labels = item
        rng = random.Random(f"{self.seed}:{item_id}")  # per sample: the same draw however the run was cut
        try:
            if extension is None:  # a tar sample
                source, extension, labels = self._tar_parts(source)
            patches, positions = self.loader.load(source, extension, form, rng)
            return patches, positions, torch.tensor(np.asarray(labels), dtype=torch.long)  # a copy: labels may be mmapped
        except DataError:
            raise  # bad labels are the data's fault, not one sample's: stop with the error
        except Exception as e:  # noqa: BLE001 - a sample that cannot be read is skipped, never the run's end
            return f"{item_id}: {type(e).__name__}: {e}"

    def _tar_parts(self, parts: dict):
        media = [e for e in parts if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS]
        if len(media) != 1 or "labels" not in parts:
            raise ValueError(f"a tar sample needs one image or video member and a .labels member, has {sorted(parts)}")
        labels = np.array([int(x) for x in re.split(r"[\s,]+", parts["labels"].decode().strip())], dtype=np.int64)
        check_sample_labels(labels, self.num_classes, self.head.labels_per_step, f"head {self.head.name}, a tar sample's .labels")
        return parts[media[0]], media[0].rsplit(".", 1)[-1], labels

    def next_batch(self, image_size: int) -> HeadBatch:
        """This rank's share of `batch_size` (the global batch) samples; unreadable ones are skipped and replaced by the following items."""
        loader = self.loader if image_size == self.loader.image_size else \
            Loader(**{**self.loader.__dict__, "image_size": image_size})
        self.loader = loader
        # the forms of the global batch, position i on rank i % world (where the order puts its sample), so that
        # any number of ranks makes the same batch; images ignore their form
        open_forms = video_forms(self.head.batch_size, self.head.video_mix)[self.rank :: self.world_size]
        done, skipped, failures = [], 0, []
        while open_forms:
            items = [self._next_item() for _ in open_forms]
            if self._pool is None:
                results = [self._load(item, form) for item, form in zip(items, open_forms)]
            else:
                results = list(self._pool.map(self._load, items, open_forms))
            still_open = []  # a failed codec sample is replaced by a codec one, and so on
            for form, result in zip(open_forms, results):
                if isinstance(result, str):
                    skipped += 1
                    failures.append(result)
                    still_open.append(form)
                else:
                    done.append(result)
            open_forms = still_open
        self.skipped_total += skipped
        self.last_failures = failures
        inputs = collate_patch_lists([(p, pos) for p, pos, _ in done])
        width = max(len(lab) for _, _, lab in done)
        # tar samples may carry different numbers of labels: shorter rows are padded by repeating them, as
        # published for OCR tags
        labels = torch.stack([lab.repeat(-(-width // len(lab)))[:width] for _, _, lab in done])
        return HeadBatch(inputs, labels, skipped)
