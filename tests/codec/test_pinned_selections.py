"""Selections pinned before the codec code was reorganised: the same generated clips must select exactly
the same patches, in the same order, with the same scores.

`tests/data/codec_pinned_selections.npz` was written by this module (`python
tests/codec/test_pinned_selections.py --write`) with the code as it stood before the move into the `codec/`
subpackage. Rewrite it only for a change that is meant to change selections, and say so in its commit.
Rewritten once since, for the "reference" entries only, when that policy was made to follow the published
reader (REFERENCE section 4); the "balanced" entries are still those of the code before the move.
"""

import hashlib
import os
import sys

import numpy as np

from onevision_encoder import select_patches
from onevision_encoder.synthetic import write_video

PINNED = os.path.join(os.path.dirname(__file__), "..", "data", "codec_pinned_selections.npz")
# (clip name, write_video options): B-frames (skipped non-reference frames), HEVC (block matching), a pan
CLIPS = {
    "objects-h264": dict(codec="h264", scene="objects", bf=2),
    "objects-hevc": dict(codec="hevc", scene="objects"),
    "pan-h264": dict(codec="h264", scene="pan"),
}
SETTINGS = [(policy, resize) for policy in ("balanced", "reference") for resize in ("crop", "letterbox")]
FIELDS = ("patch_positions", "frame_ids", "scores", "kept")


def _clips(folder) -> dict[str, str]:
    return {name: write_video(os.path.join(folder, f"{name}.mp4"), num_frames=48, width=192, height=144,
                              **options)["path"] for name, options in CLIPS.items()}


def _selections(paths: dict[str, str]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, path in paths.items():
        with open(path, "rb") as f:
            arrays[f"{name}/sha256"] = np.frombuffer(hashlib.sha256(f.read()).digest(), np.uint8)
        for policy, resize in SETTINGS:
            clip = select_patches(path, num_frames=24, budget=0.3, policy=policy, resize=resize)
            for field in FIELDS:
                arrays[f"{name}/{policy}/{resize}/{field}"] = getattr(clip, field).numpy()
    return arrays


def test_selections_equal_the_pinned_ones(tmp_path):
    with np.load(PINNED, allow_pickle=False) as data:
        pinned = dict(data)
    now = _selections(_clips(tmp_path))
    assert sorted(now) == sorted(pinned)
    for key in sorted(now):
        if key.endswith("sha256"):
            # The clips are written afresh: a different encoder build would change them, not the selection.
            assert np.array_equal(now[key], pinned[key]), f"{key}: the encoder wrote a different clip"
            continue
        assert now[key].dtype == pinned[key].dtype and np.array_equal(now[key], pinned[key]), f"{key} changed"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        np.savez_compressed(PINNED, **_selections(_clips(folder)))
    print(f"wrote {PINNED} ({os.path.getsize(PINNED)} bytes)")
