"""`ove concepts build` and `ove concepts assign`: concept banks from features, and labels from a bank."""

from __future__ import annotations

import os
import sys

from ..cli import positive_int
from .kmeans import BACKENDS


def add_concepts_parser(sub) -> None:
    p = sub.add_parser(
        "concepts",
        help="concept banks: cluster features into K concepts, label samples with their nearest concepts",
        description="Build a concept bank (spherical k-means of features) and assign each sample its nearest "
        "concepts, the labels of the pretraining loss. Exit status 2 for bad arguments or unreadable files.",
    )
    actions = p.add_subparsers(dest="action", required=True)

    build = actions.add_parser(
        "build", help="cluster FEATURES into K unit centres, written as a safetensors bank",
        description="Spherical k-means (cosine) of FEATURES: `ove encode` folders, .npy [N, D] float matrices "
        "or .safetensors matrices, read as one matrix in the order given. Uses faiss when installed "
        "(pip install \".[train]\"; faiss's GPU build when it sees a GPU), else torch.")
    build.add_argument("features", nargs="+", metavar="FEATURES")
    build.add_argument("--num-concepts", type=positive_int, required=True, metavar="K", help="centres to make")
    build.add_argument("--out", required=True, metavar="BANK.safetensors", help="the bank file written")
    build.add_argument("--iterations", type=positive_int, default=20, help="Lloyd iterations (default %(default)s)")
    build.add_argument("--max-points-per-centre", type=positive_int, default=256,
                       help="k-means trains on at most K times this many points, drawn uniformly "
                            "(default %(default)s, as faiss)")
    build.add_argument("--seed", type=int, default=0, help="sample and initial centres (default %(default)s)")
    build.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="auto: faiss when installed, else torch (default %(default)s)")
    build.set_defaults(func=_run_build)

    assign = actions.add_parser(
        "assign", help="each sample's top-k nearest concepts of a bank, in order",
        description="Labels [N, k] int64, row i the k concepts nearest to feature row i by cosine, nearest "
        "first; written as .npy or as .safetensors (key `labels`), by the extension of --out.")
    assign.add_argument("features", nargs="+", metavar="FEATURES")
    assign.add_argument("--bank", required=True, metavar="BANK.safetensors")
    assign.add_argument("--top-k", type=positive_int, default=10, help="labels per sample (default %(default)s)")
    assign.add_argument("--out", required=True, metavar="LABELS.npy|LABELS.safetensors")
    assign.set_defaults(func=_run_assign)


def _check_out_folder(path: str) -> None:
    """Before any work: the folder the output goes to exists."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: its folder {folder} does not exist")


def _run_build(args) -> int:
    from .concepts import build_bank, read_features, save_bank

    try:
        if not args.out.endswith(".safetensors"):
            raise ValueError(f"{args.out}: a bank is a .safetensors file")
        _check_out_folder(args.out)
        features = read_features(args.features)
        result, settings = build_bank(features, args.num_concepts, iterations=args.iterations,
                                      max_points_per_centre=args.max_points_per_centre, seed=args.seed,
                                      backend=args.backend, progress=sys.stderr.isatty())
        save_bank(args.out, result.centres, settings)
    except (ValueError, OSError, ImportError) as e:
        print(f"ove concepts build: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.num_concepts} concepts of {features.dim} dims from {settings['num_train_points']} "
          f"of {len(features)} rows ({result.backend}, mean cosine to centre {result.objective:.4f})",
          file=sys.stderr)
    return 0


def _run_assign(args) -> int:
    from .concepts import load_bank, read_features, write_labels

    try:
        _check_out_folder(args.out)
        centres, _ = load_bank(args.bank)
        features = read_features(args.features)
        settings = {"bank": args.bank, "top_k": args.top_k, "sources": features.paths}
        write_labels(args.out, features, centres, args.top_k, settings=settings, progress=sys.stderr.isatty())
    except (ValueError, OSError) as e:
        print(f"ove concepts assign: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: top {args.top_k} of {len(centres)} concepts for {len(features)} rows", file=sys.stderr)
    return 0


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain the encoder by cluster discrimination (resumes from its output folder)",
        description="Train the backbone on one or more heads (datasets with concept-bank labels) as the config "
        "says. Every config key can be set here: `--set optim.lr=1e-4` or a plain `optim.lr=1e-4` after the "
        "config. Run the same command again to resume from the last checkpoint; under torchrun every rank "
        "trains its share. Exit status 2 for a bad config, data or checkpoint folder.",
    )
    p.add_argument("config", metavar="CONFIG", nargs="?", help="YAML or JSON file (keys: see README)")
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="config overrides by dotted key")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override by dotted key, e.g. heads.0.batch_size=16 (repeatable)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .config import load_config
    from .loop import train

    config_path, assignments = args.config, list(args.assignments)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml", ".json")):
        assignments.insert(0, config_path)  # no file, only overrides
        config_path = None
    try:
        config = load_config(config_path, assignments + args.overrides)
        final = train(config)
    except (ValueError, OSError) as e:  # the config, data, model or checkpoint folder (each error names it)
        print(f"ove train: error: {e}", file=sys.stderr)
        return 2
    print(f"ove train: model saved to {final}", file=sys.stderr)
    return 0
