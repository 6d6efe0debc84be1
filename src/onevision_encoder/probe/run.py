"""One probe run: lists -> frozen encoder tokens (cached or live) -> head trained by the published recipe ->
every validation clip evaluated exactly once, every epoch -> the run folder.

Under `torchrun` the ranks split the work: the cache's chunks (through the `Encoder`), each training batch
(the head trains with DDP, the loss normalised by the clips of the whole batch, so any number of ranks
takes the same steps) and the validation clips (rank r takes clips r, r+W, ...; all predictions are
gathered, each once). The reported number is the last epoch's.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import load_backbone
from ..codec import check_whole_frames
from ..encode.encoder import DTYPES, Encoder, Ranks, _rank_device
from .clips import ProbeClips
from .head import AttentiveProbe
from .lists import label_classes, read_list
from .report import METRICS, REPORT_FILE, metrics, prediction_lines, write_run
from .tokens import CachedTokens, LiveTokens

MODES = ("frames", "codec")
DEFAULT_FRAMES = {"frames": 8, "codec": 64}
CACHE_DIR = "cache"


class ProbeError(ValueError):
    """A probe run cannot start: bad settings, lists or output folder."""


@dataclass
class ProbeSettings:
    """Everything a run depends on (the published recipe by default; REFERENCE §5)."""

    model: str
    train: str
    val: str
    out: str
    root: str | None = None
    mode: str = "frames"
    frames: int | None = None  # default 8 for frames, 64 for codec
    budget: int = 2048
    whole_frames: tuple[int, ...] | None = None  # codec mode: sampled frames kept whole (default frame 0)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    min_lr: float = 1e-7
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    seed: int = 0
    cache: bool | None = None  # default: on unless augmenting
    cache_dir: str | None = None  # default OUT/cache
    augment: bool = False
    standardize: bool = False
    device: str | None = None
    dtype: str | None = None  # autocast dtype; default bfloat16 on GPU, float32 on CPU
    workers: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ProbeError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.frames = self.frames or DEFAULT_FRAMES[self.mode]
        if self.cache is None:
            self.cache = not self.augment
        if self.cache and self.augment:
            raise ProbeError("--cache holds un-augmented tokens (segment centres, no jitter): it cannot be used "
                             "with --augment")
        for name in ("epochs", "batch_size", "frames"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.whole_frames is not None:
            if self.mode != "codec":
                raise ProbeError(f"--whole-frames only applies to codec mode, not {self.mode!r}")
            self.whole_frames = check_whole_frames(self.whole_frames, self.frames)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ProbeError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def run_probe(settings: ProbeSettings, model=None) -> dict:
    """Run the probe; returns the report (also written to `settings.out`, by rank 0). model: a loaded model
    or `Backbone` to use instead of loading `settings.model`."""
    s = settings
    out = os.fspath(s.out)
    if os.path.exists(os.path.join(out, REPORT_FILE)) and not s.overwrite:
        raise ProbeError(f"{out} already holds a finished run ({REPORT_FILE}); pass --overwrite or another --out")
    classes, train, val = label_classes(read_list(s.train, s.root), read_list(s.val, s.root))
    device = _rank_device(s.device)
    dtype = DTYPES[s.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    ranks = Ranks(device)
    trainer = None
    try:
        backbone = load_backbone(model if model is not None else s.model).to(device).eval().requires_grad_(False)
        reader = _reader(backbone, s)
        start = time.perf_counter()
        train_tokens, val_tokens, cache = _sources(backbone, reader, s, train.paths, val.paths, device, dtype, out)
        encode_seconds = time.perf_counter() - start
        trainer = _Trainer(backbone, len(classes), s, ranks, device, dtype, train_tokens, train.labels)
        epochs, failures = [], {}
        for epoch in tqdm(range(s.epochs), desc="probe", unit="epoch", disable=not (s.progress and ranks.rank == 0)):
            start = time.perf_counter()
            loss, failed = trainer.train_epoch(epoch)
            seconds = time.perf_counter() - start
            predictions, val_failed = trainer.evaluate(val_tokens, val.paths, val.labels)
            val_seconds = time.perf_counter() - start - seconds
            failures.update({("train", train.paths[i]): e for i, e in failed})
            failures.update({("val", val.paths[i]): e for i, e in val_failed})
            epochs.append({"epoch": epoch + 1, "train_loss": loss, **metrics(predictions), "train_seconds": seconds,
                           "val_seconds": val_seconds})
        report = _report(s, backbone, classes, train, val, epochs, predictions, failures, cache, encode_seconds,
                         ranks.world_size)
        if ranks.rank == 0:
            write_run(out, report, predictions, trainer.head.state_dict())
        ranks.barrier()
        return report
    finally:
        if trainer is not None:
            trainer.unwrap()  # before the process group goes (`Ranks.close`)
        ranks.close()


def _reader(backbone, s: ProbeSettings) -> ProbeClips:
    b = backbone.settings
    if s.mode == "codec":
        if not backbone.takes_patch_lists:
            raise ProbeError(f"{backbone.name} encodes whole frames only: codec mode needs a model that takes patch "
                             "lists (the OneVision Encoder); use --mode frames")
        return ProbeClips("codec", s.frames, s.budget, b.patch_size, b.video_size, b.mean, b.std,
                          whole_frames=(0,) if s.whole_frames is None else tuple(s.whole_frames))
    return ProbeClips("tsn", s.frames, None, b.patch_size, b.video_size, b.mean, b.std,
                      ordinal_time=backbone.ordinal_time)


def _sources(backbone, reader, s: ProbeSettings, train_paths, val_paths, device, dtype, out):
    """(train tokens, val tokens, cache description or None)."""
    if not s.cache:
        live = LiveTokens(backbone, reader, train_paths, device, dtype, _workers(s), s.seed, s.augment)
        val_live = LiveTokens(backbone, reader, val_paths, device, dtype, _workers(s), s.seed, False)
        return live, val_live, None
    cache_dir = s.cache_dir or os.path.join(out, CACHE_DIR)
    # The cache keeps tokens in the compute dtype: bfloat16 on GPU (tokens x D x 2 bytes a clip).
    encoder = Encoder(backbone, preprocessing=reader, tokens=True, batch_size=s.batch_size, device=device,
                      dtype=next(k for k, v in DTYPES.items() if v == dtype), workers=s.workers, progress=s.progress)
    features = encoder.encode(list(dict.fromkeys(train_paths + val_paths)), out=cache_dir)
    counts = [r["num_tokens"] for r in features.records]
    width = 2 if dtype != torch.float32 else 4
    cache = {"dir": os.path.abspath(cache_dir), "clips": len(features), "failed": len(features.failures),
             "mean_tokens_per_clip": float(np.mean(counts)) if counts else 0.0,
             "token_bytes": int(sum(counts) * backbone.hidden_size * width)}
    dim = backbone.hidden_size
    return CachedTokens(features, train_paths, dim), CachedTokens(features, val_paths, dim), cache


def _workers(s: ProbeSettings) -> int:
    from ..encode.encoder import default_workers

    return default_workers() if s.workers is None else s.workers


class _Trainer:
    """The head, its optimiser and schedule, and one rank's part of training and evaluation."""

    def __init__(self, backbone, num_classes: int, s: ProbeSettings, ranks, device, dtype, tokens, labels):
        self.s, self.ranks, self.device, self.dtype = s, ranks, device, dtype
        self.tokens, self.labels = tokens, labels
        torch.manual_seed(s.seed)  # the head's initial weights depend on the seed only
        mean, std = self._token_statistics(backbone.hidden_size) if s.standardize else (None, None)
        self.head = AttentiveProbe(backbone.hidden_size, num_classes, temporal=backbone.ordinal_time,
                                   token_mean=mean, token_std=std).to(device)
        self.model = self.head
        if ranks.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.head, device_ids=[device] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
        self.steps_per_epoch = math.ceil(len(labels) / s.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, 1.0, s.min_lr / s.lr,
                                                           total_iters=max(1, s.epochs * self.steps_per_epoch))

    def unwrap(self) -> None:
        """Drop the DDP wrapper, and with it DDP's hold on the process group (`Ranks.close` says why)."""
        self.model = self.head

    def _shares(self, indices) -> list[list[int]]:
        """This rank's part of each global batch of `indices`."""
        b, r, w = self.s.batch_size, self.ranks.rank, self.ranks.world_size
        return [list(indices[j : j + b])[r::w] for j in range(0, len(indices), b)]

    def _all_sum(self, *values: float) -> list[float]:
        totals = torch.tensor(values, dtype=torch.float64)
        if self.ranks.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        return totals.tolist()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def train_epoch(self, epoch: int) -> tuple[float, list[tuple[int, str]]]:
        """One pass over the training clips in a seeded order; returns (mean loss, failed clips)."""
        order = np.random.default_rng([self.s.seed, epoch]).permutation(len(self.labels))
        self.head.train()
        loss_sum, count, failed = 0.0, 0, []
        for batch in self.tokens.batches(self._shares(order), epoch):
            failed += batch.failed
            (clips,) = self._all_sum(len(batch.rows))
            if clips == 0:  # every clip of this batch failed on every rank: no step
                continue
            tokens, times, mask = (t.to(self.device) for t in (batch.tokens, batch.times, batch.mask))
            if not batch.rows:  # this rank has nothing: a zero-weight pass keeps DDP's ranks in step
                tokens, times, mask = tokens.new_zeros(1, 1, tokens.shape[-1]), times.new_zeros(1, 1), mask.new_ones(1, 1)
            with self._autocast():
                logits = self.model(tokens, times, mask)
            labels = torch.tensor([self.labels[i] for i in batch.rows], device=self.device)
            losses = F.cross_entropy(logits.float()[: len(batch.rows)], labels, reduction="sum",
                                     label_smoothing=self.s.label_smoothing) if batch.rows else logits.sum() * 0
            # DDP averages gradients over ranks: scaling by W / (clips of the whole batch) makes that average the
            # gradient of the batch's mean loss, whatever the number of ranks and however clips are shared.
            self.optimizer.zero_grad(set_to_none=True)
            (losses * self.ranks.world_size / clips).backward()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += float(losses.detach())
            count += len(batch.rows)
        total, n = self._all_sum(loss_sum, count)
        return total / max(n, 1), self._gather(failed)

    @torch.no_grad()
    def evaluate(self, tokens, paths: list[str], labels: list[int]) -> tuple[list[dict], list[tuple[int, str]]]:
        """Predictions for every validation clip, each once: rank r takes clips r, r+W, ...; all gathered."""
        self.head.eval()
        mine = list(range(self.ranks.rank, len(paths), self.ranks.world_size))
        lines, failed = [], []
        b = self.s.batch_size
        for batch in tokens.batches([mine[j : j + b] for j in range(0, len(mine), b)], None):
            failed += batch.failed
            if batch.rows:
                with self._autocast():
                    logits = self.head(batch.tokens.to(self.device), batch.times.to(self.device), batch.mask.to(self.device))
                lines += zip(batch.rows, prediction_lines(paths, labels, batch.rows, logits.cpu()))
        return [line for _, line in sorted(self._gather(lines))], sorted(self._gather(failed))

    def _gather(self, items: list) -> list:
        if self.ranks.world_size == 1:
            return items
        import torch.distributed as dist

        everyone = [None] * self.ranks.world_size
        dist.all_gather_object(everyone, items)
        return [item for part in everyone for item in part]

    def _token_statistics(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std of the training clips' tokens (evaluation sampling), over all ranks."""
        total, squares, n = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
        mine = list(range(self.ranks.rank, len(self.labels), self.ranks.world_size))
        b = self.s.batch_size
        for batch in self.tokens.batches([mine[j : j + b] for j in range(0, len(mine), b)], None):
            real = batch.tokens[batch.mask].double()
            total += real.sum(0)
            squares += (real**2).sum(0)
            n += len(real)
        sums = self._all_sum(*total.tolist(), *squares.tolist(), n)
        count = max(sums[-1], 1)
        mean = torch.tensor(sums[:dim]) / count
        std = (torch.tensor(sums[dim : 2 * dim]) / count - mean**2).clamp_min(1e-12).sqrt()
        return mean.float(), std.float().clamp_min(1e-6)


def _report(s, backbone, classes, train, val, epochs, predictions, failures, cache, encode_seconds, world_size):
    from .. import __version__

    best = max(epochs, key=lambda e: e["top1"])
    settings = {k: v for k, v in asdict(s).items() if k not in ("progress", "overwrite")}
    settings["model"] = backbone.name
    return {
        "format": "onevision-encoder-probe/1",
        "model": backbone.name,
        "version": __version__,
        "settings": settings,
        "num_classes": len(classes),
        "classes": classes,
        "train_clips": len(train.paths),
        "val_clips": len(val.paths),
        "evaluated": len(predictions),
        "final": {name: epochs[-1][name] for name in METRICS},
        "best_epoch_selected_on_validation": {"epoch": best["epoch"], **{name: best[name] for name in METRICS}},
        "epochs": epochs,
        "failures": [{"split": split, "path": path, "error": error} for (split, path), error in sorted(failures.items())],
        "num_failed": len(failures),
        "cache": cache,
        "encode_seconds": encode_seconds,
        "world_size": world_size,
    }


__all__ = ["ProbeError", "ProbeSettings", "run_probe"]
