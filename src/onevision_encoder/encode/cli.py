"""`ove encode`'s arguments and runner."""

from __future__ import annotations

import os
import sys

from ..backbones import VIDEO_POOLINGS
from ..cli import positive_int
from ..codec.cli import add_whole_frames_argument
from .encoder import DEFAULT_MODEL, DTYPES, RESOLUTIONS, Encoder
from .inputs import discover_inputs


def add_encode_parser(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="encode videos and images into features (resumable, splits across ranks under torchrun)",
        description="Encode videos and images into safetensors shards plus DIR/index.jsonl. Run the same "
        "command again to resume; under torchrun every rank takes a share of the inputs. Exit status 1 if "
        "any input failed (listed in DIR/failures.jsonl), 2 for bad arguments.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video or image files, folders (walked for them), or CSV (path column) / JSONL lists")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local folder: our model, or any transformers vision model (CLIP, SigLIP, DINOv2, "
                        "...: their own pooled embedding) (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    p.add_argument("--mode", choices=("codec", "frames", "image"),
                   help="how videos are read: codec-selected patches (default for our model) or uniform frames "
                        "(default and only choice for other encoders); 'image' accepts images only. Images always "
                        "get the model's image preprocessing (ours: see --resolution).")
    p.add_argument("--resolution", choices=RESOLUTIONS, default="crop",
                   help="images: 448 px centre crop (default, published) or native: their own size in whole "
                        "patches, no crop, downscaled to fit 1120*1120 pixels in all")
    p.add_argument("--frames", type=positive_int,
                   help="frames per video (default 64 for codec, 16 for frames, 8 for other encoders)")
    p.add_argument("--video-pooling", choices=VIDEO_POOLINGS, default="mean",
                   help="other encoders' video embedding: mean of the frames' embeddings (default) or their "
                        "concatenation (as published for the concept bank's teacher)")
    p.add_argument("--budget", type=positive_int, help="patches kept per video in codec mode (default 2048)")
    add_whole_frames_argument(p)
    p.add_argument("--tokens", action="store_true", help="also save every token's features and position")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: this rank's GPU, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes per rank (default: the cores, shared by ranks)")
    p.add_argument("--shard-size", type=positive_int,
                   help="inputs per shard (default 1024, 64 with --tokens)")
    p.set_defaults(func=_run_encode)


def _run_encode(args) -> int:
    try:
        paths = discover_inputs(args.inputs)  # a missing input fails before the model is loaded
        encoder = Encoder(args.model, mode=args.mode, frames=args.frames, budget=args.budget,
                          whole_frames=args.whole_frames, tokens=args.tokens,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype, workers=args.workers,
                          shard_size=args.shard_size, resolution=args.resolution, video_pooling=args.video_pooling)
        features = encoder.encode(paths, out=args.out)
    except (ValueError, OSError) as e:  # bad inputs (InputError), settings, model or output folder
        print(f"ove encode: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        total = len(features) + len(features.failures)
        print(f"encoded {len(features)} of {total} inputs into {args.out}", file=sys.stderr)
        if features.failures:
            print(f"{len(features.failures)} failed: see {os.path.join(args.out, 'failures.jsonl')}", file=sys.stderr)
    return 1 if features.failures else 0
