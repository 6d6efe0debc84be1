"""The OneVision LLaVA model with transformers' training tooling: adapters in a frozen vision tower or LM under
reentrant gradient checkpointing (what PEFT's k-bit preparation sets up), and the attention backend switched
after loading for the tower and the LM together."""

import pytest
import torch
from PIL import Image
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from onevision_encoder.lmm import OneVisionLlavaProcessor


@pytest.fixture(scope="module")
def batch(tokenizer):
    processor = OneVisionLlavaProcessor(tokenizer, image_mode="native")
    images = [Image.new("RGB", (42, 28), (200, 30, 30)), Image.new("RGB", (28, 28), (30, 30, 200))]
    texts = ["<image> what colour is the shape ?", "<image> and <image> : what colour is the square ?"]
    out = processor(text=texts, images=[images[:1], images])
    labels = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    return {**out, "labels": labels}


def enable_reentrant_checkpointing(model):
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def adapter_gradients(model, batch, adapters, checkpointing: bool):
    """Gradients of the `adapters` (the only trainable tensors) for the LM loss on `batch`."""
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapters(model):
        param.requires_grad_(True)
    if checkpointing:
        enable_reentrant_checkpointing(model)
        model.enable_input_require_grads()
    model(**batch).loss.backward()
    return [param.grad for param in adapters(model)]


ADAPTERS = {
    "in the frozen vision tower": lambda m: [m.vision_tower.encoder.layers[0].self_attn.q_proj.weight],
    "in the frozen LM": lambda m: [m.language_model.model.layers[1].self_attn.q_proj.weight],
}


@pytest.mark.parametrize("where", ADAPTERS)
def test_adapters_get_their_gradients_under_reentrant_checkpointing(where, batch, tokenizer, make_model):
    reference = adapter_gradients(make_model(tokenizer), batch, ADAPTERS[where], checkpointing=False)
    assert all(g is not None and g.abs().sum() > 0 for g in reference)
    got = adapter_gradients(make_model(tokenizer), batch, ADAPTERS[where], checkpointing=True)
    for g, want in zip(got, reference):
        assert g is not None, f"no gradient for the adapter {where}"
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-4)


def test_set_attn_implementation_switches_tower_and_lm(batch, tokenizer, make_model, tmp_path):
    calls = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa(module, *args, **kwargs)

    AttentionInterface.register("counting_sdpa", counting)
    AttentionMaskInterface.register("counting_sdpa", AttentionMaskInterface._global_mapping["sdpa"])  # the LM's masks
    try:
        from transformers import AutoModelForImageTextToText

        make_model(tokenizer).save_pretrained(tmp_path)
        model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            eager = model(**inputs).logits
        model.set_attn_implementation("counting_sdpa")
        with torch.no_grad():
            switched = model(**inputs).logits
        tower, lm = model.config.vision_config.num_hidden_layers, model.config.text_config.num_hidden_layers
        assert sorted(set(calls)) == ["OneVisionEncoderAttention", "Qwen3Attention"]
        assert calls.count("OneVisionEncoderAttention") == tower and calls.count("Qwen3Attention") == lm
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(switched[real], eager[real], atol=1e-4, rtol=1e-4)
    finally:
        AttentionInterface._global_mapping.pop("counting_sdpa", None)
        AttentionMaskInterface._global_mapping.pop("counting_sdpa", None)
