"""`ove`: the command-line tool. One sub-command per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ove", description="OneVision Encoder tools")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each sub-command's arguments and runner live beside the work it does.
    from .encode.cli import add_encode_parser
    from .probe.cli import add_probe_parser

    _add_select_parser(sub)
    add_encode_parser(sub)
    add_probe_parser(sub)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def budget(text: str) -> int | float:
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
    p.add_argument("--frames", type=positive_int, default=64, help="frames sampled (default %(default)s)")
    p.add_argument("--budget", type=budget, default=2048,
                   help="patches kept, a count or a fraction of frames*rows*cols (default %(default)s)")
    p.add_argument("--size", type=positive_int, default=224, help="frame side in pixels (default %(default)s)")
    p.add_argument("--patch-size", type=positive_int, default=14, help="patch side (default %(default)s)")
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
