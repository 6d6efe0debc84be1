"""Convert a checkpoint of the published LLaVA-NeXT fork (`LlavaQwen3ForCausalLM`) into our layout.

The published folder holds one config for the whole model: the LLM's keys plus `mm_*` keys (REFERENCE §8),
and weights `model.vision_tower.vision_tower.*` (the encoder, unchanged), `model.mm_projector.{0,2}.*` (the
two linear layers of `mlp2x_gelu`) and the LLM's own `model.*` / `lm_head.*`. We write a
`OneVisionLlavaConfig` folder (`vision_tower.*`, `multi_modal_projector.linear_{1,2}.*`,
`language_model.*`) with the same tensors, plus the processor when the source has a tokenizer. Tensors are
streamed shard by shard (safetensors only, never pickles), so a 4B model converts in a few GiB of memory.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import tempfile

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from ..configuration import OneVisionEncoderConfig
from .configuration import OneVisionLlavaConfig

VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_KEYS = {"model.mm_projector.0.": "multi_modal_projector.linear_1.",
                  "model.mm_projector.2.": "multi_modal_projector.linear_2."}
REQUIRED_CONFIG_KEYS = ("mm_projector_type", "mm_hidden_size", "mm_vision_select_layer")
LLM_TYPES = {"llava_qwen3": "qwen3", "llava_qwen": "qwen2", "llava_llama": "llama", "llava_mistral": "mistral"}
SHARD_BYTES = 4 * 1024**3


class LayoutError(ValueError):
    """The source folder is not a checkpoint in the published LLaVA layout."""


def _read_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise LayoutError(f"{src} is not a folder")
    if not os.path.isfile(path):
        raise LayoutError(f"{src} has no config.json, so it is not a checkpoint in the published LLaVA layout")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path} is not valid JSON ({e})") from None
    if config.get("model_type") == OneVisionLlavaConfig.model_type:
        raise LayoutError(f"{src} is in our layout already: AutoModelForImageTextToText loads it as it is")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise LayoutError(f"{path} is not a published LLaVA config: it lacks {missing} (model_type "
                          f"{config.get('model_type')!r})")
    if config["mm_projector_type"] != "mlp2x_gelu":
        raise LayoutError(f"{path}: mm_projector_type {config['mm_projector_type']!r} is not supported "
                          "(the published models use 'mlp2x_gelu')")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise LayoutError(f"{path}: mm_patch_merge_type {config['mm_patch_merge_type']!r} is not supported "
                          "(the published models use 'flat': no newline or merging tokens)")
    return config


def _weight_files(src: str) -> list[str]:
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    if not names:
        pickles = [n for n in os.listdir(src) if n.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {pickles}: pickled weights are never loaded; save them as safetensors first)" if pickles else ""
        raise LayoutError(f"{src} has no .safetensors weights{hint}")
    missing = [n for n in names if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise LayoutError(f"{src} lacks the weight file(s) {missing} its index names")
    return [os.path.join(src, n) for n in names]


def rename_key(key: str) -> str:
    """A published key -> ours (LayoutError for a key outside the published model's parts)."""
    if key.startswith(VISION_PREFIX):
        return "vision_tower." + key[len(VISION_PREFIX):]
    for old, new in PROJECTOR_KEYS.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith(("model.", "lm_head.")):
        return "language_model." + key  # the check against the model's own keys catches the rest
    raise LayoutError(f"weight {key!r} is not part of the published layout (expected model.* or lm_head.*)")


def _encoder_config(shapes: dict[str, tuple], vision_config: str | None, config: dict) -> OneVisionEncoderConfig:
    """The encoder's config: given, found beside the checkpoint (mm_vision_tower as a local folder), or read
    off the weights' shapes (head_dim 64, as in every release)."""
    source = vision_config or config.get("mm_vision_tower")
    if vision_config or (source and os.path.isfile(os.path.join(source, "config.json"))):
        encoder = OneVisionEncoderConfig.from_pretrained(source)
        # a published encoder folder names its remote code; ours needs none and has no such files beside it
        encoder.__dict__.pop("auto_map", None)
        encoder.architectures = None
        return encoder
    prefix = "vision_tower."
    patch = shapes.get(prefix + "embeddings.patch_embedding.weight")
    if patch is None:
        raise LayoutError(f"the weights lack {VISION_PREFIX}embeddings.patch_embedding.weight: no vision tower")
    hidden, channels, patch_size = patch[0], patch[1], patch[2]
    fc1 = shapes.get(prefix + "encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise LayoutError(f"the weights lack {VISION_PREFIX}encoder.layers.0.mlp.fc1.weight: no encoder layers")
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(prefix + "encoder.layers."))
    return OneVisionEncoderConfig(
        hidden_size=hidden, num_channels=channels, patch_size=patch_size, num_hidden_layers=layers,
        intermediate_size=fc1[0], num_attention_heads=hidden // 64,
        layer_norm_type="layer_norm" if prefix + "layernorm_pre.bias" in shapes else "rms_norm",
        use_head=prefix + "head.probe" in shapes,
    )


def _text_config(config: dict):
    """The LLM's config: the keys its config class knows (LLaVA-NeXT's own settings and bookkeeping dropped)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type", "")
    llm_type = LLM_TYPES.get(model_type, model_type.removeprefix("llava_"))
    if llm_type not in CONFIG_MAPPING:
        raise LayoutError(f"model_type {model_type!r}: transformers has no LLM of type {llm_type!r}")
    known = set(CONFIG_MAPPING[llm_type]().to_dict()) - {"model_type", "architectures", "transformers_version"}
    return AutoConfig.for_model(llm_type, **{k: v for k, v in config.items() if k in known})


def _check_against(config: OneVisionLlavaConfig, shapes: dict[str, tuple], published: dict[str, tuple]) -> None:
    """The renamed weights must be exactly the model's (a tied lm_head may be absent), with its shapes."""
    import torch

    from .modeling import OneVisionLlavaForConditionalGeneration

    with torch.device("meta"):  # no memory: only names and shapes
        expected = {k: tuple(v.shape) for k, v in OneVisionLlavaForConditionalGeneration(config).state_dict().items()}
    unexpected = [published[k] for k in shapes if k not in expected]
    if unexpected:
        raise LayoutError(f"weight {unexpected[0]!r} is not part of the published layout (flat mlp2x_gelu, the "
                          f"encoder, the LLM){f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    tied = {"language_model.lm_head.weight"} if getattr(config.text_config, "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in shapes and k not in tied]
    if missing:
        raise LayoutError(f"the weights lack {len(missing)} tensor(s) of the model, e.g. {missing[0]!r}")
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise LayoutError(f"weight {published[key]!r} has shape {list(shape)}, the config implies {list(expected[key])}")


def _shards(shapes: dict[str, tuple], sizes: dict[str, int]) -> list[list[str]]:
    shards, current, total = [], [], 0
    for key in shapes:
        if current and total + sizes[key] > SHARD_BYTES:
            shards.append(current)
            current, total = [], 0
        current.append(key)
        total += sizes[key]
    return shards + [current]


def convert(src: str | os.PathLike, dst: str | os.PathLike, vision_config: str | None = None,
            tokenizer: str | None = None) -> OneVisionLlavaConfig:
    """Convert the published checkpoint in `src` into our layout in `dst` (which must not exist yet; written
    to a temporary folder beside it first, so a failure leaves nothing half-written). The processor is written
    too, over `tokenizer` (a folder or hub id) or else the tokenizer in `src` if it has one. Returns the config."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst):
        raise ValueError(f"{dst} exists already: give a new folder")
    config = _read_config(src)
    where, shapes, sizes, published = {}, {}, {}, {}
    for path in _weight_files(src):
        try:
            f = safe_open(path, framework="pt")
        except SafetensorError as e:
            raise LayoutError(f"{path} cannot be read as safetensors ({e})") from None
        with f:
            for key in f.keys():
                ours = rename_key(key)
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                where[ours], shapes[ours], published[ours] = (path, key), shape, key
                sizes[ours] = max(1, math.prod(shape)) * _itemsize(piece.get_dtype())
    for needed in ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"):
        if needed not in shapes:
            old = next(o for o, n in PROJECTOR_KEYS.items() if needed.startswith(n))
            raise LayoutError(f"the weights lack {old}weight (the projector)")
    encoder = _encoder_config(shapes, vision_config, config)
    text = _text_config(config)
    if config["mm_hidden_size"] != encoder.hidden_size:
        raise LayoutError(f"mm_hidden_size {config['mm_hidden_size']} differs from the vision tower's width "
                          f"{encoder.hidden_size}")
    try:
        ours = OneVisionLlavaConfig(vision_config=encoder, text_config=text,
                                    vision_feature_layer=config["mm_vision_select_layer"])
    except ValueError as e:
        raise LayoutError(f"{os.path.join(src, 'config.json')}: {e}") from None
    _check_against(ours, shapes, published)
    # read before the processor is looked for: a bad value fails with a tokenizer or without
    pinpoints = grid_pinpoints(config.get("image_grid_pinpoints"), encoder.image_size)
    processor = _processor(src, tokenizer, text, pinpoints)
    if processor is not None:
        ours.image_token_id, ours.video_token_id = processor.image_token_id, processor.video_token_id
        if max(ours.image_token_id, ours.video_token_id) >= text.vocab_size:
            raise LayoutError(f"the tokenizer's new <image>/<video> ids {ours.image_token_id}/{ours.video_token_id} "
                              f"do not fit the LLM's vocabulary of {text.vocab_size}")
    ours.architectures = ["OneVisionLlavaForConditionalGeneration"]
    parent = os.path.dirname(os.path.abspath(dst))
    work = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        _write_weights(work, where, shapes, sizes)
        ours.save_pretrained(work)
        if processor is not None:
            processor.save_pretrained(work)
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ours


def _write_weights(out: str, where: dict, shapes: dict, sizes: dict) -> None:
    shards = _shards(shapes, sizes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            path, old = where[key]
            with safe_open(path, framework="pt") as f:
                tensors[key] = f.get_tensor(old).contiguous()
            weight_map[key] = name
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)


def grid_pinpoints(value, base: int) -> list[list[int]] | None:
    """The anyres canvases of a LLaVA config's `image_grid_pinpoints`: a list of (width, height) pairs, the same
    written as a string, or LLaVA-NeXT's range form "(1x1),...,(3x3)" (every grid from the first to the last,
    times `base` pixels, the vision tower's image size, as LLaVA-NeXT reads it). None when the key is absent.
    Raises LayoutError for anything else, naming the value."""
    if value is None:
        return None
    pairs = value
    if isinstance(value, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if len(grids) >= 2 and "..." in value:
            (w0, h0), (w1, h1) = (tuple(map(int, g)) for g in (grids[0], grids[-1]))
            pairs = [[w * base, h * base] for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
        else:
            try:
                pairs = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pairs = None
    ok = isinstance(pairs, (list, tuple)) and len(pairs) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(n, int) and n > 0 for n in p) for p in pairs)
    if not ok:
        raise LayoutError(f"image_grid_pinpoints {value!r} is neither a list of (width, height) pairs nor "
                          "LLaVA-NeXT's \"(1x1),...,(NxM)\" form")
    return [list(p) for p in pairs]


def _processor(src: str, tokenizer: str | None, text_config, pinpoints: list[list[int]] | None):
    """The processor over the given tokenizer or the source's (None when neither): anyres with the source's
    canvases (`pinpoints`; None: the published ones), as the published SFT models were trained."""
    if tokenizer is None and not any(os.path.isfile(os.path.join(src, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    from .processing import ANYRES_PINPOINTS, OneVisionLlavaProcessor

    # the LLM's config, not SRC's llava_* one (transformers would warn that it does not know that type)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer or src, config=text_config)
    try:
        return OneVisionLlavaProcessor(tokenizer, pinpoints=ANYRES_PINPOINTS if pinpoints is None else pinpoints)
    except ValueError as e:
        raise LayoutError(f"{os.path.join(src, 'config.json')}: {e}") from None


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
