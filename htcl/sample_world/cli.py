"""`htcl sample-data`: generate the sample world from the command line.

    htcl sample-data --out DIR --songs N --seed S --seconds 30 \
        [--source music21 | --source midi:PATH] [--listeners synthetic | --listeners lastfm:PATH] \
        [--workers W] [--vocal-share 0.5] [--users U] [--no-validate]

Also runnable as `python -m htcl.sample_world ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

from htcl.sample_world.validate import figures_table
from htcl.sample_world.world import generate_world


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="htcl sample-data",
        description="Generate the sample world: real music rendered to audio, multilingual vocals, "
        "simulated listeners and their logs, in the data contracts of the README (htcl.schema).",
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--songs", type=int, default=200, help="number of songs (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--seconds", type=float, default=30.0, help="maximum song length in seconds (default 30)")
    p.add_argument(
        "--source",
        default="music21",
        help="'music21' (the corpus in the music21 wheel, default) or 'midi:PATH' (a folder with manifest.tsv)",
    )
    p.add_argument(
        "--listeners",
        default="synthetic",
        help="'synthetic' (default) or 'lastfm:PATH' (HetRec 2011 Last.fm-2k folder) for real genre affinities",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel render processes (default: all cores)")
    p.add_argument("--vocal-share", type=float, default=0.5, help="share of artists who sing (default 0.5)")
    p.add_argument("--users", type=int, default=None, help="number of listeners (default: songs/2, at least 60)")
    p.add_argument("--no-validate", action="store_true", help="skip the structure figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = generate_world(
            args.out,
            songs=args.songs,
            seed=args.seed,
            seconds=args.seconds,
            source=args.source,
            listeners=args.listeners,
            workers=args.workers,
            vocal_share=args.vocal_share,
            users=args.users,
            validate=not args.no_validate,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"htcl sample-data: error: {e}", file=sys.stderr)
        return 1
    import json

    world = json.loads(paths["world_json"].read_text())
    if world.get("figures"):
        print("structure (cross-validated; songs split at random | whole artists held out):")
        for label, random_split, held_out, baseline in figures_table(world["figures"]):
            print(f"  {label}: {random_split}" + (f" | {held_out}" if held_out else "") + f"  [baseline {baseline}]")
    timing = world["timing"]
    print(
        f"sample world written to {paths['card'].parent} in {timing['total_seconds']:.1f} s "
        f"(rendering {timing['render_seconds']:.1f} s with {world['params']['workers']} workers)"
    )
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
