"""`ove`: the command-line tool. One sub-command per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ove", description="OneVision Encoder tools")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each sub-command's arguments and runner live beside the work it does.
    from .codec.cli import add_select_parser
    from .encode.cli import add_encode_parser
    from .lmm.cli import add_lmm_parser
    from .probe.cli import add_probe_parser
    from .train.cli import add_concepts_parser, add_train_parser

    add_select_parser(sub)
    add_encode_parser(sub)
    add_probe_parser(sub)
    add_concepts_parser(sub)
    add_train_parser(sub)
    add_lmm_parser(sub)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
