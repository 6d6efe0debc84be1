"""Codec-style patch selection on generated videos whose moving regions are known."""

import os
import sys
import threading

import av
import numpy as np
import pytest
import torch

from onevision_encoder import (
    CodecClip,
    VideoDecodeError,
    collate_patch_lists,
    replenishment_psnr,
    sample_frames,
    select_patches,
    temporal_slots,
)
from onevision_encoder.codec import (
    camera_free_motion,
    choose_patches,
    motion_cells,
    patch_scores,
    replenish,
    scan_video,
    uniform_frames_mask,
)
from onevision_encoder.processing import normalize, patchify, resize_frames
from onevision_encoder.synthetic import write_video
from onevision_encoder.codec.block_matching import _camera_free_magnitude
from onevision_encoder.codec.video import VideoFile, motion_vectors

SIZE, P = 224, 14
ROWS = SIZE // P
W, H = 192, 144  # small frames keep encoding and decoding fast
# FFmpeg's AVMotionVector, as PyAV exports it
MV_DTYPE = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"), ("dst_x", "<i2"),
            ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    made = {}
    for codec, ext in [("h264", "mp4"), ("hevc", "mp4"), ("mpeg4", "mp4"), ("vp9", "webm")]:
        made[codec] = write_video(root / f"objects_{codec}.{ext}", codec=codec, num_frames=80, width=W, height=H)
    made["static"] = write_video(root / "static.mp4", scene="static", num_frames=72, width=W, height=H)
    made["pan"] = write_video(root / "pan.mp4", scene="pan", num_frames=72, width=W, height=H)
    return made


def _pan_motion_vectors(tmp_path):
    """The motion vectors of each frame (None for a key frame) of a short H.264 camera pan with B-frames."""
    meta = write_video(tmp_path / "pan.mp4", scene="pan", num_frames=24, width=W, height=H, bf=2)
    with av.open(meta["path"]) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        return [motion_vectors(frame) for frame in container.decode(stream)]


def _same_picture(a, b) -> bool:
    """Floats in 0..1 that show the same picture up to the painting's rounding (a level or two on average)."""
    diff = (a - b).abs() * 255
    return bool(diff.mean() < 2 and 10 * torch.log10(255**2 / (diff**2).mean()) > 38)


