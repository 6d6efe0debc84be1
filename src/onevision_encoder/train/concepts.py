"""Concept banks: features in, unit centres and per-sample concept labels out, as files other tools can read.

FEATURES: an `ove encode` output folder (its pooled features, in index order), a `.npy` `[N, D]` float matrix,
or a `.safetensors` file with one `[N, D]` float matrix (or several tensors, one of them `features` or
`pooled`). Several are read as one matrix, one after the other. They are read in chunks (`.npy` memory-mapped,
safetensors sliced), so memory does not grow with N.

A bank: safetensors, `centres [K, D]` float32 unit rows; its settings (how many concepts, iterations, seed,
backend, sources...) in the metadata. Labels: `[N, k]` int64, row i the k concepts nearest to feature row i
by cosine, nearest first; `.npy` (written row chunk by row chunk) or safetensors (key `labels`), chosen by
the extension.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch
from tqdm.auto import tqdm

from ..encode.features import TEMPORARY_MARK, atomic_write, load_features
from .kmeans import KMeansResult, nearest_centres, spherical_kmeans, training_sample

BANK_FORMAT = "onevision-encoder-concept-bank/1"
LABEL_FORMATS = (".npy", ".safetensors")
ROWS_PER_CHUNK = 16384
MATRIX_KEYS = ("features", "pooled")


class FeatureFileError(ValueError):
    """A features, bank or labels file that cannot be used (its message names the file and the problem)."""


@dataclass
class _Part:
    """One FEATURES path: its row count and a reader of row ranges."""

    path: str
    num_rows: int
    dim: int
    read: object  # (start, stop) -> float32 Tensor [stop - start, D]


class FeatureMatrix:
    """Several FEATURES paths seen as one `[N, D]` matrix, read by row ranges."""

    def __init__(self, parts: list[_Part]):
        dims = {part.dim for part in parts}
        if len(dims) > 1:
            raise FeatureFileError("features of different widths: "
                                   + ", ".join(f"{p.path} has {p.dim}" for p in parts))
        self.parts = parts
        self.dim = parts[0].dim
        self.offsets = np.cumsum([0] + [part.num_rows for part in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def paths(self) -> list[str]:
        return [part.path for part in self.parts]

    def chunks(self, rows_per_chunk: int = ROWS_PER_CHUNK):
        """(first row, float32 rows) in order, each chunk within one part, checked for NaN and infinity."""
        for part, offset in zip(self.parts, self.offsets):
            for start in range(0, part.num_rows, rows_per_chunk):
                rows = part.read(start, min(start + rows_per_chunk, part.num_rows))
                if not torch.isfinite(rows).all():
                    bad = int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0]) + start
                    raise FeatureFileError(f"{part.path}: row {bad} is not finite (NaN or infinity)")
                yield int(offset) + start, rows

    def take(self, indices: np.ndarray, progress: bool = False) -> torch.Tensor:
        """Rows at sorted `indices`, read chunk by chunk (only the chunks' rows are in memory at a time)."""
        taken = []
        bar = tqdm(total=len(self), desc="reading the k-means sample", unit="row", disable=not progress)
        for first, rows in self.chunks():
            lo, hi = np.searchsorted(indices, [first, first + len(rows)])
            taken.append(rows[torch.from_numpy(indices[lo:hi] - first)])
            bar.update(len(rows))
        bar.close()
        return torch.cat(taken)


def read_features(paths: list[str] | str) -> FeatureMatrix:
    """FEATURES paths (encode folders, .npy, .safetensors) as one matrix, checked but not loaded."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise FeatureFileError("no FEATURES given")
    return FeatureMatrix([_open_part(os.fspath(path)) for path in paths])


def _open_part(path: str) -> _Part:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        return _encode_folder(path)
    if path.endswith(".npy"):
        return _npy_matrix(path)
    if path.endswith(".safetensors"):
        return _safetensors_matrix(path)
    raise FeatureFileError(f"{path}: FEATURES must be an `ove encode` folder, a .npy or a .safetensors file")


def _check_matrix(path: str, shape, dtype_name: str) -> None:
    if len(shape) != 2:
        raise FeatureFileError(f"{path}: features must be an [N, D] matrix, got shape {list(shape)}")
    if not any(kind in dtype_name.lower() for kind in ("float", "f16", "f32", "f64", "bf16")):
        raise FeatureFileError(f"{path}: features must be floats, got {dtype_name}")


def _npy_matrix(path: str) -> _Part:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FeatureFileError(f"{path}: not a readable .npy matrix ({e})") from None
    _check_matrix(path, array.shape, array.dtype.name)
    return _Part(path, array.shape[0], array.shape[1],
                 lambda start, stop: torch.from_numpy(np.array(array[start:stop], dtype=np.float32)))


def _open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise FeatureFileError(f"{path}: not a readable safetensors file ({e})") from None


def _safetensors_matrix(path: str) -> _Part:
    with _open_safetensors(path) as f:
        keys = list(f.keys())
        named = [key for key in MATRIX_KEYS if key in keys]
        if len(keys) != 1 and not named:
            raise FeatureFileError(f"{path}: holds {keys}; expected one matrix, or one named {MATRIX_KEYS}")
        key = keys[0] if len(keys) == 1 else named[0]
        view = f.get_slice(key)
        shape, dtype = view.get_shape(), view.get_dtype()
    _check_matrix(path, shape, dtype)

    def read(start: int, stop: int) -> torch.Tensor:
        with safe_open(path, framework="pt") as f:
            return f.get_slice(key)[start:stop].float()

    return _Part(path, shape[0], shape[1], read)


def _encode_folder(path: str) -> _Part:
    features = load_features(path)
    records = features.records
    if not records:
        raise FeatureFileError(f"{path}: the encode folder holds no encoded inputs")
    with _open_safetensors(os.path.join(path, records[0]["shard"])) as f:
        dim = f.get_slice("pooled").get_shape()[1]

    def read(start: int, stop: int) -> torch.Tensor:
        groups = []  # (shard, its rows): records run through the shards in order, so each is opened once
        for record in records[start:stop]:
            if not groups or groups[-1][0] != record["shard"]:
                groups.append((record["shard"], []))
            groups[-1][1].append(record["row"])
        out = []
        for shard, shard_rows in groups:
            with _open_safetensors(os.path.join(path, shard)) as f:
                block = f.get_slice("pooled")[min(shard_rows) : max(shard_rows) + 1]
            out.append(block[torch.tensor(shard_rows) - min(shard_rows)].float())
        return torch.cat(out)

    return _Part(path, len(records), dim, read)


def build_bank(features: FeatureMatrix, num_concepts: int, iterations: int = 20, max_points_per_centre: int = 256,
               seed: int = 0, backend: str = "auto", progress: bool = False) -> tuple[KMeansResult, dict]:
    """Cluster the features into `num_concepts` unit centres: (the k-means result, the bank's settings)."""
    if num_concepts < 1 or max_points_per_centre < 1:
        raise ValueError("num_concepts and max_points_per_centre must be positive")
    sample = training_sample(len(features), num_concepts, max_points_per_centre, seed)
    result = spherical_kmeans(features.take(sample, progress), num_concepts, iterations=iterations, seed=seed,
                              backend=backend, progress=progress)
    settings = {"format": BANK_FORMAT, "num_concepts": num_concepts, "dim": features.dim,
                "iterations": iterations, "max_points_per_centre": max_points_per_centre, "seed": seed,
                "backend": result.backend, "num_points": len(features),
                "num_train_points": result.num_train_points, "mean_cos": result.objective,
                "sources": features.paths}
    return result, settings


def save_bank(path: str, centres: torch.Tensor, settings: dict) -> None:
    """Write a bank file atomically; metadata values are strings (JSON for lists and numbers)."""
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in settings.items()}
    atomic_write(path, save_torch({"centres": centres.float().contiguous()}, metadata=metadata))


def load_bank(path: str) -> tuple[torch.Tensor, dict]:
    """(centres `[K, D]` float32 unit rows, settings) of a bank file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with _open_safetensors(path) as f:
        if "centres" not in f.keys():
            raise FeatureFileError(f"{path}: not a concept bank (no `centres` tensor)")
        centres, metadata = f.get_tensor("centres"), f.metadata() or {}
    if centres.ndim != 2 or centres.dtype != torch.float32 or len(centres) == 0:
        raise FeatureFileError(f"{path}: `centres` must be a [K, D] float32 matrix, got {centres.dtype} "
                               f"{list(centres.shape)}")
    if not torch.allclose(centres.norm(dim=1), torch.ones(len(centres)), atol=1e-3):
        raise FeatureFileError(f"{path}: `centres` rows are not unit vectors")
    settings = {}
    for key, value in metadata.items():
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return centres, settings


def assign_concepts(features: FeatureMatrix, centres: torch.Tensor, top_k: int = 10, out: np.ndarray | None = None,
                    progress: bool = False, device: str | torch.device | None = None) -> np.ndarray:
    """Each feature row's `top_k` nearest centres by cosine, nearest first, written into `out` (`[N, top_k]`
    int64; allocated when not given, e.g. a memory-mapped .npy) and returned."""
    if features.dim != centres.shape[1]:
        raise FeatureFileError(f"features are {features.dim}-dimensional but the bank's centres are "
                               f"{centres.shape[1]}-dimensional")
    if not 1 <= top_k <= len(centres):
        raise ValueError(f"top_k must be between 1 and the bank's {len(centres)} concepts, got {top_k}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    centres = F.normalize(centres.float(), dim=1).to(device)
    out = np.empty((len(features), top_k), dtype=np.int64) if out is None else out
    bar = tqdm(total=len(features), desc="assigning concepts", unit="row", disable=not progress)
    for first, rows in features.chunks():
        _, nearest = nearest_centres(F.normalize(rows.to(device), dim=1), centres, top_k)
        out[first : first + len(rows)] = nearest.cpu().numpy()
        bar.update(len(rows))
    bar.close()
    return out


def write_labels(path: str, features: FeatureMatrix, centres: torch.Tensor, top_k: int = 10,
                 settings: dict | None = None, progress: bool = False) -> None:
    """Assign and write labels to `path` (.npy streamed to disk, or .safetensors key `labels`), atomically."""
    if not path.endswith(LABEL_FORMATS):
        raise FeatureFileError(f"{path}: labels are written as {' or '.join(LABEL_FORMATS)} (by the extension)")
    temporary = f"{path}{TEMPORARY_MARK}{os.getpid()}"
    if path.endswith(".npy"):
        labels = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.int64, shape=(len(features), top_k))
        try:
            assign_concepts(features, centres, top_k, out=labels, progress=progress)
            labels.flush()
            del labels
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    labels = assign_concepts(features, centres, top_k, progress=progress)
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (settings or {}).items()}
    atomic_write(path, save_numpy({"labels": labels}, metadata=metadata))


def read_labels(path: str, num_rows: int | None = None, num_classes: int | None = None,
                mmap: bool = True) -> np.ndarray:
    """Labels `[N, k]` int64 from a .npy or .safetensors (`labels`) file, checked against the features' row
    count and the bank's size when given (each mismatch one FeatureFileError naming both)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".npy"):
        try:
            labels = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise FeatureFileError(f"{path}: not a readable .npy labels file ({e})") from None
    elif path.endswith(".safetensors"):
        with _open_safetensors(path) as f:
            if "labels" not in f.keys():
                raise FeatureFileError(f"{path}: no `labels` tensor")
            labels = f.get_tensor("labels").numpy()
    else:
        raise FeatureFileError(f"{path}: labels must be a .npy or .safetensors file")
    if labels.ndim != 2 or labels.dtype != np.int64:
        raise FeatureFileError(f"{path}: labels must be an [N, k] int64 matrix, got {labels.dtype} "
                               f"{list(labels.shape)}")
    if num_rows is not None and len(labels) != num_rows:
        raise FeatureFileError(f"{path} has {len(labels)} label rows but the features have {num_rows} rows")
    if num_classes is not None and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise FeatureFileError(f"{path}: label {low if low < 0 else high} is outside the bank's "
                                   f"{num_classes} concepts")
    return labels
