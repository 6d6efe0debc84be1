"""The OneVision LLaVA processor: anyres and native images, codec and uniform video in the published LMM
geometry, the chat template, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from onevision_encoder import select_patches
from onevision_encoder.lmm import OneVisionLlavaProcessor
from onevision_encoder.lmm.processing import ANYRES_PINPOINTS, best_pinpoint
from onevision_encoder.processing import CLIP_MEAN, CLIP_STD
from onevision_encoder.synthetic import write_video

BLACK = [(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("lmm_video") / "objects.mp4", num_frames=80, width=192, height=108,
                       seed=5)["path"]


def grey(width, height):
    return Image.fromarray(np.full((height, width, 3), 200, np.uint8))


@pytest.mark.parametrize("size, canvas, tokens", [
    ((800, 600), (1120, 1120), 6400),  # only the square keeps every pixel
    ((2000, 500), (1694, 574), 4961),  # wide: the wide canvas keeps the most
    ((300, 1000), (574, 1120), 3280),  # tall and small: both tall canvases keep it all, the smaller wastes less
])
def test_anyres_picks_the_published_canvas_and_letterboxes_in_one_pass(processor, size, canvas, tokens):
    assert best_pinpoint(*size) == canvas
    item = processor.image_item(grey(*size))
    assert len(item) == tokens  # one pass over the canvas, no tiles
    w, h = canvas
    pixels = item.pixel_values.view(h // 14, w // 14, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, h, w)
    scale = min(w / size[0], h / size[1])
    new_w, new_h = round(size[0] * scale), round(size[1] * scale)
    top, left = (h - new_h) // 2, (w - new_w) // 2
    inside = pixels[:, top + 2 : top + new_h - 2, left + 2 : left + new_w - 2]
    torch.testing.assert_close(inside.mean((1, 2)), torch.tensor([(200 / 255 - m) / s for m, s in
                                                                   zip(CLIP_MEAN, CLIP_STD)]), atol=1e-3, rtol=0)
    # the black border, one pixel away from the picture (its side may round either way)
    outside = torch.ones(h, w, dtype=torch.bool)
    outside[max(top - 1, 0) : top + new_h + 1, max(left - 1, 0) : left + new_w + 1] = False
    border = pixels[:, outside]
    assert border.shape[1] > (w * h - new_w * new_h) * 0.9
    torch.testing.assert_close(border, torch.tensor(BLACK)[:, None].expand_as(border))
    assert item.patch_positions[:, 0].eq(0).all() and item.patch_positions[-1].tolist() == [0, h // 14 - 1, w // 14 - 1]
    assert len(ANYRES_PINPOINTS) == 5


def test_native_images_keep_their_size_and_too_large_ones_are_one_clear_error(tokenizer):
    processor = OneVisionLlavaProcessor(tokenizer, image_mode="native", max_pixels=200 * 200)
    item = processor.image_item(grey(100, 60))
    assert len(item) == 4 * 7 and item.patch_positions[-1].tolist() == [0, 3, 6]
    with pytest.raises(ValueError, match=r"image 1 of sample 0: a 300x300 image .* over the maximum of 40000 pixels"):
        processor(text="<image> <image>", images=[grey(50, 50), grey(300, 300)])
    shrinking = OneVisionLlavaProcessor(tokenizer, image_mode="native", max_pixels=200 * 200, downscale_images=True)
    assert len(shrinking.image_item(grey(300, 300))) == 14 * 14  # 196 x 196 fits under 200 x 200


def test_codec_video_in_the_published_lmm_geometry(processor, clip_path):
    """64 frames on a letterboxed 36x36 grid, frame 0 whole, 10368 patches in (t, row, col) order, all fed
    as one patch list with their positions."""
    batch = processor(text="<video> what is moving?", videos=[clip_path])
    clip = processor.video_item(clip_path)
    assert batch["pixel_values"].shape == (1, 10368, 3 * 14 * 14)
    assert (batch["input_ids"][0] == processor.video_token_id).sum() == 10368
    t, row, col = clip.patch_positions.T
    assert clip.kept.shape == (64, 36, 36) and clip.kept[0].all() and (t == 0).sum() == 36 * 36
    assert t.max() == 63 and row.max() == 35 and col.max() == 35
    flat = (t * 36 + row) * 36 + col
    assert (flat.diff() > 0).all()
    # Same grid as the published 576 px / 16 px selection: the choices agree but for rounding of the scores.
    published = select_patches(clip_path, num_frames=64, budget=10368, size=576, patch_size=16, resize="letterbox")
    agree = (published.kept & clip.kept).sum().item() / 10368
    assert agree > 0.97, agree


def test_uniform_video_is_8_whole_frames_on_the_time_grid(tokenizer, clip_path):
    processor = OneVisionLlavaProcessor(tokenizer, video_mode="uniform")
    clip = processor.video_item(clip_path)
    assert len(clip) == 8 * 1296 == 10368
    assert clip.patch_positions[:, 0].unique().tolist() == [0, 9, 18, 27, 36, 45, 54, 63]


def test_chat_template_places_items_in_order(processor):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                 {"type": "video"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nand"
                    "<video>\n?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.placeholder_kinds(text) == ["image", "video"]


def test_bad_input_is_one_clear_error_naming_the_item(processor, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"video 0 of sample 1 \(.*broken.mp4\) cannot be read"):
        processor(text=["hello", "<video> ?"], videos=[[], [str(broken)]])
    with pytest.raises(ValueError, match=r"sample 1 has 2 <image> placeholder\(s\) but 1 image\(s\)"):
        processor(text=["<image>", "<image> <image>"], images=[[grey(20, 20)], [grey(20, 20)]])
    with pytest.raises(ValueError, match=r"the text has 3 <image> placeholder\(s\) but 2 image\(s\) were given: "
                                         r"the first <image> without one is in sample 1"):
        processor(text=["<image>", "<image> <image>"], images=[grey(20, 20), grey(20, 20)])
    with pytest.raises(ValueError, match=r"image 0 of sample 0 \(.*nope.png\) cannot be read as an image"):
        processor(text="<image>", images=[str(tmp_path / "nope.png")])
    conversation = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "video"}]}]
    with pytest.raises(ValueError, match=r"video 0 of sample 1: the content item has no 'video' \(nor 'path' or 'url'\)"):
        processor.apply_chat_template([[{"role": "user", "content": "hi"}], conversation], tokenize=True)
