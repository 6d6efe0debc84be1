"""How the probe reads clips: TSN indices (training and evaluation), our model's time slots, the decoded
frames against a plain decode, codec mode against `select_patches`, and the colour jitter."""

import numpy as np
import pytest
import torch

from onevision_encoder import select_patches
from onevision_encoder.probe.clips import ProbeClips, colour_jitter, time_slots, tsn_indices
from onevision_encoder.processing import patchify, preprocess_video
from onevision_encoder.synthetic import write_video
from onevision_encoder.codec.video import decode_frames


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clips") / "v.mp4", num_frames=40, width=96, height=72)["path"]


def test_tsn_indices_segment_centres_random_offsets_and_short_clips():
    assert tsn_indices(41, 8).tolist() == [int(5 * i + 2.5) for i in range(8)]
    rng = np.random.default_rng(0)
    drawn = np.stack([tsn_indices(41, 8, rng) for _ in range(200)])
    assert ((drawn >= 5 * np.arange(8)) & (drawn < 5 * np.arange(8) + 5)).all()  # inside its own segment
    assert len(np.unique(drawn[:, 3])) == 5  # every frame of the segment gets drawn
    assert tsn_indices(5, 8).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_time_slots_put_frame_numbers_on_the_64_slot_grid():
    assert time_slots(np.array([0, 20, 40]), 41).tolist() == [0, 32, 63]
    assert time_slots(np.array([0, 0]), 1).tolist() == [0, 0]


def test_frames_mode_gives_the_sampled_frames_at_their_slots(video):
    reader = ProbeClips("tsn", 8, None, 14, 224)
    clip = reader.load(video)
    indices = tsn_indices(40, 8)
    decoded = [f.to_ndarray(format="rgb24") for _, f in decode_frames(video)]
    expected = patchify(preprocess_video(np.stack([decoded[i] for i in indices])).transpose(0, 1), 14).flatten(0, 1)
    torch.testing.assert_close(clip.pixel_values, expected, atol=1e-5, rtol=1e-5)
    assert clip.patch_positions[::256, 0].tolist() == time_slots(indices, 40).tolist()
    ordinal = ProbeClips("tsn", 8, None, 14, 224, ordinal_time=True).load(video)
    assert ordinal.patch_positions[::256, 0].tolist() == list(range(8))


def test_codec_mode_is_select_patches_and_other_statistics_renormalise(video):
    clip = ProbeClips("codec", 16, 512, 14, 224).load(video)
    expected = select_patches(video, num_frames=16, budget=512, size=224, patch_size=14)
    torch.testing.assert_close(clip.pixel_values, expected.pixel_values, atol=1e-5, rtol=1e-5)
    assert torch.equal(clip.patch_positions, expected.patch_positions)
    half = ProbeClips("tsn", 2, None, 14, 224, mean=(0.5,) * 3, std=(0.5,) * 3).load(video)
    assert half.pixel_values.min() >= -1 - 1e-5 and half.pixel_values.max() <= 1 + 1e-5


def test_training_sampling_varies_with_the_rng_and_jitter_stays_in_range(video):
    reader = ProbeClips("tsn", 8, None, 14, 224)
    a = reader.load(video, np.random.default_rng(1), jitter=True)
    b = reader.load(video, np.random.default_rng(1), jitter=True)
    c = reader.load(video, np.random.default_rng(2), jitter=True)
    assert torch.equal(a.pixel_values, b.pixel_values) and not torch.equal(a.pixel_values, c.pixel_values)
    pixels = torch.rand(10, 3, 4)
    jittered = colour_jitter(pixels.clone(), np.random.default_rng(0))
    assert jittered.min() >= 0 and jittered.max() <= 1
    ratio = (jittered.mean() / pixels.mean()).item()
    assert 0.8 < ratio < 1.2  # never the published near-black multiplier


def test_whole_frames_pass_through_to_the_selection(video):
    from onevision_encoder.probe import ProbeError, ProbeSettings

    clip = ProbeClips("codec", 16, 768, 14, 224, whole_frames=(0, 8)).load(video)
    expected = select_patches(video, num_frames=16, budget=768, size=224, patch_size=14, whole_frames=(0, 8))
    assert torch.equal(clip.patch_positions, expected.patch_positions)
    assert int((expected.kept[8]).sum()) == 256
    with pytest.raises(ProbeError, match="only applies to codec mode"):
        ProbeSettings("m", "t", "v", "o", mode="frames", whole_frames=(0,))
    with pytest.raises(ValueError, match="out of range"):
        ProbeSettings("m", "t", "v", "o", mode="codec", frames=16, whole_frames=(16,))
