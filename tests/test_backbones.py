"""Any encoder behind one interface: tokens, positions and pooled embeddings of transformers vision models
against the models run by hand, the per-family settings, and a model that is not a vision model."""

import os

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, CLIPConfig, CLIPModel

from onevision_encoder.backbones import NotAVisionModel, OneVisionBackbone, load_backbone
from onevision_encoder.processing import collate_patch_lists, grid_positions, patchify

TINY = os.path.join(os.path.dirname(__file__), "data", "tiny-p14")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def clips_of(frames_per_clip, size, patch, seed=0):
    """A padded batch of clips made of whole random frames, at RoPE-like slots (not ordinals)."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(n, 3, size, size, generator=g) for n in frames_per_clip]
    rows = size // patch
    pairs = [(patchify(f, patch).flatten(0, 1), grid_positions(torch.linspace(0, 63, len(f)).round().long(), rows, rows))
             for f in frames]
    return frames, collate_patch_lists(pairs)


def test_siglip_tokens_and_pooled_match_the_model_frame_by_frame(tiny_siglip):
    backbone = load_backbone(tiny_siglip)
    s = backbone.settings
    assert (s.video_size, s.patch_size, s.mean, s.std) == (32, 8, (0.5,) * 3, (0.5,) * 3)
    frames, batch = clips_of([3, 2], 32, 8)
    with torch.no_grad():
        out = backbone(**batch)
        model = AutoModel.from_pretrained(tiny_siglip).eval()
        direct = [model(pixel_values=f) for f in frames]
    assert out.attention_mask.sum(1).tolist() == [48, 32]
    torch.testing.assert_close(out.last_hidden_state[1, :32], direct[1].last_hidden_state.flatten(0, 1))
    torch.testing.assert_close(out.pooler_output[0], direct[0].pooler_output.mean(0))
    assert out.token_positions[0, ::16, 0].tolist() == [0, 1, 2]  # frame ordinals, not the input slots
    assert out.token_positions[0, :16, 1:].tolist() == grid_positions(torch.zeros(1), 4, 4)[:, 1:].tolist()


def test_dino_drops_class_and_register_tokens_and_pools_its_class_token(tiny_dinov2):
    backbone = load_backbone(tiny_dinov2)
    frames, batch = clips_of([2], 32, 8)
    with torch.no_grad():
        out = backbone(**batch)
        direct = AutoModel.from_pretrained(tiny_dinov2).eval()(pixel_values=frames[0])
    assert direct.last_hidden_state.shape[1] == 1 + 2 + 16
    torch.testing.assert_close(out.last_hidden_state[0], direct.last_hidden_state[:, 3:].flatten(0, 1))
    torch.testing.assert_close(out.pooler_output[0], direct.pooler_output.mean(0))
    assert backbone.settings.mean == (0.485, 0.456, 0.406)


def test_dual_model_uses_its_vision_tower_projection_and_concat_pooling(tmp_path):
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=dict(image_size=32, patch_size=8, **SMALL),
                                text_config=dict(vocab_size=99, **SMALL), projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")  # no preprocessor config: CLIP statistics, the config's size
    backbone = load_backbone(tmp_path / "clip", video_pooling="concat")
    assert backbone.settings.video_size == 32 and backbone.settings.mean[0] == pytest.approx(0.48145466)
    frames, batch = clips_of([2, 2], 32, 8)
    with torch.no_grad():
        out = backbone(**batch)
        embeds = clip.visual_projection(clip.vision_model(pixel_values=frames[1]).pooler_output)
    assert out.pooler_output.shape == (2, 32)
    torch.testing.assert_close(out.pooler_output[1], embeds.flatten())
    assert out.token_positions[0, 0].tolist() == [0, -1, -1]  # CLIP's class token is kept, marked as no patch
    with pytest.raises(ValueError, match="same frame count"):
        backbone(**clips_of([2, 1], 32, 8)[1])


def test_not_a_vision_model_and_missing_folder_are_one_clear_error(tmp_path):
    BertModel(BertConfig(vocab_size=99, **SMALL)).save_pretrained(tmp_path / "bert")
    with pytest.raises(NotAVisionModel, match="not a vision model"):
        load_backbone(tmp_path / "bert")
    with pytest.raises(ValueError, match="no such folder"):
        load_backbone(tmp_path / "missing")


def test_our_model_takes_patch_lists_as_they_are():
    backbone = load_backbone(TINY)
    assert isinstance(backbone, OneVisionBackbone) and backbone.takes_patch_lists
    _, batch = clips_of([2, 1], 224, 14)
    with torch.no_grad():
        out = backbone(**batch)
        direct = backbone.model(**batch)
    torch.testing.assert_close(out.pooler_output, direct.pooler_output)
    assert torch.equal(out.token_positions, batch["patch_positions"])


def test_ove_encode_with_another_encoder_pools_eight_uniform_frames(tiny_siglip, tmp_path):
    from onevision_encoder import load_features, sample_frames
    from onevision_encoder.cli import main
    from onevision_encoder.encode import Encoder
    from onevision_encoder.processing import renormalize_patches
    from onevision_encoder.synthetic import write_image, write_video

    video = write_video(tmp_path / "v.mp4", num_frames=20, width=64, height=48)["path"]
    image = write_image(tmp_path / "i.png", width=40, height=40)
    assert main(["encode", video, image, "--model", tiny_siglip, "--out", str(tmp_path / "f"), "--workers", "0"]) == 0
    features = load_features(tmp_path / "f")
    assert [r["mode"] for r in features.records] == ["frames", "image"] and features.records[0]["frames"] == 8
    clip = sample_frames(video, num_frames=8, size=32, patch_size=8)
    backbone = load_backbone(tiny_siglip)
    with torch.no_grad():
        frames = renormalize_patches(clip.pixel_values, (0.5,) * 3, (0.5,) * 3).view(8, 4, 4, 3, 8, 8)
        frames = frames.permute(0, 3, 1, 4, 2, 5).reshape(8, 3, 32, 32)
        expected = backbone.encode_frames(frames)[1].mean(0)
    torch.testing.assert_close(features.pooled[0], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="whole frames only"):
        Encoder(tiny_siglip, mode="codec")
