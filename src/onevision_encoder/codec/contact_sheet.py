"""A picture of a codec selection: the sampled frames as a contact sheet, kept patches bright, the rest dimmed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def contact_sheet(frames: torch.Tensor, kept: torch.Tensor, columns: int = 8, thumb: int = 96,
                  dim: float = 0.3) -> Image.Image:
    """Render `frames [T, 3, S, S]` (0..1) as a grid of `thumb`-pixel thumbnails, `columns` per row, with the
    patches not in `kept [T, rows, cols]` darkened to `dim` of their brightness and each frame's slot and
    kept-patch count written in its corner, so one can check at a glance that the selection follows motion."""
    t, _, s, _ = frames.shape
    patch = s // kept.shape[-1]
    light = kept.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).to(frames.dtype)
    shaded = frames * (dim + (1 - dim) * light)
    sheet_rows = -(-t // columns)
    gap = 2
    sheet = Image.new("RGB", (columns * (thumb + gap) + gap, sheet_rows * (thumb + gap) + gap), (16, 16, 16))
    draw = ImageDraw.Draw(sheet)
    pictures = (shaded.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i, picture in enumerate(pictures):
        x, y = gap + (i % columns) * (thumb + gap), gap + (i // columns) * (thumb + gap)
        sheet.paste(Image.fromarray(np.ascontiguousarray(picture)).resize((thumb, thumb), Image.BILINEAR), (x, y))
        draw.text((x + 3, y + 2), f"{i}: {int(kept[i].sum())}", fill=(255, 255, 0))
    return sheet
