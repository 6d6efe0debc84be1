"""Fixtures of the codec tests: generated clips whose moving regions are known, and the layout of the motion
vectors as PyAV hands them over."""

import numpy as np
import pytest

from onevision_encoder.codec.video import decode_frames, motion_vectors
from onevision_encoder.synthetic import write_video

W, H = 192, 144  # small frames keep encoding and decoding fast


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """`write_video`'s metadata (path, moving masks, ...) of moving objects in four codecs, a still clip and
    a camera pan, all W x H."""
    root = tmp_path_factory.mktemp("videos")
    made = {}
    for codec, ext in [("h264", "mp4"), ("hevc", "mp4"), ("mpeg4", "mp4"), ("vp9", "webm")]:
        made[codec] = write_video(root / f"objects_{codec}.{ext}", codec=codec, num_frames=80, width=W, height=H)
    made["static"] = write_video(root / "static.mp4", scene="static", num_frames=72, width=W, height=H)
    made["pan"] = write_video(root / "pan.mp4", scene="pan", num_frames=72, width=W, height=H)
    return made


@pytest.fixture(scope="session")
def mv_dtype(videos) -> np.dtype:
    """FFmpeg's AVMotionVector as PyAV exports it, read off a decoded H.264 frame (the package learns it the
    same way), so that hand-made vectors have the layout the decoder gives."""
    vectors = [motion_vectors(frame) for _, frame in decode_frames(videos["h264"]["path"], export_motion_vectors=True)]
    dtype = next(v.dtype for v in vectors if v is not None)
    assert dtype.names == ("source", "w", "h", "src_x", "src_y", "dst_x", "dst_y", "flags", "motion_x", "motion_y",
                           "motion_scale")
    return dtype
