"""Native resolution for the encoder alone: images at their own size in whole patches (no crop), through
the processing helper and `ove encode --resolution native`."""

import os

import pytest
import torch
from PIL import Image

from onevision_encoder import Encoder, OneVisionEncoderModel
from onevision_encoder.cli import main
from onevision_encoder.processing import native_image, native_size, patchify
from onevision_encoder.synthetic import write_image

TINY = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")


def test_native_size_keeps_the_aspect_in_whole_patches_and_refuses_or_shrinks_big_images():
    assert native_size(60, 100) == (56, 98)  # 4.3 and 7.1 patches round to 4 x 7
    assert native_size(3, 500) == (14, 504)  # at least one patch a side
    with pytest.raises(ValueError, match=r"a 2000x1500 image is 2002x1498 pixels .* over the maximum of 1254400"):
        native_size(1500, 2000)
    h, w = native_size(1500, 2000, downscale=True)
    assert h * w <= 1120 * 1120 and h % 14 == 0 and w % 14 == 0
    assert abs(w / h - 2000 / 1500) < 0.02 and (h + 14) * (w + 14) > 1120 * 1120  # as large as fits


def test_ove_encode_native_keeps_the_whole_page(tmp_path):
    """A wide 'document' keeps its size (no 448 centre crop): its tokens cover the rounded grid, and the
    features are the model's on that image."""
    path = write_image(tmp_path / "page.png", width=100, height=60, seed=4)
    assert main(["encode", str(path), "--model", TINY, "--mode", "image", "--resolution", "native", "--tokens",
                 "--workers", "0", "--out", str(tmp_path / "out")]) == 0
    encoder = Encoder(TINY, mode="image", resolution="native", tokens=True, workers=0, progress=False)
    features = encoder.encode([path])
    assert features.records[0]["size"] == "native" and features.records[0]["num_tokens"] == 4 * 7
    assert features.positions(0)[:, 1:].amax(0).tolist() == [3, 6]
    model = OneVisionEncoderModel.from_pretrained(TINY).eval()
    with Image.open(path) as image:
        pixels = native_image(image)
    with torch.no_grad():
        expected = model(pixels[None]).pooler_output[0]
    torch.testing.assert_close(features.pooled[0], expected, atol=1e-4, rtol=1e-4)
    assert patchify(pixels, 14).shape == (28, 588)


def test_native_resolution_is_refused_for_an_encoder_of_a_fixed_size(tiny_siglip):
    """Only our model takes images of any size in whole patches; a SigLIP tower gets one clear error."""
    with pytest.raises(ValueError, match="resolution 'native' is for the OneVision Encoder"):
        Encoder(tiny_siglip, resolution="native", workers=0)
    with pytest.raises(ValueError, match="resolution must be one of"):
        Encoder(TINY, resolution="square", workers=0)
