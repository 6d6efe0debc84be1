"""`ove select`'s arguments and runner."""

from __future__ import annotations

import argparse
import sys

from ..cli import budget, positive_int
from ..processing import RESIZE_MODES
from .scores import DEFAULT_POLICY, POLICIES


def frame_indices(text: str) -> tuple[int, ...]:
    """"0,16,32,48" -> (0, 16, 32, 48); "none" or "" -> () (argparse type; ranges are checked by the selection)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame indices like 0,16,32,48 (or none), got {text!r}") from None


def add_whole_frames_argument(parser) -> None:
    """`--whole-frames`, shared by the sub-commands that select patches."""
    parser.add_argument("--whole-frames", type=frame_indices, default=None, metavar="I,J,...",
                        help="sampled frames kept whole, the rest of the budget going by score (default 0; the "
                             "published training data kept 0,16,32,48 of 64; 'none' for none)")


def add_select_parser(sub) -> None:
    p = sub.add_parser(
        "select",
        help="codec-style patch selection of one video: summary, picture, saved selection",
        description="Sample frames uniformly, score every patch by motion and change, keep frame 0 (or the "
        "--whole-frames) whole and the top patches of the rest. Exit status 1 for an unreadable video, 2 for bad arguments.",
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
    add_whole_frames_argument(p)
    p.set_defaults(func=_run_select)


def _run_select(args) -> int:
    from .contact_sheet import contact_sheet
    from .selection import save_selection, select_patches
    from .video import VideoDecodeError

    try:
        clip = select_patches(args.video, num_frames=args.frames, budget=args.budget, size=args.size,
                              patch_size=args.patch_size, policy=args.policy, resize=args.resize,
                              whole_frames=args.whole_frames, keep_frames=args.out is not None,
                              progress=sys.stderr.isatty())
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
