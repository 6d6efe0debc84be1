"""The model against the published implementation's golden outputs, and its input forms and checks."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

import onevision_encoder as ove
from onevision_encoder.modeling import rope_angles
from onevision_encoder.processing import grid_positions

GOLDEN = Path(__file__).parent / "data" / "tiny-p14"
CASES = ["image_native", "image_batch", "video_visible_dense", "video_visible_sparse", "video_patch_positions"]
BACKENDS = ["eager", "sdpa"]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def cases():
    return load_file(GOLDEN / "cases.safetensors")


@pytest.fixture(scope="module", params=BACKENDS)
def golden_model(request):
    return AutoModel.from_pretrained(GOLDEN, attn_implementation=request.param).eval()


def case_inputs(cases, name):
    inputs = {"pixel_values": cases[f"{name}.pixel_values"]}
    for key in ("visible_indices", "patch_positions"):
        if f"{name}.{key}" in cases:
            inputs[key] = cases[f"{name}.{key}"]
    return inputs


@pytest.mark.parametrize("name", CASES)
def test_golden_cases(golden_model, cases, name):
    with torch.no_grad():
        out = golden_model(**case_inputs(cases, name), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, cases[f"{name}.last_hidden_state"], **TOL)
    torch.testing.assert_close(out.pooler_output, cases[f"{name}.pooler_output"], **TOL)
    torch.testing.assert_close(out.hidden_states[-2], cases[f"{name}.hidden_states_minus2"], **TOL)


def test_published_config_loads_without_remote_code():
    config = json.loads((GOLDEN / "config.json").read_text())
    assert "auto_map" in config  # the published layout points at remote code...
    model = AutoModel.from_pretrained(GOLDEN)  # ...which we never need
    assert isinstance(model, ove.OneVisionEncoderModel)
    assert isinstance(AutoConfig.from_pretrained(GOLDEN), ove.OneVisionEncoderConfig)
    assert model.config._attn_implementation == "sdpa"


def test_state_dict_keys_are_the_published_ones():
    model = AutoModel.from_pretrained(GOLDEN)
    assert set(model.state_dict()) == set(load_file(GOLDEN / "model.safetensors"))


def test_save_pretrained_round_trip(tmp_path, cases):
    model = AutoModel.from_pretrained(GOLDEN).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    inputs = case_inputs(cases, "video_patch_positions")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).pooler_output, model(**inputs).pooler_output, atol=0, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "onevision_encoder"


def test_rope_angles_follow_the_466_formula():
    theta, head_dim = 10000.0, 64
    pos = torch.tensor([[5, 3, 7]])
    angles = rope_angles(pos, head_dim, theta)[0]
    expected = [5 * theta ** (-i / 8) for i in range(8)]
    expected += [3 * theta ** (-j / 12) for j in range(12)] + [7 * theta ** (-j / 12) for j in range(12)]
    expected = torch.tensor(expected + expected)
    torch.testing.assert_close(angles, expected, atol=1e-5, rtol=1e-6)


def random_checkpoint(tmp_path, dtype, **config_kwargs):
    """A checkpoint in the published layout the tests have not seen: config.json with auto_map + safetensors."""
    config = ove.OneVisionEncoderConfig(**config_kwargs)
    torch.manual_seed(0)
    model = ove.OneVisionEncoderModel(config).eval()
    state = {k: (v.normal_() * 0.05 if k.endswith("weight") and v.ndim > 1 else v.uniform_(0.5, 1.5)).to(dtype)
             for k, v in model.state_dict().items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((GOLDEN / "config.json").read_text())
    raw.update(config.to_diff_dict())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return state


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hidden_size=192, num_attention_heads=3, intermediate_size=384, num_hidden_layers=3, patch_size=16),
        dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=1,
             layer_norm_type="rms_norm", use_head=False),
    ],
)
def test_unseen_published_layout_checkpoints_load_exactly(tmp_path, kwargs):
    state = random_checkpoint(tmp_path, torch.float32, **kwargs)
    model = AutoModel.from_pretrained(tmp_path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    p = model.config.patch_size
    out = model(torch.randn(2, 3, 2 * p, 3 * p))
    assert out.last_hidden_state.shape == (2, 6, model.config.hidden_size)
    assert (out.pooler_output is None) == (not model.config.use_head)


def test_bf16_checkpoint_and_bf16_loading(tmp_path, cases):
    shutil.copytree(GOLDEN, tmp_path / "ckpt")
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(GOLDEN / "model.safetensors").items()}
    save_file(bf16, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})  # released weights are bf16
    inputs = case_inputs(cases, "video_visible_sparse")
    model = AutoModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**inputs)
    assert out.pooler_output.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.pooler_output.float(), cases["video_visible_sparse.pooler_output"])
    assert cos.min() > 0.99
    as_fp32 = AutoModel.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = as_fp32(**inputs).pooler_output
    cos32 = torch.nn.functional.cosine_similarity(ref, cases["video_visible_sparse.pooler_output"])
    assert cos32.min() > 0.995


# --------------------------------------------------------------------------------------------------
# Input forms agree with each other
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return AutoModel.from_pretrained(GOLDEN).eval()


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def test_patch_list_equals_dense_image(model):
    image = torch.randn(2, 3, 28, 42)
    dense = run(model, pixel_values=image)
    patches = ove.patchify(image, 14)
    positions = grid_positions(torch.zeros(1), 2, 3).expand(2, -1, -1)
    listed = run(model, pixel_values=patches, patch_positions=positions)
    torch.testing.assert_close(listed.last_hidden_state, dense.last_hidden_state, **TOL)
    torch.testing.assert_close(listed.pooler_output, dense.pooler_output, **TOL)


def test_video_helpers_give_the_same_features_in_both_forms(model):
    video = torch.randn(2, 3, 16, 28, 28)
    by_indices = run(model, **ove.video_inputs(video, 14, form="visible_indices"))
    by_patches = run(model, **ove.video_inputs(video, 14, form="patches"))
    no_positions = run(model, pixel_values=video)  # dense video: frames spread over the 64 slots
    torch.testing.assert_close(by_patches.pooler_output, by_indices.pooler_output, **TOL)
    torch.testing.assert_close(no_positions.pooler_output, by_indices.pooler_output, **TOL)
    idx = ove.video_inputs(video, 14, form="visible_indices")["visible_indices"]
    assert idx.shape == (2, 16 * 4)
    assert (idx[0, ::4] // 4).tolist() == torch.linspace(0, 63, 16).round().long().tolist()


def test_visible_indices_gather_equals_patch_list(model):
    torch.manual_seed(1)
    video = torch.randn(1, 3, 64, 28, 28)
    keep = torch.randperm(64 * 4)[:50].sort().values.unsqueeze(0)
    gathered = run(model, pixel_values=video, visible_indices=keep)
    patches = ove.patchify(video.transpose(1, 2), 14).flatten(1, 2)[:, keep[0]]
    positions = torch.stack([keep // 4, keep % 4 // 2, keep % 2], -1)
    listed = run(model, pixel_values=patches, patch_positions=positions)
    torch.testing.assert_close(listed.last_hidden_state, gathered.last_hidden_state, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_changes_real_outputs(backend):
    model = AutoModel.from_pretrained(GOLDEN, attn_implementation=backend).eval()
    torch.manual_seed(2)
    clips = []
    for n in (7, 19, 12):
        positions = torch.stack([torch.randint(0, 64, (n,)), torch.randint(0, 16, (n,)), torch.randint(0, 16, (n,))], -1)
        clips.append(ove.PatchClip(pixel_values=torch.randn(n, 3 * 14 * 14), patch_positions=positions))
    batch = ove.collate_patch_lists(clips)
    assert batch["attention_mask"].sum(1).tolist() == [7, 19, 12]
    together = run(model, **batch)
    for i, clip in enumerate(clips):
        alone = run(model, pixel_values=clip.pixel_values[None], patch_positions=clip.patch_positions[None])
        n = len(clip)
        torch.testing.assert_close(together.last_hidden_state[i, :n], alone.last_hidden_state[0], **TOL)
        torch.testing.assert_close(together.pooler_output[i], alone.pooler_output[0], **TOL)
    # the padding really is ignored: garbage in the padded slots changes nothing
    noisy = dict(batch, pixel_values=batch["pixel_values"] + 5 * (1 - batch["attention_mask"])[..., None])
    torch.testing.assert_close(run(model, **noisy).pooler_output, together.pooler_output, **TOL)


def test_output_attentions_and_hidden_states(model):
    out = run(model, pixel_values=torch.randn(1, 3, 28, 28), output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (1, model.config.num_attention_heads, 4, 4)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 2, 4))
    tup = model(pixel_values=torch.randn(1, 3, 28, 28), return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (1, 4, 128)


def test_flash_attention_without_the_package_fails_clearly():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash_attn is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="(?i)flash"):
        AutoModel.from_pretrained(GOLDEN, attn_implementation="flash_attention_2")


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error up front
# --------------------------------------------------------------------------------------------------

P = 3 * 14 * 14
BAD_INPUTS = [
    (dict(pixel_values=torch.randn(3, 28, 28)), "add the batch dimension"),
    (dict(pixel_values=torch.randn(28, 28)), "got shape"),
    (dict(pixel_values=torch.randn(1, 3, 30, 28)), "multiples of the patch size"),
    (dict(pixel_values=torch.randn(1, 4, 28, 28)), "channels"),
    (dict(pixel_values=torch.randn(1, 3, 64, 28, 28), visible_indices=torch.tensor([[0, 5, 1024]])), "must lie in"),
    (dict(pixel_values=torch.randn(1, 3, 4, 28, 28), visible_indices=torch.tensor([[0, 1, 2, -1] * 4])), "must lie in"),
    (dict(pixel_values=torch.randn(1, 3, 4, 28, 28), visible_indices=torch.zeros(1, 3)), "integer"),
    (dict(pixel_values=torch.randn(1, 3, 4, 28, 28), visible_indices=torch.zeros(2, 3, dtype=torch.long)), "batch size"),
    (dict(pixel_values=torch.randn(1, 3, 28, 28), patch_positions=torch.zeros(1, 5, 3)), "5 positions for 4 tokens"),
    (dict(pixel_values=torch.randn(1, 3, 28, 28), patch_positions=torch.zeros(1, 4, 2)), r"\[B, N, 3\]"),
    (dict(pixel_values=torch.randn(1, 6, P)), "needs patch_positions"),
    (dict(pixel_values=torch.randn(1, 0, P), patch_positions=torch.zeros(1, 0, 3)), "patch list is empty"),
    (dict(pixel_values=torch.randn(1, 3, 4, 28, 28), visible_indices=torch.zeros(1, 0, dtype=torch.long)), "is empty"),
    (dict(pixel_values=torch.randn(1, 6, P - 1), patch_positions=torch.zeros(1, 6, 3)), "C\\*p\\*p"),
    (dict(pixel_values=torch.randn(2, 6, P), patch_positions=torch.zeros(1, 6, 3)), "batch size"),
    (dict(pixel_values=torch.randn(1, 6, P), patch_positions=torch.zeros(1, 6, 3), attention_mask=torch.ones(1, 5)),
     "attention_mask must be"),
    (dict(pixel_values=torch.randn(2, 6, P), patch_positions=torch.zeros(2, 6, 3),
          attention_mask=torch.tensor([[1] * 6, [0] * 6])), "no real token"),
]


@pytest.mark.parametrize("inputs,message", BAD_INPUTS)
def test_bad_inputs_raise_one_clear_error(model, inputs, message):
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_more_than_64_frames_with_indices(model):
    video = torch.randn(1, 3, 80, 14, 14)  # one token per frame
    idx = torch.arange(80).unsqueeze(0)
    out = run(model, pixel_values=video, visible_indices=idx)
    pos = torch.stack([torch.arange(80), torch.zeros(80), torch.zeros(80)], -1).long().unsqueeze(0)
    ref = run(model, pixel_values=ove.patchify(video.transpose(1, 2), 14).flatten(1, 2), patch_positions=pos)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, **TOL)
    assert math.isfinite(out.pooler_output.abs().sum().item())


def test_gradients_agree_across_backends_and_with_checkpointing():
    torch.manual_seed(3)
    image = torch.randn(2, 3, 28, 42)
    grads, layer_calls = [], []
    for backend, checkpointing in (("eager", False), ("sdpa", False), ("sdpa", True)):
        model = AutoModel.from_pretrained(GOLDEN, attn_implementation=backend).train()
        if checkpointing:  # transformers 5 renamed it; 4.x has only the old name
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        calls = []
        # q_proj runs early in the layer: a recompute reaches it even when it stops as soon as it can
        model.encoder.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
        x = image.clone().requires_grad_(True)
        model(pixel_values=x).pooler_output.square().sum().backward()
        grads.append((x.grad, model.encoder.layers[0].self_attn.q_proj.weight.grad))
        layer_calls.append(len(calls))
    assert layer_calls == [1, 1, 2]  # checkpointing recomputes the layer in the backward pass
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    for other in grads[1:]:
        torch.testing.assert_close(other[0], grads[0][0], **TOL)
        torch.testing.assert_close(other[1], grads[0][1], **TOL)
