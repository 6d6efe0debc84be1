"""OneVision LLaVA processor: chat text, images and videos -> token ids and one padded patch-list batch.

Each sample states its modalities through its placeholders: `<image>` takes the sample's next image and
`<video>` its next video; nothing is guessed from shapes. Every placeholder is expanded to one placeholder
token per visual token of its item, and all items of the batch, in text order, become one patch-list batch
(`collate_patch_lists`) for a single encoder call.

Images (`image_mode`):
- `"anyres"` (published SFT): of the 5 pinpoint canvases, the one that keeps the most of the image's pixels,
  then wastes the least; the image is resized to fit it with its aspect kept and centred on black; one pass,
  no tiles (3280, 4961 or 6400 tokens of 14 px).
- `"native"`: the image's own size, sides rounded to the patch size, at most `max_pixels` (a larger image is
  an error unless `downscale_images`).

Videos (`video_mode`), from a file path (or a ready `PatchClip`):
- `"codec"` (published LMM geometry): 64 frames, a letterboxed square of 36x36 patches, frame 0 whole and the
  top patches of the other 63, 10368 in all, as one patch list with (t, row, col) positions. The published
  code selects 16-px patches on a 576-px square and then shrinks JPEG mosaics of them to 504 px; we select
  on the same 36x36 grid at 504 px with the encoder's own 14-px patches, so each token is cut from one
  resampling of the decoded frame (no JPEG, no blur across unrelated packed patches). The motion maps are
  then summed over 14-px instead of 16-px patches: on the shared reference clip 61 of the 10368 patches
  (0.6%) differ from a 576/16 selection.
- `"uniform"`: 8 whole frames at linspace(0, N-1, 8), t = 0, 9, ..., 63 (the published fallback): also 10368.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from ..codec import sample_frames, select_patches
from ..processing import NATIVE_MAX_PIXELS, PatchClip, collate_patch_lists, grid_positions, native_image, normalize, \
    patchify
from ..codec.video import VideoDecodeError

# (width, height) canvases of the published anyres rule, 14-px patches.
ANYRES_PINPOINTS = ((574, 1120), (1120, 574), (1120, 1120), (1694, 574), (574, 1694))
IMAGE_MODES = ("anyres", "native")
VIDEO_MODES = ("codec", "uniform")
CODEC_FRAMES, CODEC_BUDGET, VIDEO_SIZE = 64, 10368, 504
UNIFORM_FRAMES = 8

# ChatML, as the published Qwen3 LMM; image and video content items become their placeholders.
DEFAULT_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def best_pinpoint(width: int, height: int, pinpoints=ANYRES_PINPOINTS) -> tuple[int, int]:
    """The canvas (w, h) that keeps the most effective pixels of a width x height image, then wastes the least."""
    best, best_key = None, None
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(w * h - effective))
        if best_key is None or key > best_key:
            best, best_key = (w, h), key
    return best


def anyres_image(image: Image.Image, pinpoints=ANYRES_PINPOINTS) -> torch.Tensor:
    """The published anyres preprocessing: resize into the best canvas with the aspect kept, centred on black,
    CLIP-normalised -> `[3, h, w]`."""
    image = image.convert("RGB")
    w, h = best_pinpoint(image.width, image.height, pinpoints)
    scale_w, scale_h = w / image.width, h / image.height
    if scale_w < scale_h:
        new_w, new_h = w, min(math.ceil(image.height * scale_w), h)
    else:
        new_w, new_h = min(math.ceil(image.width * scale_h), w), h
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), resample=3), ((w - new_w) // 2, (h - new_h) // 2))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return normalize(pixels, inplace=True)


def image_patch_list(pixels: torch.Tensor, patch_size: int) -> PatchClip:
    """A normalised `[3, H, W]` image as a patch list at t = 0, raster order."""
    rows, cols = pixels.shape[1] // patch_size, pixels.shape[2] // patch_size
    return PatchClip(patchify(pixels, patch_size), grid_positions(torch.zeros(1, dtype=torch.long), rows, cols))


def visual_batch(items: list[PatchClip]) -> dict[str, torch.Tensor]:
    """Visual items (text order) -> the model's visual inputs: one padded patch-list batch under its names."""
    batch = collate_patch_lists(items)
    return {"pixel_values": batch["pixel_values"], "patch_positions": batch["patch_positions"],
            "patch_attention_mask": batch["attention_mask"]}