def _decoded(path):
    with av.open(os.fspath(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _moving_patches(meta, frame_ids, resize="crop"):
    """[T, rows, cols]: patches touched by ground-truth motion between consecutive sampled frames."""
    masks = meta["moving_masks"]
    out = []
    for i, fid in enumerate(frame_ids.tolist()):
        lo = frame_ids[i - 1] + 1 if i else fid
        moved = masks[lo : fid + 1].any(axis=0) if fid >= lo else np.zeros_like(masks[0])
        img = np.repeat(moved[..., None].astype(np.uint8) * 255, 3, axis=-1)
        x, _ = resize_frames(img[None], SIZE, resize)
        out.append(patchify(x[0], P).amax(-1).view(ROWS, ROWS) > 0.1)
    return torch.stack(out)


@pytest.mark.parametrize("codec", ["h264", "hevc", "mpeg4", "vp9"])
@pytest.mark.parametrize("policy", ["balanced", "reference"])
def test_kept_patches_after_frame_0_are_on_the_moving_objects(videos, codec, policy):
    meta = videos[codec]
    clip = select_patches(meta["path"], budget=1024, policy=policy)
    moving = _moving_patches(meta, clip.frame_ids)
    kept = clip.kept.clone()
    kept[0] = False
    on_motion = (kept & moving).sum() / kept.sum()
    background = ~moving.any(0)  # patches no object ever reaches: static background
    assert on_motion > 0.8, f"only {on_motion:.2f} of kept patches lie on moving objects"
    assert (kept & background).sum() < 0.05 * kept.sum()
    assert clip.motion_source == ("bitstream" if codec in ("h264", "mpeg4") else "block-matching")


def test_still_stretch_gets_no_patches_with_balanced(videos):
    meta = videos["h264"]
    clip = select_patches(meta["path"], budget=1024)
    start, stop = meta["static_frames"]
    ids = clip.frame_ids.numpy()
    # Slots whose frames (and everything since the previous slot) repeat their predecessor.
    still = [i for i in range(1, 64) if ids[i - 1] + 1 >= start and ids[i] < stop]
    assert len(still) >= 5
    assert clip.kept[still].sum() == 0


def test_patch_list_form_positions_order_and_pixels(videos):
    meta = videos["h264"]
    clip = select_patches(meta["path"], budget=2048, keep_frames=True)
    assert isinstance(clip, CodecClip)
    assert len(clip) == 2048 and clip.pixel_values.shape == (2048, 3 * P * P)
    assert clip.scores.shape == (64, ROWS, ROWS) and clip.kept.shape == (64, ROWS, ROWS)
    assert clip.kept[0].all()
    pos = clip.patch_positions
    key = pos[:, 0] * ROWS * ROWS + pos[:, 1] * ROWS + pos[:, 2]
    assert torch.all(key[1:] > key[:-1])  # (t, row, col) order, no repeats
    assert pos[:, 0].max() <= 63
    expected_ids = np.linspace(0, meta["num_frames"] - 1, 64).astype(int)
    assert np.array_equal(clip.frame_ids.numpy(), expected_ids)
    patches = patchify(normalize(clip.frames), P)  # [T, rows*cols, D]
    assert torch.allclose(clip.pixel_values, patches[pos[:, 0], pos[:, 1] * ROWS + pos[:, 2]])
    # The sampled frames are the decoded frames, resized the shared way (painted from the planes: about a level
    # apart, `test_patch_pictures.py`)
    decoded = _decoded(meta["path"])
    want, _ = resize_frames(decoded[expected_ids[[0, 17, 63]]], SIZE)
    assert _same_picture(clip.frames[[0, 17, 63]], want)


def test_budget_as_fraction_count_too_large_and_invalid(videos):
    path = videos["mpeg4"]["path"]
    assert len(select_patches(path, budget=0.25)) == round(0.25 * 64 * ROWS * ROWS)
    everything = select_patches(path, budget=10**6)
    assert len(everything) == 64 * ROWS * ROWS
    for bad in (0, -5, 0.0, 1.5, "many", True):
        with pytest.raises(ValueError, match="budget"):
            select_patches(path, budget=bad)
    with pytest.raises(ValueError, match="whole frame"):
        select_patches(path, budget=100)
    with pytest.raises(ValueError, match="policy"):
        select_patches(path, policy="magic")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        select_patches(path, size=220)


def test_static_video_falls_back_to_uniform_whole_frames(videos):
    clip = select_patches(videos["static"]["path"], budget=4 * ROWS * ROWS)
    per_frame = clip.kept.sum((1, 2))
    whole = torch.nonzero(per_frame == ROWS * ROWS).squeeze(1).tolist()
    assert len(whole) == 4 and per_frame.sum() == 4 * ROWS * ROWS
    assert whole[0] == 0 and whole[-1] == 63  # spread over the clip, not bunched at the start
    assert min(np.diff(whole)) >= 15


def test_pan_camera_motion_is_not_selected_as_object_motion(videos):
    meta = videos["pan"]
    clip = select_patches(meta["path"], budget=768, policy="reference")
    moving = _moving_patches(meta, clip.frame_ids)
    kept = clip.kept.clone()
    kept[0] = False
    assert (kept & moving).sum() / kept.sum() > 0.6


def test_fewer_frames_than_slots_repeat_frames(tmp_path):
    meta = write_video(tmp_path / "short.mp4", num_frames=20, width=W, height=H)
    clip = select_patches(meta["path"], budget=512)
    ids = clip.frame_ids.numpy()
    assert len(ids) == 64 and ids[0] == 0 and ids[-1] == 19 and len(np.unique(ids)) == 20
    repeats = [i for i in range(1, 64) if ids[i] == ids[i - 1]]
    assert clip.scores[repeats].sum() == 0  # a repeated frame shows nothing new
    assert len(clip) == 512


def test_positions_use_the_64_slot_grid_for_other_frame_counts(videos):
    clip = select_patches(videos["h264"]["path"], num_frames=16, budget=1024)
    assert torch.equal(clip.time_slots, temporal_slots(16))
    assert set(clip.patch_positions[:, 0].tolist()) <= set(temporal_slots(16).tolist())


def test_letterbox_never_chooses_padding_after_frame_0(videos):
    clip = select_patches(videos["h264"]["path"], budget=0.2, resize="letterbox")
    rows_with_picture = clip.kept[1:].any(dim=(0, 2))
    # 192x144 letterboxed into 224: 168 rows of picture, centred, so the top and bottom patch rows are padding.
    assert not rows_with_picture[0] and not rows_with_picture[-1]
    assert clip.kept[0].all()
    # frame 0's padding patches (28 rows above the picture: patch rows 0 and 1) hold the CLIP mean colour,
    # which normalises to exactly zero; every patch of the picture has some non-zero pixel
    first = clip.patch_positions[:, 0].eq(0)
    padding = first & (clip.patch_positions[:, 1] < 2)
    picture = first & (clip.patch_positions[:, 1] == 2)
    assert padding.sum() == 2 * ROWS and clip.pixel_values[padding].abs().max() == 0
    assert clip.pixel_values[picture].abs().amax(dim=1).min() > 0


def test_selection_under_inference_mode_equals_the_plain_one(videos):
    path = videos["h264"]["path"]
    with torch.inference_mode():
        inside = select_patches(path, budget=1024)
    outside = select_patches(path, budget=1024)
    assert torch.equal(inside.pixel_values, outside.pixel_values) and torch.equal(inside.kept, outside.kept)


def test_sample_frames_matches_the_dense_video_preprocessing(videos):
    meta = videos["h264"]
    clip = sample_frames(meta["path"], num_frames=16)
    ids = np.linspace(0, meta["num_frames"] - 1, 16).astype(int)
    assert np.array_equal(clip.frame_ids.numpy(), ids)
    assert len(clip) == 16 * ROWS * ROWS
    assert torch.equal(clip.patch_positions[:: ROWS * ROWS, 0], temporal_slots(16))
    x, _ = resize_frames(_decoded(meta["path"])[ids], SIZE)
    assert torch.allclose(clip.pixel_values, patchify(normalize(x), P).reshape(-1, 3 * P * P), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    from onevision_encoder import OneVisionEncoderModel

    path = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
    return OneVisionEncoderModel.from_pretrained(path).eval()


def test_visible_indices_form_feeds_the_model_the_same_tokens(videos, tiny_model):
    clip = select_patches(videos["h264"]["path"], budget=1024)
    published = clip.to_visible_indices()
    assert published["pixel_values"].shape == (1, 3, 1024 // (ROWS * ROWS), SIZE, SIZE)
    assert published["visible_indices"].max() < 64 * ROWS * ROWS
    with torch.no_grad():
        a = tiny_model(**collate_patch_lists([clip])).last_hidden_state
        b = tiny_model(**published).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)
    odd = select_patches(videos["h264"]["path"], budget=1000)
    with pytest.raises(ValueError, match="pseudo-frames"):
        odd.to_visible_indices()


def test_collate_pads_clips_of_different_sizes(videos, tiny_model):
    small = select_patches(videos["mpeg4"]["path"], budget=300)
    large = select_patches(videos["h264"]["path"], budget=700)
    batch = collate_patch_lists([small, large])
    assert batch["pixel_values"].shape == (2, 700, 3 * P * P)
    assert batch["attention_mask"].sum(1).tolist() == [300, 700]
    with torch.no_grad():
        together = tiny_model(**batch).last_hidden_state
        alone = tiny_model(**collate_patch_lists([small])).last_hidden_state
    assert torch.allclose(together[0, :300], alone[0], atol=1e-4)


def test_replenishment_psnr_rewards_keeping_what_changes(videos):
    clip = select_patches(videos["h264"]["path"], budget=2048, keep_frames=True)
    everything = torch.ones_like(clip.kept)
    assert replenishment_psnr(clip.frames, everything, P) == float("inf")
    rebuilt = replenish(clip.frames, clip.kept, P)
    assert torch.equal(rebuilt[clip.kept.repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1).expand_as(rebuilt)],
                       clip.frames[clip.kept.repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1).expand_as(rebuilt)])
    uniform = replenishment_psnr(clip.frames, uniform_frames_mask(64, ROWS, ROWS, 2048), P)
    assert replenishment_psnr(clip.frames, clip.kept, P) > uniform + 1.0


def test_motion_cells_fill_each_block_over_its_area_in_pixels():
    mvs = np.array([(-1, 16, 8, 0, 0, 8, 4, 0, 12, -4, 4),  # 16x8 block at the top-left, (3, -1) px
                    (1, 8, 8, 0, 0, 20, 20, 0, 40, 40, 4)],  # future reference (L1): ignored
                   dtype=MV_DTYPE)
    vx, vy = motion_cells(mvs, (8, 8))
    assert np.all(vx[:2, :4] == 3) and np.all(vy[:2, :4] == -1)
    assert vx.sum() == 3 * 8 and np.count_nonzero(vy) == 8


def test_motion_cells_drop_blocks_outside_the_frame_and_still_ones():
    """A block past the frame's edge (coded rows below a 1080-line picture) and a still one add nothing, whether
    the other blocks come with them or alone (the copy-free path taken when every block moves and lies inside)."""
    inside = [(-1, 16, 8, 0, 0, 8, 4, 0, 12, -4, 4), (-1, 8, 8, 0, 0, 20, 20, 0, -8, 6, 4)]
    past_edge = (-1, 16, 16, 0, 0, 8, 40, 0, 100, 100, 4)  # rows 32..47 of a 32-row frame
    still = (-1, 16, 16, 0, 0, 24, 8, 0, 0, 0, 4)
    alone = motion_cells(np.array(inside, dtype=MV_DTYPE), (8, 8))
    mixed = motion_cells(np.array([inside[0], past_edge, still, inside[1]], dtype=MV_DTYPE), (8, 8))
    for a, b in zip(alone, mixed):
        np.testing.assert_array_equal(a, b)
    assert alone[0].sum() == 3 * 8 - 2 * 4 and np.count_nonzero(alone[1]) == 8 + 4
    assert camera_free_motion(np.array([past_edge], dtype=MV_DTYPE), (8, 8)).sum() == 0


# --- bad input -------------------------------------------------------------------------------------------


def test_unreadable_files_raise_one_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    audio = tmp_path / "audio.mka"
    with av.open(os.fspath(audio), "w") as c:
        s = c.add_stream("mp2", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    cases = {tmp_path / "missing.mp4": "no such file", empty: "empty", noise: "not a readable video",
             audio: "no video stream", tmp_path: "directory"}
    for path, reason in cases.items():
        with pytest.raises(VideoDecodeError, match=reason) as err:
            select_patches(path)
        assert str(path) in str(err.value)


def test_truncated_file_gives_a_result_or_a_clear_error(tmp_path):
    meta = write_video(tmp_path / "whole.mkv", num_frames=80, width=W, height=H)
    data = open(meta["path"], "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])  # Matroska: frames up to the cut stay decodable
    clip = select_patches(cut, budget=512)
    assert len(clip) == 512 and clip.frame_ids.max() < 80
    mp4 = write_video(tmp_path / "whole.mp4", num_frames=24, width=W, height=H)
    cut_mp4 = tmp_path / "cut.mp4"
    cut_mp4.write_bytes(open(mp4["path"], "rb").read()[:-2000])  # loses the index at the end
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        select_patches(cut_mp4, budget=512)


@pytest.mark.parametrize("pix_fmt,codec", [("yuv420p10le", "h264"), ("yuvj420p", "h264"), ("yuv420p10le", "hevc")])
def test_high_bit_depth_and_full_range_videos_select_the_moving_objects(tmp_path, pix_fmt, codec):
    meta = write_video(tmp_path / "v.mp4", codec=codec, num_frames=72, width=W, height=H, pix_fmt=pix_fmt)
    clip = select_patches(meta["path"], budget=1024)
    moving = _moving_patches(meta, clip.frame_ids)
    kept = clip.kept.clone()
    kept[0] = False
    assert (kept & moving).sum() / kept.sum() > 0.8


def test_odd_sizes_and_rotation_metadata(tmp_path):
    odd = write_video(tmp_path / "odd.mp4", num_frames=70, width=321, height=239, pix_fmt="yuv444p")
    clip = select_patches(odd["path"], budget=1024)
    assert len(clip) == 1024
    rotated = write_video(tmp_path / "rot.mp4", num_frames=70, width=W, height=H, rotation=90)
    clip = select_patches(rotated["path"], budget=1024, keep_frames=True)
    with av.open(rotated["path"]) as c:
        first = next(c.decode(video=0))
        raw = first.to_ndarray(format="rgb24")
    upright, _ = resize_frames(np.rot90(raw, 1)[None].copy(), SIZE)  # display matrix: +90 = a quarter turn left
    assert _same_picture(clip.frames[0], upright[0])
    assert not _same_picture(clip.frames[0], resize_frames(raw[None].copy(), SIZE)[0][0])
    # Ground truth turned the same way: the selection still follows the objects.
    meta = dict(rotated, moving_masks=np.rot90(rotated["moving_masks"], 1, axes=(1, 2)))
    kept = clip.kept.clone()
    kept[0] = False
    assert (kept & _moving_patches(meta, clip.frame_ids)).sum() / kept.sum() > 0.8


# --- ove select --------------------------------------------------------------------------------------------


def test_ove_select_writes_picture_and_selection_and_fails_cleanly(videos, tmp_path, capsys):
    from PIL import Image

    from onevision_encoder.cli import main

    picture, saved = tmp_path / "sheet.png", tmp_path / "sel.npz"
    assert main(["select", videos["h264"]["path"], "--budget", "1024", "--out", str(picture), "--save", str(saved)]) == 0
    assert "kept 1024 of 16384 patches" in capsys.readouterr().out
    assert Image.open(picture).size[0] > 8 * 64
    with np.load(saved, allow_pickle=False) as data:
        assert data["patch_positions"].shape == (1024, 3) and data["scores"].shape == (64, ROWS, ROWS)
        assert data["kept"].sum() == 1024
    assert main(["select", str(tmp_path / "missing.mp4")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.mp4" in err and "Traceback" not in err
    assert main(["select", videos["h264"]["path"], "--budget", "-3"]) == 2
    assert "budget" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["balanced", "reference"])
def test_scan_for_one_policy_selects_the_same_as_a_full_scan(videos, policy):
    path = videos["h264"]["path"]
    full = scan_video(path)
    only = scan_video(path, policy=policy)
    torch.testing.assert_close(patch_scores(only, policy), patch_scores(full, policy))
    other = "reference" if policy == "balanced" else "balanced"
    with pytest.raises(ValueError, match="did not measure"):
        patch_scores(only, other)
    assert torch.equal(select_patches(path, policy=policy).kept,
                       choose_patches(patch_scores(full, policy), full.valid, 2048, (0,), policy == "balanced"))


def test_block_weighted_camera_free_motion_equals_the_per_cell_definition(tmp_path):
    vectors = _pan_motion_vectors(tmp_path)
    shape = (-(-H // 4), -(-W // 4))
    compared = 0
    for mvs in vectors:
        per_cell = _camera_free_magnitude(*motion_cells(mvs, shape, 4))
        np.testing.assert_allclose(camera_free_motion(mvs, shape, 4), per_cell, atol=1e-4)
        compared += mvs is not None and per_cell.max() > 0
    assert compared > 10  # the pan gives real, non-zero motion on most frames
    # Weights matter: eight 4x4 blocks moving by 10 px against three still 32x32 blocks (and still,
    # uncovered cells) must give a median of 0, not the 10 an unweighted median of the blocks gives.
    blocks = np.zeros(11, dtype=next(m for m in vectors if m is not None).dtype)
    blocks["source"], blocks["motion_scale"] = -1, 1
    blocks["w"][:8] = blocks["h"][:8] = 4
    blocks["dst_x"][:8], blocks["dst_y"][:8], blocks["motion_x"][:8] = (8 + np.arange(8)) * 4 + 2, 12 * 4 + 2, 10
    blocks["w"][8:] = blocks["h"][8:] = 32  # three quadrants; the small blocks lie in the fourth, on cell row 12
    blocks["dst_x"][8:], blocks["dst_y"][8:] = [16, 48, 16], [16, 16, 48]
    magnitude = camera_free_motion(blocks, (16, 16), 4)
    assert magnitude[12, 8:].tolist() == [10.0] * 8 and magnitude.sum() == 80
    np.testing.assert_allclose(magnitude, _camera_free_magnitude(*motion_cells(blocks, (16, 16), 4)))


def test_block_motion_finds_a_known_shift_and_reads_flat_areas_as_still():
    from onevision_encoder.codec import block_motion

    rng = np.random.default_rng(0)
    previous = rng.uniform(0, 255, (45, 80)).astype(np.float32)
    current = np.roll(previous, (2, -3), axis=(0, 1))  # current[y, x] = previous[y - 2, x + 3]
    vx, vy = block_motion(previous, current, cell=4)
    inner = (slice(8, -8), slice(8, -8))  # away from the wrapped-around border
    assert np.all(vx[inner] == 12) and np.all(vy[inner] == -8)  # where each block came from, in pixels
    flat = np.full((23, 41), 90.0, np.float32)  # odd size, every shift ties: the smallest (none) wins
    vx, vy = block_motion(flat, flat)
    assert vx.shape == (23, 41) and not vx.any() and not vy.any()


def test_skipping_undecoded_b_frames_changes_no_selection(tmp_path, monkeypatch):
    path = write_video(tmp_path / "b.mp4", num_frames=90, width=W, height=H, bf=3)["path"]
    skipped = scan_video(path)
    frames = VideoFile.frames
    decoded = []

    def decode_all(self, export_motion_vectors=False, needed=None, numbering=None):  # count, skip nothing
        for number, frame in frames(self, export_motion_vectors):
            decoded.append(number)
            yield number, frame

    monkeypatch.setattr(VideoFile, "frames", decode_all)
    whole = scan_video(path)
    assert decoded == list(range(90))
    assert torch.equal(skipped.frames, whole.frames)
    for name in ("own_motion", "residual", "motion_since", "change_since"):
        np.testing.assert_array_equal(getattr(skipped, name), getattr(whole, name))
    assert np.abs(whole.motion_since).sum() > 0


def test_motion_on_16_pixel_cells_is_the_mean_of_the_4_pixel_cells(tmp_path):
    """Large frames fill motion blocks on 8- or 16-pixel squares (sub-blocks weighted by their share of a
    square) instead of the 4-pixel grid: the result must be the area mean of the 4-pixel cells."""
    vectors = _pan_motion_vectors(tmp_path)
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


def test_motion_of_several_frames_worked_out_together_is_the_sum_of_each(tmp_path):
    from onevision_encoder.codec.motion import _BlockCanvas, _camera_free_cells

    vectors = _pan_motion_vectors(tmp_path)
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


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_scan_without_worker_threads_equals_the_threaded_scan(videos, codec, torch_threads):
    """With one torch thread (as in a DataLoader worker) everything runs inline, with the same result."""
    path = videos[codec]["path"]
    with torch_threads(2):
        threaded = scan_video(path)
    with torch_threads(1):
        inline = scan_video(path)
    assert torch.equal(threaded.pictures, inline.pictures)
    for name in ("own_motion", "residual", "motion_since", "change_since"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(inline, name))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_worker_threads_run_a_little_below_the_callers_priority():
    from onevision_encoder.codec.workers import WORKER_NICENESS, _worker_pool

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    pool = _worker_pool(1)
    try:
        worker, worker_torch_threads = pool.submit(lambda: (nice(), torch.get_num_threads())).result()
    finally:
        pool.shutdown()
    assert worker == min(19, nice() + WORKER_NICENESS)
    assert worker > nice() or nice() == 19  # below the caller, unless it is already at the bottom
    assert worker_torch_threads == 1


def test_a_sampled_frame_the_decoder_drops_repeats_the_one_before(videos, monkeypatch):
    path = videos["h264"]["path"]
    whole = scan_video(path, num_frames=16)
    painted = scan_video(path, num_frames=16, pictures=False).frames  # kept patches painted from held frames
    dropped = int(whole.frame_ids[5])
    frames = VideoFile.frames

    def dropping(self, *args, **kwargs):  # as when a broken frame is concealed away by the decoder
        return ((n, f) for n, f in frames(self, *args, **kwargs) if n not in (0, dropped))

    monkeypatch.setattr(VideoFile, "frames", dropping)
    gappy = scan_video(path, num_frames=16)
    expected = whole.frame_ids.copy()
    expected[5], expected[0] = expected[4], expected[1]  # the gap shows the frame before; frame 0, the next
    assert gappy.frame_ids.tolist() == expected.tolist()
    assert torch.equal(gappy.pictures[5], whole.pictures[4]) and torch.equal(gappy.pictures[0], whole.pictures[1])
    assert torch.equal(gappy.pictures[6:], whole.pictures[6:])
    # the same when the kept patches are painted from held frames afterwards
    gappy_painted = scan_video(path, num_frames=16, pictures=False).frames
    assert torch.equal(gappy_painted[5], painted[4]) and torch.equal(gappy_painted[0], painted[1])
    assert torch.equal(gappy_painted[6:], painted[6:]) and not torch.equal(painted[5], painted[4])


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
