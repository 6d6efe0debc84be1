"""The encoder as transformers' own tooling expects a model to behave: input embeddings for adapter training
under gradient checkpointing, attention backends switchable after loading, and graphs that torch.compile
(fullgraph) and torch.export can capture on a padded batch."""

import pytest
import torch
from transformers import AutoModel
from transformers.modeling_utils import AttentionInterface

import onevision_encoder as ove

PATCH = 4


def tiny_model(attn_implementation="sdpa", **overrides):
    torch.manual_seed(0)
    config = ove.OneVisionEncoderConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH,
        **overrides,
    )
    config._attn_implementation = attn_implementation
    return ove.OneVisionEncoderModel(config).eval()


def padded_batch(lengths=(7, 4), max_len=7, seed=0):
    """A patch-list batch of clips with different token counts, padded to max_len."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    pixel_values = torch.randn(b, max_len, 3 * PATCH * PATCH, generator=g)
    positions = torch.stack(
        [torch.randint(0, 64, (b, max_len), generator=g), torch.randint(0, 8, (b, max_len), generator=g),
         torch.randint(0, 8, (b, max_len), generator=g)], dim=-1)
    mask = (torch.arange(max_len)[None] < torch.tensor(lengths)[:, None]).long()
    return {"pixel_values": pixel_values, "patch_positions": positions, "attention_mask": mask}


def assert_same_outputs(got, want, mask):
    """last_hidden_state at real tokens (padded rows are meaningless by contract) and the pooled output."""
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Input embeddings, adapters and reentrant gradient checkpointing
# ----------------------------------------------------------------------------------------------------


def enable_reentrant_checkpointing(model):
    kwargs = {"use_reentrant": True}  # what PEFT's k-bit preparation asks for
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def adapter_gradient(model, batch, require_grads: bool, checkpointing: bool):
    """Gradient of an 'adapter' (layer 1's q_proj, the only trainable tensor) in a frozen encoder."""
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    adapter = model.encoder.layers[1].self_attn.q_proj.weight
    adapter.requires_grad_(True)
    adapter.grad = None
    if checkpointing:
        enable_reentrant_checkpointing(model)
    if require_grads:
        model.enable_input_require_grads()
    out = model(**batch)
    loss = out.pooler_output.square().sum()
    if loss.requires_grad:
        loss.backward()
    return adapter.grad


def test_get_input_embeddings_is_the_patch_embedding():
    model = tiny_model()
    embeddings = model.get_input_embeddings()
    assert embeddings is model.embeddings
    assert embeddings.patch_embedding.weight is model.embeddings.patch_embedding.weight
    replacement = ove.modeling.OneVisionEncoderEmbeddings(model.config)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement


@pytest.mark.parametrize("form", ["patch_list", "image"])
def test_frozen_encoder_adapter_gets_gradients_under_reentrant_checkpointing(form):
    batch = padded_batch()
    if form == "image":
        batch = {"pixel_values": torch.randn(2, 3, 3 * PATCH, 2 * PATCH, generator=torch.Generator().manual_seed(1))}
    reference = adapter_gradient(tiny_model(), batch, require_grads=False, checkpointing=False)
    assert reference is not None and reference.abs().sum() > 0

    # What goes wrong without it: under reentrant checkpointing no input of a block requires grad, so the
    # adapter inside it never gets a gradient (torch warns and the loss does not even require grad).
    with pytest.warns(UserWarning, match="requires_grad"):
        missing = adapter_gradient(tiny_model(), batch, require_grads=False, checkpointing=True)
    assert missing is None

    fixed = adapter_gradient(tiny_model(), batch, require_grads=True, checkpointing=True)
    assert fixed is not None
    torch.testing.assert_close(fixed, reference, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Attention backend switched after loading
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def counting_attention():
    """A registered attention backend that counts its calls and computes sdpa."""
    calls = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    AttentionInterface.register("counting_sdpa", counting)
    yield calls
    AttentionInterface._global_mapping.pop("counting_sdpa", None)


def test_set_attn_implementation_switches_the_backend_after_loading(counting_attention, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = padded_batch()
    with torch.no_grad():
        eager = model(**batch)

    model.set_attn_implementation("counting_sdpa")
    assert model.config._attn_implementation == "counting_sdpa"
    with torch.no_grad():
        switched = model(**batch)
    assert len(counting_attention) == model.config.num_hidden_layers  # every layer took the new backend
    assert_same_outputs(switched, eager, batch["attention_mask"])

    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(**batch)
    assert len(counting_attention) == model.config.num_hidden_layers  # and back: the counter saw nothing more


# ----------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) and torch.export on a padded batch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_compile_fullgraph_on_a_padded_batch(attn_implementation):
    torch._dynamo.reset()
    model = tiny_model(attn_implementation)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    for batch in (padded_batch(), padded_batch(lengths=(3, 7), seed=1), padded_batch(lengths=(7, 7), seed=2)):
        with torch.no_grad():
            assert_same_outputs(compiled(**batch), model(**batch), batch["attention_mask"])


def test_export_on_a_padded_batch_follows_the_mask_it_is_given():
    model = tiny_model()
    batch = padded_batch()
    with torch.no_grad():
        exported = torch.export.export(model, args=(), kwargs=batch).module()
        # Same shapes, other padding (none at all included): the graph holds no branch on the mask's values.
        for other in (padded_batch(lengths=(2, 6), seed=3), padded_batch(lengths=(7, 7), seed=4)):
            assert_same_outputs(exported(**other), model(**other), other["attention_mask"])


def test_eager_mode_keeps_its_value_checks():
    model = tiny_model()
    batch = padded_batch()
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="no real token"):
        model(**batch)
    video = torch.randn(1, 3, 2, 2 * PATCH, 2 * PATCH)
    with pytest.raises(ValueError, match="visible_indices must lie in"):
        model(pixel_values=video, visible_indices=torch.tensor([[0, 1, 64 * 4]]))
