"""Quick start: from a video file and a picture to OneVision Encoder features, with no network.

Generates a short H.264 video with moving objects and a picture, then computes
  - image features (the published CLIP preprocessing, 448 px),
  - video features from codec-style selected patches (64 frames, 2048 of 16384 patches),
  - video features from 16 uniformly sampled whole frames,
and batches the two clips of different lengths together to show that padding changes nothing.

    python examples/quickstart.py                                   # the small local checkpoint
    python examples/quickstart.py --model lmms-lab-encoder/onevision-encoder-large
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

import onevision_encoder as ove
from onevision_encoder import synthetic

TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-p14"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_CHECKPOINT), help="hub id or local directory")
    parser.add_argument("--out", default="out/quickstart", help="where the generated inputs go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    video = synthetic.write_video(out / "moving_objects.mp4", codec="h264", num_frames=96, width=320, height=240)
    picture = synthetic.write_image(out / "texture.png", width=640, height=480)
    print(f"generated {video['path']} ({video['num_frames']} frames) and {picture}")

    model = AutoModel.from_pretrained(args.model).eval()
    p = model.config.patch_size
    print(f"model {args.model}: hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
          f"patch {p}, attention {model.config._attn_implementation}")

    with torch.inference_mode():
        pixels = ove.image_processor()(images=Image.open(picture), return_tensors="pt")["pixel_values"]
        image_out = model(pixel_values=pixels)
        print(f"image   {tuple(pixels.shape)} -> pooled {tuple(image_out.pooler_output.shape)}, "
              f"tokens {tuple(image_out.last_hidden_state.shape)}")

        start = time.perf_counter()
        codec_clip = ove.select_patches(video["path"], num_frames=64, budget=2048, size=224, patch_size=p)
        print(f"codec   kept {len(codec_clip)} of {64 * (224 // p) ** 2} patches from frames "
              f"{codec_clip.frame_ids[:3].tolist()}...{codec_clip.frame_ids[-1].item()} "
              f"in {time.perf_counter() - start:.2f} s ({codec_clip.motion_source} motion)")
        frames_clip = ove.sample_frames(video["path"], num_frames=16, size=224, patch_size=p)
        print(f"frames  {len(frames_clip)} patches of 16 whole frames at slots {frames_clip.time_slots.tolist()}")

        batch = ove.collate_patch_lists([codec_clip, frames_clip])
        together = model(**batch).pooler_output
        for name, clip, row in (("codec", codec_clip, together[0]), ("frames", frames_clip, together[1])):
            alone = model(**ove.collate_patch_lists([clip])).pooler_output[0]
            print(f"{name:7s} pooled {tuple(alone.shape)}; alone vs in the padded batch: max |diff| "
                  f"{(alone - row).abs().max().item():.1e}")
        similarity = torch.nn.functional.cosine_similarity(together[0], together[1], dim=0).item()
        print(f"cosine(codec clip, uniform frames) = {similarity:.3f}")
    print(f"see the selection: ove select {video['path']} --out {out / 'selection.png'}")


if __name__ == "__main__":
    main()
