"""Configuration of the OneVision LLaVA model: our encoder, the `mlp2x_gelu` projector and any causal LM."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..configuration import OneVisionEncoderConfig

PROJECTOR_TYPES = ("mlp2x_gelu",)

# The ids "<image>" and "<video>" get when added to Qwen3's tokenizer (151669 entries; its embedding has room).
QWEN3_IMAGE_TOKEN_ID = 151669
QWEN3_VIDEO_TOKEN_ID = 151670


def _sub_config(value, default_class, name: str) -> PretrainedConfig:
    if value is None:
        return default_class()
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        if default_class is OneVisionEncoderConfig:
            return OneVisionEncoderConfig(**{k: v for k, v in value.items() if k != "model_type"})
        if "model_type" not in value:
            raise ValueError(f"{name} given as a dict needs a 'model_type' (e.g. 'qwen3'), got keys {sorted(value)}")
        return AutoConfig.for_model(**value)
    raise ValueError(f"{name} must be a config or a dict, got {type(value).__name__}")


def check_causal_lm(config: PretrainedConfig, what: str = "text_config must be the config of") -> None:
    """One clear error when `config` is not the config of a transformers causal LM."""
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{what} a causal language model, got model_type {config.model_type!r} "
                         f"({type(config).__name__}), which has no causal LM class")


class OneVisionLlavaConfig(PretrainedConfig):
    r"""Configuration of a [`OneVisionLlavaForConditionalGeneration`].

    Args:
        vision_config: the encoder's `OneVisionEncoderConfig` (or its dict); default the published ViT-L.
        text_config: the config of any transformers causal LM (Qwen3 as published, Qwen2, Llama, ...), or its
            dict with a `model_type`; default a Qwen3 config.
        vision_feature_layer: which entry of the encoder's `hidden_states` feeds the projector; -2 (the
            second-to-last layer's output, before `layernorm_post`) as published.
        projector_type: `"mlp2x_gelu"`: Linear(vision hidden -> text hidden), exact GELU, Linear(text -> text).
        image_token_id / video_token_id: the placeholder tokens the processor repeats once per visual token.
    """

    model_type = "onevision_llava"
    sub_configs = {"text_config": AutoConfig, "vision_config": OneVisionEncoderConfig}

    def __init__(
        self,
        vision_config: OneVisionEncoderConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        vision_feature_layer: int = -2,
        projector_type: str = "mlp2x_gelu",
        image_token_id: int = QWEN3_IMAGE_TOKEN_ID,
        video_token_id: int = QWEN3_VIDEO_TOKEN_ID,
        **kwargs,
    ):
        from transformers import Qwen3Config

        self.vision_config = _sub_config(vision_config, OneVisionEncoderConfig, "vision_config")
        self.text_config = _sub_config(text_config, Qwen3Config, "text_config")
        check_causal_lm(self.text_config)
        depth = self.vision_config.num_hidden_layers
        if not -(depth + 1) <= vision_feature_layer <= depth:
            raise ValueError(f"vision_feature_layer {vision_feature_layer} is outside the encoder's {depth + 1} "
                             f"hidden states (embeddings + {depth} layers)")
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {projector_type!r}")
        if image_token_id == video_token_id:
            raise ValueError(f"image_token_id and video_token_id must differ, both are {image_token_id}")
        self.vision_feature_layer = vision_feature_layer
        self.projector_type = projector_type
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
