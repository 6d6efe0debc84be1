"""The synthetic videos are what the codec tests stand on: check they decode and their ground truth holds."""

import av
import numpy as np
import pytest

from onevision_encoder.synthetic import render_scene, write_image, write_video


@pytest.mark.parametrize("codec,ext", [("h264", "mp4"), ("hevc", "mkv"), ("mpeg4", "mp4"), ("vp9", "webm")])
def test_written_video_decodes_with_its_size_and_frame_count(tmp_path, codec, ext):
    meta = write_video(tmp_path / f"clip.{ext}", codec=codec, num_frames=24, width=160, height=120)
    with av.open(meta["path"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 24
    assert frames[0].shape == (120, 160, 3)
    assert meta["moving_masks"].shape == (24, 120, 160)


def test_objects_scene_masks_cover_what_changes_and_static_stretch_is_still():
    frames, masks, extra = render_scene("objects", 48, 160, 120)
    start, stop = extra["static_frames"]
    assert 0 < start < stop <= 48
    frames = np.stack(frames).astype(int)
    changed = np.abs(frames[1:] - frames[:-1]).max(-1) > 0  # pixels that differ from the previous frame
    assert not changed[start - 1 : stop - 1].any()  # frames start..stop-1 repeat their predecessor
    assert not masks[start:stop].any() and not masks[0].any()
    assert masks[1:start].any(axis=(1, 2)).all()
    # Every change happens inside the ground-truth mask (the background is static).
    assert not (changed & ~masks[1:]).any()


def test_pan_scene_moves_the_background_but_masks_only_the_object():
    frames, masks, extra = render_scene("pan", 8, 160, 120)
    step = extra["pan_pixels_per_frame"]
    assert step > 0
    a, b = frames[3].astype(int), frames[4].astype(int)
    # Away from the object, frame 4 is frame 3 shifted left by `step` pixels.
    outside = ~masks[4][:, :-step] & ~masks[4][:, step:]
    assert np.array_equal(b[:, :-step][outside], a[:, step:][outside])
    assert 0 < masks[4].mean() < 0.2


def test_static_scene_has_no_motion():
    frames, masks, _ = render_scene("static", 6, 64, 48)
    assert not masks.any()
    assert all(np.array_equal(frames[0], f) for f in frames)


def test_pixel_formats_and_rotation_reach_the_file(tmp_path):
    ten_bit = write_video(tmp_path / "a.mp4", num_frames=4, width=64, height=48, pix_fmt="yuv420p10le")
    rotated = write_video(tmp_path / "b.mp4", num_frames=4, width=64, height=48, rotation=90)
    with av.open(ten_bit["path"]) as c:
        assert c.streams.video[0].codec_context.format.name == "yuv420p10le"
    with av.open(rotated["path"]) as c:
        frame = next(c.decode(video=0))
        assert abs(abs(frame.rotation) - 90) < 1e-6


def test_unknown_codec_or_scene_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="codec"):
        write_video(tmp_path / "x.mp4", codec="mjpeg2000")
    with pytest.raises(ValueError, match="scene"):
        render_scene("fireworks", 4, 32, 32)


def test_write_image_writes_a_picture(tmp_path):
    from PIL import Image

    path = write_image(tmp_path / "i.png", width=50, height=30, seed=1)
    assert Image.open(path).size == (50, 30)
