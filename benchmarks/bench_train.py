"""Training costs, measured side by side in one run (absolute times on shared machines mean little).

1. Partial FC: the multi-label loss (`PartialFCLoss`, 8 labels drawn of 10) over many classes at sample
   rate 0.1 vs the same loss at rate 1, a full softmax over every class. One process holds all the
   centres, as one rank holds its shard. Measured: forward + backward of the loss (the centres' AdamW
   update costs the same either way and is left out), median of alternating repeats; and the peak
   memory a step adds on top of the centres and their gradient (on CPU the process's peak resident set,
   reset before each step through /proc/self/clear_refs, so Linux only; on GPU torch's peak allocation).

2. Training-step throughput of the two video inputs of the same token count: a codec clip (2048 patches
   selected from 64 frames, the published setting) vs 8 whole frames (8 x 256 patches), each a patch list
   from a real (generated, H.264) video. One step: backbone forward, Partial-FC loss, backward, AdamW;
   median of alternating repeats. About 1.0 is expected (same tokens; only the positions differ). The time
   to make each input (selection vs decoding 8 frames) is printed beside it.

The second-to-last line is `codec_vs_frames=Z.ZZ` (codec-clip steps a second over whole-frame ones), the last
`pfc_memory_ratio=X.XX pfc_speedup=Y.YY`: full-softmax memory and time over Partial FC's (> 1: Partial FC
needs less).

    python benchmarks/bench_train.py                      # CPU: 1M classes, dim 256, batch 64
    python benchmarks/bench_train.py --device cuda --classes 2000000 --dim 1024 --batch 256 --step-layers 24
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from onevision_encoder import OneVisionEncoderConfig, OneVisionEncoderModel, collate_patch_lists
from onevision_encoder.codec import sample_frames, select_patches
from onevision_encoder.synthetic import write_video
from onevision_encoder.train.loss import PartialFCLoss

LABELS_PER_SAMPLE = 10


class PeakMemory:
    """Peak memory (bytes) of a block of work, on CPU (process resident set) or CUDA (torch allocations)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")


def partial_fc_vs_full_softmax(args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    embeddings = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch, LABELS_PER_SAMPLE), device=device)
    losses = {}
    for name, rate in (("partial_fc", args.sample_rate), ("full_softmax", 1.0)):
        losses[name] = PartialFCLoss(args.classes, args.dim, sample_rate=rate).to(device)
    meter = PeakMemory(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in losses}
    extra = {name: 0 for name in losses}
    for repeat in range(args.repeats + 1):  # the first round warms up (and allocates the gradients)
        for name, loss_fn in losses.items():
            loss_fn.zero_grad(set_to_none=False)
            embeddings.grad = None
            before = meter.reset()
            sync()
            start = time.perf_counter()
            loss_fn(embeddings, labels).backward()
            sync()
            elapsed = time.perf_counter() - start
            if repeat:
                times[name].append(elapsed)
                extra[name] = max(extra[name], meter.peak() - before)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in losses:
        print(f"{name:13s} rate {losses[name].sample_rate:<4g} ({losses[name].num_sampled:>8d} classes scored): "
              f"{median[name] * 1000:8.1f} ms a step, {extra[name] / 2**20:8.1f} MiB above the centres")
    return {"pfc_memory_ratio": extra["full_softmax"] / extra["partial_fc"],
            "pfc_speedup": median["full_softmax"] / median["partial_fc"]}


def _clips(repeats: int) -> tuple[dict, dict[str, float]]:
    """A codec clip and an 8-frame clip of one generated video, and the median time to make each."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_video(os.path.join(folder, "clip.mp4"), num_frames=240, width=640, height=360)["path"]
        makers = {"codec": lambda: select_patches(path, num_frames=64, budget=2048),
                  "frames": lambda: sample_frames(path, num_frames=8)}
        clips, made = {}, {name: [] for name in makers}
        for _ in range(repeats):
            for name, make in makers.items():
                start = time.perf_counter()
                clips[name] = make()
                made[name].append(time.perf_counter() - start)
    return clips, {name: statistics.median(t) for name, t in made.items()}


def codec_clip_vs_whole_frames(args, device: torch.device) -> dict[str, float]:
    clips, made = _clips(args.repeats)
    assert len(clips["codec"]) == len(clips["frames"]) == 2048
    torch.manual_seed(0)
    config = OneVisionEncoderConfig(hidden_size=args.step_width, intermediate_size=4 * args.step_width,
                                    num_attention_heads=args.step_width // 64, num_hidden_layers=args.step_layers)
    model = OneVisionEncoderModel._from_config(config, attn_implementation="sdpa").to(device).train()
    loss_fn = PartialFCLoss(10_000, args.step_width, sample_rate=0.1).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), loss_fn.centres], lr=1e-5)
    batches = {name: {k: v.to(device) for k, v in collate_patch_lists([clip] * args.step_batch).items()}
               for name, clip in clips.items()}
    labels = torch.randint(0, 10_000, (args.step_batch, LABELS_PER_SAMPLE), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in batches}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, inputs in batches.items():
            sync()
            start = time.perf_counter()
            with autocast:
                pooled = model(**inputs).pooler_output
            loss_fn(pooled.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if repeat:
                times[name].append(time.perf_counter() - start)
    step = {name: statistics.median(t) for name, t in times.items()}
    for name, label in (("codec", "codec clip, 2048 of 64x256 patches"), ("frames", "8 whole frames, 8x256 patches")):
        print(f"{label:36s}: {step[name] * 1000:8.1f} ms a training step of {args.step_batch} "
              f"({args.step_batch / step[name]:.2f} clips/s); making one clip {made[name] * 1000:.0f} ms")
    return {"codec_vs_frames": step["frames"] / step["codec"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="samples a step (global batch of the loss)")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-width", type=int, default=512, help="backbone width of the video steps")
    parser.add_argument("--step-layers", type=int, default=2, help="backbone layers of the video steps")
    parser.add_argument("--step-batch", type=int, default=1, help="clips a video step")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{args.classes} classes, dim {args.dim}, batch {args.batch} x 8 labels, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    pfc = partial_fc_vs_full_softmax(args, device)
    print(f"video steps: width {args.step_width}, {args.step_layers} layers, {args.step_batch} clip(s) a step")
    video = codec_clip_vs_whole_frames(args, device)
    for figures in (video, pfc):  # the Partial FC figures last, as the issue reads them
        print(" ".join(f"{key}={value:.2f}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
