"""Preprocessing: the published CLIP image pipeline, patch lists, slots and padding."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

import onevision_encoder as ove
from onevision_encoder.processing import SquarePlan, resize_frames


def test_auto_image_processor_from_saved_config(tmp_path):
    path = ove.save_preprocessor_config(tmp_path)
    assert path.endswith("preprocessor_config.json")
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    yy, xx = np.mgrid[0:300, 0:500]
    smooth = np.stack([xx / 500 * 255, yy / 300 * 255, (xx + yy) / 800 * 255], -1).astype(np.uint8)
    image = Image.fromarray(smooth)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 448, 448)
    # independent check: PIL bicubic short side -> 448, centre crop, CLIP normalisation
    resized = np.asarray(image.resize((746, 448), Image.BICUBIC), dtype=np.float32) / 255
    left = (746 - 448) // 2
    crop = resized[:, left : left + 448]
    expected = (crop - np.array(ove.CLIP_MEAN)) / np.array(ove.CLIP_STD)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=0.05)


def test_patchify_matches_conv_layout():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 42)
    weight = torch.randn(8, 3, 14, 14)
    conv = torch.nn.functional.conv2d(pixels, weight, stride=14).flatten(2).transpose(1, 2)
    linear = ove.patchify(pixels, 14) @ weight.flatten(1).T
    torch.testing.assert_close(linear, conv, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ove.patchify(torch.randn(3, 20, 28), 14)


def test_temporal_slots():
    assert ove.temporal_slots(16).tolist() == [round(i / 15 * 63) for i in range(16)]
    assert ove.temporal_slots(64).tolist() == list(range(64))
    assert ove.temporal_slots(1).tolist() == [0]
    with pytest.raises(ValueError):
        ove.temporal_slots(0)


def test_resize_frames_crop_and_letterbox():
    frames = np.zeros((2, 120, 240, 3), dtype=np.uint8)
    frames[:, :, :120] = 255  # left half white
    crop, geo = resize_frames(frames, 56, mode="crop")
    assert crop.shape == (2, 3, 56, 56) and (geo.height, geo.width) == (56, 56)
    assert crop[:, :, :, :20].mean() > 0.95 and crop[:, :, :, -20:].mean() < 0.05  # centre crop spans the edge
    box, geo = resize_frames(frames, 56, mode="letterbox")
    assert (geo.top, geo.height, geo.width) == (14, 28, 56)
    normalised = ove.processing.normalize(box)
    assert normalised[:, :, :14].abs().max() < 1e-5  # padding is the CLIP mean, i.e. zero after normalising
    valid = geo.valid_patches(14)
    assert valid.tolist() == [[False] * 4, [True] * 4, [True] * 4, [False] * 4]
    with pytest.raises(ValueError, match="resize mode"):
        resize_frames(frames, 56, mode="stretch")
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        resize_frames(frames[0], 56)
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frames / 255.0, 56)


@pytest.mark.parametrize("mode", ["crop", "letterbox"])
@pytest.mark.parametrize("channels", [3, 4])
def test_resample_gives_exactly_torch_antialiased_bicubic(mode, channels):
    """`SquarePlan.resample` calls torch's kernel with a channels-last output of its own (faster): the pixels
    must be exactly those of `F.interpolate(..., mode="bicubic", antialias=True)`, whatever the layout."""
    frame = np.random.default_rng(1).integers(0, 256, (90, 161, channels), dtype=np.uint8)
    plan = SquarePlan.for_picture(90, 161, 56, mode)
    got = plan.resample(frame)
    full = torch.nn.functional.interpolate(torch.from_numpy(frame).permute(2, 0, 1)[None].contiguous(),
                                           size=(plan.resized_height, plan.resized_width), mode="bicubic",
                                           antialias=True)[0]
    if mode == "crop":
        full = full[:, plan.top : plan.top + 56, plan.left : plan.left + 56]
    assert got.dtype == torch.uint8 and got.shape == full.shape
    assert torch.equal(got, full)


def test_collate_pads_and_checks():
    a = ove.PatchClip(torch.ones(3, 12), torch.ones(3, 3, dtype=torch.long))
    b = (torch.full((5, 12), 2.0), torch.full((5, 3), 2, dtype=torch.long))
    batch = ove.collate_patch_lists([a, b])
    assert batch["pixel_values"].shape == (2, 5, 12)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["pixel_values"][0, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="different patch sizes"):
        ove.collate_patch_lists([a, (torch.ones(2, 10), torch.ones(2, 3))])
    with pytest.raises(ValueError, match="at least one"):
        ove.collate_patch_lists([])
