"""The `htcl` command: each pipeline step, and `demo` for all of them.

    htcl <step> --config configs/demo.yaml [key.path=value ...]

preprocess, pretrain, finetune and embed run as the Ray jobs in ray_jobs/ (on the cluster in
RAY_ADDRESS, else on a local Ray instance bound to 127.0.0.1); with `--local` they run in this
process without Ray. materialize and backfill publish to and read from the Feast store. Every
step prints where its outputs went. On a Ray cluster, submit the same steps as
`ray job submit --working-dir . -- python -m ray_jobs.<step> --config ...`.

This module is the composition root: the one module of htcl that imports ray_jobs and serving
(tests/test_boundary.py), inside the functions that run them, so that `htcl --help` and the
`--local` paths load neither Ray nor Feast. Each step's options come from htcl.arguments, as the
job's own parser takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from htcl.arguments import (
    add_config_args,
    add_embed_args,
    add_embeddings_arg,
    add_evaluate_args,
    add_features_args,
    add_preprocess_args,
    add_train_args,
    config_overrides,
    external_embeddings,
)
from htcl.config import ConfigError, load_config, replace, save_config
from htcl.layout import Layout
from htcl.mels import read_catalog_or_refuse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htcl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("sample-data", help="generate the sample world (see `htcl sample-data --help`)", add_help=False)

    local = "run in this process, without Ray"
    p = sub.add_parser("preprocess", help="decode audio and compute log-Mel spectrograms (Ray Data)")
    add_preprocess_args(p)
    p.add_argument("--local", action="store_true", help=local)

    p = sub.add_parser(
        "features",
        help="cache the locked towers' features: the audio backbone's per-patch "
        "features, the locked BERT's pooled text (Ray Data)",
    )
    add_features_args(p)
    p.add_argument("--local", action="store_true", help=local)

    p = sub.add_parser("pretrain", help="stage 1: audio-text contrastive pre-training (Ray Train)")
    add_train_args(p, "pretrain")
    p.add_argument("--local", action="store_true", help=local)

    p = sub.add_parser("finetune", help="stage 2: preference fine-tuning from the stage-1 checkpoint (Ray Train)")
    add_train_args(p, "finetune")
    p.add_argument("--local", action="store_true", help=local)

    p = sub.add_parser("embed", help="embed the new or changed preprocessed songs with a checkpoint (Ray Data)")
    add_embed_args(p)
    p.add_argument("--local", action="store_true", help=local)

    sub.add_parser(
        "materialize", help="publish stats and embeddings to Feast (see `htcl materialize --help`)", add_help=False
    )
    sub.add_parser(
        "backfill", help="point-in-time training frame for the rankers (see `htcl backfill --help`)", add_help=False
    )
    sub.add_parser(
        "train-rankers",
        help="XGBoost CTR/CVR rankers on Feast's point-in-time frame (see `htcl train-rankers --help`)",
        add_help=False,
    )

    sub.add_parser("serve", help="the Ray Serve app on 127.0.0.1 (see `htcl serve --help`)", add_help=False)

    p = sub.add_parser("evaluate", help="the comparison table of every embedding variant on held-out data")
    add_evaluate_args(p)
    p.add_argument("--local", action="store_true", help="point-in-time stats computed in this process, without Feast")

    p = sub.add_parser(
        "demo",
        help="sample-data -> preprocess -> pretrain -> finetune (+ w_CF) -> embed -> "
        "materialize -> train-rankers -> evaluate",
    )
    add_config_args(p)
    p.add_argument("--local", action="store_true", help="run every step in this process, without Ray or Feast")
    add_embeddings_arg(p)
    return parser


JOBS = (
    "preprocess",
    "features",
    "pretrain",
    "finetune",
    "embed",
    "materialize",
    "backfill",
    "train-rankers",
    "evaluate",
)


def job_main(step: str) -> Callable:
    """ray_jobs.<step>.main: the entry point `ray job submit` runs (only that job's module is loaded)."""
    if step == "preprocess":
        from ray_jobs.preprocess import main
    elif step == "features":
        from ray_jobs.features import main
    elif step == "pretrain":
        from ray_jobs.pretrain import main
    elif step == "finetune":
        from ray_jobs.finetune import main
    elif step == "embed":
        from ray_jobs.embed import main
    elif step == "materialize":
        from ray_jobs.materialize import main
    elif step == "backfill":
        from ray_jobs.backfill import main
    elif step == "train-rankers":
        from ray_jobs.train_rankers import main
    elif step == "evaluate":
        from ray_jobs.evaluate import main
    else:
        raise ValueError(f"no Ray job named {step!r} (one of {', '.join(JOBS)})")
    return main


def run_job(step: str, argv: list[str]) -> int:
    """ray_jobs.<step>.main(argv), as an exit status."""
    result = job_main(step)(argv)
    return result if isinstance(result, int) else 0


def serve(argv: list[str]) -> int:
    """`htcl serve`: serving.run's own command line."""
    from serving.run import main

    return main(argv)


def _config(args):
    return load_config(args.config, config_overrides(args))


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
    if argv and argv[0] in JOBS and "--local" not in argv:
        return run_job(argv[0], argv[1:])
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from htcl import pipeline

    try:
        cfg = _config(args)
    except ConfigError as e:
        print(f"htcl: {e}", file=sys.stderr)
        return 2
    if args.command in ("preprocess", "features"):
        catalog = Path(args.catalog or pipeline.catalog_path(cfg))
        if read_catalog_or_refuse(catalog, f"htcl {args.command}") is None:
            return 1
        run = pipeline.run_preprocess if args.command == "preprocess" else pipeline.run_features
        print(json.dumps(run(cfg, catalog, args.force), indent=2))
    elif args.command == "pretrain":
        print(f"pretrain checkpoint: {pipeline.run_train(cfg, 'pretrain')}")
    elif args.command == "finetune":
        print(f"finetune checkpoint: {pipeline.run_train(cfg, 'finetune', args.init_from)}")
    elif args.command == "embed":
        ckpt = args.checkpoint or Layout.of(cfg).checkpoint(pipeline.run_dir_name(cfg, "finetune"))
        print(f"embeddings: {pipeline.run_embed(cfg, ckpt, args.force)}")
    elif args.command == "evaluate":
        external = external_embeddings(parser, args.embeddings)
        results = pipeline.run_evaluate(cfg, external=external)
        print("\n" + Path(results["paths"]["markdown"]).read_text())
    elif args.command == "demo":
        external_embeddings(parser, args.embeddings)  # a bad NAME=PATH is a usage error before hours of work
        return demo(cfg, args)
    return 0


def other_family(cfg) -> str:
    """The audio family the demo trains beside the config's own: the paper's encoder beside a
    backbone config, musicnn_msd beside a paper config."""
    return "none" if cfg.model.audio_backbone != "none" else "musicnn_msd"


def demo(cfg, args) -> int:
    """The whole pipeline on the embedded sample world, timed step by step.

    Trains both audio families (the config's own, whose HTCL is embedded, published and served,
    and the other one, for the comparison table), each with stage 1, HTCL and HTCL_w_CF.
    On a local Ray instance (one for all steps) unless --local, which runs the library's
    in-process pipeline and skips the Feast step.
    """
    from htcl import pipeline

    layout = Layout.of(cfg)
    layout.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, layout.root / "config.yaml")
    timings: dict[str, float] = {}
    other = other_family(cfg)
    families = [
        (cfg, []),
        (replace(cfg, model=replace(cfg.model, audio_backbone=other)), [f"model.audio_backbone={other}"]),
    ]

    def step(name, fn):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    def job(name, *extra, overrides=()):
        code = run_job(name, ["--config", args.config, *args.overrides, *overrides, *extra])
        if code != 0:
            raise SystemExit(f"htcl demo: step {name} failed with exit status {code}")

    def label(fcfg) -> str:
        return fcfg.model.audio_backbone if fcfg.model.audio_backbone != "none" else "paper encoder"

    world = step("sample-data", lambda: _sample_data(cfg))
    s1 = layout.checkpoint(pipeline.run_dir_name(cfg, "pretrain"))
    s2 = layout.checkpoint(pipeline.run_dir_name(cfg, "finetune"))
    if args.local:
        print(json.dumps(step("preprocess", lambda: pipeline.run_preprocess(cfg)), indent=2))
        for fcfg, _ in families:
            name = label(fcfg)
            print(json.dumps(step(f"features ({name})", lambda: pipeline.run_features(fcfg)), indent=2))
            f1 = step(f"pretrain ({name})", lambda: pipeline.run_train(fcfg, "pretrain"))
            step(f"finetune ({name})", lambda: pipeline.run_train(fcfg, "finetune", f1))
            cf_cfg = replace(fcfg, finetune=replace(fcfg.finetune, variant="cf"))
            step(f"finetune w_CF ({name})", lambda: pipeline.run_train(cf_cfg, "finetune", f1))
        emb = step("embed", lambda: pipeline.run_embed(cfg, s2))
        step("evaluate", lambda: pipeline.run_evaluate(cfg, external=dict(args.embeddings)))
    else:
        from ray_jobs.common import ray_connection

        with ray_connection():  # one local Ray instance (or RAY_ADDRESS's cluster) for every step
            step("preprocess", lambda: job("preprocess"))
            for fcfg, extra in families:
                name = label(fcfg)
                f1 = Layout.of(fcfg).checkpoint(pipeline.run_dir_name(fcfg, "pretrain"))
                step(f"features ({name})", lambda: job("features", overrides=extra))
                step(f"pretrain ({name})", lambda: job("pretrain", overrides=extra))
                step(f"finetune ({name})", lambda: job("finetune", "--init-from", str(f1), overrides=extra))
                step(
                    f"finetune w_CF ({name})",
                    lambda: job("finetune", "--init-from", str(f1), "--variant", "cf", overrides=extra),
                )
            step("embed", lambda: job("embed", "--checkpoint", str(s2)))
            step("materialize", lambda: job("materialize"))
            step("train-rankers", lambda: job("train-rankers"))
            step("evaluate", lambda: job("evaluate", *(f"--embeddings={n}={p}" for n, p in args.embeddings)))
        emb = max(layout.embeddings_root.glob("*/part-*.parquet"), key=lambda p: p.stat().st_mtime).parent
        # Ray Serve on the current model version: one /v1/recommend over HTTP, printed, then down.
        from serving.run import demo_recommend

        step("serve", lambda: demo_recommend(args.config, list(args.overrides)))
    print("\n=== done ===")
    print(f"sample world       {world}")
    print(f"mels               {layout.mels}")
    print(f"cached features    {layout.features_root}")
    print(f"stage-1 checkpoint {s1}  (curves: {Path(s1).parent / 'training_curves.png'})")
    print(f"stage-2 checkpoint {s2}  (curves: {Path(s2).parent / 'training_curves.png'})")
    print(f"embeddings         {emb}  (ANN index: {layout.index(Path(emb).name)})")
    if not args.local:
        print(f"feature store      {layout.feast}")
        print(f"rankers            {layout.rankers(Path(emb).name)}")
    print(f"evaluation         {layout.evaluation / 'results.md'}  (+ results.json, cosine_histograms.png)")
    print("seconds per step   " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(f"total seconds      {round(sum(timings.values()), 1)}")
    (layout.root / "demo_timings.json").write_text(json.dumps(timings, indent=2))
    print("\n" + (layout.evaluation / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
