"""Motion from the bitstream (`codec/motion.py`): vectors filled over the blocks they cover, camera motion taken
out, sums over the intervals between sampled frames."""

import numpy as np
import pytest

from onevision_encoder.codec import camera_free_motion, motion_cells, scan_video
from onevision_encoder.codec.block_matching import _camera_free_magnitude
from onevision_encoder.codec.video import decode_frames, motion_vectors
from onevision_encoder.synthetic import write_video

W, H = 192, 144  # multiples of 16: whole 16-pixel cells


@pytest.fixture(scope="module")
def pan_vectors(tmp_path_factory):
    """The motion vectors of each frame (None for a key frame) of a short H.264 camera pan with B-frames."""
    meta = write_video(tmp_path_factory.mktemp("pan") / "pan.mp4", scene="pan", num_frames=24, width=W, height=H, bf=2)
    return [motion_vectors(frame) for _, frame in decode_frames(meta["path"], export_motion_vectors=True)]


def test_motion_cells_fill_each_block_over_its_area_in_pixels(mv_dtype):
    mvs = np.array([(-1, 16, 8, 0, 0, 8, 4, 0, 12, -4, 4),  # 16x8 block at the top-left, (3, -1) px
                    (1, 8, 8, 0, 0, 20, 20, 0, 40, 40, 4)],  # future reference (L1): ignored
                   dtype=mv_dtype)
    vx, vy = motion_cells(mvs, (8, 8))
    assert np.all(vx[:2, :4] == 3) and np.all(vy[:2, :4] == -1)
    assert vx.sum() == 3 * 8 and np.count_nonzero(vy) == 8


def test_motion_cells_drop_blocks_outside_the_frame_and_still_ones(mv_dtype):
    """A block past the frame's edge (coded rows below a 1080-line picture) and a still one add nothing, whether
    the other blocks come with them or alone (the copy-free path taken when every block moves and lies inside)."""
    inside = [(-1, 16, 8, 0, 0, 8, 4, 0, 12, -4, 4), (-1, 8, 8, 0, 0, 20, 20, 0, -8, 6, 4)]
    past_edge = (-1, 16, 16, 0, 0, 8, 40, 0, 100, 100, 4)  # rows 32..47 of a 32-row frame
    still = (-1, 16, 16, 0, 0, 24, 8, 0, 0, 0, 4)
    alone = motion_cells(np.array(inside, dtype=mv_dtype), (8, 8))
    mixed = motion_cells(np.array([inside[0], past_edge, still, inside[1]], dtype=mv_dtype), (8, 8))
    for a, b in zip(alone, mixed):
        np.testing.assert_array_equal(a, b)
    assert alone[0].sum() == 3 * 8 - 2 * 4 and np.count_nonzero(alone[1]) == 8 + 4
    assert camera_free_motion(np.array([past_edge], dtype=mv_dtype), (8, 8)).sum() == 0