def _open_image(image, name: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} ({image}) cannot be read as an image: {e}") from None
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{name} must be a PIL image, a path or a uint8 [H, W, 3] array, got "
                         f"{type(image).__name__} {getattr(array, 'shape', '')} {getattr(array, 'dtype', '')}")
    return Image.fromarray(array)


def _per_sample(items, counts: list[int], kind: str) -> list[list]:
    """Items given per sample (a list of lists) or flat in text order -> per-sample lists, checked against the
    number of placeholders of each sample."""
    items = [] if items is None else list(items)
    if items and all(isinstance(x, (list, tuple)) for x in items) and len(items) == len(counts):
        nested = [list(x) for x in items]
    else:
        if len(items) != sum(counts):
            raise ValueError(f"the text has {sum(counts)} <{kind}> placeholder(s) but {len(items)} {kind}(s) were "
                             f"given{_first_unmatched(len(items), counts, kind)}")
        starts = np.cumsum([0] + counts)
        nested = [items[a:b] for a, b in zip(starts[:-1], starts[1:])]
    for sample, (given, needed) in enumerate(zip(nested, counts)):
        if len(given) != needed:
            raise ValueError(f"sample {sample} has {needed} <{kind}> placeholder(s) but {len(given)} {kind}(s)")
    return nested


def _first_unmatched(given: int, counts: list[int], kind: str) -> str:
    """Where a flat list of `given` items and the samples' placeholder counts part ways, for the error."""
    if given > sum(counts):
        return f": {kind}(s) {sum(counts)}.. have no placeholder"
    sample = int(np.searchsorted(np.cumsum(counts), given, side="right"))
    return f": the first <{kind}> without one is in sample {sample}"


