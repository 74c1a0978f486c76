"""The `htcl` command: each pipeline step in this process, and `demo` for all of them.

    htcl <step> --config configs/demo.yaml [key.path=value ...]

Every step prints where its outputs went. On a Ray cluster, submit the same steps as
`ray job submit --working-dir . -- python -m ray_jobs.<step> --config ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from htcl.config import ConfigError, load_config, save_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htcl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("sample-data", help="generate the sample world (see `htcl sample-data --help`)", add_help=False)

    p = sub.add_parser("preprocess", help="decode audio and compute log-Mel spectrograms")
    _add_config_args(p)
    p.add_argument("--catalog", help="catalog Parquet/CSV (default: <data.root>/catalog.parquet)")
    p.add_argument("--force", action="store_true", help="recompute songs already done")

    p = sub.add_parser("pretrain", help="stage 1: audio-text contrastive pre-training")
    _add_config_args(p)

    p = sub.add_parser("finetune", help="stage 2: preference fine-tuning from the stage-1 checkpoint")
    _add_config_args(p)
    p.add_argument("--init-from", help="stage-1 checkpoint (default: <output_dir>/pretrain/model.pt)")
    p.add_argument("--variant", choices=["favor", "cf"], help="favor triplets (HTCL) or co-occurrence (HTCL_w_CF)")

    p = sub.add_parser("embed", help="embed every preprocessed song with a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="default: <output_dir>/finetune/model.pt")

    p = sub.add_parser("demo", help="sample-data -> preprocess -> pretrain -> finetune -> embed")
    _add_config_args(p)
    return parser


def _config(args):
    overrides = list(args.overrides)
    if getattr(args, "variant", None):
        overrides.append(f"finetune.variant={args.variant}")
    return load_config(args.config, overrides)


def _sample_data(cfg) -> Path:
    from htcl.sample_world.world import generate_world

    root = Path(cfg.data.root)
    if (root / "catalog.parquet").is_file():
        print(f"sample world: reusing {root}")
        return root
    generate_world(root, songs=cfg.data.songs, seed=cfg.data.seed, seconds=cfg.data.seconds)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sample-data":
        from htcl.sample_world.cli import main as sample_main

        return sample_main(argv[1:])
    args = build_parser().parse_args(argv)
    from htcl import pipeline

    try:
        cfg = _config(args)
    except ConfigError as e:
        print(f"htcl: {e}", file=sys.stderr)
        return 2
    if args.command == "preprocess":
        print(json.dumps(pipeline.run_preprocess(cfg, args.catalog, args.force), indent=2))
    elif args.command == "pretrain":
        print(f"pretrain checkpoint: {pipeline.run_train(cfg, 'pretrain')}")
    elif args.command == "finetune":
        print(f"finetune checkpoint: {pipeline.run_train(cfg, 'finetune', args.init_from)}")
    elif args.command == "embed":
        ckpt = args.checkpoint or pipeline.out_path(cfg, "finetune", "model.pt")
        print(f"embeddings: {pipeline.run_embed(cfg, ckpt)}")
    elif args.command == "demo":
        return demo(cfg)
    return 0


def demo(cfg) -> int:
    """The whole pipeline on the embedded sample world, timed step by step."""
    from htcl import pipeline

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}

    def step(name, fn):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    world = step("sample-data", lambda: _sample_data(cfg))
    summary = step("preprocess", lambda: pipeline.run_preprocess(cfg))
    print(json.dumps(summary, indent=2))
    s1 = step("pretrain", lambda: pipeline.run_train(cfg, "pretrain"))
    s2 = step("finetune", lambda: pipeline.run_train(cfg, "finetune", s1))
    emb = step("embed", lambda: pipeline.run_embed(cfg, s2))
    print("\n=== done ===")
    print(f"sample world      {world}")
    print(f"mels              {pipeline.out_path(cfg, 'mels')}")
    print(f"stage-1 checkpoint {s1}  (curves: {s1.parent / 'training_curves.png'})")
    print(f"stage-2 checkpoint {s2}  (curves: {s2.parent / 'training_curves.png'})")
    print(f"embeddings        {emb}")
    print("seconds per step  " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    (out / "demo_timings.json").write_text(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