def test_block_weighted_camera_free_motion_equals_the_per_cell_definition(pan_vectors, mv_dtype):
    vectors = pan_vectors
    shape = (-(-H // 4), -(-W // 4))
    compared = 0
    for mvs in vectors:
        per_cell = _camera_free_magnitude(*motion_cells(mvs, shape, 4))
        np.testing.assert_allclose(camera_free_motion(mvs, shape, 4), per_cell, atol=1e-4)
        compared += mvs is not None and per_cell.max() > 0
    assert compared > 10  # the pan gives real, non-zero motion on most frames
    # Weights matter: eight 4x4 blocks moving by 10 px against three still 32x32 blocks (and still,
    # uncovered cells) must give a median of 0, not the 10 an unweighted median of the blocks gives.
    blocks = np.zeros(11, dtype=mv_dtype)
    blocks["source"], blocks["motion_scale"] = -1, 1
    blocks["w"][:8] = blocks["h"][:8] = 4
    blocks["dst_x"][:8], blocks["dst_y"][:8], blocks["motion_x"][:8] = (8 + np.arange(8)) * 4 + 2, 12 * 4 + 2, 10
    blocks["w"][8:] = blocks["h"][8:] = 32  # three quadrants; the small blocks lie in the fourth, on cell row 12
    blocks["dst_x"][8:], blocks["dst_y"][8:] = [16, 48, 16], [16, 16, 48]
    magnitude = camera_free_motion(blocks, (16, 16), 4)
    assert magnitude[12, 8:].tolist() == [10.0] * 8 and magnitude.sum() == 80
    np.testing.assert_allclose(magnitude, _camera_free_magnitude(*motion_cells(blocks, (16, 16), 4)))


def test_motion_on_16_pixel_cells_is_the_mean_of_the_4_pixel_cells(pan_vectors):
    """Large frames fill motion blocks on 8- or 16-pixel squares (sub-blocks weighted by their share of a
    square) instead of the 4-pixel grid: the result must be the area mean of the 4-pixel cells."""
    vectors = pan_vectors
    fine, coarse = (H // 4, W // 4), (H // 16, W // 16)  # W and H are multiples of 16

    def pooled(cells):
        return cells.reshape(coarse[0], 4, coarse[1], 4).mean(axis=(1, 3))

    small_blocks = 0
    for mvs in vectors:
        np.testing.assert_allclose(camera_free_motion(mvs, coarse, 16), pooled(camera_free_motion(mvs, fine, 4)), atol=1e-4)
        np.testing.assert_allclose(motion_cells(mvs, coarse, 16)[0], pooled(motion_cells(mvs, fine, 4)[0]), atol=1e-4)
        small_blocks += mvs is not None and bool((mvs["w"] < 16).any())
    assert small_blocks > 5  # sub-macroblock partitions were there to weigh


@pytest.mark.parametrize("setting", ["inline", "one-interval-batches", "several-threads"])
def test_motion_since_is_the_same_inline_and_one_interval_at_a_time(videos, monkeypatch, setting):
    """The default (the workers' pool, 8 intervals a batch) against summing inline, against batches of one
    interval (fails if a batch writes its sums to the wrong slots), and against one-interval batches worked
    out by several threads at once, finishing in any order."""
    from concurrent.futures import ThreadPoolExecutor

    from onevision_encoder.codec.motion import _MotionSince

    path = videos["pan"]["path"]
    default = scan_video(path, policy="balanced")
    make = _MotionSince.__init__
    with ThreadPoolExecutor(3) as pool:
        change = {"inline": {"pool": None}, "one-interval-batches": {"batch_intervals": 1},
                  "several-threads": {"pool": pool, "batch_intervals": 1}}[setting]
        changed = lambda self, *args, **kw: make(self, *args, **{**kw, **change})  # noqa: E731
        monkeypatch.setattr(_MotionSince, "__init__", changed)
        other = scan_video(path, policy="balanced")
    np.testing.assert_array_equal(default.motion_since, other.motion_since)
    assert (default.motion_since[1:].reshape(63, -1).max(1) > 0).mean() > 0.9  # (nearly) every interval moved


def test_motion_of_several_frames_worked_out_together_is_the_sum_of_each(pan_vectors):
    from onevision_encoder.codec.motion import _BlockCanvas, _camera_free_cells

    vectors = pan_vectors
    assert vectors[0] is None and sum(v is not None for v in vectors) > 10  # a key frame, then P/B frames
    for cell in (4, 16):
        shape = (-(-H // cell), -(-W // cell))
        canvas = _BlockCanvas(H, W, cell)
        together = _camera_free_cells(canvas, canvas.blocks(vectors))
        each = sum(camera_free_motion(v, shape, cell) for v in vectors)
        np.testing.assert_allclose(together[0], each, rtol=1e-5, atol=1e-3)
        # in groups (intervals between sampled frames), each group's sum of its own frames
        kept = [v for v in vectors if v is not None]
        group = np.arange(len(kept)) % 3
        grouped = _camera_free_cells(canvas, canvas.blocks(kept), group, 4)
        assert grouped.shape == (4, *shape) and not grouped[3].any()  # a group without frames stays still
        for g in range(3):
            own = sum(camera_free_motion(v, shape, cell) for v, i in zip(kept, group) if i == g)
            np.testing.assert_allclose(grouped[g], own, rtol=1e-5, atol=1e-3)


def test_weighted_medians_by_histogram_equal_those_by_sorting():
    from onevision_encoder.codec.motion import _weighted_medians

    rng = np.random.default_rng(0)
    for trial in range(100):
        groups = int(rng.integers(1, 5))
        n = int(rng.integers(groups, 2000))
        keys = rng.integers(-200, 200, n)  # motion in sub-pel steps
        if trial % 3 == 0:
            keys = np.round(keys / 8).astype(np.int64) * 8  # many ties
        weights = rng.integers(0, 64, n) / 16  # multiples of 1/16 pixel area, some 0
        group = rng.integers(0, groups, n)
        group[:groups], weights[:groups] = np.arange(groups), weights[:groups] + 1  # no empty group
        totals = np.bincount(group, weights)
        by_histogram = _weighted_medians(keys, weights, group, totals)
        np.testing.assert_array_equal(by_histogram, _weighted_medians(keys, weights, group, totals, histogram_cells=0))
        g = group == 0  # and the sort is the definition: first key reaching half the weight
        order = np.argsort(keys[g], kind="stable")
        half = np.cumsum(weights[g][order]) >= weights[g].sum() / 2
        assert by_histogram[0] == keys[g][order][half.argmax()]
