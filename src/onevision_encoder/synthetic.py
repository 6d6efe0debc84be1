"""Small synthetic videos and images with known motion, written with PyAV's encoders.

Tests and benchmarks need real bitstreams (motion vectors, B-frames, key frames) whose moving regions are
known exactly, without shipping media files. `write_video` renders a scene frame by frame, encodes it, and
returns the ground truth (per-frame masks of the pixels that moved).
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
from PIL import Image

# Our codec names -> PyAV encoder, and encoder options that keep encoding fast and quiet.
ENCODERS = {
    "h264": ("libx264", {"preset": "veryfast", "crf": "23"}),
    "hevc": ("libx265", {"preset": "ultrafast", "crf": "26", "x265-params": "log-level=error"}),
    "mpeg4": ("mpeg4", {"qscale": "4"}),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}),
}
SCENES = ("objects", "pan", "static")


def _texture(height: int, width: int, rng: np.random.Generator, cell: int = 12) -> np.ndarray:
    """Smooth random colour texture with fine detail: gives block matching something to lock on to."""
    coarse = rng.integers(0, 256, size=(max(2, height // cell), max(2, width // cell), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    fine = rng.normal(0, 12, size=(height, width, 1)).astype(np.float32)
    return np.clip(smooth * 0.8 + 25 + fine, 0, 255).astype(np.uint8)


def _static_stretch(num_frames: int) -> tuple[int, int]:
    """Frames [start, stop) during which nothing moves in the "objects" scene (the middle fifth)."""
    return int(num_frames * 0.4), int(num_frames * 0.6)


def _objects(t: float, height: int, width: int) -> list[tuple[np.ndarray, int, int]]:
    """The moving objects at animation time t, as (mask, dy, dx): a sliding square, a bouncing disc and a
    pulsating ellipse that deforms around a fixed centre. (dy, dx) is how far the object's own texture has
    moved, so that its inside carries real motion, not only its edges."""
    yy, xx = np.mgrid[0:height, 0:width]
    s = min(height, width)
    side = s // 4
    x0 = int((0.1 + 0.6 * (t % 1.0)) * (width - side))
    y0 = height // 8
    square = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    r = s // 8
    cx = int(width * (0.25 + 0.1 * np.sin(2 * np.pi * t)))
    cy = int(height * (0.65 + 0.15 * np.cos(2 * np.pi * t * 1.3)))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    ax, ay = s * (0.08 + 0.05 * np.sin(4 * np.pi * t)), s * (0.13 - 0.05 * np.sin(4 * np.pi * t))
    ellipse = ((xx - width * 0.75) / ax) ** 2 + ((yy - height * 0.65) / ay) ** 2 <= 1
    return [(square, 0, x0), (disc, cy, cx), (ellipse, 0, 0)]


def render_scene(
    scene: str, num_frames: int, width: int, height: int, seed: int = 0, grain: float = 0.0
) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """Render `num_frames` RGB frames of `scene` and the ground truth.

    Returns (frames uint8 [H, W, 3] each, moving_masks bool [T, H, W], extra metadata). moving_masks[t] marks
    the pixels covered by an object that moved between frame t-1 and t, where it was or where it is; camera
    motion ("pan") is not object motion and is left out. moving_masks[0] is all False. grain: std (levels)
    of fresh Gaussian noise on every frame, like a camera sensor's; it makes the encoder spend bits on
    every block, so the file decodes at the cost of real footage (noise-free synthetic frames decode
    several times faster than camera video of the same size).
    """
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
    rng = np.random.default_rng(seed)
    pan_step = 2  # pixels per frame, horizontal
    margin = pan_step * num_frames if scene == "pan" else 0
    background = _texture(height, width + margin, rng)
    object_textures = [_texture(height, width, rng, cell=6) for _ in range(3)]
    yy, xx = np.mgrid[0:height, 0:width]
    still_start, still_stop = _static_stretch(num_frames) if scene == "objects" else (0, 0)

    frames, masks = [], np.zeros((num_frames, height, width), dtype=bool)
    previous_union, previous_time = None, None
    for i in range(num_frames):
        offset = pan_step * i if scene == "pan" else 0
        frame = background[:, offset : offset + width].copy()
        if scene != "static":
            # Animation time stops during the static stretch, so the objects hold still there.
            time = i - min(max(0, i - still_start), still_stop - still_start)
            objects = _objects(time / 48.0, height, width)
            if scene == "pan":
                objects = objects[1:2]  # one disc moving over the panning background
            for (mask, dy, dx), tex in zip(objects, object_textures):
                frame[mask] = tex[(yy[mask] - dy) % height, (xx[mask] - dx) % width]
            union = np.logical_or.reduce([mask for mask, _, _ in objects])
            if previous_union is not None and time != previous_time:
                masks[i] = union | previous_union
            previous_union, previous_time = union, time
        if grain:
            frame = np.clip(frame + rng.normal(0, grain, frame.shape), 0, 255).astype(np.uint8)
        frames.append(frame)
    # Frames still_start+1 .. still_stop repeat their predecessor (animation time is frozen at still_start).
    still = (still_start + 1, still_stop + 1) if still_stop else (0, 0)
    extra = {"static_frames": still, "pan_pixels_per_frame": pan_step if scene == "pan" else 0}
    return frames, masks, extra


def _open_stream(container, codec: str, width: int, height: int, fps: int, pix_fmt: str | None, opts: dict):
    if codec not in ENCODERS:
        raise ValueError(f"codec must be one of {tuple(ENCODERS)}, got {codec!r}")
    encoder, defaults = ENCODERS[codec]
    rotation = opts.pop("rotation", None)
    stream = container.add_stream(encoder, rate=Fraction(fps))
    stream.width, stream.height = width, height
    stream.pix_fmt = pix_fmt or "yuv420p"
    stream.options = {**defaults, **{k: str(v) for k, v in opts.items()}}
    if rotation:
        stream.set_display_rotation(rotation)
    return stream


def write_video(
    path: str | os.PathLike,
    codec: str = "h264",
    num_frames: int = 96,
    width: int = 320,
    height: int = 240,
    fps: int = 24,
    scene: str = "objects",
    pix_fmt: str | None = None,
    seed: int = 0,
    grain: float = 0.0,
    **opts,
) -> dict:
    """Encode a synthetic video with known motion and return its ground truth.

    codec: "h264" (libx264), "hevc" (libx265), "mpeg4" or "vp9" (libvpx-vp9); the container follows the
    file extension (.mp4, .mkv, .webm, ...). scene: "objects" (a sliding square, a bouncing disc and a
    pulsating ellipse over a textured static background, all holding still for the middle fifth of the
    clip), "pan" (the camera pans right at 2 px/frame over the texture while one disc moves), "static".
    pix_fmt: the encoder's pixel format (default yuv420p; e.g. "yuv420p10le", "yuvj420p"; odd sizes need a
    format without chroma subsampling such as "yuv444p"). Extra keyword options go to the encoder (e.g.
    g=12, bf=0), except `rotation=90`, which stores a display-matrix rotation in the stream.

    Returns a dict: path, codec, num_frames, width, height, fps, scene, pix_fmt, moving_masks (bool
    [T, H, W], see `render_scene`), static_frames ([start, stop) of the still stretch; (0, 0) if none),
    pan_pixels_per_frame. Frames in static_frames are identical to the frame before them (up to the noise,
    when grain > 0: see `render_scene`).
    """
    frames, masks, extra = render_scene(scene, num_frames, width, height, seed, grain)
    path = write_frames(path, frames, codec, fps, pix_fmt, **opts)
    return {
        "path": path,
        "codec": codec,
        "num_frames": num_frames,
        "width": width,
        "height": height,
        "fps": fps,
        "scene": scene,
        "pix_fmt": pix_fmt or "yuv420p",
        "moving_masks": masks,
        **extra,
    }


def write_frames(path: str | os.PathLike, frames, codec: str = "h264", fps: int = 24, pix_fmt: str | None = None,
                 **opts) -> str:
    """Encode RGB frames (uint8 [H, W, 3] each, all one size) of a scene of one's own; codec, pix_fmt and
    options as for `write_video`. Returns the path."""
    path = os.fspath(path)
    height, width = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = _open_stream(container, codec, width, height, fps, pix_fmt, dict(opts))
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_image(path: str | os.PathLike, width: int = 320, height: int = 240, seed: int = 0) -> str:
    """Write a textured RGB test image (format from the extension, e.g. .png or .jpg); returns the path."""
    path = os.fspath(path)
    Image.fromarray(_texture(height, width, np.random.default_rng(seed))).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Labelled datasets for the attentive probe
# ----------------------------------------------------------------------------------------------------------

DATASETS = ("brief_event", "motion_direction")
EVENT_COLOURS = ((235, 40, 40), (40, 210, 60), (50, 90, 240), (245, 225, 40), (210, 60, 220), (40, 220, 225))
DIRECTIONS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (dy, dx) per class: left, right, up, down


def _disc(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def render_brief_event(label: int, num_frames: int = 160, width: int = 128, height: int = 96, seed: int = 0,
                       event_fraction: float = 0.02) -> tuple[list[np.ndarray], tuple[int, int]]:
    """A clip whose class is a brief event: a small square of colour `EVENT_COLOURS[label]` shows for
    `event_fraction` of the frames (at least one) at a random time and place, while a textured disc bounces
    around the textured background the whole time (motion that says nothing about the class). Everything
    but the event is grey.
    Returns (frames, (first, stop) frames of the event)."""
    if not 0 <= label < len(EVENT_COLOURS):
        raise ValueError(f"label must be in 0..{len(EVENT_COLOURS) - 1}, got {label}")
    rng = np.random.default_rng(seed)
    # Grey scene: colour belongs to the event alone, so whoever sees the event sees its class.
    background, texture = (_texture(height, width, rng, cell).mean(-1, keepdims=True).astype(np.uint8).repeat(3, -1)
                           for cell in (12, 6))
    r, side = min(height, width) / 6, min(height, width) // 4
    position = rng.uniform([r, r], [height - r, width - r])
    velocity = rng.uniform(1.5, 3.0, 2) * rng.choice([-1, 1], 2)
    length = max(1, round(num_frames * event_fraction))
    first = int(rng.integers(1, num_frames - length))
    top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
    frames = []
    for i in range(num_frames):
        frame = background.copy()
        position += velocity
        for axis, limit in enumerate((height, width)):  # bounce off the edges
            if not r <= position[axis] <= limit - r:
                velocity[axis] = -velocity[axis]
                position[axis] = np.clip(position[axis], r, limit - r)
        mask = _disc(height, width, *position, r)
        frame[mask] = texture[mask]
        if first <= i < first + length:
            frame[top : top + side, left : left + side] = EVENT_COLOURS[label]
        frames.append(frame)
    return frames, (first, first + length)


def render_motion_direction(label: int, num_frames: int = 64, width: int = 128, height: int = 96, seed: int = 0,
                            speed: float = 2.0, trail: int = 12) -> list[np.ndarray]:
    """A clip whose class is the direction a light square moves in (`DIRECTIONS[label]`: left, right, up,
    down) over a plain grey background, `speed` pixels a frame from a random start, wrapping around. It
    leaves a trail fading over `trail` frames, as motion blur does, so that a single patch shows the
    direction too (an encoder whose tokens carry neither place nor time can still see it). Both are plain:
    over a texture, the trail's ramp of brightness is lost in the texture's own (measured: a probe on
    patch tokens stays at chance)."""
    if not 0 <= label < len(DIRECTIONS):
        raise ValueError(f"label must be in 0..{len(DIRECTIONS) - 1}, got {label}")
    rng = np.random.default_rng(seed)
    side = min(height, width) // 3
    start = rng.uniform(0, [height, width])
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(num_frames):
        frame = np.full((height, width, 3), 110.0, dtype=np.float32)
        for age in range(trail, -1, -1):  # oldest first: newer positions cover older ones
            y0, x0 = (start + speed * (i - age) * np.array(DIRECTIONS[label])) % (height, width)
            inside = ((yy - y0) % height < side) & ((xx - x0) % width < side)
            weight = 1 - age / (trail + 1)
            frame[inside] = weight * 245 + (1 - weight) * frame[inside]
        frames.append(frame.round().astype(np.uint8))
    return frames


def write_probe_dataset(folder: str | os.PathLike, kind: str = "brief_event", num_classes: int = 4,
                        train_per_class: int = 32, val_per_class: int = 16, codec: str = "h264", seed: int = 0,
                        **render) -> tuple[str, str]:
    """Write a labelled video dataset for `ove probe`: clips under `folder/videos/` and the lists
    `folder/train.csv`, `folder/val.csv` in the published format (`relative_path,label`, no header).
    kind: "brief_event" (`render_brief_event`) or "motion_direction" (`render_motion_direction`); other
    keyword arguments go to the renderer (num_frames, width, height, ...). Every clip has its own seed.
    Returns the paths of the two lists."""
    if kind not in DATASETS:
        raise ValueError(f"kind must be one of {DATASETS}, got {kind!r}")
    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    lists = {}
    number = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        lines = []
        for i in range(per_class):
            for label in range(num_classes):
                clip_seed = seed * 1_000_003 + number
                number += 1
                if kind == "brief_event":
                    frames, _ = render_brief_event(label, seed=clip_seed, **render)
                else:
                    frames = render_motion_direction(label, seed=clip_seed, **render)
                name = f"videos/{split}_{i:04d}_{label}.mp4"
                write_frames(os.path.join(folder, name), frames, codec)
                lines.append(f"{name},{label}\n")
        lists[split] = os.path.join(folder, f"{split}.csv")
        with open(lists[split], "w") as f:
            f.writelines(lines)
    return lists["train"], lists["val"]


def write_pixel_encoder(folder: str | os.PathLike, hidden_size: int = 128, num_layers: int = 2, patch_size: int = 14,
                        seed: int = 0) -> str:
    """Write a small OneVision checkpoint (published layout) whose tokens carry the pixels plainly: a fresh
    random initialisation with every layer's output projections (attention out_proj, MLP fc2) zeroed, so
    each token is its patch's normalised embedding. A fully random checkpoint scrambles the pixels (its
    token dimensions differ wildly in scale); this one lets a probe on generated data measure what the
    inputs show, not what a random network hides. Returns the folder."""
    import torch

    from .configuration import OneVisionEncoderConfig
    from .modeling import OneVisionEncoderModel

    torch.manual_seed(seed)
    config = OneVisionEncoderConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                    num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 64),
                                    patch_size=patch_size)
    model = OneVisionEncoderModel(config)
    with torch.no_grad():
        for layer in model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    model.save_pretrained(os.fspath(folder))
    return os.fspath(folder)
