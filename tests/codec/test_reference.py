"""Policy "reference": the published reader's motion term (REFERENCE section 4) and agreement with the
published selection on real footage."""

import os

import av
import numpy as np
import pytest
import torch

from onevision_encoder import select_patches
from onevision_encoder.codec.cells import _CellsToPatches, _WorkMap
from onevision_encoder.codec.reference import frame_difference, reference_motion, whole_pixel_l0_cells
from onevision_encoder.codec.video import motion_vectors
from onevision_encoder.synthetic import write_video

def _vector(source, w, h, x, y, motion_x, motion_y, scale=4):
    """An exported vector as FFmpeg writes it: dst = the block's centre, src = dst + motion / scale in C
    (integer division, truncated toward zero)."""
    dst_x, dst_y = x + w // 2, y + h // 2
    src_x, src_y = dst_x + int(motion_x / scale), dst_y + int(motion_y / scale)
    return (source, w, h, src_x, src_y, dst_x, dst_y, 0, motion_x, motion_y, scale)


def test_l0_vectors_fill_their_cells_in_whole_pixels_truncated_toward_zero(mv_dtype):
    mvs = np.array([
        _vector(-1, 16, 8, 0, 0, -7, 9),  # -1.75, 2.25 px -> -1, 2 (floor would give -2)
        _vector(1, 16, 16, 16, 0, 40, 40),  # list 1: ignored
        _vector(-1, 8, 8, 28, 12, 12, -3),  # half outside a 32-px-wide frame: 3, 0 px on the inside cells
        _vector(-1, 4, 4, 4, 24, 2, 3),  # under a pixel: truncates to no motion
    ], dtype=mv_dtype)
    vx, vy = whole_pixel_l0_cells(mvs, 8, 8)
    assert (vx[:2, :4] == -1).all() and (vy[:2, :4] == 2).all()
    assert (vx[3:5, 7] == 3).all() and not vy[3:5, 7].any()
    assert np.count_nonzero(vx) == 8 + 2 and np.count_nonzero(vy) == 8


def test_bitstream_vectors_follow_the_conventions_relied_on(tmp_path):
    """FFmpeg's H.264 export: src - dst = motion / scale truncated toward zero, L0 = source < 0, blocks of
    4..16 pixels with dst at their centre on the 4-pixel grid."""
    path = write_video(tmp_path / "pan.mp4", scene="pan", num_frames=24, width=192, height=144, bf=2)["path"]
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        vectors = [v for v in (motion_vectors(f) for f in container.decode(stream)) if v is not None]
    mvs = np.concatenate(vectors)
    assert len(mvs) > 1000 and (mvs["source"] < 0).any() and (mvs["source"] > 0).any()  # B-frames: both lists
    truncated = np.trunc(mvs["motion_x"] / mvs["motion_scale"]).astype(int)
    assert np.array_equal(mvs["src_x"].astype(int) - mvs["dst_x"], truncated)
    assert set(np.unique(mvs["w"])) <= {4, 8, 16} and ((mvs["dst_x"] - mvs["w"] // 2) % 4 == 0).all()


def test_median_counts_every_cell_and_a_zero_p95_makes_the_map_binary(mv_dtype):
    rows = cols = 20  # 400 cells
    few = np.array([_vector(-1, 4, 4, 4 * i, 0, 4, 0) for i in range(10)]  # 10 cells at 1 px
                   + [_vector(-1, 4, 4, 0, 8, 40, 0)], dtype=mv_dtype)  # one at 10 px
    m = reference_motion(few, rows, cols)
    # 11 of 400 cells move: the median is 0, the P95 is 0, the 1e-6 floor makes 1 px and 10 px both 1
    assert m.max() == 1 and np.count_nonzero(m) == 11 and set(np.unique(m)) == {0.0, 1.0}
    # most cells moving by 2 px (a camera pan), an object at 6 px: the median takes the pan out
    pan = np.array([_vector(-1, 16, 16, 16 * (i % 5), 16 * (i // 5), 8, 0) for i in range(20)]
                   + [_vector(-1, 4, 4, 0, 76, 24, 0)], dtype=mv_dtype)
    m = reference_motion(pan, rows, cols)
    assert m[19, 0] == 1 and m[:16].max() == 0  # the object, not the panned background
    assert (m[16:19] > 0).all()  # cells no vector reaches count as still: against the pan they move


def test_frame_difference_is_the_mean_absolute_difference_of_each_cell():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (10, 9), dtype=np.uint8), rng.integers(0, 256, (10, 9), dtype=np.uint8)
    diff = frame_difference(a, b)
    assert diff.shape == (3, 3)
    assert np.isclose(diff[0, 0], np.abs(a[:4, :4].astype(int) - b[:4, :4]).mean())
    assert np.isclose(diff[2, 2], np.abs(a[8:, 8:].astype(int) - b[8:, 8:]).mean())  # edge cell: 2x1 pixels


@pytest.mark.parametrize("mode", ["crop", "letterbox"])
def test_cells_sum_over_patches_by_the_area_they_cover(mode):
    wmap = _WorkMap.for_frame(640, 360, 0, 576, 144, mode)
    sums = _CellsToPatches.for_map(wmap, 4, 16)(np.ones((160, 90), np.float32))
    plan = wmap.plan
    if mode == "crop":
        np.testing.assert_allclose(sums, 256, rtol=1e-5)
    else:  # the picture's area, patch by patch: 324 px wide centred, columns 8..27 inside, 7 and 28 in part
        assert np.isclose(sums.sum(), plan.resized_height * plan.resized_width, rtol=1e-5)
        np.testing.assert_allclose(sums[:, 8:28], 256, rtol=1e-5)
        assert not sums[:, :7].any() and 0 < sums[0, 7] < 256


def _agreement(path, published):
    clip = select_patches(path, num_frames=64, budget=10368, size=576, patch_size=16, resize="letterbox",
                          policy="reference")
    later = published[published[:, 0] > 0]  # frame 0 is whole on both sides
    return clip, float(clip.kept[later[:, 0], later[:, 1], later[:, 2]].float().mean())


def test_reference_agrees_with_the_published_selection_on_real_footage(published_selection):
    published = np.load(os.path.join(published_selection, "published.visidx_thw.npy"))
    clip, agreement = _agreement(os.path.join(published_selection, "clip.mp4"), published)
    frame_ids = np.load(os.path.join(published_selection, "published.frame_ids.npy"))
    assert np.array_equal(clip.frame_ids.numpy(), frame_ids)
    assert len(clip) == len(published) and clip.kept[0].all()
    assert agreement >= 0.85, f"reference keeps {agreement:.3f} of the published patches of frames 1..63"
    # the same kept set as the published one in its own form: padding never chosen after frame 0
    assert not clip.kept[1:, :, :8].any() and not clip.kept[1:, :, 28:].any()
    assert torch.equal(clip.kept.sum(), torch.tensor(len(published)))
