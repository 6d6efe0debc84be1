"""OneVision Encoder: a video and image ViT fed with codec-style sparse patches.

Importing the package registers the model with transformers' Auto classes, so
`AutoModel.from_pretrained("lmms-lab-encoder/onevision-encoder-large")` works without remote code.
"""

from transformers import AutoConfig, AutoModel

from .codec import CodecClip, VideoDecodeError, replenishment_psnr, sample_frames, select_patches
from .configuration import OneVisionEncoderConfig
from .encode import Encoder, Features, load_features
from .modeling import OneVisionEncoderModel, OneVisionEncoderPreTrainedModel
from .processing import (
    CLIP_MEAN,
    CLIP_STD,
    PatchClip,
    collate_patch_lists,
    image_processor,
    patchify,
    preprocess_video,
    save_preprocessor_config,
    temporal_slots,
    video_inputs,
)

__version__ = "0.1.0"

AutoConfig.register(OneVisionEncoderConfig.model_type, OneVisionEncoderConfig, exist_ok=True)
AutoModel.register(OneVisionEncoderConfig, OneVisionEncoderModel, exist_ok=True)

__all__ = [
    "CodecClip",
    "VideoDecodeError",
    "replenishment_psnr",
    "sample_frames",
    "select_patches",
    "Encoder",
    "Features",
    "load_features",
    "CLIP_MEAN",
    "CLIP_STD",
    "OneVisionEncoderConfig",
    "OneVisionEncoderModel",
    "OneVisionEncoderPreTrainedModel",
    "PatchClip",
    "collate_patch_lists",
    "image_processor",
    "patchify",
    "preprocess_video",
    "save_preprocessor_config",
    "temporal_slots",
    "video_inputs",
]
