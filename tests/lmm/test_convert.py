"""`ove lmm convert`: a tiny checkpoint written here in the published LLaVA-NeXT layout (sharded Qwen3 weights,
the encoder of tiny-p14, mm_projector.0/.2, mm_* config keys, a tokenizer) gives the same logits as the
published computation done by hand from its parts; sources in other layouts are one clear error."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3ForCausalLM

from onevision_encoder import OneVisionEncoderModel
from onevision_encoder.cli import main
from onevision_encoder.lmm.processing import ANYRES_PINPOINTS

TINY_P14 = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
LLAVA_KEYS = {
    "mm_vision_tower": "lmms-lab-encoder/onevision-encoder-large",  # a hub id: not reachable, read off the weights
    "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 128, "mm_vision_select_layer": -2,
    "mm_patch_merge_type": "flat", "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "image_aspect_ratio": "anyres",
    "image_grid_pinpoints": [list(p) for p in ANYRES_PINPOINTS], "tokenizer_model_max_length": 8192,
    "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter",
}


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer, make_text_config):
    """A published-layout folder and its parts (the LLM, the encoder, the projector)."""
    src = tmp_path_factory.mktemp("published") / "llava-qwen3"
    torch.manual_seed(1)
    llm = Qwen3ForCausalLM(make_text_config(len(tokenizer) + 2)).eval()  # room for <image>/<video>
    llm.save_pretrained(src, max_shard_size="100KB")  # several shards and an index
    encoder = OneVisionEncoderModel.from_pretrained(TINY_P14).eval()
    projector = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    extra = {f"model.vision_tower.vision_tower.{k}": v for k, v in load_file(os.path.join(TINY_P14, "model.safetensors")).items()}
    extra.update({f"model.mm_projector.{k}": v.detach().clone() for k, v in projector.state_dict().items()})
    save_file(extra, src / "model-vision.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-vision.safetensors" for k in extra})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config.update(LLAVA_KEYS, model_type="llava_qwen3", architectures=["LlavaQwen3ForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(src)
    return src, llm, encoder, projector


def published_logits(llm, encoder, projector, batch, image_token_id):
    """The published forward, by hand: hidden_states[-2] of the tower, mm_projector, into the LLM's embeddings."""
    hidden = encoder(batch["pixel_values"], patch_positions=batch["patch_positions"],
                     output_hidden_states=True).hidden_states[-2]
    ids = batch["input_ids"]
    embeds = llm.get_input_embeddings()(ids.masked_fill(ids == image_token_id, 0))
    embeds[ids == image_token_id] = projector(hidden[0])
    return llm(inputs_embeds=embeds).logits


