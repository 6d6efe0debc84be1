"""Spherical k-means: unit-vector centres, points assigned by cosine (Lloyd's iterations, as faiss runs them).

Two backends run the same algorithm from the same start: faiss (`pip install ".[train]"`; on the GPU when a
faiss GPU build sees one), else torch in chunks. Both start from the same seeded sample of the points as
initial centres and run the same fixed number of iterations (assign every point to its nearest centre, move
each centre to the normalised sum of its points), so they end at the same centres up to float rounding in
ties. A centre that loses all its points is split off the largest cluster (faiss does the same, with its own
random choice), so the two can differ only on data that empties a cluster.

Like faiss, training uses at most `max_points_per_centre` points per centre, drawn uniformly: the memory and
time of the clustering depend on K, not on the number of points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

BACKENDS = ("auto", "faiss", "torch")
SCORES_PER_CHUNK = 1 << 24  # cosine entries held at once by the torch backend (64 MiB of float32)
SPLIT_NUDGE = 1.0 / 1024  # relative offset between the two halves of a split cluster (faiss's EPS)


@dataclass
class KMeansResult:
    centres: torch.Tensor  # [K, D] float32, unit rows
    objective: float  # mean cosine of the training points to their centre, at the last assignment
    backend: str  # "faiss", "faiss-gpu" or "torch"
    num_train_points: int


def training_sample(num_points: int, num_centres: int, max_points_per_centre: int, seed: int) -> np.ndarray:
    """Sorted indices of the points k-means trains on: all of them, or `num_centres * max_points_per_centre`
    drawn uniformly without replacement (memory of the sample only, not of the N points)."""
    if num_centres > num_points:
        raise ValueError(f"cannot make {num_centres} concepts from {num_points} feature rows")
    size = min(num_points, num_centres * max_points_per_centre)
    if size == num_points:
        return np.arange(num_points)
    return np.sort(np.random.default_rng(seed).choice(num_points, size=size, replace=False, shuffle=False))


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def spherical_kmeans(points: torch.Tensor, num_centres: int, iterations: int = 20, seed: int = 0,
                     backend: str = "auto", device: str | torch.device | None = None,
                     progress: bool = False) -> KMeansResult:
    """Cluster `points [n, D]` (normalised here) into `num_centres` unit centres.

    backend: "faiss", "torch" or "auto" (faiss when installed). device: the torch backend's device (default
    the GPU when there is one)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if points.ndim != 2 or len(points) < num_centres or num_centres < 1:
        raise ValueError(f"need a [n, D] matrix with n >= num_centres ({num_centres}), got {list(points.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    points = F.normalize(points.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    start = points[torch.randperm(len(points), generator=generator)[:num_centres]]
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        return _faiss_kmeans(points, start, iterations, seed, progress)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _torch_kmeans(points.to(device), start.to(device), iterations, generator, progress)


def nearest_centres(points: torch.Tensor, centres: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest `centres` of each of `points` (both unit rows) by cosine, nearest first: (cosines
    `[n, k]`, indices `[n, k]` int64). Chunked over points and centres so at most SCORES_PER_CHUNK cosines
    exist at once, whatever n and K."""
    centre_chunk = max(k, min(len(centres), SCORES_PER_CHUNK // 64))
    point_chunk = max(1, SCORES_PER_CHUNK // centre_chunk)
    best_scores, best_indices = [], []
    for p in range(0, len(points), point_chunk):
        block = points[p : p + point_chunk]
        scores = block.new_full((len(block), 0), -math.inf)
        indices = torch.zeros(len(block), 0, dtype=torch.long, device=block.device)
        for c in range(0, len(centres), centre_chunk):
            chunk_scores = block @ centres[c : c + centre_chunk].T
            chunk_top = chunk_scores.topk(min(k, chunk_scores.shape[1]), dim=1)
            scores = torch.cat([scores, chunk_top.values], dim=1)
            indices = torch.cat([indices, chunk_top.indices + c], dim=1)
            if scores.shape[1] > k:  # keep the running best k over the centre chunks seen so far
                top = scores.topk(k, dim=1)
                scores, indices = top.values, indices.gather(1, top.indices)
        best_scores.append(scores)
        best_indices.append(indices)
    return torch.cat(best_scores), torch.cat(best_indices)


def _torch_kmeans(points, centres, iterations, generator, progress) -> KMeansResult:
    objective = float("nan")
    bar = tqdm(range(iterations), desc="k-means (torch)", unit="iteration", disable=not progress)
    for _ in bar:
        cosines, assignment = nearest_centres(points, centres)
        assignment = assignment[:, 0]
        objective = cosines.mean().item()
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=len(centres))
        centres = F.normalize(sums, dim=1)
        _split_largest_into_empty(centres, counts, generator)
        bar.set_postfix(mean_cos=f"{objective:.4f}")
    return KMeansResult(centres.cpu(), objective, "torch", len(points))


def _split_largest_into_empty(centres: torch.Tensor, counts: torch.Tensor, generator) -> None:
    """Give each empty centre half of the largest cluster: the two copies nudged apart (in place)."""
    counts = counts.clone()
    for empty in (counts == 0).nonzero()[:, 0].tolist():
        largest = int(counts.argmax())
        nudge = torch.randint(0, 2, centres.shape[1:], generator=generator).to(centres) * 2 - 1
        centre = centres[largest].clone()
        centres[empty] = F.normalize(centre * (1 + SPLIT_NUDGE * nudge), dim=0)
        centres[largest] = F.normalize(centre * (1 - SPLIT_NUDGE * nudge), dim=0)
        counts[empty] = counts[largest] // 2
        counts[largest] -= counts[empty]


def _faiss_kmeans(points, start, iterations, seed, progress) -> KMeansResult:
    import faiss

    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(points.shape[1], len(start), niter=iterations, spherical=True, seed=seed, gpu=gpu,
                          verbose=progress, max_points_per_centroid=len(points), min_points_per_centroid=1)
    kmeans.train(points.numpy(), init_centroids=start.numpy())
    centres = F.normalize(torch.from_numpy(kmeans.centroids.copy()), dim=1)
    # faiss's objective is the sum of inner products of the last assignment
    objective = float(kmeans.obj[-1]) / len(points) if len(kmeans.obj) else float("nan")
    return KMeansResult(centres, objective, "faiss-gpu" if gpu else "faiss", len(points))
