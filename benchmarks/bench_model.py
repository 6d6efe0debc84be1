"""Model speed and memory, measured side by side in one run (absolute times on shared machines mean little).

1. OneVision Encoder vs transformers' SiglipVisionModel (what users would pick instead): same width, depth,
   heads, MLP and token count, same attention backend, random weights, same input pixels.
2. Codec-style sparse input (4096 of the 16384 patches of a 64-frame 224 px clip) vs the same clip dense.
3. Peak memory of the 4096-token forward, each model in a fresh process.

Full-width layers (hidden 1024, 16 heads, MLP 4096); fewer layers than ViT-L on CPU, which leaves the
ratios unchanged since every layer costs the same. The last line is
`speedup_vs_siglip=X.XX sparse_vs_dense=Y.YY`.

    python benchmarks/bench_model.py                        # CPU, 2 layers
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --backends sdpa flash_attention_2 --layers 24
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from onevision_encoder import OneVisionEncoderConfig, OneVisionEncoderModel, patchify
from onevision_encoder.processing import grid_positions

WIDTH = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096)
PATCH = 14


def build(kind: str, layers: int, tokens_side: int, backend: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if kind == "siglip":
        config = SiglipVisionConfig(**WIDTH, num_hidden_layers=layers, patch_size=PATCH, image_size=tokens_side * PATCH)
        model = SiglipVisionModel._from_config(config, attn_implementation=backend)
    else:
        config = OneVisionEncoderConfig(**WIDTH, num_hidden_layers=layers, patch_size=PATCH)
        model = OneVisionEncoderModel._from_config(config, attn_implementation=backend)
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_vs_siglip(args, backend: str, dtype: torch.dtype) -> dict[int, float]:
    """Speed ratio (SigLIP time / our time) at each token count; > 1 means we are faster."""
    ratios = {}
    for tokens in args.tokens:
        side = int(tokens**0.5)
        pixels = torch.randn(args.batch, 3, side * PATCH, side * PATCH, device=args.device, dtype=dtype)
        ours = build("ove", args.layers, side, backend, args.device, dtype)
        siglip = build("siglip", args.layers, side, backend, args.device, dtype)
        # interleave the contenders so drifting machine load hits both alike
        t_ours, t_siglip = [], []
        for _ in range(args.rounds):
            t_ours.append(timed(lambda: ours(pixel_values=pixels), args.device, args.repeats))
            t_siglip.append(timed(lambda: siglip(pixel_values=pixels), args.device, args.repeats))
        a, b = statistics.median(t_ours), statistics.median(t_siglip)
        ratios[tokens] = b / a
        print(f"[{backend} {dtype_name(dtype)}] {tokens:5d} tokens x{args.batch}: ours {a * 1e3:8.1f} ms  "
              f"siglip {b * 1e3:8.1f} ms  speedup {b / a:.2f}x", flush=True)
        del ours, siglip
    return ratios


def sparse_vs_dense(args, backend: str, dtype: torch.dtype) -> float:
    """Time of the dense 64x256-token clip / time of the 4096-token codec-style selection from it."""
    model = build("ove", args.layers, 16, backend, args.device, dtype)
    torch.manual_seed(1)
    video = torch.randn(1, 3, 64, 224, 224, device=args.device, dtype=dtype)
    patches = patchify(video.transpose(1, 2), PATCH).flatten(1, 2)  # [1, 16384, 588]
    positions = grid_positions(torch.arange(64), 16, 16).to(args.device)
    keep = torch.cat([torch.arange(256), 256 + torch.randperm(16384 - 256)[: 4096 - 256].sort().values])
    sparse = dict(pixel_values=patches[:, keep], patch_positions=positions[keep][None])
    t_sparse = timed(lambda: model(**sparse), args.device, args.repeats)
    t_dense = timed(lambda: model(pixel_values=video), args.device, args.dense_repeats, warmup=args.dense_warmup)
    print(f"[{backend} {dtype_name(dtype)}] 64-frame clip: dense 16384 tokens {t_dense * 1e3:9.1f} ms  "
          f"sparse 4096 tokens {t_sparse * 1e3:8.1f} ms  speedup {t_dense / t_sparse:.2f}x", flush=True)
    return t_dense / t_sparse


def _peak_memory_child(kind, layers, backend, device, dtype_str, queue):
    dtype = getattr(torch, dtype_str)
    model = build(kind, layers, 64, backend, device, dtype)
    pixels = torch.randn(1, 3, 64 * PATCH, 64 * PATCH, device=device, dtype=dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(pixel_values=pixels)
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
        base = _status_kib("VmRSS")
        with torch.inference_mode():
            model(pixel_values=pixels)
        queue.put((_status_kib("VmHWM") - base) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(kind: str, args, backend: str, dtype: torch.dtype) -> float:
    """Peak extra memory (MiB) of one 4096-token forward beyond the loaded model, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(kind, args.layers, backend, args.device,
                                                        dtype_name(dtype), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--backends", nargs="+", default=["sdpa"], help="eager, sdpa, flash_attention_2")
    parser.add_argument("--layers", type=int, default=None, help="2 on CPU, 24 on GPU by default")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of ours vs siglip")
    parser.add_argument("--dense-repeats", type=int, default=None)
    parser.add_argument("--dense-warmup", type=int, default=None)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    args.layers = args.layers or (24 if on_gpu else 2)
    # the dense 16384-token forward takes tens of seconds per layer on a CPU: time it once there
    args.dense_repeats = args.dense_repeats or (args.repeats if on_gpu else 1)
    args.dense_warmup = args.dense_warmup if args.dense_warmup is not None else (1 if on_gpu else 0)
    print(f"device={args.device} dtype={dtype_name(dtype)} layers={args.layers} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}", flush=True)

    summary = {}
    for backend in args.backends:
        ratios = image_vs_siglip(args, backend, dtype)
        mem_ours = peak_memory("ove", args, backend, dtype)
        mem_siglip = peak_memory("siglip", args, backend, dtype)
        print(f"[{backend} {dtype_name(dtype)}] peak memory of the 4096-token forward: ours {mem_ours:.0f} MiB  "
              f"siglip {mem_siglip:.0f} MiB  ratio {mem_ours / mem_siglip:.2f}", flush=True)
        summary[backend] = (min(ratios.values()), sparse_vs_dense(args, backend, dtype))
    first = summary[args.backends[0]]
    print(f"speedup_vs_siglip={first[0]:.2f} sparse_vs_dense={first[1]:.2f}")


if __name__ == "__main__":
    main()
