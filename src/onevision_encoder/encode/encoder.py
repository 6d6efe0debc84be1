"""Encoding whole datasets: the `Encoder` behind `ove encode`, in memory or into a resumable output folder.

Work is cut into chunks of `shard_size` inputs (in input order); a chunk is the unit of resuming and of
sharing out between ranks, and becomes one shard (see `features.py` for the folder layout). Under
`torchrun` every rank takes its share of the chunks still to do; rank 0 writes the index at the end.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backbones import load_backbone
from .inputs import EncodeDataset, Preprocessing, collate_samples, discover_inputs
from .features import (
    FAILURES_FILE,
    INDEX_FILE,
    SETTINGS_FILE,
    SHARDS_DIR,
    Features,
    InMemoryTokens,
    ItemFeatures,
    atomic_write,
    load_features,
    read_settings,
    read_shard_entries,
    remove_temporary_files,
    shard_name,
    write_jsonl,
    write_shard,
)

DEFAULT_MODEL = "lmms-lab-encoder/onevision-encoder-large"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESOLUTIONS = ("crop", "native")  # images: 448 centre crop (published) or their own size in whole patches
OTHER_ENCODER_FRAMES = 8
DEFAULT_SHARD_SIZE = 1024
DEFAULT_SHARD_SIZE_WITH_TOKENS = 64  # 64 codec clips of ViT-L tokens in bf16 are ~270 MB
# Ranks wait for each other at the start and the end; the longest wait is about one chunk of work.
BARRIER_TIMEOUT = timedelta(minutes=60)


class SettingsMismatch(ValueError):
    """The output folder holds features made with other settings; resuming into it would mix them."""


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that changes the features; an output folder is only ever resumed with the same ones."""

    model: str
    version: str
    hidden_size: int
    mode: str
    frames: int | None
    budget: int | None
    patch_size: int
    video_size: int
    image_size: int | str
    dtype: str
    tokens: bool
    shard_size: int
    video_pooling: str | None = None  # other encoders' video embedding; None for ours
    whole_frames: list[int] | None = None  # codec mode's frames kept whole

    def differences(self, recorded: dict) -> list[str]:
        return [f"{key}: {value!r} now, {recorded.get(key)!r} in the folder"
                for key, value in asdict(self).items() if recorded.get(key) != value]


