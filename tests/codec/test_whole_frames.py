"""`whole_frames`: the sampled frames kept whole, the rest of the budget by score (select_patches, ove select,
ove encode)."""

import os

import numpy as np
import pytest
import torch

from onevision_encoder import select_patches
from onevision_encoder.cli import build_parser, main
from onevision_encoder.encode.inputs import Preprocessing
from onevision_encoder.synthetic import write_video

ROWS = 16
KEY_FRAMES = [0, 16, 32, 48]  # the published training data's convention: a key frame every 16 of 64


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    return {scene: write_video(root / f"{scene}.mp4", scene=scene, num_frames=72, width=192, height=144)["path"]
            for scene in ("objects", "static")}


@pytest.mark.parametrize("policy", ["balanced", "reference"])
def test_whole_frames_are_kept_whole_and_the_rest_goes_by_score(clips, policy):
    clip = select_patches(clips["objects"], budget=2048, policy=policy, whole_frames=KEY_FRAMES)
    per_frame = clip.kept.sum((1, 2))
    assert per_frame[KEY_FRAMES].tolist() == [ROWS * ROWS] * 4 and len(clip) == 2048
    others = torch.ones(64, dtype=torch.bool)
    others[KEY_FRAMES] = False
    # a global top-K over the other frames: no kept patch there scores below a patch left out
    kept_scores, left_scores = clip.scores[others][clip.kept[others]], clip.scores[others][~clip.kept[others]]
    assert kept_scores.min() >= left_scores.max() and kept_scores.max() > 0
    assert per_frame[others].sum() == 2048 - 4 * ROWS * ROWS
    # the positions follow: four whole frames at slots 0, 16, 32, 48
    slots, counts = clip.patch_positions[:, 0].unique(return_counts=True)
    assert {s: c for s, c in zip(slots.tolist(), counts.tolist()) if c == ROWS * ROWS}.keys() >= set(KEY_FRAMES)


def test_default_is_frame_0_and_keep_first_frame_false_is_no_whole_frame(clips):
    path = clips["objects"]
    default = select_patches(path, budget=1024)
    assert torch.equal(default.kept, select_patches(path, budget=1024, whole_frames=[0]).kept)
    none = select_patches(path, budget=1024, keep_first_frame=False)
    assert torch.equal(none.kept, select_patches(path, budget=1024, whole_frames=[]).kept)
    assert not none.kept[0].all() and none.kept.sum() == 1024


def test_static_video_fills_between_the_whole_frames(clips):
    clip = select_patches(clips["static"], budget=4 * ROWS * ROWS, whole_frames=[0, 32])
    whole = torch.nonzero(clip.kept.sum((1, 2)) == ROWS * ROWS).squeeze(1).tolist()
    # two more whole frames where the clip is farthest from a kept one: the end, then the first half
    assert whole == [0, 16, 32, 63] and len(clip) == 4 * ROWS * ROWS


@pytest.mark.parametrize("whole, message", [
    ([0, 64], "whole frame 64 is out of range: the sampled frames are 0..63"),
    ([-1], "whole frame -1 is out of range"),
    ([0, 16, 16], r"names frame\(s\) \[16\] more than once"),
    ([0, 1.5], "integer frame indices"),
    ("0,16", "list of sampled-frame indices"),
])
def test_bad_whole_frames_are_one_clear_error_before_decoding(tmp_path, whole, message):
    missing = tmp_path / "not-decoded.mp4"  # the check comes first: no decoding error
    with pytest.raises(ValueError, match=message):
        select_patches(missing, whole_frames=whole)


def test_budget_must_hold_the_whole_frames(clips):
    with pytest.raises(ValueError, match=r"smaller than the 4 whole frame\(s\) \[0, 16, 32, 48\] \(1024 patches\)"):
        select_patches(clips["objects"], budget=1000, whole_frames=KEY_FRAMES)
    with pytest.raises(ValueError, match="not both"):
        select_patches(clips["objects"], keep_first_frame=False, whole_frames=[0])


def test_ove_select_whole_frames(clips, tmp_path, capsys):
    saved = tmp_path / "sel.npz"
    assert main(["select", clips["objects"], "--whole-frames", "0,16,32,48", "--save", str(saved)]) == 0
    with np.load(saved) as data:
        assert data["kept"][KEY_FRAMES].all() and data["kept"].sum() == 2048
    capsys.readouterr()
    assert main(["select", clips["objects"], "--whole-frames", "0,99"]) == 2
    assert "whole frame 99 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["select", clips["objects"], "--whole-frames", "0,x"])
    assert "expected frame indices" in capsys.readouterr().err
    assert build_parser().parse_args(["select", "v.mp4", "--whole-frames", "none"]).whole_frames == ()


def test_ove_encode_passes_whole_frames_through(clips, tmp_path):
    from onevision_encoder import Encoder

    args = build_parser().parse_args(["encode", "v.mp4", "--out", "d", "--whole-frames", "0,8"])
    assert args.whole_frames == (0, 8)
    loaded = Preprocessing.with_defaults("codec", frames=16, budget=768, whole_frames=args.whole_frames)
    assert loaded.load(clips["objects"]).kept[[0, 8]].all()
    tiny = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
    encoder = Encoder(tiny, frames=16, budget=768, whole_frames=[0, 8], workers=0, progress=False)
    assert encoder.settings.whole_frames == [0, 8]
    features = encoder.encode([clips["objects"]], out=tmp_path / "features")
    assert features.records[0]["whole_frames"] == [0, 8]
    with pytest.raises(ValueError, match="only applies to mode 'codec'"):
        Preprocessing.with_defaults("frames", whole_frames=[0])
    with pytest.raises(ValueError, match=r"between 768 \(3 whole frames\) and 4096"):
        Preprocessing.with_defaults("codec", frames=16, budget=700, whole_frames=[0, 5, 10])
    with pytest.raises(ValueError, match="out of range"):
        Preprocessing.with_defaults("codec", frames=16, whole_frames=[16])
