"""The clip-level P95 of the "balanced" scores: the same number as `np.percentile`, on maps like a scan's
(mostly still, ties, tiny values) and on the real and small arrays that take NumPy's own path."""

import numpy as np
import pytest

from onevision_encoder.codec.scores import p95


def _maps(kind: str, n: int, rng) -> np.ndarray:
    if kind == "uniform":
        return rng.random(n, dtype=np.float32)
    if kind == "mostly still":  # 70% zeros, as motion maps of a fixed camera
        return ((rng.random(n) < 0.3) * rng.random(n)).astype(np.float32)
    if kind == "few levels":  # heavy ties around the 90th and 95th percentiles
        return np.round(rng.random(n) * 5).astype(np.float32)
    if kind == "98% still":  # the threshold misses: NumPy's path
        return ((rng.random(n) < 0.02) * rng.exponential(3, n)).astype(np.float32)
    return (rng.exponential(1, n) * 1e-3).astype(np.float32)


@pytest.mark.parametrize("kind", ["uniform", "mostly still", "few levels", "98% still", "tiny"])
def test_p95_is_numpy_s_percentile_to_the_bit(kind):
    rng = np.random.default_rng(7)
    for n in [1, 2, 1000, 16383, 16384, 16385, 40001, 63 * 64 * 64, 300_007]:
        values = _maps(kind, n, rng).reshape(-1, 1) if n % 2 else _maps(kind, n, rng)
        want = float(np.percentile(values, 95))
        assert p95(values) == want, (kind, n)


def test_p95_leaves_its_input_as_it_was():
    values = np.random.default_rng(0).random((63, 64, 64), dtype=np.float32)
    before = values.copy()
    p95(values)
    assert np.array_equal(values, before)
