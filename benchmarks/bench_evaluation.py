"""The comparison table (issue 6) on the benchmark world: real MIDI music, real Last.fm listeners.

Generates (once) a world whose music comes from ../shared/data/midi_genres and whose listeners'
genre affinities come from real Last.fm users (../shared/data/lastfm_hetrec2011), then runs the
whole pipeline at demo sizes in this process (`htcl demo --local` with the output paths moved):
preprocess, stage 1, stage 2 (HTCL) and its HTCL_w_CF control, embed, evaluate. Copies the
report to benchmarks/results/evaluation_bench_world.{json,md,png} and prints the table.

    python benchmarks/bench_evaluation.py [--songs 200] [--out-dir outputs/bench_world] [k=v ...]

Takes ~25 min on 2 free cores (world ~2 min, stage 1 ~8, each stage 2 ~5).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--songs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="outputs/bench_world")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--name", default="bench_world", help="results file stem: evaluation_<name>.*")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = p.parse_args(argv)
    midi, lastfm = SHARED / "midi_genres", SHARED / "lastfm_hetrec2011"
    for path in (midi, lastfm):
        if not path.is_dir():
            raise SystemExit(f"bench_evaluation: {path} is missing (the benchmark world needs ../shared/data)")
    from htcl.cli import main as htcl

    out = Path(args.out_dir)
    world = out / "sample_world"
    t0 = time.perf_counter()
    if not (world / "catalog.parquet").is_file():
        code = htcl(["sample-data", "--out", str(world), "--songs", str(args.songs), "--seed", str(args.seed),
                     "--seconds", "30", "--source", f"midi:{midi}", "--listeners", f"lastfm:{lastfm}"])
        if code:
            return code
    overrides = [f"output_dir={out}", f"data.root={world}", f"data.songs={args.songs}", *args.overrides]
    code = htcl(["demo", "--local", "--config", args.config, *overrides])
    if code:
        return code
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = out / "evaluation"
    results = json.loads((report / "results.json").read_text())
    results["bench"] = {"world": str(world), "songs": args.songs, "config": args.config, "overrides": overrides,
                        "seconds": round(time.perf_counter() - t0, 1), "machine": platform.platform(),
                        "command": "python benchmarks/bench_evaluation.py " + " ".join(argv or sys.argv[1:])}
    (RESULTS / f"evaluation_{args.name}.json").write_text(json.dumps(results, indent=2))
    shutil.copy(report / "results.md", RESULTS / f"evaluation_{args.name}.md")
    shutil.copy(report / "cosine_histograms.png", RESULTS / f"evaluation_{args.name}_cosines.png")
    print((report / "results.md").read_text())
    print(f"bench_evaluation: {RESULTS / f'evaluation_{args.name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
