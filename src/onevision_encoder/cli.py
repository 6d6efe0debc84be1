"""`ove`: the command-line tool. One sub-command per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ove", description="OneVision Encoder tools")
    sub = parser.add_subparsers(dest="command", required=True)
    # --- ove select (codec-style patch selection) ---
    _add_select_parser(sub)
    # --- ove encode (features for datasets) ---
    _add_encode_parser(sub)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_encode_parser(sub) -> None:
    from .encode import DEFAULT_MODEL, DTYPES

    p = sub.add_parser(
        "encode",
        help="encode videos and images into features (resumable, splits across ranks under torchrun)",
        description="Encode videos and images into safetensors shards plus DIR/index.jsonl. Run the same "
        "command again to resume; under torchrun every rank takes a share of the inputs. Exit status 1 if "
        "any input failed (listed in DIR/failures.jsonl), 2 for bad arguments.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video or image files, folders (walked for them), or CSV (path column) / JSONL lists")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    p.add_argument("--mode", choices=("codec", "frames", "image"), default="codec",
                   help="how videos are read: codec-selected patches (default) or uniform frames; 'image' "
                        "accepts images only. Images always get the image preprocessing (448 px).")
    p.add_argument("--frames", type=_positive_int, help="frames per video (default 64 for codec, 16 for frames)")
    p.add_argument("--budget", type=_positive_int, help="patches kept per video in codec mode (default 2048)")
    p.add_argument("--tokens", action="store_true", help="also save every token's features and position")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: this rank's GPU, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes per rank (default: the cores, shared by ranks)")
    p.add_argument("--shard-size", type=_positive_int,
                   help="inputs per shard (default 1024, 64 with --tokens)")
    p.set_defaults(func=_run_encode)


def _run_encode(args) -> int:
    from .data import discover_inputs
    from .encode import Encoder

    try:
        paths = discover_inputs(args.inputs)  # a missing input fails before the model is loaded
        encoder = Encoder(args.model, mode=args.mode, frames=args.frames, budget=args.budget, tokens=args.tokens,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype, workers=args.workers,
                          shard_size=args.shard_size)
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


def _budget(text: str) -> int | float:
    """A patch count ("2048") or a fraction of all patches ("0.125")."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a patch count or a fraction, got {text!r}") from None


def _add_select_parser(sub) -> None:
    from .codec import DEFAULT_POLICY, POLICIES
    from .processing import RESIZE_MODES

    p = sub.add_parser(
        "select",
        help="codec-style patch selection of one video: summary, picture, saved selection",
        description="Sample frames uniformly, score every patch by motion and change, keep frame 0 whole and the "
        "top patches of the rest. Exit status 1 for an unreadable video, 2 for bad arguments.",
    )
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--frames", type=_positive_int, default=64, help="frames sampled (default %(default)s)")
    p.add_argument("--budget", type=_budget, default=2048,
                   help="patches kept, a count or a fraction of frames*rows*cols (default %(default)s)")
    p.add_argument("--size", type=_positive_int, default=224, help="frame side in pixels (default %(default)s)")
    p.add_argument("--patch-size", type=_positive_int, default=14, help="patch side (default %(default)s)")
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY, help="scoring (default %(default)s)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="crop", help="default %(default)s")
    p.add_argument("--out", metavar="PICTURE.png", help="contact sheet of the sampled frames, kept patches bright")
    p.add_argument("--save", metavar="SELECTION.npz", help="positions, frame ids, scores and kept mask")
    p.set_defaults(func=_run_select)


def _run_select(args) -> int:
    from .codec import save_selection, select_patches
    from .contact_sheet import contact_sheet
    from .video import VideoDecodeError

    try:
        clip = select_patches(args.video, num_frames=args.frames, budget=args.budget, size=args.size,
                              patch_size=args.patch_size, policy=args.policy, resize=args.resize,
                              keep_frames=args.out is not None, progress=sys.stderr.isatty())
        if args.out:
            contact_sheet(clip.frames, clip.kept).save(args.out)
        if args.save:
            save_selection(clip, args.save)
    except VideoDecodeError as e:
        print(f"ove select: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"ove select: error: {e}", file=sys.stderr)
        return 2
    frames, rows, cols = clip.kept.shape
    print(f"{args.video}: kept {len(clip)} of {frames * rows * cols} patches ({frames} frames of {rows}x{cols}, "
          f"policy {clip.policy}, motion from {clip.motion_source}); frame ids {clip.frame_ids[0]}.."
          f"{clip.frame_ids[-1]}" + (f"; picture {args.out}" if args.out else "")
          + (f"; selection {args.save}" if args.save else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
