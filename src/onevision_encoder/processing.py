"""Where pixels become model inputs: CLIP preprocessing, frame resizing, patch lists and positions.

Everything that turns an image or a stack of frames into `pixel_values` (dense `[B,C,H,W]` /
`[B,C,T,H,W]`, or a patch list `[B,N,C*p*p]`) plus positions lives here, so that the codec selection,
the dataset encoder and the quick-start helpers all normalise and order patches the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

# OpenAI CLIP statistics, used by the published encoder for images and video frames.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_SIZE = 448  # published image preprocessing: short side 448, centre crop 448
VIDEO_SIZE = 224  # published video frames: short side 224, centre crop 224
RESIZE_MODES = ("crop", "letterbox")


def image_processor(size: int = IMAGE_SIZE):
    """The published image preprocessing as transformers' `CLIPImageProcessor`.

    Bicubic resize of the short side to `size`, centre crop `size`×`size`, rescale to [0, 1], CLIP mean/std.
    Always PIL's resampling, as the published model was preprocessed: transformers 5 names that backend
    `CLIPImageProcessorPil` (its plain `CLIPImageProcessor` uses torchvision when installed).
    """
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as processor_class

    return processor_class(
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def save_preprocessor_config(directory: str | os.PathLike, size: int = IMAGE_SIZE) -> str:
    """Write `preprocessor_config.json` for the published preprocessing into `directory`.

    After this, `AutoImageProcessor.from_pretrained(directory)` gives the same `CLIPImageProcessor`.
    Returns the path of the written file.
    """
    path = os.path.join(os.fspath(directory), "preprocessor_config.json")
    os.makedirs(directory, exist_ok=True)
    config = image_processor(size).to_dict()
    config["image_processor_type"] = "CLIPImageProcessor"  # the name transformers 4.x and 5.x both know
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def temporal_slots(num_frames: int, temporal_size: int = 64) -> torch.Tensor:
    """RoPE time slot of each of `num_frames` frames sampled uniformly over a clip.

    The model's temporal grid has `temporal_size` slots; frame i of n gets `round(i / (n-1) * (slots-1))`,
    i.e. the integers of `linspace(0, 63, n)` (16 frames -> 0, 4, 8, ..., 63). One frame gets slot 0.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.linspace(0, temporal_size - 1, num_frames).round().long()


