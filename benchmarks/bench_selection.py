"""Codec-style selection: speed against decoding alone, and information kept (replenishment PSNR).

    python benchmarks/bench_selection.py [--sizes 640x360,1280x720] [VIDEO ...]

Generates moving/deforming objects with a still stretch, and a camera pan, in H.264 and HEVC at each size,
plus one 640x360 H.264 clip with two slices a frame (plus any videos given), then for each: selection time /
decode-only time (PyAV, all frames, same threading; least of 5 runs, the timed calls taking turns), the time
of `sample_frames` for the same 64 frames (decoding plus resizing, what any frame-sampling pipeline pays: the
difference to the selection is the cost of the motion analysis), and the replenishment PSNR of uniform whole
frames, "reference" and the default policy at K = 2048 and 4096 of 64x256. Beside the wall-time ratio, the
CPU time of a selection in one torch thread without worker threads (what `ove encode`'s loader processes run)
against the CPU time of decoding every frame (least of 5, `time.process_time`, which counts every thread of
the process, so other work on the machine does not enter it), and beside it the same ratio for the
selection's own decoding pass alone ("pass 1t": the floor under the selection, what is left of the 1.2x goal
for everything else). Last line: `select_vs_decode=X.XX
psnr_gain_db=Y.YY select_cpu_vs_decode=Z.ZZ` (default policy vs uniform frames, K=2048, averaged over the
videos; the two ratios are medians over all of them).

Slices matter to the speed ratio: with slice threading (what both sides use) a frame of one slice decodes on
one core, and the selection's own work (resizing, motion) runs on the others beside it; a frame of several
slices decodes on several cores, and that work has to share them. The H.264 clips have one slice a frame, as
the ffmpeg command line writes by default (x264 frame threading); the "-2slices" clip is written the way
PyAV's encoder does by default (x264 slice threading, one slice per encoder thread), the harder case. It is a
pan, where codec selection gains least: it does not raise the PSNR average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import av
import torch

from onevision_encoder.codec import (
    DEFAULT_POLICY,
    choose_patches,
    patch_scores,
    replenishment_psnr,
    sample_frames,
    scan_video,
    select_patches,
    uniform_frames_mask,
)
from onevision_encoder.synthetic import write_video
from onevision_encoder.codec.video import (
    DECODE_THREADING,
    VideoDecodeError,
    VideoFile,
    motion_vectors,
    probe_video,
    sample_indices,
)

BUDGETS = (2048, 4096)
# Encoded as camera footage usually is (x264/x265 "medium": CABAC, deblocking, B-frames) with light sensor
# grain. The tests' "ultrafast" files skip most of that and decode several times faster than real video,
# which would make any per-frame work look expensive next to decoding.
REALISTIC_ENCODING = dict(preset="medium", grain=2.0)
ONE_SLICE = {"x264-params": "sliced-threads=0"}  # x264's frame threading: one slice a frame
TWO_SLICES = {"x264-params": "sliced-threads=1:threads=2"}


def decode_all(path: str) -> None:
    """Decode every frame with PyAV, same threading as the selection, no conversion."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = DECODE_THREADING
        for _ in container.decode(stream):
            pass


def decoding_pass(path: str, num_frames: int = 64) -> None:
    """The decoding a default selection does and nothing else: the sampled frames and the reference frames
    (the unneeded non-reference ones skipped), the moving list-0 vectors of the samples and of the I/P frames
    read out. Its CPU time is the floor under the selection's: what is left for motion, scores and pictures."""
    with VideoFile(path) as video:
        info = video.info(timestamps=True)
        sampled = sample_indices(info.frame_count, num_frames)
        wanted = set(sampled.tolist())
        for number, frame in video.frames(info.exports_motion_vectors, wanted.__contains__, info.presentation_numbers):
            if number > sampled[-1]:
                break
            if info.exports_motion_vectors and (number in wanted or frame.pict_type in (1, 2)):
                motion_vectors(frame, moving_l0=True)


def best_seconds(calls: dict, repeats: int = 5, clock=time.perf_counter) -> dict:
    """Least time (`clock`: wall time by default) of each of `calls` ({name: function}), the calls taking
    turns: the machine is shared and its speed drifts over minutes, so the minimum is the least disturbed
    time, and taking turns lets every call meet the same moments (timed one after the other, a slow minute
    could fall on one side only)."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = clock()
            call()
            times[name].append(clock() - start)
    return {name: min(t) for name, t in times.items()}


def single_thread_cpu_seconds(path: str) -> dict:
    """CPU seconds of decoding every frame, of the selection's own decoding pass (`decoding_pass`) and of a
    selection, with torch on one thread, so the selection runs without worker threads, as in a DataLoader
    worker process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best_seconds({"decode": lambda: decode_all(path), "pass": lambda: decoding_pass(path),
                             "select": lambda: select_patches(path, budget=BUDGETS[0])}, clock=time.process_time)
    finally:
        torch.set_num_threads(threads)


