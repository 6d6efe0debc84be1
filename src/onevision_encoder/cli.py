"""`ove`: the command-line tool. One sub-command per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ove", description="OneVision Encoder tools")
    sub = parser.add_subparsers(dest="command", required=True)
    # --- ove select (codec-style patch selection) ---
    # --- ove encode (features for datasets) ---
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