class Ranks:
    """This process's place among the `torchrun` processes (one process = world size 1).

    Joins the process group when WORLD_SIZE > 1 and none exists yet (gloo on CPU, nccl on GPU), and leaves
    it again in `close()` only if it joined it.
    """

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._joined = False
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # NCCL's barrier runs on the current device
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
                self._joined = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group, if this object joined it. Free DDP wrappers before: DDP's reducer holds
        the group, and when the reducer lets go last, the group is destroyed with the GIL held, waiting for
        gloo's threads, one of which may be waiting for the GIL to free a finished collective: a deadlock at
        exit (seen once in a two-rank probe run; `gdb` showed exactly that). With DDP gone first, the last
        hold is the one let go here, through torch's own release, which drops the GIL before destroying."""
        if self._joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _rank_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, defaulting to a GPU if there is one; a GPU without an index means this
    rank's own (LOCAL_RANK under torchrun), so that `--device cuda` works the same with one process or many."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def default_workers() -> int:
    """Loader workers per process: the cores of this machine shared among its ranks, one left for the
    main process (which feeds the model), at most 16."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, (os.cpu_count() or 2) // local_ranks - 1))


class Encoder:
    """Turns videos and images into features of the OneVision Encoder or of another image encoder.

    model: a hub id or a local folder (published layout, or any transformers vision model: see
    `backbones.load_backbone`), a loaded model or a `Backbone`. mode: how videos are read, "codec"
    (codec-style patch selection, the default for our model) or "frames" (uniform frames; the default, and
    the only video mode, for other encoders), or "image" to accept images only; images always get the
    model's image preprocessing. frames / budget: per-video frames and kept patches (default 64 / 2048 for
    codec, 16 frames for frames, 8 for other encoders). video_pooling: other encoders' embedding of a video,
    "mean" of its frames' or their "concat"enation. preprocessing: a reader of its own in place of the one
    mode, frames and budget describe (the probe's clip sampling). whole_frames: the sampled frames codec
    mode keeps whole (default [0]). tokens: keep every token's features and position, not only the pooled ones.
    dtype: "float32", "bfloat16" or "float16" (autocast; default bfloat16 on GPU, float32 on CPU).
    workers: DataLoader worker processes that decode and select patches (0 = in this process).
    resolution: images as the published 448 px centre crop ("crop") or at their own size, sides rounded to
    whole patches, downscaled to fit 1120*1120 pixels in all ("native": documents and charts keep their edges).

    `encode(inputs)` returns the features in memory; `encode(inputs, out=DIR)` writes them to DIR,
    resumably, and splits the work between ranks when run under `torchrun`.
    """

    def __init__(
        self,
        model=DEFAULT_MODEL,
        *,
        mode: str | None = None,
        frames: int | None = None,
        budget: int | None = None,
        whole_frames: Sequence[int] | None = None,
        tokens: bool = False,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        workers: int | None = None,
        shard_size: int | None = None,
        resolution: str = "crop",
        progress: bool = True,
        video_pooling: str = "mean",
        preprocessing=None,
    ):
        self.device = _rank_device(device)
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shard_size = shard_size or (DEFAULT_SHARD_SIZE_WITH_TOKENS if tokens else DEFAULT_SHARD_SIZE)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        self.model = load_backbone(model, video_pooling).to(self.device).eval()
        self.model_name = self.model.name
        self.preprocessing = preprocessing or _preprocessing_for(self.model, mode, frames, budget, whole_frames,
                                                                 resolution)
        self.dtype = DTYPES[dtype]
        self.tokens = tokens
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self.progress = progress
        from .. import __version__

        p = self.preprocessing
        pooling = None if self.model.takes_patch_lists else self.model.video_pooling
        self.settings = EncodeSettings(self.model_name, __version__, self.model.pooled_size, p.mode, p.frames,
                                       p.budget, p.patch_size, p.video_size, p.image_size, dtype, tokens, shard_size,
                                       video_pooling=pooling,
                                       whole_frames=list(p.whole_frames) if p.mode == "codec" else None)

    def encode(self, inputs, out: str | os.PathLike | None = None) -> Features:
        """Encode `inputs` (files, folders, CSV/JSONL lists). Inputs that fail are listed in
        `.failures` (and DIR/failures.jsonl), never raised."""
        paths = discover_inputs(inputs)
        if out is None:
            return self._encode_in_memory(paths)
        return self._encode_to_folder(paths, os.fspath(out))

    def _encode_in_memory(self, paths: list[str]) -> Features:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("under torchrun, give an output folder (out=DIR): each rank writes its own shards")
        items = list(self._encode_items(paths, show_progress=self.progress))
        encoded = [item for item in items if item.error is None]
        records = [{"path": item.path, **item.info, "num_tokens": item.num_tokens} for item in encoded]
        pooled = torch.stack([item.pooled for item in encoded]) if encoded else torch.empty(0, self.settings.hidden_size)
        failures = [{"path": item.path, "error": item.error} for item in items if item.error is not None]
        return Features(records, pooled, failures, InMemoryTokens(encoded) if self.tokens else None)

    def _encode_to_folder(self, paths: list[str], out: str) -> Features:
        ranks = Ranks(self.device)
        try:
            self._check_folder(out)
            ranks.barrier()  # every rank has checked the settings before anything is removed or written
            size = self.settings.shard_size
            chunks = [paths[start : start + size] for start in range(0, len(paths), size)]
            if ranks.rank == 0:
                remove_temporary_files(out)
                for name in (INDEX_FILE, FAILURES_FILE):  # describe an earlier run until this one ends
                    if os.path.exists(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
            to_do = [j for j, chunk in enumerate(chunks) if _chunk_entries(out, j, chunk) is None]
            ranks.barrier()  # every rank has seen the same chunks to do before any shard is written
            mine = to_do[ranks.rank :: ranks.world_size]
            self._encode_chunks(out, mine, chunks, ranks.rank)
            ranks.barrier()
            if ranks.rank == 0:
                self._write_index(out, chunks)
            ranks.barrier()
            return load_features(out)
        finally:
            ranks.close()

    def _check_folder(self, out: str) -> None:
        """Create `out`, or check that it was made with these settings (every rank checks on its own)."""
        os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)
        recorded = read_settings(out)
        if recorded is None:
            # Every rank may write it: they all write the same text, each replace is atomic.
            atomic_write(os.path.join(out, SETTINGS_FILE), _settings_json(self.settings))
            return
        differences = self.settings.differences(recorded)
        if differences:
            raise SettingsMismatch(f"{out} holds features made with other settings ({'; '.join(differences)}); "
                                   "use another output folder, or the settings it was made with")

    def _encode_chunks(self, out: str, chunk_ids: list[int], chunks: list[list[str]], rank: int) -> None:
        """Encode these chunks' inputs as one stream, writing each chunk's shard as soon as it is complete."""
        paths = [path for j in chunk_ids for path in chunks[j]]
        if not paths:
            return
        owners = [j for j in chunk_ids for _ in chunks[j]]
        pending: dict[int, list[ItemFeatures]] = {j: [] for j in chunk_ids}
        # Shards are written by a thread so the model need not wait for the disk (token shards are large);
        # one write at a time bounds the memory held by finished chunks.
        with ThreadPoolExecutor(max_workers=1) as writer:
            writing = None
            for position, item in enumerate(self._encode_items(paths, show_progress=self.progress and rank == 0)):
                j = owners[position]
                pending[j].append(item)
                if len(pending[j]) == len(chunks[j]):
                    if writing is not None:
                        writing.result()
                    writing = writer.submit(write_shard, out, j, pending.pop(j), self.tokens, rank)
            if writing is not None:
                writing.result()

    def _write_index(self, out: str, chunks: list[list[str]]) -> None:
        records, failures = [], []
        run = {"model": self.settings.model, "version": self.settings.version}
        for j, chunk in enumerate(chunks):
            entries = _chunk_entries(out, j, chunk)
            if entries is None:
                raise RuntimeError(f"{shard_name(j)} is missing or holds other inputs after the run")
            for entry in entries:
                if "error" in entry:
                    failures.append(entry)
                else:
                    records.append({"path": entry["path"], "shard": shard_name(j),
                                    **{k: v for k, v in entry.items() if k != "path"}, **run})
        write_jsonl(os.path.join(out, INDEX_FILE), records)
        write_jsonl(os.path.join(out, FAILURES_FILE), failures)

    def _encode_items(self, paths: list[str], show_progress: bool):
        """Yield one `ItemFeatures` per path, in order, decoding in loader workers while the model runs."""
        dataset = EncodeDataset(paths, self.preprocessing)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=collate_samples, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers else None,
                            multiprocessing_context=_worker_context() if self.workers else None,
                            worker_init_fn=functools.partial(_exit_with, os.getpid()))
        failed = 0
        with tqdm(total=len(dataset), unit="item", desc="encode", disable=not show_progress, smoothing=0.1) as bar:
            for batch in loader:
                outcomes = {s.index: ItemFeatures(s.path, self.preprocessing.describe(s.mode), error=s.error)
                            for s in batch.failed}
                if batch.inputs is not None:
                    for sample, item in zip(batch.loaded, self.forward_batch(batch.inputs)):
                        item.path, item.info = sample.path, self.preprocessing.describe(sample.mode)
                        outcomes[sample.index] = item
                yield from (outcomes[i] for i in sorted(outcomes))
                failed += len(batch.failed)
                bar.update(len(outcomes))
                if failed:
                    bar.set_postfix(failed=failed)

    @torch.inference_mode()
    def forward_batch(self, inputs: dict[str, torch.Tensor]) -> list[ItemFeatures]:
        """Run the model on one collated batch (`collate_patch_lists` output): one `ItemFeatures` per clip,
        with its pooled features, token count and, if this encoder keeps tokens, tokens and positions."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            output = self.model(inputs["pixel_values"], inputs["patch_positions"], inputs["attention_mask"])
        pooled = output.pooler_output.float().cpu()
        lengths = output.attention_mask.sum(1).tolist()
        if not self.tokens:
            return [ItemFeatures("", pooled=pooled[i], num_tokens=k) for i, k in enumerate(lengths)]
        hidden = output.last_hidden_state.to(self.dtype).cpu()
        positions = output.token_positions.cpu()
        return [ItemFeatures("", pooled=pooled[i], num_tokens=k, tokens=hidden[i, :k].clone(),
                             positions=positions[i, :k].clone()) for i, k in enumerate(lengths)]


def _preprocessing_for(backbone, mode: str | None, frames: int | None, budget: int | None,
                       whole_frames=None, resolution: str = "crop") -> Preprocessing:
    """The reader for this backbone: our model defaults to codec selection; other encoders take whole frames
    (8 by default, as their published comparisons), at their own size and normalisation."""
    s = backbone.settings
    sizes = dict(patch_size=s.patch_size, video_size=s.video_size, image_size=s.image_size, mean=s.mean, std=s.std)
    if resolution == "native":  # any size in whole patches: a patch list, which only our model takes
        if not backbone.takes_patch_lists:
            raise ValueError(f"{backbone.name} takes images at its own fixed size: resolution 'native' is for "
                             "the OneVision Encoder")
        sizes["image_size"] = "native"
    if backbone.takes_patch_lists:
        return Preprocessing.with_defaults(mode or "codec", frames, budget, whole_frames, **sizes)
    if mode == "codec":
        raise ValueError(f"{backbone.name} encodes whole frames only: use mode 'frames' or 'image', not 'codec'")
    mode = mode or "frames"
    return Preprocessing.with_defaults(mode, frames or (OTHER_ENCODER_FRAMES if mode == "frames" else None),
                                       budget, whole_frames, **sizes)


def _worker_context():
    """Loader workers start from a fork server, not from a fork of this process: a process that has run
    the model (OpenMP) or decoded video (FFmpeg threads) can hold locks that a plain fork copies locked,
    and its workers then hang. The server imports the decoding code once, so each worker starts fast."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["onevision_encoder.encode.inputs"])
    return context


def _exit_with(main_pid: int, worker_id: int) -> None:
    """Make a loader worker end when the main process is gone. Workers started by the fork server are its
    children, not ours, so DataLoader's own parent check never fires when the main process is killed."""

    def watch():
        while True:
            time.sleep(1)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name=f"exit-with-{main_pid}", daemon=True).start()


def _chunk_entries(out: str, chunk_id: int, chunk: list[str]) -> list[dict] | None:
    """The entries of the chunk's shard, if it exists and was made for exactly these inputs."""
    entries = read_shard_entries(out, chunk_id)
    return entries if entries is not None and [e["path"] for e in entries] == chunk else None


def _settings_json(settings: EncodeSettings) -> bytes:
    return (json.dumps(asdict(settings), indent=2) + "\n").encode()
