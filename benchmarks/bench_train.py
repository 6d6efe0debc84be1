"""Training costs, measured side by side in one run (absolute times on shared machines mean little).

1. Partial FC: the multi-label loss (`PartialFCLoss`, 8 labels drawn of 10) over many classes at sample
   rate 0.1 vs the same loss at rate 1, a full softmax over every class. One process holds all the
   centres, as one rank holds its shard. Measured: forward + backward of the loss (the centres' AdamW
   update costs the same either way and is left out), median of alternating repeats; and the peak
   memory a step adds on top of the centres and their gradient (on CPU the process's peak resident set,
   reset before each step through /proc/self/clear_refs, so Linux only; on GPU torch's peak allocation).

The last line is `pfc_memory_ratio=X.XX pfc_speedup=Y.YY`: full-softmax memory and time over Partial FC's
(> 1: Partial FC needs less).

    python benchmarks/bench_train.py                      # CPU: 1M classes, dim 256, batch 64
    python benchmarks/bench_train.py --device cuda --classes 2000000 --dim 1024 --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="samples a step (global batch of the loss)")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{args.classes} classes, dim {args.dim}, batch {args.batch} x 8 labels, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    pfc = partial_fc_vs_full_softmax(args, device)
    print(" ".join(f"{key}={value:.2f}" for key, value in pfc.items()))


if __name__ == "__main__":
    main()
