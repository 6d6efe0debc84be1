"""OneVision LLaVA: the OneVision Encoder as the vision tower of a multimodal LLM, inside transformers.

The flow: `OneVisionLlavaProcessor` (processing.py) turns chat messages with images and videos into token ids,
where each image/video placeholder is repeated once per visual token, plus one padded patch-list batch of all
visual items (images: anyres or native resolution; videos: codec-selected patches or uniform frames).
`OneVisionLlavaForConditionalGeneration` (modeling.py) encodes that batch in one encoder call, projects
`hidden_states[-2]` with `mlp2x_gelu` and puts the tokens in place of the placeholders of any causal LM
(`text_config`). convert.py reads checkpoints of the published LLaVA-NeXT fork; cli.py is `ove lmm`.

Importing this package registers the classes with AutoConfig, AutoModelForImageTextToText and AutoProcessor.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration import OneVisionLlavaConfig
from .modeling import OneVisionLlavaForConditionalGeneration, OneVisionLlavaProjector, check_placeholders
from .processing import OneVisionLlavaProcessor

AutoConfig.register(OneVisionLlavaConfig.model_type, OneVisionLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(OneVisionLlavaConfig, OneVisionLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(OneVisionLlavaConfig, OneVisionLlavaProcessor, exist_ok=True)

__all__ = [
    "OneVisionLlavaConfig",
    "OneVisionLlavaForConditionalGeneration",
    "OneVisionLlavaProcessor",
    "OneVisionLlavaProjector",
    "check_placeholders",
]
