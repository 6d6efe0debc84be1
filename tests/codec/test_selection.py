"""Codec-style patch selection on generated videos whose moving regions are known."""

import os

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
from onevision_encoder.codec import replenish, uniform_frames_mask
from onevision_encoder.processing import normalize, patchify, resize_frames
from onevision_encoder.synthetic import write_video

SIZE, P = 224, 14
ROWS = SIZE // P
W, H = 192, 144  # the clips made here as small as the shared ones (`videos`, conftest.py)


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

