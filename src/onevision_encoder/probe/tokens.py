"""Where the head's inputs come from: the frozen encoder's tokens, read from the cache or computed live.

Both sources answer `batches(shares, epoch)`: for each list of clip indices, one `TokenBatch` of the clips
that loaded (padded, with a mask) and the ones that failed. The cache holds the tokens of the evaluation
sampling (segment centres, no jitter); the live source re-reads clips every epoch (augmented training).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ..encode.encoder import _exit_with, _worker_context
from ..encode.inputs import collate_samples
from .clips import ProbeClips, TrainingClips


@dataclass
class TokenBatch:
    """tokens `[B, M, D]` float32, times `[B, M]` (t of each token), mask `[B, M]` bool (True = real);
    rows: the clip indices of the B clips; failed: (clip index, error) of those that could not be read."""

    tokens: torch.Tensor
    times: torch.Tensor
    mask: torch.Tensor
    rows: list[int]
    failed: list[tuple[int, str]] = field(default_factory=list)


def pad_tokens(pairs: list[tuple[torch.Tensor, torch.Tensor]], dim: int) -> tuple[torch.Tensor, ...]:
    """[(tokens [K, D], t [K])] -> padded tokens `[B, M, D]` float32, times `[B, M]`, mask `[B, M]`."""
    m = max((len(t) for t, _ in pairs), default=1)
    tokens = torch.zeros(len(pairs), m, dim)
    times = torch.zeros(len(pairs), m, dtype=torch.long)
    mask = torch.zeros(len(pairs), m, dtype=torch.bool)
    for i, (x, t) in enumerate(pairs):
        tokens[i, : len(x)] = x.float()
        times[i, : len(x)] = t
        mask[i, : len(x)] = True
    return tokens, times, mask


class CachedTokens:
    """Tokens of `paths` from `ove encode` features (clips that failed to encode are `failures`)."""

    def __init__(self, features, paths: list[str], dim: int):
        where = {path: i for i, path in enumerate(features.paths)}
        self.features, self.dim = features, dim
        self.rows = [where.get(path) for path in paths]
        errors = {f["path"]: f["error"] for f in features.failures}
        self.failures = {i: errors.get(path, "not in the cache") for i, path in enumerate(paths) if self.rows[i] is None}

    def batches(self, shares: list[list[int]], epoch: int | None):
        for share in shares:
            rows = [i for i in share if self.rows[i] is not None]
            pairs = [(self.features.tokens(self.rows[i]), self.features.positions(self.rows[i])[:, 0]) for i in rows]
            yield TokenBatch(*pad_tokens(pairs, self.dim), rows, [(i, self.failures[i]) for i in share if i not in rows])


class LiveTokens:
    """Tokens computed by the backbone, reading clips in loader workers while it runs."""

    def __init__(self, backbone, reader: ProbeClips, paths: list[str], device, dtype, workers: int, seed: int,
                 augment: bool):
        self.backbone, self.reader, self.paths = backbone, reader, paths
        self.device, self.dtype, self.workers, self.seed, self.augment = device, dtype, workers, seed, augment

    def batches(self, shares: list[list[int]], epoch: int | None):
        """epoch None: evaluation sampling (segment centres); else training sampling of that epoch."""
        train = epoch is not None and self.augment
        dataset = TrainingClips(self.paths, self.reader, self.seed, epoch if train else None, jitter=train)
        loader = DataLoader(dataset, batch_sampler=shares, num_workers=self.workers,
                            collate_fn=collate_samples, prefetch_factor=2 if self.workers else None,
                            multiprocessing_context=_worker_context() if self.workers else None,
                            worker_init_fn=functools.partial(_exit_with, os.getpid()))
        for batch in loader:
            failed = [(s.index, s.error) for s in batch.failed]
            if batch.inputs is None:
                yield TokenBatch(*pad_tokens([], self.backbone.hidden_size), [], failed)
                continue
            yield TokenBatch(*self._encode(batch.inputs), [s.index for s in batch.loaded], failed)

    @torch.no_grad()  # not inference mode: the head trains on these tensors
    def _encode(self, inputs: dict[str, torch.Tensor]):
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.backbone(inputs["pixel_values"], inputs["patch_positions"], inputs["attention_mask"])
        mask = out.attention_mask.bool()
        return out.last_hidden_state.float(), out.token_positions[..., 0], mask
