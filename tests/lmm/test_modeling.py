"""The OneVision LLaVA model: mixed batches against samples alone, generation with the KV cache, save/load,
other LMs as text_config, and bad input."""

import os

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, BertConfig, LlamaConfig, Qwen2Config

from onevision_encoder.lmm import OneVisionLlavaConfig, OneVisionLlavaProcessor
from onevision_encoder.synthetic import write_image, write_video

TOL = dict(atol=1e-4, rtol=1e-4)
QUESTION = "what colour is the shape?"


def user(*content):
    return [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmm_media")
    images = [Image.open(write_image(root / f"i{k}.png", width=w, height=h, seed=k)) for k, (w, h) in
              enumerate([(70, 42), (30, 56), (44, 44)])]
    video = write_video(root / "v.mp4", num_frames=24, width=96, height=64, seed=3)["path"]
    return images, video


@pytest.fixture(scope="module")
def small_processor(tokenizer):
    """Native-resolution images and a codec video on a 4x4 grid, so the tiny model runs in a blink."""
    return OneVisionLlavaProcessor(tokenizer, image_mode="native", video_frames=8, video_budget=40, video_size=56)


@pytest.fixture(scope="module")
def conversations(media):
    (a, b, c), video = media
    image = lambda x: {"type": "image", "image": x}  # noqa: E731
    return [
        user(),  # text only
        user(image(a)),
        user(image(b), image(c)),
        user({"type": "video", "video": video}),
        user(image(c), {"type": "video", "video": video}),
    ]


def real_logits(model, batch):
    logits = model(**batch).logits
    return [row[mask.bool()] for row, mask in zip(logits, batch["attention_mask"])]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_every_sample_alone_gives_its_logits_in_a_mixed_batch(tokenizer, make_model, small_processor, conversations,
                                                              backend):
    model = make_model(tokenizer)
    model.set_attn_implementation(backend)
    assert model.vision_tower.config._attn_implementation == backend
    assert model.language_model.config._attn_implementation == backend
    batch = small_processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
    assert batch["pixel_values"].shape[0] == 6  # 1 + 2 + 1 + 2 visual items, one encoder batch
    assert len(set(batch["patch_attention_mask"].sum(1).tolist())) > 1  # items of different lengths: padded
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding
    with torch.no_grad():
        together = real_logits(model, batch)
        for i, conversation in enumerate(conversations):
            alone = small_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
            (logits,) = real_logits(model, alone)
            torch.testing.assert_close(together[i], logits, **TOL, msg=f"sample {i}")


def test_visual_tokens_replace_placeholders_in_text_order(model, small_processor, media):
    """Swapping the two images of a sample changes its logits: each placeholder takes its own item."""
    (a, b, _), _ = media
    text = "<image> and <image> ?"
    with torch.no_grad():
        ab = model(**small_processor(text=text, images=[a, b])).logits
        ba = model(**small_processor(text=text, images=[b, a])).logits
    assert ab.shape != ba.shape or not torch.allclose(ab, ba, atol=1e-3)
    n_a = len(small_processor.image_item(a))
    assert (small_processor(text=text, images=[a, b])["input_ids"][0][:n_a] == model.config.image_token_id).all()


def test_generation_with_cache_equals_without_and_encodes_once(model, small_processor, conversations):
    batch = small_processor.apply_chat_template(conversations[1:4], add_generation_prompt=True, tokenize=True)
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        cached = model.generate(**batch, use_cache=True, **settings)
        assert len(calls) == 1  # visual tokens computed once, at the prefill
        uncached = model.generate(**batch, use_cache=False, **settings)
        assert len(calls) == 1 + 6  # without a cache every step re-encodes: the count above could fail
    finally:
        hook.remove()
    assert cached.shape == (3, batch["input_ids"].shape[1] + 6)
    torch.testing.assert_close(cached, uncached)


def test_a_generated_placeholder_id_is_text_at_a_decoding_step(model, small_processor, media):
    """An LM may emit a placeholder id itself (beam search with the tiny random model did): after the prefill it
    is an ordinary token, not an error; on a fresh pass without pixel_values it still is one."""
    (a, _, _), _ = media
    batch = small_processor(text=["<image> ?"], images=[[a]])
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        step = torch.tensor([[model.config.image_token_id]])
        out = model(input_ids=step, past_key_values=prefill.past_key_values,
                    attention_mask=torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long))
    assert out.logits.shape[:2] == (1, 1) and torch.isfinite(out.logits).all() and out.visual_hidden_states is None
    with pytest.raises(ValueError, match="have visual placeholder tokens but no pixel_values"):
        model(input_ids=step)


