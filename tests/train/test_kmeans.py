"""Spherical k-means: the torch backend gives faiss's centres, chunking changes nothing, planted concepts are
found, the training sample is bounded by K, and an emptied cluster is refilled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onevision_encoder.train import kmeans
from onevision_encoder.train.kmeans import nearest_centres, spherical_kmeans, training_sample


def blobs(num_centres=24, dim=32, num_points=4000, spread=0.35, seed=0):
    """Points around random unit centres; with this spread the clusters overlap (k-means has work to do)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_centres, dim, generator=g), dim=1)
    which = torch.randint(0, num_centres, (num_points,), generator=g)
    points = centres[which] + spread * torch.randn(num_points, dim, generator=g) / dim ** 0.5 * 4
    return F.normalize(points, dim=1), centres


def match_by_assignment(points, centres_a, centres_b):
    """For each cluster of a, the cluster of b holding most of its points; and the share of points whose
    clusters correspond under that matching."""
    a = nearest_centres(points, centres_a)[1][:, 0]
    b = nearest_centres(points, centres_b)[1][:, 0]
    joint = torch.zeros(len(centres_a), len(centres_b), dtype=torch.long)
    joint.index_put_((a, b), torch.ones_like(a), accumulate=True)
    matching = joint.argmax(dim=1)
    return matching, (matching[a] == b).float().mean().item()


def test_torch_backend_gives_the_faiss_centres():
    pytest.importorskip("faiss")  # in the test extra; the test needs both backends
    points, _ = blobs()
    with_faiss = spherical_kmeans(points, 24, iterations=15, seed=3, backend="faiss")
    with_torch = spherical_kmeans(points, 24, iterations=15, seed=3, backend="torch")
    assert with_faiss.backend == "faiss" and with_torch.backend == "torch"
    matching, agreement = match_by_assignment(points, with_torch.centres, with_faiss.centres)
    assert sorted(matching.tolist()) == list(range(24))  # one to one
    assert agreement > 0.995
    cosines = (with_torch.centres * with_faiss.centres[matching]).sum(dim=1)
    assert cosines.min() > 0.999
    assert with_torch.objective == pytest.approx(with_faiss.objective, abs=1e-4)
    for result in (with_faiss, with_torch):
        torch.testing.assert_close(result.centres.norm(dim=1), torch.ones(24))
    # another seed starts elsewhere: the test above can tell starts apart
    other = spherical_kmeans(points, 24, iterations=1, seed=4, backend="torch")
    assert not torch.allclose(other.centres, spherical_kmeans(points, 24, iterations=1, seed=3,
                                                              backend="torch").centres)


def test_chunked_nearest_centres_equal_one_big_product(monkeypatch):
    points, centres = blobs(num_centres=40, num_points=700)
    expected = (points @ centres.T).topk(5, dim=1)
    whole = spherical_kmeans(points, 12, iterations=5, backend="torch")
    monkeypatch.setattr(kmeans, "SCORES_PER_CHUNK", 640)  # 10 centres x 64 points at a time
    scores, indices = nearest_centres(points, centres, k=5)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(indices, expected.indices)
    chunked = spherical_kmeans(points, 12, iterations=5, backend="torch")
    torch.testing.assert_close(chunked.centres, whole.centres, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_planted_concepts_are_found(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    points, planted = blobs(num_centres=10, num_points=2000, spread=0.1)
    found = spherical_kmeans(points, 10, iterations=20, seed=1, backend=backend).centres
    best = (planted @ found.T).max(dim=1).values
    # random starts can put two centres in one blob; with 10 well-apart blobs most are found exactly
    assert (best > 0.99).sum() >= 8


def test_training_sample_is_bounded_by_the_centres_not_the_points():
    sample = training_sample(1_000_000, 50, 40, seed=0)
    assert len(sample) == 2000 and len(np.unique(sample)) == 2000
    assert (np.diff(sample) > 0).all() and sample[0] >= 0 and sample[-1] < 1_000_000
    assert np.array_equal(sample, training_sample(1_000_000, 50, 40, seed=0))
    assert not np.array_equal(sample, training_sample(1_000_000, 50, 40, seed=1))
    assert np.array_equal(training_sample(300, 5, 100, seed=0), np.arange(300))
    with pytest.raises(ValueError, match="cannot make 11 concepts from 10 feature rows"):
        training_sample(10, 11, 5, seed=0)


def test_an_emptied_cluster_is_split_off_the_largest():
    # only three distinct points: two starting centres on the same point leave one cluster empty
    distinct = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    points = distinct[torch.tensor([0] * 60 + [1] * 30 + [2] * 10)]
    result = spherical_kmeans(points, 4, iterations=6, seed=0, backend="torch")
    assert torch.isfinite(result.centres).all()
    torch.testing.assert_close(result.centres.norm(dim=1), torch.ones(4))
    # every distinct point ends as (nearly) a centre of its own
    assert ((distinct @ result.centres.T).max(dim=1).values > 0.999).all()
