"""What `--cache` buys `ove probe`: seconds per epoch with the cache vs without, on the same generated
dataset, side by side in one run.

Cached: the frozen encoder ran once per clip before the epochs (its time is printed too, as the price paid
once); an epoch only trains the head and evaluates it on stored tokens. Uncached: every epoch decodes,
samples and encodes every training and validation clip again (what `--augment` has to do). Both runs
use the same settings and seed, so they also give the same numbers (the cache is valid: no augmentation,
segment-centre frames).

Dataset: `synthetic.write_probe_dataset` (motion direction, 4 classes). Model: a local checkpoint
(`--model`) or the shipped tiny one.

    python benchmarks/bench_probe.py                              # a few minutes on 2 CPU cores
    python benchmarks/bench_probe.py --model lmms-lab-encoder/onevision-encoder-large --device cuda --clips 16

The last line is `cached_speedup=X.XX` (uncached seconds per epoch / cached seconds per epoch).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from onevision_encoder.probe import ProbeSettings, run_probe
from onevision_encoder.synthetic import write_probe_dataset

TINY = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tiny-p14")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--mode", choices=("frames", "codec"), default="frames")
    parser.add_argument("--clips", type=int, default=8, help="training clips a class (half as many for validation)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        train, val = write_probe_dataset(root, "motion_direction", 4, args.clips, max(1, args.clips // 2),
                                         num_frames=64, width=160, height=120)
        common = dict(model=args.model, train=train, val=val, mode=args.mode, epochs=args.epochs,
                      batch_size=args.batch_size, workers=args.workers, device=args.device, progress=False)
        results = {}
        for name, cache in (("cached", True), ("uncached", False)):
            report = run_probe(ProbeSettings(**common, cache=cache, out=os.path.join(root, name)))
            epochs = report["epochs"]
            per_epoch = sum(e["train_seconds"] + e["val_seconds"] for e in epochs) / len(epochs)
            results[name] = (per_epoch, report)
            print(f"{name:9s} {per_epoch:8.2f} s/epoch  (encoding before the epochs: {report['encode_seconds']:.2f} s; "
                  f"final top1 {report['final']['top1']:.1f})", flush=True)
    cached, uncached = results["cached"], results["uncached"]
    same = cached[1]["final"] == uncached[1]["final"]
    print(f"clips {4 * args.clips} train + {4 * max(1, args.clips // 2)} val, {args.epochs} epochs, mode {args.mode}; "
          f"same final metrics with and without the cache: {same}")
    print(f"cached_speedup={uncached[0] / cached[0]:.2f}")


if __name__ == "__main__":
    main()
