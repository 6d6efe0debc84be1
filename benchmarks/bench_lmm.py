"""What codec video saves inside a multimodal LLM: visual tokens and prefill time of one 64-frame video.

Three inputs of the same video, side by side, through the same OneVision LLaVA model:
- codec: codec-selected patches in the published LMM geometry (64 frames, letterboxed 36x36 grid, frame 0
  whole, 8 frames' worth = 10368 patches), as the processor feeds them;
- dense64: all 64 frames whole (82944 tokens), the alternative at the same temporal coverage;
- dense8: 8 whole frames (10368 tokens), the published fallback at the same token count.
Prefill = one forward over the prompt (encoder, projector, LLM, KV cache filled, last logits): what a
generate() pays before its first token. The encoder has full-size layers (width 1024, 16 heads, MLP 4096;
`--layers` of them: few on a CPU), the LLM is a small random Qwen3, the same for all three.

    python benchmarks/bench_lmm.py                          # the published geometry: for a GPU
    python benchmarks/bench_lmm.py --grid 12 --layers 2     # 168-px frames: minutes on 2 CPU cores

--grid scales the frame (grid x 14 px) and the budget (8 frames' worth) together. The last line is
`codec_vs_dense64_prefill=X.XX` (dense64 prefill time / codec prefill time; > 1 means codec is faster).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import Qwen3Config

from onevision_encoder import OneVisionEncoderConfig, sample_frames, select_patches
from onevision_encoder.lmm import OneVisionLlavaConfig, OneVisionLlavaForConditionalGeneration
from onevision_encoder.processing import collate_patch_lists
from onevision_encoder.synthetic import write_video

PATCH, FRAMES, TEXT_TOKENS, VOCAB = 14, 64, 32, 1000
IMAGE_TOKEN = VOCAB - 2


def build_model(layers: int, device: str, dtype: torch.dtype) -> OneVisionLlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = OneVisionEncoderConfig(num_hidden_layers=layers, use_head=False)
    text = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=131072)
    config = OneVisionLlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                  image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1)
    return OneVisionLlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def prompt(clip, device: str, dtype: torch.dtype) -> dict:
    """A prompt of `TEXT_TOKENS` text tokens around the clip's placeholders, and the clip as a patch-list batch."""
    batch = collate_patch_lists([clip])
    half = torch.randint(0, IMAGE_TOKEN, (TEXT_TOKENS,)).chunk(2)
    ids = torch.cat([half[0], torch.full((len(clip),), IMAGE_TOKEN), half[1]])[None]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": batch["pixel_values"].to(device, dtype), "patch_positions": batch["patch_positions"].to(device),
            "patch_attention_mask": batch["attention_mask"].to(device)}


def prefill_seconds(model, inputs: dict, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="a video file (default: a generated 320x240 H.264 clip)")
    parser.add_argument("--grid", type=int, default=36, help="patches per frame side (default 36: 504 px)")
    parser.add_argument("--layers", type=int, default=24, help="full-size encoder layers (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="prefills per input, in turns, least time kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    size, budget = args.grid * PATCH, 8 * args.grid**2

    with tempfile.TemporaryDirectory() as tmp:
        path = args.video or write_video(os.path.join(tmp, "clip.mp4"), num_frames=192, seed=0)["path"]
        clips = {
            "codec": select_patches(path, num_frames=FRAMES, budget=budget, size=size, patch_size=PATCH,
                                    resize="letterbox"),
            "dense64": sample_frames(path, num_frames=FRAMES, size=size, patch_size=PATCH, resize="letterbox"),
            "dense8": sample_frames(path, num_frames=8, size=size, patch_size=PATCH, resize="letterbox"),
        }
    model = build_model(args.layers, args.device, dtype)
    print(f"{args.layers} full-size encoder layers, {size} px frames ({args.grid}x{args.grid} patches), "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads", flush=True)
    inputs = {name: prompt(clip, args.device, dtype) for name, clip in clips.items()}
    prefill_seconds(model, inputs["codec"], args.device)  # warm-up (the cheapest of the three)
    seconds = {name: float("inf") for name in clips}
    names = list(clips)
    for r in range(args.repeats):  # in turns, so that a slow minute of a shared machine hits all alike, and
        for name in names[r % 3:] + names[: r % 3]:  # each goes first once in 3 (after dense64 the allocator
            seconds[name] = min(seconds[name], prefill_seconds(model, inputs[name], args.device))  # is cold)
    for name, clip in clips.items():
        print(f"{name:8s} {len(clip):6d} visual tokens  prefill {seconds[name]:9.2f} s", flush=True)
    codec = seconds["codec"]
    print(f"dense8_vs_codec_prefill={seconds['dense8'] / codec:.2f} "
          f"tokens_dense64_vs_codec={len(clips['dense64']) / len(clips['codec']):.2f}")
    print(f"codec_vs_dense64_prefill={seconds['dense64'] / codec:.2f}")


if __name__ == "__main__":
    main()
