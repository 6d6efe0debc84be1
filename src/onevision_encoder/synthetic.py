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
