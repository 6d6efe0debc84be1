"""The decoding pass (`codec/scan.py`, `codec/workers.py`): which frames it decodes, what its worker threads do,
and that neither changes what is selected."""

import os
import sys
import threading

import numpy as np
import pytest
import torch

from onevision_encoder import select_patches
from onevision_encoder.codec import choose_patches, patch_scores, scan_video
from onevision_encoder.codec.video import VideoFile
from onevision_encoder.synthetic import write_video


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


def test_skipping_undecoded_b_frames_changes_no_selection(tmp_path, monkeypatch):
    path = write_video(tmp_path / "b.mp4", num_frames=90, width=192, height=144, bf=3)["path"]
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
