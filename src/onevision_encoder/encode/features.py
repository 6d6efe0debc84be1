"""Encoded features on disk and in memory: the shard format, the index, and reading them back.

An output folder holds:

    settings.json        how the features were made (model, version, modes, frames, budget, dtype, ...)
    shards/shard-00000.safetensors
                         chunk 0 of the inputs (`shard_size` inputs in input order): `pooled [n, D]`
                         float32 for the n inputs of the chunk that encoded, and with tokens
                         `tokens [sum K, D]`, `positions [sum K, 3]`, `offsets [n + 1]` (item r's tokens are
                         rows offsets[r]:offsets[r+1]); its metadata lists every input of the chunk with
                         its row, or with its error if it failed
    index.jsonl          one line per encoded input, in input order: path, shard, row, mode, frames, budget,
                         size, num_tokens, model, version
    failures.jsonl       one line per input that failed: path, error

A shard is written once its whole chunk is done, to a temporary name and then renamed, so a shard that
exists is complete. Chunks depend only on the input list, so the index is the same whichever ranks
encoded which chunks and however often the run was interrupted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save

SHARD_FORMAT = "onevision-encoder-features/1"
SETTINGS_FILE = "settings.json"
INDEX_FILE = "index.jsonl"
FAILURES_FILE = "failures.jsonl"
SHARDS_DIR = "shards"
TEMPORARY_MARK = ".tmp-"


@dataclass
class ItemFeatures:
    """The outcome for one input: features (pooled, optional tokens and positions) or an error."""

    path: str
    info: dict = field(default_factory=dict)  # how it was read: mode, frames, budget, size
    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    num_tokens: int = 0
    error: str | None = None


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a killed writer) never sees a partial file."""
    temporary = f"{path}{TEMPORARY_MARK}{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def shard_name(chunk: int) -> str:
    return os.path.join(SHARDS_DIR, f"shard-{chunk:05d}.safetensors")


def write_shard(out_dir: str, chunk: int, items: list[ItemFeatures], with_tokens: bool, rank: int = 0) -> None:
    """Write the shard of one chunk: the tensors of the items that encoded, every item's outcome, and
    which rank wrote it (for the record; the index does not depend on it)."""
    encoded = [item for item in items if item.error is None]
    entries, row = [], 0
    for item in items:
        if item.error is None:
            entries.append({"path": item.path, "row": row, **item.info, "num_tokens": item.num_tokens})
            row += 1
        else:
            entries.append({"path": item.path, "error": item.error})
    tensors = {}
    if encoded:
        tensors["pooled"] = torch.stack([item.pooled.float() for item in encoded])
        if with_tokens:
            tensors["tokens"] = torch.cat([item.tokens for item in encoded])
            tensors["positions"] = torch.cat([item.positions for item in encoded]).long()
            lengths = torch.tensor([0] + [len(item.tokens) for item in encoded])
            tensors["offsets"] = lengths.cumsum(0)
    metadata = {"format": SHARD_FORMAT, "items": json.dumps(entries), "rank": str(rank)}
    atomic_write(os.path.join(out_dir, shard_name(chunk)), save(tensors, metadata=metadata))


def read_shard_entries(out_dir: str, chunk: int) -> list[dict] | None:
    """The per-item entries of a chunk's shard, or None if the shard is missing or unreadable."""
    path = os.path.join(out_dir, shard_name(chunk))
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != SHARD_FORMAT:
            return None
        return json.loads(metadata["items"])
    except Exception:  # noqa: BLE001 - safetensors has its own error type; any unreadable shard is redone
        return None


def remove_temporary_files(out_dir: str) -> None:
    """Remove what writers killed mid-write left behind (only ever called while nothing is being written)."""
    for folder in (out_dir, os.path.join(out_dir, SHARDS_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if TEMPORARY_MARK in name:
                    os.remove(os.path.join(folder, name))


class Features:
    """Features of a set of inputs, in input order.

    `paths`: the inputs that encoded; `pooled`: `[N, D]` float32 pooled features, row i for `paths[i]`;
    `records`: one dict per input (how it was read, shard and row when on disk); `failures`: one dict
    (`path`, `error`) per input that failed. With tokens: `tokens(i)` `[K_i, D]` and `positions(i)`
    `[K_i, 3]` (t, row, col) of input i.
    """

    def __init__(self, records: list[dict], pooled, failures: list[dict], token_source=None):
        """pooled: the `[N, D]` tensor, or a function that reads it (called on first use of `.pooled`)."""
        self.records = records
        self.paths = [r["path"] for r in records]
        self._pooled = pooled
        self.failures = failures
        self._token_source = token_source

    @property
    def pooled(self) -> torch.Tensor:
        if callable(self._pooled):
            self._pooled = self._pooled()
        return self._pooled

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"Features({len(self)} inputs, tokens {'yes' if self.has_tokens else 'no'}, "
                f"{len(self.failures)} failed)")

    @property
    def has_tokens(self) -> bool:
        return self._token_source is not None

    def tokens(self, i: int) -> torch.Tensor:
        return self._tokens_and_positions(i)[0]

    def positions(self, i: int) -> torch.Tensor:
        return self._tokens_and_positions(i)[1]

    def _tokens_and_positions(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._token_source is None:
            raise ValueError("these features were encoded without tokens (pass --tokens / tokens=True)")
        return self._token_source(i)


class InMemoryTokens:
    def __init__(self, items: list[ItemFeatures]):
        self.items = items

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i].tokens, self.items[i].positions


class ShardTokens:
    """Reads one input's tokens from its shard on demand (memory-mapped: only those rows are read)."""

    def __init__(self, out_dir: str, records: list[dict]):
        self.out_dir = out_dir
        self.records = records
        self._open: dict[str, object] = {}

    def _shard(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(os.path.join(self.out_dir, name), framework="pt")
        return self._open[name]

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[i]
        shard = self._shard(record["shard"])
        offsets = shard.get_slice("offsets")[record["row"] : record["row"] + 2]
        start, stop = int(offsets[0]), int(offsets[1])
        return shard.get_slice("tokens")[start:stop], shard.get_slice("positions")[start:stop]


def load_features(out_dir: str | os.PathLike) -> Features:
    """Read back what `ove encode --out DIR` (or `Encoder.encode(..., out=DIR)`) wrote."""
    out_dir = os.fspath(out_dir)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{index_path} does not exist: not an encode output folder, or the run has not "
                                "finished (run the same command again to resume it)")
    records = read_jsonl(index_path)
    failures_path = os.path.join(out_dir, FAILURES_FILE)
    failures = read_jsonl(failures_path) if os.path.exists(failures_path) else []
    settings = read_settings(out_dir) or {}
    token_source = ShardTokens(out_dir, records) if settings.get("tokens") else None
    return Features(records, lambda: _read_pooled(out_dir, records, settings.get("hidden_size", 0)), failures,
                    token_source)


def _read_pooled(out_dir: str, records: list[dict], hidden_size: int) -> torch.Tensor:
    """`[N, D]` pooled features of the index records, in their order."""
    if not records:
        return torch.empty(0, hidden_size)
    pooled_by_shard: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(r["shard"] for r in records):
        with safe_open(os.path.join(out_dir, name), framework="pt") as f:
            pooled_by_shard[name] = f.get_tensor("pooled")
    return torch.stack([pooled_by_shard[r["shard"]][r["row"]] for r in records])


def read_settings(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
