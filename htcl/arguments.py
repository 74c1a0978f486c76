"""Each pipeline step's command-line options, defined once.

`htcl <step>` (htcl/cli.py) and `python -m ray_jobs.<step>` (each job's build_parser) both build a
step's parser from the function here and add their own options on top: `--local` in the one,
Ray's `--workers`, `--num-cpus`, batch sizes in the other. Plain argparse, nothing heavier
imported, so `htcl --help` and `htcl <step> --local` load neither Ray nor Feast.
"""

from __future__ import annotations

import argparse

# --variant of stage 2: favor triplets (HTCL) or co-occurrence pairs (HTCL_w_CF); finetune.variant.
FINETUNE_VARIANTS = ("favor", "cf")
CATALOG_HELP = "catalog Parquet/CSV (default: <data.root>/catalog.parquet)"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`--config C` plus dotted `key.path=value` overrides."""
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides to load the config with: argv's own, then `--variant V` (where the
    step has it) as finetune.variant=V."""
    overrides = list(args.overrides)
    if getattr(args, "variant", None):
        overrides.append(f"finetune.variant={args.variant}")
    return overrides


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--catalog", help=CATALOG_HELP)
    parser.add_argument("--force", action="store_true", help="recompute songs already done")


def add_features_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--catalog", help=CATALOG_HELP)
    parser.add_argument("--force", action="store_true", help="recompute every song's features")


def add_train_args(parser: argparse.ArgumentParser, stage: str) -> None:
    """pretrain and finetune; finetune also starts from a checkpoint and picks its variant."""
    add_config_args(parser)
    if stage == "finetune":
        parser.add_argument("--init-from", help="stage-1 checkpoint (default: <output_dir>/pretrain/model.pt)")
        parser.add_argument(
            "--variant", choices=FINETUNE_VARIANTS, help="favor triplets (HTCL) or co-occurrence (HTCL_w_CF)"
        )


def add_embed_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument(
        "--checkpoint", help="default: the config's stage-2 checkpoint (<output_dir>/finetune[_<backbone>]/model.pt)"
    )
    parser.add_argument("--force", action="store_true", help="re-embed every song, not only new or changed ones")


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    add_embeddings_arg(parser)


def embeddings_arg(text: str) -> tuple[str, str]:
    """argparse type of `--embeddings NAME=PATH`: (NAME, PATH), both non-empty."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. item2vec=vectors.parquet), got {text!r}")
    return name.strip(), path.strip()


EMBEDDINGS_HELP = (
    "score an external embedding table as a row of its own, with the same probes, hit-rates, "
    "rankers and plots (repeatable): Parquet or CSV with song_id and a fixed-length embedding "
    '(a list of floats; in CSV "[0.1, 0.2]" or "0.1 0.2")'
)


def add_embeddings_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", action="append", type=embeddings_arg, default=[], metavar="NAME=PATH", help=EMBEDDINGS_HELP
    )


def external_embeddings(parser: argparse.ArgumentParser, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """--embeddings' (NAME, PATH) pairs as a dict; a repeated name or a built-in variant's name is
    a usage error (exit status 2)."""
    from htcl.evaluation import BUILTIN_VARIANTS

    out: dict[str, str] = {}
    for name, path in pairs:
        if name in out:
            parser.error(f"argument --embeddings: name {name!r} given twice")
        if name in BUILTIN_VARIANTS:
            parser.error(f"argument --embeddings: {name!r} is the name of one of htcl's own variants")
        out[name] = path
    return out
