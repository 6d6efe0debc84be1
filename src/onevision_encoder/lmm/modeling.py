"""OneVision LLaVA: the OneVision Encoder, the `mlp2x_gelu` projector and any transformers causal LM.

The flow of one forward pass:

1. every visual item of the batch (an image, a codec-selected video, uniform frames) arrives as one patch list
   of a padded batch: `pixel_values [M, N, C*p*p]`, `patch_positions [M, N, 3]`, `patch_attention_mask [M, N]`
   (`onevision_encoder.collate_patch_lists`), M items in text order, sample after sample;
2. one encoder call over that batch; the features are `hidden_states[vision_feature_layer]`;
3. the projector maps each real (unpadded) token to the LM's width;
4. the LM's embeddings of the text, where each visual placeholder token (`image_token_id`, `video_token_id`)
   is replaced by the next projected visual token, in order;
5. the LM does the rest (left padding, KV cache and generation are its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..modeling import OneVisionEncoderModel
from .configuration import OneVisionLlavaConfig, check_causal_lm

VISUAL_INPUTS = ("pixel_values", "patch_positions", "patch_attention_mask")


@dataclass
class OneVisionLlavaOutput(CausalLMOutputWithPast):
    """The LM's output plus the projected visual tokens of this pass (`[sum of tokens, text hidden]`; None when
    the pass had no visual input, e.g. every generation step after the prefill)."""

    visual_hidden_states: torch.FloatTensor | None = None


class OneVisionLlavaProjector(nn.Module):
    """The published `mlp2x_gelu`: Linear(vision hidden -> text hidden), exact GELU, Linear(text -> text), per token."""

    def __init__(self, config: OneVisionLlavaConfig):
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision, text)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text, text)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def tokens_per_item(pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None) -> list[int]:
    """The real (unpadded) patch count of each item of a patch-list batch."""
    if patch_attention_mask is None:
        return [pixel_values.shape[1]] * pixel_values.shape[0]
    return patch_attention_mask.ne(0).sum(dim=1).tolist()


def check_placeholders(placeholders_per_sample: list[int], tokens_per_item: list[int]) -> list[range]:
    """The visual items, in order, must fill each sample's placeholder tokens exactly; returns each sample's
    items (as a range of item indices).

    Raises one ValueError naming the first sample whose placeholders and items disagree.
    """
    item, items_of_samples = 0, []
    for sample, needed in enumerate(placeholders_per_sample):
        first, given = item, 0
        while given < needed and item < len(tokens_per_item):
            given += tokens_per_item[item]
            item += 1
        if given != needed:
            items = f"items {first}..{item - 1}" if item > first else "no item left"
            raise ValueError(
                f"sample {sample} has {needed} visual placeholder tokens, but the visual items given for it "
                f"({items}) make {given} visual tokens: as many images/videos as placeholders are needed, each "
                "placeholder expanded to its item's token count (the processor does this)"
            )
        items_of_samples.append(range(first, item))
    if item != len(tokens_per_item):
        raise ValueError(f"{len(tokens_per_item) - item} visual item(s) (from item {item} on) have no placeholder "
                         f"tokens left in the text ({len(tokens_per_item)} items for "
                         f"{sum(placeholders_per_sample)} placeholder tokens)")
    return items_of_samples


class OneVisionLlavaPreTrainedModel(PreTrainedModel):
    config_class = OneVisionLlavaConfig
    config: OneVisionLlavaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["OneVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the placeholder check reads counts on the host

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The encoder and the LM initialise their own modules; this covers the projector.
        if isinstance(module, OneVisionLlavaProjector):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
                nn.init.zeros_(linear.bias)


class OneVisionLlavaForConditionalGeneration(OneVisionLlavaPreTrainedModel, GenerationMixin):
    """Our encoder + `mlp2x_gelu` + a causal LM, with images and videos in any batch. See the module docstring."""

    def __init__(self, config: OneVisionLlavaConfig):
        super().__init__(config)
        self.vision_tower = OneVisionEncoderModel(config.vision_config)
        self.multi_modal_projector = OneVisionLlavaProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # device_map="auto" must not split the LM's blocks either
        self._no_split_modules = ["OneVisionEncoderLayer", *(self.language_model._no_split_modules or [])]
        self.post_init()

    @classmethod
    def from_encoder_and_llm(cls, encoder, llm, image_token_id: int | None = None, video_token_id: int | None = None,
                             **load_kwargs) -> "OneVisionLlavaForConditionalGeneration":
        """A new model from a pretrained encoder and a pretrained causal LM (hub ids, folders or loaded
        models) with a freshly initialised projector: the start of training stage 1. load_kwargs (e.g.
        dtype) go to both `from_pretrained` calls. Each part's weights are loaded once, not allocated twice."""
        if isinstance(llm, (str, os.PathLike)):  # checked before any weight is loaded
            check_causal_lm(AutoConfig.from_pretrained(llm), f"llm {os.fspath(llm)!r} must be")
        if isinstance(encoder, (str, os.PathLike)):
            encoder = OneVisionEncoderModel.from_pretrained(encoder, **load_kwargs)
        if isinstance(llm, (str, os.PathLike)):
            llm = AutoModelForCausalLM.from_pretrained(llm, **load_kwargs)
        ids = {k: v for k, v in (("image_token_id", image_token_id), ("video_token_id", video_token_id)) if v is not None}
        config = OneVisionLlavaConfig(vision_config=encoder.config, text_config=llm.config, **ids)
        with torch.device("meta"):  # the parts come loaded: build only the skeleton
            model = cls(config)
        model.vision_tower, model.language_model = encoder, llm
        weight = llm.get_input_embeddings().weight
        model.multi_modal_projector = OneVisionLlavaProjector(config).to(device=weight.device, dtype=weight.dtype)
        model._init_weights(model.multi_modal_projector)
        return model

    # The text side belongs to the LM: embeddings, head and their resizing are its own.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def enable_input_require_grads(self) -> None:
        """Make the outputs of both input embeddings (the LM's tokens, the tower's patches) require grad, so
        adapters in a frozen LM or tower get gradients under reentrant checkpointing. transformers 5 hooks
        every sub-model's embeddings itself; 4.x only `get_input_embeddings()`, the LM's."""
        super().enable_input_require_grads()
        if not hasattr(self, "_require_grads_hooks"):  # transformers 4.x
            self._tower_require_grads_hook = self.vision_tower.get_input_embeddings().register_forward_hook(
                lambda module, inputs, output: output.requires_grad_(True))

    def disable_input_require_grads(self) -> None:
        super().disable_input_require_grads()
        if hasattr(self, "_tower_require_grads_hook"):
            self._tower_require_grads_hook.remove()
            del self._tower_require_grads_hook

    def get_visual_features(
        self, pixel_values: torch.Tensor, patch_positions: torch.Tensor, patch_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One encoder call over a padded patch-list batch of M items -> their projected real tokens
        `[sum of tokens, text hidden]`, item after item."""
        out = self.vision_tower(
            pixel_values=pixel_values,
            patch_positions=patch_positions,
            attention_mask=patch_attention_mask,
            output_hidden_states=True,
            return_dict=True,
        )
        features = out.hidden_states[self.config.vision_feature_layer]
        if patch_attention_mask is not None:
            features = features[patch_attention_mask.to(features.device) != 0]
        else:
            features = features.flatten(0, 1)
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, L]` bool: the image and video placeholder tokens."""
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        patch_attention_mask: torch.Tensor | None = None,
        decoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings with the visual tokens in place of the placeholders; also returns the visual tokens.
        decoding: a generation step after the prefill, whose new tokens may be placeholder ids the LM produced
        itself (sampling, an untrained head): text then, not visual slots."""
        placeholders = self.placeholder_mask(input_ids)
        # Placeholder ids may lie beyond the vocabulary: embed them as token 0, they are overwritten anyway.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        if pixel_values is None:
            if bool(placeholders.any()) and not decoding:
                rows = placeholders.any(dim=1).nonzero().flatten().tolist()
                raise ValueError(f"sample(s) {rows} have visual placeholder tokens but no pixel_values were given")
            return embeds, None
        if patch_positions is None:
            raise ValueError("pixel_values (a patch-list batch [M, N, C*p*p]) needs patch_positions [M, N, 3]")
        if pixel_values.ndim != 3:
            raise ValueError(f"pixel_values must be a patch-list batch [M, N, C*p*p] (collate_patch_lists), got "
                             f"shape {tuple(pixel_values.shape)}")
        tokens = tokens_per_item(pixel_values, patch_attention_mask)
        if not bool(placeholders.any()):
            raise ValueError(f"{len(tokens)} visual item(s) given, but input_ids hold no placeholder token "
                             f"(image_token_id {self.config.image_token_id}, video_token_id "
                             f"{self.config.video_token_id}): does the processor use the model's ids?")
        check_placeholders(placeholders.sum(dim=1).tolist(), tokens)
        visual = self.get_visual_features(pixel_values, patch_positions, patch_attention_mask)
        embeds = embeds.masked_scatter(placeholders.unsqueeze(-1).to(embeds.device), visual.to(embeds.dtype))
        return embeds, visual

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        patch_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> OneVisionLlavaOutput:
        r"""
        Args:
            input_ids: `[B, L]` token ids (left-padded for generation), each image/video placeholder repeated
                once per visual token of its item.
            pixel_values: `[M, N, C*p*p]` the batch's M visual items as a padded patch-list batch, in the order
                their placeholders appear (sample after sample).
            patch_positions: `[M, N, 3]` (t, row, col) of each patch.
            patch_attention_mask: `[M, N]` 1 for real patches, 0 for padding.
            attention_mask, position_ids, labels and the rest (cache, use_cache, logits_to_keep, ...): the LM's.
                Without position_ids on a fresh pass, they count the real tokens of attention_mask, so a
                left-padded sample sees the positions it would have alone.
        """
        visual = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids (or inputs_embeds)")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x / 4.x names
            decoding = cache is not None and not isinstance(cache, tuple) and cache.get_seq_length() > 0
            inputs_embeds, visual = self.embed(input_ids, pixel_values, patch_positions, patch_attention_mask,
                                               decoding=decoding)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (their placeholders say where the visual tokens go), "
                             "not inputs_embeds")
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2 \
                and attention_mask.shape[1] == inputs_embeds.shape[1]:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **{**kwargs, "return_dict": True},
        )
        return OneVisionLlavaOutput(**out, visual_hidden_states=visual)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beams and num_return_sequences repeat each sample; its visual items must be repeated with it as a
        # group (the default repeats item by item, which pairs a sample's copies with the wrong items).
        visual = {name: model_kwargs.pop(name) for name in VISUAL_INPUTS if model_kwargs.get(name) is not None}
        if visual and expand_size > 1 and input_ids is not None:
            tokens = tokens_per_item(visual["pixel_values"], visual.get("patch_attention_mask"))
            groups = check_placeholders(self.placeholder_mask(input_ids).sum(dim=1).tolist(), tokens)
            order = torch.tensor([i for items in groups for _ in range(expand_size) for i in items], dtype=torch.long)
            visual = {name: value.index_select(0, order.to(value.device)) for name, value in visual.items()}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        return input_ids, {**model_kwargs, **visual}

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, never emitting an image or video placeholder id: they stand for visual
        tokens, and one emitted would hand a step without the KV cache (`use_cache=False`) more placeholders
        than there are visual tokens. A `suppress_tokens` given here replaces this default."""
        if "suppress_tokens" not in kwargs:
            config = kwargs.get("generation_config") or self.generation_config
            ids = {self.config.image_token_id, self.config.video_token_id} - {None}
            kwargs["suppress_tokens"] = sorted(set(getattr(config, "suppress_tokens", None) or ()) | ids)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # The visual tokens enter at the prefill only: later steps read them from the KV cache.
        visual = {name: kwargs.pop(name, None) for name in VISUAL_INPUTS}
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            inputs.update({name: value for name, value in visual.items() if value is not None})
        return inputs