def test_generation_never_emits_a_placeholder_id(model, small_processor, media):
    """An LM that prefers the image placeholder id above all (its logit raised by 100) generates other tokens,
    with the KV cache and without it (where an emitted placeholder would ask for a visual token more)."""
    (a, _, _), _ = media
    batch = small_processor(text=["<image> ?"], images=[[a]])
    image_id = model.config.image_token_id
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: out.index_add(
        -1, torch.tensor([image_id]), torch.full((*out.shape[:-1], 1), 100.0)))
    try:
        with torch.no_grad():
            prompt = batch["input_ids"].shape[1]
            unguarded = model.generate(**batch, max_new_tokens=1, do_sample=False, suppress_tokens=[])
            assert unguarded[0, prompt] == image_id  # the raised logit wins when nothing is suppressed
            for cache in (True, False):
                new = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=cache)
                assert new.shape[1] > prompt and not (new[:, prompt:] == image_id).any()
    finally:
        hook.remove()


def test_beam_search_repeats_each_samples_items_with_it(model, small_processor):
    """num_beams copies each sample; a sample's two images must follow each copy as a pair (transformers' own
    expansion repeats item by item: [a, a, b, b], which silently gives copies the wrong images)."""
    rng = torch.Generator().manual_seed(0)
    a, b, c = (Image.fromarray(torch.randint(0, 255, size, generator=rng, dtype=torch.uint8).numpy())
               for size in ((28, 28, 3), (28, 28, 3), (42, 28, 3)))
    batch = small_processor(text=["<image> <image> what colour", "<image> what"], images=[[a, b], [c]])
    seen = []
    hook = model.vision_tower.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["pixel_values"]),
                                                        with_kwargs=True)
    try:
        with torch.no_grad():
            together = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2)
    finally:
        hook.remove()
    items = batch["pixel_values"]
    assert torch.equal(seen[0], items[[0, 1, 0, 1, 2, 2]])
    for row, (text, images) in enumerate([("<image> <image> what colour", [a, b]), ("<image> what", [c])]):
        one = small_processor(text=[text], images=[images])
        with torch.no_grad():
            alone = model.generate(**one, max_new_tokens=3, do_sample=False, num_beams=2)
        assert torch.equal(alone[0, one["input_ids"].shape[1]:], together[row, batch["input_ids"].shape[1]:])


def test_save_and_from_pretrained_round_trip(model, small_processor, conversations, tmp_path):
    batch = small_processor.apply_chat_template(conversations[4], tokenize=True)
    model.save_pretrained(tmp_path)
    small_processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # still tied
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path)
    assert (processor.image_mode, processor.video_budget, processor.video_size) == ("native", 40, 56)
    again = processor.apply_chat_template(conversations[4], tokenize=True)
    torch.testing.assert_close(again["pixel_values"], batch["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, model(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("config_class", [Qwen2Config, LlamaConfig])
def test_other_causal_lms_as_text_config(tokenizer, small_processor, conversations, config_class, make_model,
                                        make_text_config):
    model = make_model(tokenizer, make_text_config(len(tokenizer), config_class))
    assert type(model.language_model).__name__.startswith(config_class.__name__[:-6])
    batch = small_processor.apply_chat_template(conversations[1:3], add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        together = real_logits(model, batch)
        (alone,) = real_logits(model, small_processor.apply_chat_template(conversations[2], add_generation_prompt=True,
                                                                          tokenize=True))
    torch.testing.assert_close(together[1], alone, **TOL)


def test_vision_features_are_the_second_to_last_layer_projected(model, small_processor, media):
    (a, _, _), _ = media
    batch = small_processor(text="<image>", images=[a])
    with torch.no_grad():
        out = model(**batch)
        hidden = model.vision_tower(batch["pixel_values"], patch_positions=batch["patch_positions"],
                                    output_hidden_states=True).hidden_states
        projector = model.multi_modal_projector
        expected = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(hidden[-2][0])))
        last_layer = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(hidden[-1][0])))
    assert len(hidden) == model.config.vision_config.num_hidden_layers + 1  # embeddings + each layer
    torch.testing.assert_close(out.visual_hidden_states, expected)
    assert not torch.allclose(out.visual_hidden_states, last_layer, atol=1e-3)  # the tap is not the last layer


