"""Block matching (`codec/block_matching.py`): it finds known shifts, and its shortcuts give what the plain
computation gives."""

import numpy as np
import pytest

from onevision_encoder.codec import block_motion
from onevision_encoder.codec.block_matching import _block_motion_since, _camera_free_magnitude, _shift_median
from onevision_encoder.codec.cells import _WorkMap


def test_whole_number_cells_match_in_integers_what_fractional_cells_match_in_floats():
    """Cells of whole numbers take the 16-bit path; the same cells plus 0.25 (same differences) the float one."""
    rng = np.random.default_rng(0)
    previous = rng.integers(0, 256, (45, 80)).astype(np.float32)
    current = np.roll(previous, (1, -2), axis=(0, 1)) + rng.integers(-3, 4, (45, 80))
    current = np.clip(current, 0, 255).astype(np.float32)
    whole = block_motion(previous, current, cell=4)
    fractional = block_motion(previous + 0.25, current + 0.25, cell=4)
    assert all(np.array_equal(a, b) for a, b in zip(whole, fractional))
    assert np.mean(whole[0][8:-8, 8:-8] == 8) > 0.9  # it still finds the shift


def test_block_motion_finds_a_known_shift_and_reads_flat_areas_as_still():
    rng = np.random.default_rng(0)
    previous = rng.uniform(0, 255, (45, 80)).astype(np.float32)
    current = np.roll(previous, (2, -3), axis=(0, 1))  # current[y, x] = previous[y - 2, x + 3]
    vx, vy = block_motion(previous, current, cell=4)
    inner = (slice(8, -8), slice(8, -8))  # away from the wrapped-around border
    assert np.all(vx[inner] == 12) and np.all(vy[inner] == -8)  # where each block came from, in pixels
    flat = np.full((23, 41), 90.0, np.float32)  # odd size, every shift ties: the smallest (none) wins
    vx, vy = block_motion(flat, flat)
    assert vx.shape == (23, 41) and not vx.any() and not vy.any()


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_any_block_size_finds_a_shift_of_the_whole_frame(block):
    rng = np.random.default_rng(3)
    previous = rng.integers(0, 256, (30, 50)).astype(np.float32)
    current = np.roll(previous, (1, 2), axis=(0, 1))  # moved down 1, right 2: found 1 up, 2 left in `previous`
    vx, vy = block_motion(previous, current, block=block, cell=1)
    assert np.mean(vx[5:-5, 5:-5] == -2) > 0.9 and np.mean(vy[5:-5, 5:-5] == -1) > 0.9


def test_median_of_shifts_is_numpys_median_of_the_repeated_values():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 30, 400):
        shifts = rng.integers(-4, 5, n)
        counts = rng.integers(1, 17, n)
        median = _shift_median(shifts.reshape(-1, 1), counts.reshape(-1, 1), 4)
        assert median.dtype == np.float32 and median == np.median(np.repeat(shifts, counts))
    # shifts that never occur (the bins left empty) are stepped over; an even total averages the middle two
    assert _shift_median(np.array([-4, 4]), np.array([3, 3]), 4) == 0.0
    assert _shift_median(np.array([-4, 4]), np.array([3, 4]), 4) == 4.0


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def test_camera_free_motion_per_block_equals_per_cell():
    """`_block_motion_since` (per block) writes what `_camera_free_magnitude` of the cells gives."""
    rng = np.random.default_rng(2)
    previous = rng.integers(0, 256, (23, 41)).astype(np.float32)  # partial edge blocks
    current = np.roll(previous, (2, 1), axis=(0, 1)).copy()
    current[5:12, 10:20] = rng.integers(0, 256, (7, 10))  # something moving on its own
    wmap = _WorkMap.for_frame(23 * 4, 41 * 4, 0, 224, 64, "crop")
    out = np.zeros((64, 64), np.float32)
    _block_motion_since(_Done(previous), _Done(current), wmap, out)
    vx, vy = block_motion(previous, current, cell=wmap.cell)
    want = wmap(_camera_free_magnitude(vx, vy)) * wmap.scale
    assert np.array_equal(out, want) and out.max() > 0