def test_converted_checkpoint_gives_the_published_logits(published, tmp_path):
    src, llm, encoder, projector = published
    dst = tmp_path / "ours"
    assert main(["lmm", "convert", str(src), str(dst)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    assert model.config.vision_config.num_hidden_layers == 2 and model.config.vision_config.hidden_size == 128
    assert model.config.text_config.model_type == "qwen3" and not hasattr(model.config.text_config, "mm_hidden_size")
    assert processor.image_mode == "anyres" and processor.pinpoints == [list(p) for p in ANYRES_PINPOINTS]
    assert model.config.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    from PIL import Image
    import numpy as np

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    batch = processor(text="<image>\nwhat colour is the shape?", images=[image])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = published_logits(llm, encoder, projector, batch, processor.image_token_id)
    assert (batch["input_ids"] == processor.image_token_id).sum() == 3280  # the 1120x574 canvas, 80x41 tokens
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def write_folder(path, config, tensors=None, name="model.safetensors"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, path / name)
    return path


@pytest.mark.parametrize("case, message", [
    ("plain_llm", r"is not a published LLaVA config: it lacks \['mm_projector_type', 'mm_hidden_size'"),
    ("pickles", r"has no .safetensors weights \(found \['pytorch_model.bin'\]: pickled weights are never loaded"),
    ("resampler", r"weight 'model.vision_resampler.proj.weight' is not part of the published layout"),
    ("no_projector", r"the weights lack model.mm_projector.2.weight"),
    ("other_projector", r"mm_projector_type 'spatial_merge' is not supported"),
    ("width", r"mm_hidden_size 1024 differs from the vision tower's width 128"),
    ("llm_shape", r"weight 'model.norm.weight' has shape \[32\], the config implies \[64\]"),
    ("llm_missing", r"the weights lack 1 tensor\(s\) of the model, e.g. 'language_model.model.norm.weight'"),
    ("no_config", r"has no config.json"),
    ("not_json", r"config.json is not valid JSON"),
    ("corrupt_shard", r"model.safetensors cannot be read as safetensors"),
    ("ours", r"is in our layout already"),
    ("pinpoints", r"image_grid_pinpoints 'anyres_max_9' is neither a list of \(width, height\) pairs"),
])
def test_sources_in_other_layouts_are_one_clear_error_and_write_nothing(published, tmp_path, capsys, case, message):
    src = published[0]
    config = json.loads((src / "config.json").read_text())
    vision = {k: v for k, v in load_file(src / "model-vision.safetensors").items()}
    bad = tmp_path / case
    if case == "plain_llm":
        write_folder(bad, {k: v for k, v in config.items() if not k.startswith("mm_")}, vision)
    elif case == "pickles":
        write_folder(bad, config)
        (bad / "pytorch_model.bin").write_bytes(b"not read")
    elif case == "resampler":
        write_folder(bad, config, {**vision, "model.vision_resampler.proj.weight": torch.zeros(2, 2)})
    elif case == "no_projector":
        write_folder(bad, config, {k: v for k, v in vision.items() if not k.startswith("model.mm_projector.2")})
    elif case == "other_projector":
        write_folder(bad, {**config, "mm_projector_type": "spatial_merge"}, vision)
    elif case in ("llm_shape", "llm_missing"):
        llm = {k: v for f in src.glob("model-0*.safetensors") for k, v in load_file(f).items()}
        llm["model.norm.weight"] = torch.ones(32)
        if case == "llm_missing":
            del llm["model.norm.weight"]
        write_folder(bad, config, {**vision, **llm})
    elif case == "width":
        write_folder(bad, {**config, "mm_hidden_size": 1024}, vision)
    elif case == "not_json":
        bad.mkdir()
        (bad / "config.json").write_text("{not json")
    elif case == "corrupt_shard":
        write_folder(bad, config)
        (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    elif case == "pinpoints":  # the whole checkpoint, one config value bad
        shutil.copytree(src, bad)
        (bad / "config.json").write_text(json.dumps({**config, "image_grid_pinpoints": "anyres_max_9"}))
    elif case == "ours":
        assert main(["lmm", "convert", str(src), str(bad)]) == 0
        capsys.readouterr()
    else:
        bad.mkdir()
    dst = tmp_path / "out"
    assert main(["lmm", "convert", str(bad), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ove lmm convert: error:") and len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(message, err), err
    assert not dst.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".convert-")] == []


def test_an_existing_destination_is_refused_untouched(published, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["lmm", "convert", str(published[0]), str(dst)]) == 2
    assert "exists already" in capsys.readouterr().err and os.listdir(dst) == ["keep.txt"]


def test_without_a_tokenizer_the_ids_are_named_and_tokenizer_writes_the_processor(published, tokenizer, tmp_path,
                                                                                   capsys):
    src = tmp_path / "no-tokenizer"
    src.mkdir()
    for f in published[0].iterdir():
        if "tokenizer" not in f.name and f.name != "special_tokens_map.json":
            (src / f.name).write_bytes(f.read_bytes())
    assert main(["lmm", "convert", str(src), str(tmp_path / "bare")]) == 0
    assert "no processor (SRC has no tokenizer; give --tokenizer)" in capsys.readouterr().out
    assert not (tmp_path / "bare" / "processor_config.json").exists()
    assert main(["lmm", "convert", str(src), str(tmp_path / "full"), "--tokenizer", str(published[0])]) == 0
    assert "no processor" not in capsys.readouterr().out
    processor = AutoProcessor.from_pretrained(tmp_path / "full")
    config = AutoModelForImageTextToText.from_pretrained(tmp_path / "full").config
    assert config.image_token_id == processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_the_encoder_config_from_a_published_encoder_folder_keeps_no_remote_code(published, tmp_path):
    dst = tmp_path / "ours"
    assert main(["lmm", "convert", str(published[0]), str(dst), "--vision-config", TINY_P14]) == 0
    vision = json.loads((dst / "config.json").read_text())["vision_config"]
    tiny = json.loads(open(os.path.join(TINY_P14, "config.json")).read())
    assert "auto_map" in tiny and "auto_map" not in vision and vision["image_size"] == tiny["image_size"]
    assert AutoModelForImageTextToText.from_pretrained(dst).config.vision_config.num_hidden_layers == 2


def test_string_pinpoints_are_read_as_llava_next_reads_them():
    from onevision_encoder.lmm.convert import grid_pinpoints

    assert grid_pinpoints("[(574, 1120), (1120, 574)]", 448) == [[574, 1120], [1120, 574]]
    assert grid_pinpoints("(1x1),...,(2x3)", 448) == [[w * 448, h * 448] for w in (1, 2) for h in (1, 2, 3)]
    assert grid_pinpoints(None, 448) is None
    for bad in ("", "[(574,)]", "[[0, 14]]", 3, "(1x1),(2x2)"):
        with pytest.raises(ValueError, match="image_grid_pinpoints"):
            grid_pinpoints(bad, 448)