class OneVisionLlavaProcessor(ProcessorMixin):
    """Tokenizer + image and video processing of the OneVision LLaVA model. See the module docstring.

    Args:
        tokenizer: any transformers tokenizer; `image_token` and `video_token` are added to it if missing.
        chat_template: Jinja template for `apply_chat_template`; default ChatML with image/video items.
        image_mode: `"anyres"` or `"native"`; pinpoints ((width, height) canvases) apply to anyres mode,
            max_pixels and downscale_images to native mode.
        video_mode: `"codec"` or `"uniform"`; video_frames, video_budget and video_size (the letterboxed square's
            side, 504 = 36 patches) set their frame count, patch count and grid.
        patch_size: the encoder's patch size (14).
    """

    attributes = ["tokenizer"]  # transformers 4.x reads these two
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        chat_template: str | None = None,
        image_mode: str = "anyres",
        pinpoints=ANYRES_PINPOINTS,
        max_pixels: int = NATIVE_MAX_PIXELS,
        downscale_images: bool = False,
        video_mode: str = "codec",
        video_frames: int | None = None,
        video_budget: int = CODEC_BUDGET,
        video_size: int = VIDEO_SIZE,
        patch_size: int = 14,
        image_token: str = "<image>",
        video_token: str = "<video>",
        **kwargs,
    ):
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if video_mode not in VIDEO_MODES:
            raise ValueError(f"video_mode must be one of {VIDEO_MODES}, got {video_mode!r}")
        missing = [t for t in (image_token, video_token) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        self.image_mode, self.max_pixels, self.downscale_images = image_mode, max_pixels, downscale_images
        self.pinpoints = [list(p) for p in pinpoints]
        if any(len(p) != 2 or p[0] % patch_size or p[1] % patch_size for p in self.pinpoints):
            raise ValueError(f"pinpoints must be (width, height) pairs in whole {patch_size}-px patches, got {pinpoints}")
        self.video_mode, self.video_budget, self.video_size = video_mode, video_budget, video_size
        self.patch_size = patch_size
        self.video_frames = video_frames or (CODEC_FRAMES if video_mode == "codec" else UNIFORM_FRAMES)
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        super().__init__(tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    # -- visual items --------------------------------------------------------------------------------------

    def image_item(self, image, name: str = "image") -> PatchClip:
        """One image as a patch list, in this processor's image mode."""
        picture = _open_image(image, name)
        if self.image_mode == "anyres":
            return image_patch_list(anyres_image(picture, self.pinpoints), self.patch_size)
        try:
            pixels = native_image(picture, self.patch_size, self.max_pixels, self.downscale_images)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return image_patch_list(pixels, self.patch_size)

    def video_item(self, video, name: str = "video") -> PatchClip:
        """One video file as a patch list, in this processor's video mode (a `PatchClip` passes as it is)."""
        if isinstance(video, PatchClip):
            return video
        if not isinstance(video, (str, os.PathLike)):
            raise ValueError(f"{name} must be a video file path or a PatchClip, got {type(video).__name__}")
        try:
            if self.video_mode == "codec":
                return select_patches(video, num_frames=self.video_frames, budget=self.video_budget, size=self.video_size,
                                      patch_size=self.patch_size, resize="letterbox")
            return sample_frames(video, num_frames=self.video_frames, size=self.video_size, patch_size=self.patch_size,
                                 resize="letterbox")
        except (VideoDecodeError, OSError) as e:
            raise ValueError(f"{name} ({video}) cannot be read: {e}") from None

    # -- text + items ---------------------------------------------------------------------------------------

    def __call__(self, text=None, images=None, videos=None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """text: one string or a list (one per sample) with `<image>`/`<video>` placeholders. images / videos:
        per-sample lists, or flat lists in text order. Returns input_ids and attention_mask (left-padded) and,
        when there are visual items, pixel_values / patch_positions / patch_attention_mask (one patch-list batch
        of all items in text order, see `OneVisionLlavaForConditionalGeneration.forward`)."""
        if text is None:
            raise ValueError("text is needed: the placeholders in it say where each image and video goes")
        texts = [text] if isinstance(text, str) else list(text)
        order = [self.placeholder_kinds(t) for t in texts]
        per_image = _per_sample(images, [o.count("image") for o in order], "image")
        per_video = _per_sample(videos, [o.count("video") for o in order], "video")
        items, expanded = [], []
        for sample, (t, kinds) in enumerate(zip(texts, order)):
            next_item = {"image": iter(enumerate(per_image[sample])), "video": iter(enumerate(per_video[sample]))}
            pieces = self._split(t)
            out = [pieces[0]]
            for kind, piece in zip(kinds, pieces[1:]):
                index, raw = next(next_item[kind])
                name = f"{kind} {index} of sample {sample}"
                item = self.image_item(raw, name) if kind == "image" else self.video_item(raw, name)
                items.append(item)
                token = self.image_token if kind == "image" else self.video_token
                out += [token * len(item), piece]
            expanded.append("".join(out))
        kwargs.setdefault("padding", True)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("return_token_type_ids", False)  # the model has none (transformers 4.x adds them)
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, **kwargs))
        if items:
            data.update(visual_batch(items))
        return BatchFeature(data=data, tensor_type=None)

    def placeholder_kinds(self, text: str) -> list[str]:
        """The kinds ("image"/"video") of the placeholders of `text`, in order."""
        return ["image" if m == self.image_token else "video" for m in re.findall(self._pattern, text)]

    def _split(self, text: str) -> list[str]:
        return re.split(self._pattern, text)

    @property
    def _pattern(self) -> str:
        return "|".join(re.escape(m) for m in (self.image_token, self.video_token))

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Render one conversation (a list of messages) or a batch of them with the chat template. Content may be
        a string or a list of items `{"type": "text", "text": ...}`, `{"type": "image", "image": PIL/path/array}`,
        `{"type": "video", "video": path}`. tokenize=False returns the prompt text(s); tokenize=True returns
        `__call__`'s BatchFeature with the items in the order they appear (kwargs go to `__call__`)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = chat_template or self.chat_template
        texts = [self.tokenizer.apply_chat_template(c, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt) for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        media = {"image": [], "video": []}
        for sample, c in enumerate(conversations):
            found = {"image": [], "video": []}
            for message in c:
                content = message["content"]
                for item in [] if isinstance(content, str) else content:
                    kind = item["type"]
                    if kind in found:
                        value = item.get(kind, item.get("path", item.get("url")))
                        if value is None:
                            raise ValueError(f"{kind} {len(found[kind])} of sample {sample}: the content item has no "
                                             f"{kind!r} (nor 'path' or 'url')")
                        found[kind].append(value)
            for kind in media:
                media[kind].append(found[kind])
        return self(text=texts, images=media["image"], videos=media["video"], **kwargs)