def grid_positions(t_slots: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`[T*rows*cols, 3]` (t, row, col) positions of whole frames in raster order, one frame after another."""
    t = t_slots.long().view(-1, 1, 1).expand(-1, rows, cols)
    r = torch.arange(rows).view(1, -1, 1).expand(len(t_slots), rows, cols)
    c = torch.arange(cols).view(1, 1, -1).expand(len(t_slots), rows, cols)
    return torch.stack([t, r, c], dim=-1).reshape(-1, 3)


@dataclass
class FrameGeometry:
    """Where the picture lies inside a resized `size`×`size` frame (letterbox leaves borders)."""

    size: int
    top: int
    left: int
    height: int
    width: int

    def to_float(self, pictures: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 squares (or patches of them) -> floats in 0..1, letterbox padding in the CLIP mean colour,
        which normalises to exactly zero. inside: bool mask of the picture pixels, broadcast against
        `pictures` without its channel axis (default: `picture_mask()`, for whole squares `[T, 3, size, size]`)."""
        floats = pictures.float().div_(255)
        if self.fills_square:
            return floats
        inside = self.picture_mask() if inside is None else inside
        return torch.where(inside.unsqueeze(-3), floats, torch.tensor(CLIP_MEAN).view(3, 1, 1))

    @property
    def fills_square(self) -> bool:
        """True when the picture covers the whole square (no letterbox padding)."""
        return self.height == self.width == self.size

    def picture_mask(self) -> torch.Tensor:
        """`[size, size]` bool: the pixels that show the picture (False = letterbox padding)."""
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        mask[self.top : self.top + self.height, self.left : self.left + self.width] = True
        return mask

    def valid_patches(self, patch_size: int) -> torch.Tensor:
        """`[rows, cols]` bool: patches that overlap the picture (False = pure padding)."""
        n = self.size // patch_size
        edges = torch.arange(n) * patch_size
        rows = (edges + patch_size > self.top) & (edges < self.top + self.height)
        cols = (edges + patch_size > self.left) & (edges < self.left + self.width)
        return rows[:, None] & cols[None, :]


@dataclass
class SquarePlan:
    """How a `height`×`width` picture becomes a `size`×`size` square: scale it to `resized_height`×
    `resized_width`, then take the square at (`top`, `left`) of it ("crop") or put it at (`top`, `left`) of
    the square ("letterbox")."""

    mode: str
    size: int
    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int

    @property
    def scale(self) -> float:
        """Square pixels per source pixel."""
        return self.resized_height / self.height

    @classmethod
    def for_picture(cls, height: int, width: int, size: int, mode: str) -> "SquarePlan":
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
        scale = size / min(height, width) if mode == "crop" else size / max(height, width)
        nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = ((nh - size) // 2, (nw - size) // 2) if mode == "crop" else ((size - nh) // 2, (size - nw) // 2)
        return cls(mode, size, height, width, nh, nw, top, left)

    @property
    def geometry(self) -> FrameGeometry:
        """Where the picture lies inside the square."""
        if self.mode == "crop":
            return FrameGeometry(self.size, 0, 0, self.size, self.size)
        return FrameGeometry(self.size, self.top, self.left, self.resized_height, self.resized_width)

    def resample(self, frame) -> torch.Tensor:
        """uint8 `[H, W, C]` (numpy or torch; RGB, or RGBA, which resamples faster) -> the picture part of the
        square, uint8 `[C, h, w]`: the whole square for "crop", the resized picture for "letterbox".

        Bicubic with antialiasing, through torch's uint8 kernel: it follows PIL's filter (what the CLIP
        image processor uses for images) to within 2 levels on under 1% of the pixels (measured on 144p to
        1080p frames) and ran 3-6x faster than PIL on 640x360 frames, the most common cost of video input.
        """
        pixels = torch.as_tensor(frame).permute(2, 0, 1).unsqueeze(0)  # channels-last, as decoded
        h, w, c = self.resized_height, self.resized_width, pixels.shape[1]
        # `F.interpolate(pixels, (h, w), mode="bicubic", antialias=True)`, written channels-last like its input:
        # given the channels-first output F.interpolate makes, the kernel repacks every pixel one at a time
        # (a fifth of the time at 640x360). Same pixels.
        resized = torch.empty(1, h, w, c, dtype=torch.uint8).permute(0, 3, 1, 2)
        torch.ops.aten._upsample_bicubic2d_aa.out(pixels, [h, w], False, out=resized)
        resized = resized[0]
        if self.mode == "crop":
            return resized[:, self.top : self.top + self.size, self.left : self.left + self.size]
        return resized

    def place(self, picture: torch.Tensor, square: torch.Tensor) -> None:
        """Write one resampled picture (uint8 `[3, h, w]`) into a uint8 square `[3, size, size]` (the padding
        of a letterbox is left as it is: `FrameGeometry.to_float` fills it)."""
        if self.mode == "letterbox":
            square = square[:, self.top : self.top + self.resized_height, self.left : self.left + self.resized_width]
        square.copy_(picture)


def resize_frames(frames, size: int = VIDEO_SIZE, mode: str = "crop") -> tuple[torch.Tensor, FrameGeometry]:
    """Resize frames to a `size`×`size` square, as floats in [0, 1] (bicubic, antialiased).

    frames: uint8 `[T, H, W, 3]` (numpy or torch, as decoders give them).
    mode: `"crop"` scales the short side to `size` and takes the centre (published probe/encoder setting);
    `"letterbox"` scales the long side to `size` and centres the picture on a square filled with the CLIP
    mean colour, so that padding normalises to exactly zero (published LMM setting).
    Returns `[T, 3, size, size]` float32 and the geometry of the picture inside the square.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:  # floats would be cut to 0/1 by the uint8 resampling, silently
        raise ValueError(f"frames must be uint8 (0..255, as decoders give them), got {frames.dtype}")
    plan = SquarePlan.for_picture(frames.shape[1], frames.shape[2], size, mode)
    squares = torch.empty(len(frames), 3, size, size, dtype=torch.uint8)
    for frame, square in zip(frames, squares):
        plan.place(plan.resample(frame), square)
    return plan.geometry.to_float(squares), plan.geometry


def normalize(pixels: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """CLIP-normalise `[..., 3, H, W]` floats in [0, 1]; inplace: in `pixels` itself (for callers that made it:
    a fresh tensor of a clip's size costs more in page faults than the math)."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels.sub_(mean) if inplace else pixels - mean).div_(std)


def renormalize_patches(patches: torch.Tensor, mean, std) -> torch.Tensor:
    """CLIP-normalised patches `[..., C*p*p]` ((C, p, p) order) -> the same pixels normalised with another
    encoder's `mean`/`std` (one per channel), so every reader can stay on CLIP statistics."""
    c = len(mean)
    x = patches.unflatten(-1, (c, -1))
    clip_mean, clip_std, new_mean, new_std = (torch.tensor(v, dtype=patches.dtype).view(c, 1)
                                              for v in (CLIP_MEAN, CLIP_STD, mean, std))
    return (x * clip_std + clip_mean - new_mean).div_(new_std).flatten(-2)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[..., C, H, W]` -> `[..., (H/p)*(W/p), C*p*p]`: raster-order patches, each flattened in (C, p, p)
    order, the layout of the patch-embedding Conv2d weight (so a patch list embeds exactly like the image)."""
    *lead, c, h, w = pixels.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"height {h} and width {w} must be multiples of the patch size {p}")
    n = len(lead)
    x = pixels.reshape(*lead, c, h // p, p, w // p, p)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)  # [..., H/p, W/p, C, p, p]
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def preprocess_video(frames, size: int = VIDEO_SIZE) -> torch.Tensor:
    """Published video preprocessing of uint8 frames `[T, H, W, 3]` -> normalised `[3, T, size, size]`."""
    x, _ = resize_frames(frames, size, mode="crop")
    return normalize(x, inplace=True).transpose(0, 1).contiguous()


def video_inputs(
    pixel_values: torch.Tensor, patch_size: int, form: str = "patches", temporal_size: int = 64
) -> dict[str, torch.Tensor]:
    """Model inputs for a dense clip of T frames sampled uniformly over a video.

    pixel_values: normalised `[B, C, T, H, W]`. The frames are placed at the 64-slot positions
    `temporal_slots(T)` (e.g. 16 frames -> t = 0, 4, 8, ..., 63).
    form: `"visible_indices"` returns the published form (the video plus flat indices
    `t*h*w + row*w + col`, one per token, so the model only reads their positions) or `"patches"` returns
    the patch-list form (`pixel_values [B, T*h*w, C*p*p]`, `patch_positions [B, T*h*w, 3]`).
    """
    if pixel_values.ndim != 5:
        raise ValueError(f"pixel_values must be [B, C, T, H, W], got shape {tuple(pixel_values.shape)}")
    b, _, t, h, w = pixel_values.shape
    rows, cols = h // patch_size, w // patch_size
    positions = grid_positions(temporal_slots(t, temporal_size), rows, cols).to(pixel_values.device)
    if form == "visible_indices":
        flat = positions[:, 0] * rows * cols + positions[:, 1] * cols + positions[:, 2]
        return {"pixel_values": pixel_values, "visible_indices": flat.unsqueeze(0).expand(b, -1).contiguous()}
    if form == "patches":
        patches = patchify(pixel_values.transpose(1, 2), patch_size).flatten(1, 2)
        return {"pixel_values": patches, "patch_positions": positions.unsqueeze(0).expand(b, -1, -1).contiguous()}
    raise ValueError(f"form must be 'visible_indices' or 'patches', got {form!r}")


@dataclass
class PatchClip:
    """One clip (or image) as a patch list: the form every sparse and codec input takes.

    pixel_values: normalised `[K, C*p*p]` patches, (C, p, p) order; patch_positions: `[K, 3]` (t, row, col)
    on the model's grid. Producers (codec selection, uniform frame sampling) may attach what they know
    about where the patches came from.
    """

    pixel_values: torch.Tensor
    patch_positions: torch.Tensor
    frame_ids: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    path: str | None = None

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


def collate_patch_lists(clips) -> dict[str, torch.Tensor]:
    """Pad patch lists of different lengths into one batch.

    Accepts `PatchClip`s or `(pixel_values [K, D], patch_positions [K, 3])` pairs. Returns
    `pixel_values [B, N, D]`, `patch_positions [B, N, 3]` and `attention_mask [B, N]` (1 = real, 0 = padding),
    N being the longest clip. Padding is zeros at position (0, 0, 0); the model ignores it through the mask.
    """
    pairs = [(c.pixel_values, c.patch_positions) if isinstance(c, PatchClip) else tuple(c) for c in clips]
    if not pairs:
        raise ValueError("collate_patch_lists needs at least one clip")
    dims = {pv.shape[-1] for pv, _ in pairs}
    if len(dims) != 1:
        raise ValueError(f"clips have different patch sizes (feature dims {sorted(dims)})")
    for pv, pos in pairs:
        if pv.ndim != 2 or pos.shape != (pv.shape[0], 3):
            raise ValueError(f"each clip needs pixel_values [K, D] and patch_positions [K, 3], got "
                             f"{tuple(pv.shape)} and {tuple(pos.shape)}")
    n = max(pv.shape[0] for pv, _ in pairs)
    b, d = len(pairs), dims.pop()
    pixel_values = pairs[0][0].new_zeros(b, n, d)
    positions = torch.zeros(b, n, 3, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.long)
    for i, (pv, pos) in enumerate(pairs):
        k = pv.shape[0]
        pixel_values[i, :k] = pv
        positions[i, :k] = pos
        mask[i, :k] = 1
    return {"pixel_values": pixel_values, "patch_positions": positions, "attention_mask": mask}


NATIVE_MAX_PIXELS = 1120 * 1120  # the largest published anyres canvas: 6400 tokens of 14 px


def native_size(height: int, width: int, patch_size: int = 14, max_pixels: int = NATIVE_MAX_PIXELS,
                downscale: bool = False) -> tuple[int, int]:
    """Native resolution: the picture's own size with each side rounded to the nearest multiple of the patch
    size (at least one patch), so the aspect ratio is kept to within half a patch a side.

    Above `max_pixels` a ValueError names the size, unless `downscale`: then both sides shrink by one factor
    and round down to whole patches, which fits under the limit.
    """
    if height < 1 or width < 1:
        raise ValueError(f"an image must have positive sides, got {width}x{height}")
    p = patch_size
    h, w = max(p, round(height / p) * p), max(p, round(width / p) * p)
    if h * w <= max_pixels:
        return h, w
    if not downscale:
        raise ValueError(f"a {width}x{height} image is {w}x{h} pixels at native resolution, over the maximum of "
                         f"{max_pixels} pixels ({max_pixels // (p * p)} patches of {p} px); raise max_pixels or "
                         "allow downscaling")
    scale = (max_pixels / (height * width)) ** 0.5
    return max(p, int(height * scale / p) * p), max(p, int(width * scale / p) * p)


def native_image(image, patch_size: int = 14, max_pixels: int = NATIVE_MAX_PIXELS, downscale: bool = False
                 ) -> torch.Tensor:
    """A PIL image at native resolution (`native_size`): bicubic resize (PIL, as the CLIP processor), CLIP
    normalisation -> `[3, H, W]` float32, no crop and no padding. Documents and charts keep all their content."""
    image = image.convert("RGB")
    h, w = native_size(image.height, image.width, patch_size, max_pixels, downscale)
    if (w, h) != image.size:
        image = image.resize((w, h), resample=3)  # PIL bicubic
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return normalize(pixels, inplace=True)