def test_placeholder_count_mismatch_names_the_sample(model, small_processor, media):
    (a, b, _), _ = media
    batch = small_processor(text=["<image> ?", "<image> <image> ?"], images=[[a], [a, b]])
    ids = batch["input_ids"].clone()
    ids[1, (ids[1] == model.config.image_token_id).nonzero()[0]] = 7  # sample 1 loses one placeholder token
    with pytest.raises(ValueError, match="sample 1 has"):
        model(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match=r"1 visual item\(s\) \(from item 3 on\) have no placeholder"):
        model(**{**batch, "pixel_values": torch.cat([batch["pixel_values"], batch["pixel_values"][:1]]),
                 "patch_positions": torch.cat([batch["patch_positions"], batch["patch_positions"][:1]]),
                 "patch_attention_mask": torch.cat([batch["patch_attention_mask"],
                                                    batch["patch_attention_mask"][:1]])})
    with pytest.raises(ValueError, match=r"sample\(s\) \[0, 1\] have visual placeholder tokens but no pixel_values"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    other_ids = ids.masked_fill(ids == model.config.image_token_id, 7)  # a processor with other token ids
    with pytest.raises(ValueError, match=r"3 visual item\(s\) given, but input_ids hold no placeholder token "
                                         r"\(image_token_id 4, video_token_id 5\): does the processor use"):
        model(**{**batch, "input_ids": other_ids})


def test_text_config_that_is_not_a_causal_lm_is_refused():
    from transformers import CLIPVisionConfig

    with pytest.raises(ValueError, match="'clip_vision_model'.*no causal LM class"):
        OneVisionLlavaConfig(text_config=CLIPVisionConfig())
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        OneVisionLlavaConfig(text_config={"hidden_size": 8})
    assert OneVisionLlavaConfig(text_config=BertConfig(is_decoder=True)).text_config.model_type == "bert"
    from onevision_encoder.lmm import OneVisionLlavaForConditionalGeneration

    tiny_p14 = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
    with pytest.raises(ValueError, match=r"llm '.*tiny-p14' must be a causal language model, got model_type "
                                         r"'onevision_encoder'"):
        OneVisionLlavaForConditionalGeneration.from_encoder_and_llm(tiny_p14, tiny_p14)


def test_a_model_from_a_pretrained_encoder_and_llm(tokenizer, make_text_config, tmp_path):
    """Stage 1 starts from an encoder checkpoint of ours (published layout) and any LLM folder."""
    from onevision_encoder import OneVisionEncoderModel
    from onevision_encoder.lmm import OneVisionLlavaForConditionalGeneration
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(2)
    Qwen3ForCausalLM(make_text_config(len(tokenizer))).save_pretrained(tmp_path / "llm")
    tiny_p14 = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
    model = OneVisionLlavaForConditionalGeneration.from_encoder_and_llm(
        tiny_p14, tmp_path / "llm", image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>")).eval()
    assert not any(p.is_meta for p in model.parameters())
    assert model.multi_modal_projector.linear_1.weight.std() > 0
    encoder = OneVisionEncoderModel.from_pretrained(tiny_p14)
    torch.testing.assert_close(model.vision_tower.state_dict(), encoder.state_dict())
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        expected = Qwen3ForCausalLM.from_pretrained(tmp_path / "llm")(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_resizing_the_vocabulary_reaches_the_llm(tokenizer, make_model):
    """For an LLM without room for <image>/<video>: the LM's embeddings and tied head grow, the config follows."""
    model = make_model(tokenizer)
    model.resize_token_embeddings(len(tokenizer) + 5)
    lm = model.language_model
    assert lm.get_input_embeddings().weight.shape[0] == model.config.text_config.vocab_size == len(tokenizer) + 5
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert model(input_ids=torch.tensor([[len(tokenizer) + 4]])).logits.shape[-1] == len(tokenizer) + 5