def measure(path: str) -> dict:
    timed = best_seconds({
        "decode": lambda: decode_all(path),
        "select": lambda: select_patches(path, budget=BUDGETS[0]),
        # decoding and resizing the same 64 frames, as any frame-sampling pipeline must
        "sample": lambda: sample_frames(path, num_frames=64),
    })
    cpu = single_thread_cpu_seconds(path)
    scan = scan_video(path)
    frames = scan.frames  # floats, made once: each `scan.frames` converts the uint8 pictures again
    num_frames, rows = len(frames), frames.shape[-1] // scan.patch_size
    psnr = {}
    for budget in BUDGETS:
        uniform = uniform_frames_mask(num_frames, rows, rows, budget)
        psnr[("uniform", budget)] = replenishment_psnr(frames, uniform, scan.patch_size)
        for policy in ("reference", DEFAULT_POLICY):
            kept = choose_patches(patch_scores(scan, policy), scan.valid, budget, (0,), policy == "balanced")
            psnr[(policy, budget)] = replenishment_psnr(frames, kept, scan.patch_size)
    return {**timed, "cpu": cpu["select"] / cpu["decode"], "pass": cpu["pass"] / cpu["decode"], "psnr": psnr,
            "motion": scan.motion_source, "frames": scan.total_frames}


def frame_sizes(text: str) -> list[tuple[int, int]]:
    """"640x360,1280x720" -> [(640, 360), (1280, 720)] (argparse type: a bad value is a usage error)."""
    try:
        sizes = [tuple(int(n) for n in size.split("x")) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 16 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected sizes WxH[,WxH...] of at least 16x16, got {text!r}")
    return sizes


def generated_clips(sizes: list[tuple[int, int]]):
    """(name, `write_video` options) of the generated clips: both scenes in both codecs at each (width,
    height), H.264 with one slice a frame; then the two-slice H.264 clip."""
    for width, height in sizes:
        for codec in ("h264", "hevc"):
            for scene in ("objects", "pan"):
                options = dict(codec=codec, scene=scene, width=width, height=height)
                yield f"{scene}-{codec}-{height}p", {**options, **(ONE_SLICE if codec == "h264" else {})}
    yield "pan-h264-360p-2slices", dict(codec="h264", scene="pan", width=640, height=360, **TWO_SLICES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*", help="real clips to add to the generated ones")
    parser.add_argument("--sizes", type=frame_sizes, default="640x360,1280x720",
                        help="sizes of the generated clips, WxH,...")
    args = parser.parse_args()
    for video in args.videos:  # before minutes of encoding
        try:
            probe_video(video)
        except VideoDecodeError as exc:
            parser.error(str(exc))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        videos = {}
        for name, options in generated_clips(args.sizes):
            print(f"writing {name} ...", file=sys.stderr)
            videos[name] = write_video(os.path.join(tmp, f"{name}.mp4"), num_frames=240, **REALISTIC_ENCODING,
                                       **options)["path"]
        videos.update({os.path.basename(v): v for v in args.videos})
        results = {name: measure(path) for name, path in videos.items()}

    print(f"{'video':<26}{'frames':>7}{'motion':>16}{'decode s':>10}{'sample s':>10}{'select s':>10}{'ratio':>7}"
          f"{'cpu 1t':>7}{'pass 1t':>8}", end="")
    for budget in BUDGETS:
        print(f"{'uniform':>10}{'ref':>8}{DEFAULT_POLICY[:8]:>10}", end="")
    print("   (replenishment PSNR dB at K=" + ", ".join(map(str, BUDGETS)) + ")")
    for name, r in results.items():
        print(f"{name:<26}{r['frames']:>7}{r['motion']:>16}{r['decode']:>10.3f}{r['sample']:>10.3f}{r['select']:>10.3f}"
              f"{r['select'] / r['decode']:>7.2f}{r['cpu']:>7.2f}{r['pass']:>8.2f}", end="")
        for budget in BUDGETS:
            p = r["psnr"]
            print(f"{p[('uniform', budget)]:>10.2f}{p[('reference', budget)]:>8.2f}{p[(DEFAULT_POLICY, budget)]:>10.2f}",
                  end="")
        print()
    ratio = statistics.median(r["select"] / r["decode"] for r in results.values())
    gain = statistics.mean(r["psnr"][(DEFAULT_POLICY, 2048)] - r["psnr"][("uniform", 2048)] for r in results.values())
    cpu = statistics.median(r["cpu"] for r in results.values())
    print(f"select_vs_decode={ratio:.2f} psnr_gain_db={gain:.2f} select_cpu_vs_decode={cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
