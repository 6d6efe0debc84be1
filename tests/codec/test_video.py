"""Streaming decoding: frame numbers, and skipping the frames nobody needs."""

import numpy as np
import pytest

from onevision_encoder.synthetic import write_video
from onevision_encoder.codec.video import VideoDecodeError, VideoFile, decode_frames, motion_vectors, probe_video

W, H = 192, 144


@pytest.fixture(scope="module", params=[("h264", "mp4"), ("hevc", "mkv"), ("mpeg4", "avi")])
def b_frame_video(request, tmp_path_factory):
    """A stream with B-frames, most of which no other frame is predicted from."""
    codec, ext = request.param
    opts = {"bf": 3} if codec != "hevc" else {"x265-params": "bframes=3:log-level=none"}
    return write_video(tmp_path_factory.mktemp("v") / f"b.{ext}", codec=codec, num_frames=48, width=W, height=H, **opts)


def _all_frames(path):
    return {number: frame.to_ndarray(format="gray") for number, frame in decode_frames(path)}


def test_skipping_unneeded_frames_keeps_numbers_and_pixels(b_frame_video):
    path = b_frame_video["path"]
    everything = _all_frames(path)
    assert sorted(everything) == list(range(48))
    wanted = {0, 5, 6, 17, 30, 46, 47}
    decoded = {number: frame.to_ndarray(format="gray") for number, frame in decode_frames(path, needed=wanted.__contains__)}
    assert wanted <= decoded.keys()
    assert len(decoded) < 40  # non-reference B-frames nobody asked for were not decoded
    assert list(decoded) == sorted(decoded)  # still in presentation order
    for number, pixels in decoded.items():  # same numbering as decoding everything, same pictures
        np.testing.assert_array_equal(pixels, everything[number])


def test_reading_motion_vectors_lets_each_frame_go(tmp_path):
    """A streaming pass must not keep the frames whose vectors it read (each holds a decoded picture): no
    reference from the vectors to the frame, and no cycle that only the garbage collector would free."""
    import gc

    import av

    path = write_video(tmp_path / "b.mp4", num_frames=30, width=W, height=H, bf=2)["path"]
    frames_alive = lambda: sum(type(o) is av.VideoFrame for o in gc.get_objects())  # noqa: E731
    gc.collect()
    before, kept, with_vectors = frames_alive(), [], 0
    gc.disable()
    try:
        for _, frame in decode_frames(path, export_motion_vectors=True):
            vectors = motion_vectors(frame)
            if vectors is not None:
                with_vectors += 1
                kept.append(vectors)
        del frame
        alive = frames_alive() - before
    finally:
        gc.enable()
    assert with_vectors > 20 and alive == 0
    def memory_of(array):  # the array at the root of a chain of NumPy views
        while isinstance(array.base, np.ndarray):
            array = array.base
        return array

    assert all(memory_of(v).flags.owndata for v in kept)  # arrays of their own, not views into the frames
    assert {"motion_x", "motion_y", "motion_scale", "source"} <= set(kept[0].dtype.names)


def test_motion_vectors_are_pyav_s_records_and_the_moving_l0_ones_a_subset(tmp_path):
    """Read through NumPy's buffer view, the vectors are what PyAV's own `to_ndarray` gives, record for record;
    `moving_l0` keeps exactly the past-referencing blocks that move, in order."""
    import av
    from av.sidedata.sidedata import SideDataContainer
    from av.sidedata.sidedata import Type as SideDataType

    path = write_video(tmp_path / "b.mp4", scene="pan", num_frames=20, width=W, height=H, bf=2)["path"]
    compared = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        for frame in container.decode(stream):
            side = SideDataContainer(frame).get(SideDataType.MOTION_VECTORS)
            vectors, moving = motion_vectors(frame), motion_vectors(frame, moving_l0=True)
            if side is None:
                assert vectors is None and moving is None
                continue
            want = side.to_ndarray()
            assert vectors.dtype == want.dtype and np.array_equal(vectors, want)
            keep = (want["source"] < 0) & ((want["motion_x"] != 0) | (want["motion_y"] != 0))
            assert np.array_equal(moving, want[keep])
            compared += 1
    assert compared > 10


def test_probe_reads_presentation_numbers_only_when_asked(b_frame_video):
    path = b_frame_video["path"]
    assert probe_video(path).presentation_numbers is None
    numbers = probe_video(path, timestamps=True).presentation_numbers
    assert sorted(numbers.values()) == list(range(48))
    assert list(numbers) == sorted(numbers)  # numbered by presentation time, not by decoding order


def test_unreadable_file_is_one_error_with_or_without_skipping(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for needed in (None, {0}.__contains__):
        with pytest.raises(VideoDecodeError, match="noise.mp4"):
            list(decode_frames(noise, needed=needed))


def test_raw_stream_without_timestamps_is_decoded_whole_and_counted(tmp_path):
    path = write_video(tmp_path / "raw.h264", num_frames=30, width=W, height=H, bf=2)["path"]
    info = probe_video(path, timestamps=True)
    assert info.frame_count == 30 and info.presentation_numbers is None  # no pts: nothing can be skipped
    numbers = [number for number, _ in decode_frames(path, needed={0, 5}.__contains__)]
    assert numbers == list(range(30))


def test_a_container_that_cannot_seek_back_is_opened_again(b_frame_video, monkeypatch):
    import av

    path = b_frame_video["path"]
    expected = _all_frames(path)

    refused = []

    def refuse(self, *args, **kwargs):
        refused.append(args)
        raise av.error.PermissionError(1, "seeking refused by the test")

    monkeypatch.setattr(av.container.InputContainer, "seek", refuse)
    with VideoFile(path) as video:
        numbering = video.info(timestamps=True).presentation_numbers  # reads every packet
        got = {n: f.to_ndarray(format="gray") for n, f in video.frames(needed={3, 40}.__contains__, numbering=numbering)}
    assert refused and {3, 40} <= got.keys()
    for number, pixels in got.items():
        np.testing.assert_array_equal(pixels, expected[number])


def test_frames_cut_off_by_an_edit_list_are_neither_counted_nor_numbered(tmp_path):
    """An MP4 whose edit list starts 3 frames into the stream (a clip cut without re-encoding): the decoder
    never shows those 3, so they get no frame number, with or without skipping."""
    import fractions

    import av

    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"bf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):  # pts -3, -2, -1 come before the edit list's start
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i - 3, fractions.Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert probe_video(path, timestamps=True).frame_count == 17
    everything = _all_frames(path)
    assert sorted(everything) == list(range(17)) and abs(everything[0].mean() - 30) < 3  # shown from pts 0
    decoded = {n: f.to_ndarray(format="gray") for n, f in decode_frames(path, needed={0, 8, 16}.__contains__)}
    for number, pixels in decoded.items():
        np.testing.assert_array_equal(pixels, everything[number])

    from onevision_encoder import sample_frames

    clip = sample_frames(path, num_frames=17, size=28, patch_size=14)
    assert clip.frame_ids.tolist() == list(range(17))
