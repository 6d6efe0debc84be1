"""How close `ove encode` comes to the model's own speed: end-to-end items/s over model-only items/s.

End to end = `Encoder.encode(videos, out=DIR)`: decoding and patch selection in DataLoader workers, the
model, shard writing. Model only = the same `Encoder.forward_batch` on the same inputs, decoded and
collated beforehand. The ratio is the pipeline's efficiency: 1.0 means decoding is completely hidden behind
the model. On a GPU the goal is >= 0.9. On a small CPU the workers and the model share the same cores,
so the ratio says how much decoding costs there, not how well it overlaps.

Inputs: generated H.264 videos (`synthetic.write_video`), read with the published probe setting (64 frames,
2048 kept patches, 224 px, 14 px patches) unless told otherwise. Model: a local checkpoint (`--model`) or
a randomly initialised one of the size given by `--size` (random weights run exactly as fast).

    python benchmarks/bench_encode.py                         # about a minute on 2 CPU cores
    python benchmarks/bench_encode.py --size large --videos 256 --batch-size 16 --device cuda

The last line is `pipeline_efficiency=X.XX`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from onevision_encoder import Encoder, OneVisionEncoderConfig, OneVisionEncoderModel
from onevision_encoder.processing import collate_patch_lists
from onevision_encoder.synthetic import write_video

# Random-weight model sizes: hidden, layers, heads, MLP (head_dim 64 as in every release).
SIZES = {
    "tiny": (128, 2, 2, 256),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def build_model(args) -> OneVisionEncoderModel:
    if args.model:
        return OneVisionEncoderModel.from_pretrained(args.model)
    hidden, layers, heads, mlp = SIZES[args.size]
    torch.manual_seed(0)
    return OneVisionEncoderModel(OneVisionEncoderConfig(hidden_size=hidden, num_hidden_layers=layers,
                                                        num_attention_heads=heads, intermediate_size=mlp))


def make_videos(folder: str, count: int, frames: int) -> list[str]:
    scenes = ("objects", "pan", "static")
    return [write_video(os.path.join(folder, f"video{i:04d}.mp4"), num_frames=frames, seed=i,
                        scene=scenes[i % len(scenes)])["path"] for i in range(count)]


def model_only_items_per_second(encoder: Encoder, paths: list[str], batch_size: int) -> tuple[float, float]:
    """(items/s of the model on pre-decoded, pre-collated batches; items/s of decoding in one process)."""
    start = time.perf_counter()
    clips = [encoder.preprocessing.load(path) for path in paths]
    decode_rate = len(paths) / (time.perf_counter() - start)
    batches = [collate_patch_lists(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]
    encoder.forward_batch(batches[0])  # warm-up (first-call allocations, kernel selection)
    _synchronize(encoder.device)
    start = time.perf_counter()
    for batch in batches:
        encoder.forward_batch(batch)
    _synchronize(encoder.device)
    return len(paths) / (time.perf_counter() - start), decode_rate


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local checkpoint folder (default: random weights of --size)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--video-frames", type=int, default=96, help="frames of each generated 320x240 video")
    parser.add_argument("--mode", choices=("codec", "frames"), default="codec")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()

    model = build_model(args)
    encoder = Encoder(model, mode=args.mode, frames=args.frames, budget=args.budget, batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, workers=args.workers, progress=False)
    config, p = model.config, encoder.preprocessing
    params = sum(t.numel() for t in model.parameters()) / 1e6
    print(f"machine: {os.cpu_count()} CPU cores, device {encoder.device}, torch threads {torch.get_num_threads()}")
    print(f"model: {args.model or f'random {args.size}'} (hidden {config.hidden_size}, {config.num_hidden_layers} "
          f"layers, {params:.1f}M parameters), dtype {encoder.settings.dtype}")
    print(f"inputs: {args.videos} H.264 videos, 320x240, {args.video_frames} frames; mode {p.mode}, "
          f"{p.frames} frames, budget {p.budget}; batch {args.batch_size}, {encoder.workers} loader workers")
    with tempfile.TemporaryDirectory() as folder:
        paths = make_videos(folder, args.videos, args.video_frames)
        model_rate, decode_rate = model_only_items_per_second(encoder, paths, args.batch_size)
        start = time.perf_counter()
        features = encoder.encode(paths, out=os.path.join(folder, "features"))
        pipeline_rate = len(paths) / (time.perf_counter() - start)
    if features.failures or len(features) != len(paths):
        raise SystemExit(f"encoding failed: {features.failures}")
    print(f"decode + select alone (1 process): {decode_rate:.2f} items/s")
    print(f"model alone (pre-decoded):         {model_rate:.2f} items/s")
    print(f"ove encode end to end:             {pipeline_rate:.2f} items/s (loader start-up included)")
    if encoder.device.type == "cpu":
        # Workers and model share the cores here, so even perfect overlap cannot beat doing both in turn.
        shared_bound = 1 / (1 / model_rate + 1 / decode_rate)
        print(f"bound when decoding and model share the CPU: {shared_bound:.2f} items/s "
              f"(efficiency {shared_bound / model_rate:.2f})")
    print(f"pipeline_efficiency={pipeline_rate / model_rate:.2f}")


if __name__ == "__main__":
    main()
