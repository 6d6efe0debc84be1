"""Any image or video encoder behind one interface: our model, or a transformers vision model.

`load_backbone(name)` takes a hub id or local folder (or a loaded model) and returns a `Backbone`: a module
that runs on the padded patch-list batches every reader of this package makes (`collate_patch_lists`) and
gives per-token features with their (t, row, col) positions plus one pooled embedding per clip.

- The OneVision Encoder takes the patch list as it is (sparse codec patches included).
- Other encoders (SigLIP/SigLIP2, CLIP, MetaCLIP, DINOv2/v3, AIMv2, ... anything `AutoModel` loads whose
  forward takes `pixel_values`; for dual image-text models the vision tower) get each clip's whole frames
  back from the patch list and encode them one by one. Their tokens are `last_hidden_state` with DINO's
  class and register tokens dropped (a class token of other families is kept, at (t, -1, -1)); t becomes
  the frame's ordinal in its clip (0..T-1). The pooled embedding is the model's own (CLIP-family image
  embeddings through the visual projection, SigLIP's attention-pool head, DINO's normed class token), the
  mean over a clip's frames or their concatenation (`video_pooling`).

Each backbone carries its preprocessing (`ImageSettings`: size, mean, std, patch size), read from the
model's `preprocessor_config.json` when it has one, else from per-family defaults.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .processing import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, VIDEO_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# Per-family normalisation when a model has no preprocessor config (by config.model_type prefix).
FAMILY_STATS = {"siglip": (HALF, HALF), "dinov": (IMAGENET_MEAN, IMAGENET_STD), "aimv2": (CLIP_MEAN, CLIP_STD)}
DINO_INPUT_SIZE = 224  # DINO configs say 518 (their pretraining size); users and the published probe use 224
VIDEO_POOLINGS = ("mean", "concat")


class NotAVisionModel(ValueError):
    """The model loads, but takes no images."""


@dataclass(frozen=True)
class ImageSettings:
    """How a backbone's inputs are prepared: frames and images resized (short side) and centre-cropped to
    `video_size` / `image_size`, normalised with `mean`/`std`, cut into `patch_size` patches."""

    image_size: int
    video_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int


@dataclass
class BackboneOutput:
    """One batch's features. last_hidden_state `[B, M, D]` tokens, token_positions `[B, M, 3]` (t, row, col),
    attention_mask `[B, M]` (1 = real token), pooler_output `[B, P]` one embedding per clip."""

    last_hidden_state: torch.Tensor
    token_positions: torch.Tensor
    attention_mask: torch.Tensor
    pooler_output: torch.Tensor


class Backbone(nn.Module):
    """A frozen encoder on patch-list batches. `name`: what it was loaded from; `hidden_size`: token width;
    `pooled_size`: width of the pooled embedding; `takes_patch_lists`: True when any patch list (sparse codec
    input) works, False when clips must be whole frames; `ordinal_time`: True when token t is the frame's
    ordinal (the probe then adds a temporal embedding), False when t is already a position the model saw."""

    takes_patch_lists = False
    ordinal_time = True

    def __init__(self, model: nn.Module, name: str, settings: ImageSettings, hidden_size: int, pooled_size: int):
        super().__init__()
        self.model = model
        self.name = name
        self.settings = settings
        self.hidden_size = hidden_size
        self.pooled_size = pooled_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class OneVisionBackbone(Backbone):
    """Our model: the patch list goes in as it is; tokens keep their RoPE positions."""

    takes_patch_lists = True
    ordinal_time = False

    def __init__(self, model, name: str):
        c = model.config
        settings = ImageSettings(IMAGE_SIZE, VIDEO_SIZE, CLIP_MEAN, CLIP_STD, c.patch_size)
        super().__init__(model, name, settings, c.hidden_size, c.hidden_size)

    def forward(self, pixel_values, patch_positions, attention_mask) -> BackboneOutput:
        out = self.model(pixel_values=pixel_values, patch_positions=patch_positions, attention_mask=attention_mask)
        return BackboneOutput(out.last_hidden_state, patch_positions, attention_mask, out.pooler_output)


class FrameBackbone(Backbone):
    """A transformers image encoder run frame by frame on clips made of whole frames."""

    def __init__(self, tower: nn.Module, name: str, settings: ImageSettings, family: str,
                 projection: nn.Module | None = None, video_pooling: str = "mean"):
        if video_pooling not in VIDEO_POOLINGS:
            raise ValueError(f"video_pooling must be one of {VIDEO_POOLINGS}, got {video_pooling!r}")
        config = tower.config
        pooled = projection.out_features if isinstance(projection, nn.Linear) else config.hidden_size
        super().__init__(tower, name, settings, config.hidden_size, pooled)
        self.projection = projection
        self.family = family
        self.drops_prefix = family.startswith("dinov")  # CLS and register tokens, as DINO users do
        self.video_pooling = video_pooling

    def forward(self, pixel_values, patch_positions, attention_mask) -> BackboneOutput:
        frames, ordinals, owners = self._frames(pixel_values, patch_positions, attention_mask)
        tokens, pooled = self.encode_frames(frames)
        rows = self.settings.video_size // self.settings.patch_size
        grid = _grid(rows, tokens.shape[1], self.drops_prefix, tokens.device)
        if self.drops_prefix:
            tokens = tokens[:, tokens.shape[1] - rows * rows :]
        clips = [torch.nonzero(owners == b).flatten() for b in range(pixel_values.shape[0])]
        per_clip = [tokens[i].flatten(0, 1) for i in clips]
        positions = [torch.cat([ordinals[i].repeat_interleave(len(grid))[:, None], grid.repeat(len(i), 1)], 1)
                     for i in clips]
        from .processing import collate_patch_lists

        batch = collate_patch_lists(list(zip(per_clip, positions)))
        return BackboneOutput(batch["pixel_values"], batch["patch_positions"].to(tokens.device),
                              batch["attention_mask"].to(tokens.device), self._pool(pooled, clips))

    def encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frames `[F, 3, S, S]` -> (`last_hidden_state [F, n, D]`, pooled `[F, P]`)."""
        if self.family.startswith("siglip2"):
            out = self.model(**_naflex_inputs(frames, self.settings.patch_size))
        else:
            out = self.model(pixel_values=frames)
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return out.last_hidden_state, pooled

    def _frames(self, pixel_values, patch_positions, attention_mask):
        """The whole frames of every clip in the batch, their ordinals and the clip each belongs to."""
        s, p = self.settings.video_size, self.settings.patch_size
        per_frame = (s // p) ** 2
        frames, ordinals, owners = [], [], []
        for b in range(pixel_values.shape[0]):
            k = int(attention_mask[b].sum())
            if k % per_frame:
                raise ValueError(f"{self.name} encodes whole frames: a clip of {k} patches is not whole frames of "
                                 f"{per_frame} (use frame sampling, not codec selection, for this model)")
            patches = pixel_values[b, :k].view(k // per_frame, s // p, s // p, 3, p, p)
            frames.append(patches.permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, s, s))
            slots = patch_positions[b, :k:per_frame, 0]
            ordinals.append(torch.unique(slots, return_inverse=True)[1].to(slots.device))
            owners.append(torch.full((k // per_frame,), b, device=pixel_values.device))
        return torch.cat(frames), torch.cat(ordinals), torch.cat(owners)

    def _pool(self, pooled: torch.Tensor, clips: list[torch.Tensor]) -> torch.Tensor:
        if self.video_pooling == "mean":
            return torch.stack([pooled[i].mean(0) for i in clips])
        counts = {len(i) for i in clips}
        if len(counts) > 1:
            raise ValueError(f"video_pooling 'concat' needs the same frame count in every clip, got {sorted(counts)} "
                             "(images count as one frame: encode them apart from videos)")
        return torch.stack([pooled[i].flatten() for i in clips])


def _grid(rows: int, num_tokens: int, drops_prefix: bool, device) -> torch.Tensor:
    """(row, col) of one frame's kept tokens: a kept prefix (class token) at (-1, -1), then the patches."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(rows), indexing="ij")
    grid = torch.stack([r.flatten(), c.flatten()], 1)
    prefix = 0 if drops_prefix else num_tokens - rows * rows
    if prefix < 0:
        raise ValueError(f"the model gave {num_tokens} tokens for a {rows}x{rows} patch grid")
    return torch.cat([torch.full((prefix, 2), -1), grid]).to(device)


def _naflex_inputs(frames: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """SigLIP2 (NaFlex) takes patches flattened in (p, p, C) order with a mask and each image's grid."""
    f, c, s, _ = frames.shape
    n = s // patch_size
    patches = frames.view(f, c, n, patch_size, n, patch_size).permute(0, 2, 4, 3, 5, 1).reshape(f, n * n, -1)
    mask = torch.ones(f, n * n, dtype=torch.long, device=frames.device)
    shapes = torch.tensor([[n, n]] * f, device=frames.device)
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def load_backbone(model, video_pooling: str = "mean") -> Backbone:
    """A `Backbone` from a hub id or local folder (published OneVision layout, or any transformers vision
    model), a loaded model, or a `Backbone` (returned as it is). Weights in float32; callers autocast."""
    if isinstance(model, Backbone):
        return model
    from .modeling import OneVisionEncoderModel

    if isinstance(model, OneVisionEncoderModel):
        return OneVisionBackbone(model, _loaded_name(model))
    if isinstance(model, nn.Module):
        return _wrap_transformers(model, _loaded_name(model), None, video_pooling)
    name = os.fspath(model)
    local = os.path.expanduser(name)
    if (os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(local)) and not os.path.isdir(local):
        raise ValueError(f"model {name!r}: no such folder")
    from transformers import AutoConfig, AutoModel

    from .configuration import OneVisionEncoderConfig

    source = local if os.path.isdir(local) else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model {name!r}: cannot be loaded ({e})") from e
    display = os.path.abspath(local) if os.path.isdir(local) else name
    if isinstance(config, OneVisionEncoderConfig):
        return OneVisionBackbone(OneVisionEncoderModel.from_pretrained(source, dtype=torch.float32), display)
    loaded = AutoModel.from_pretrained(source, dtype=torch.float32)
    return _wrap_transformers(loaded, display, source, video_pooling)


def _loaded_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _wrap_transformers(model: nn.Module, name: str, source: str | None, video_pooling: str) -> FrameBackbone:
    tower, projection = _vision_tower(model, name)
    family = _family(model.config)
    vision_config = tower.config
    return FrameBackbone(tower, name, image_settings(source, vision_config, family), family, projection, video_pooling)


def _vision_tower(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module | None]:
    """(the module that takes pixel_values, the image projection after it or None)."""
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):  # CLIP, SigLIP, MetaCLIP, AIMv2 ...
        return _as_model(model.vision_model, model), getattr(model, "visual_projection", None)
    forward = inspect.signature(model.forward).parameters
    if "pixel_values" in forward and "input_ids" not in forward:
        return model, None
    raise NotAVisionModel(f"model {name!r} ({type(model).__name__}) is not a vision model: its forward takes no "
                          "pixel_values (give an image encoder, or an image-text model with a vision tower)")


def _as_model(tower: nn.Module, parent: nn.Module) -> nn.Module:
    """Dual models' towers are inner modules without a config of their own: give them the vision config."""
    if not hasattr(tower, "config"):
        tower.config = parent.config.vision_config
    return tower


def _family(config) -> str:
    vision = getattr(config, "vision_config", None)
    return (getattr(vision, "model_type", None) or config.model_type or "").lower()


def image_settings(source: str | None, vision_config, family: str) -> ImageSettings:
    """Size and normalisation from the model's preprocessor config when there is one, else per-family
    defaults (SigLIP 0.5/0.5, DINO ImageNet statistics at 224 px, others CLIP statistics at the config's
    image size)."""
    patch = int(vision_config.patch_size)
    mean, std = next((stats for prefix, stats in FAMILY_STATS.items() if family.startswith(prefix)),
                     (CLIP_MEAN, CLIP_STD))
    size = DINO_INPUT_SIZE if family.startswith("dinov") else int(getattr(vision_config, "image_size", 224))
    processor = _preprocessor_config(source) if source else None
    if processor:
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
        size = _processor_size(processor) or size
    if size % patch:
        raise ValueError(f"input size {size} is not a multiple of the model's patch size {patch}")
    return ImageSettings(size, size, tuple(map(float, mean)), tuple(map(float, std)), patch)


def _processor_size(processor: dict) -> int | None:
    """The side of the square the processor hands the model: its crop, else its resize target."""
    for key in ("crop_size", "size"):
        value = processor.get(key) if processor.get(f"do_{'center_crop' if key == 'crop_size' else 'resize'}", True) else None
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
    return None


def _preprocessor_config(source: str) -> dict | None:
    """The model's preprocessor_config.json as a dict (local folder, or the hub's cached copy), or None."""
    path = os.path.join(source, "preprocessor_config.json")
    if not os.path.isdir(source):
        from transformers.utils import cached_file

        try:
            path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
