"""`ove probe`'s arguments and runner."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import positive_int
from ..codec.cli import add_whole_frames_argument
from ..encode.encoder import DEFAULT_MODEL, DTYPES
from .run import MODES, ProbeSettings, run_probe


def add_probe_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="attentive-probe evaluation of a frozen video encoder on a labelled TRAIN/VAL pair",
        description="Train the published attentive head on a frozen encoder's tokens and evaluate every validation "
        "clip once per epoch; the headline is the last epoch's top-1. Writes OUT/report.json, predictions.jsonl, "
        "head.safetensors, curves.png, confusion.png. Exit status 2 for bad arguments, lists or output folder.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local folder: our model or any transformers vision model (default: %(default)s)")
    p.add_argument("--train", required=True, metavar="TRAIN", help="CSV (path,label; header optional) or JSONL list")
    p.add_argument("--val", required=True, metavar="VAL", help="same formats as TRAIN")
    p.add_argument("--root", help="folder the lists' relative paths start from (default: each list's folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--mode", choices=MODES, default="frames",
                   help="TSN frames (default) or codec-selected patches (our model only)")
    p.add_argument("--frames", type=positive_int, help="frames per clip (default 8 for frames, 64 for codec)")
    p.add_argument("--budget", type=positive_int, default=2048, help="codec patches kept (default %(default)s)")
    add_whole_frames_argument(p)
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="encode every clip once and train on the stored tokens (default: on unless --augment)")
    p.add_argument("--cache-dir", help="where the cache lives (default OUT/cache; resumable, reusable)")
    p.add_argument("--augment", action="store_true",
                   help="random TSN offsets and colour jitter in training; the encoder runs every epoch")
    p.add_argument("--standardize", action="store_true",
                   help="divide out per-dimension token statistics of the training set (random encoders need it)")
    p.add_argument("--device", help="e.g. cuda, cpu (default: this rank's GPU, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes per rank (default: the cores, shared by ranks)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT")
    p.set_defaults(func=_run_probe)


def _run_probe(args) -> int:
    try:
        settings = ProbeSettings(
            model=args.model, train=args.train, val=args.val, out=args.out, root=args.root, mode=args.mode,
            frames=args.frames, budget=args.budget, whole_frames=args.whole_frames, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, cache=args.cache, cache_dir=args.cache_dir, augment=args.augment,
            standardize=args.standardize, device=args.device, dtype=args.dtype, workers=args.workers,
            overwrite=args.overwrite, progress=sys.stderr.isatty())
        report = run_probe(settings)
    except (ValueError, OSError) as e:  # bad lists, settings, model or run folder
        print(f"ove probe: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        final = report["final"]
        print(f"top1 {final['top1']:.2f}  top5 {final['top5']:.2f}  mean-class {final['mean_class_accuracy']:.2f}  "
              f"({report['evaluated']} of {report['val_clips']} val clips, {report['num_failed']} failed; last epoch "
              f"of {len(report['epochs'])}) -> {os.path.join(args.out, 'report.json')}", file=sys.stderr)
    return 0
