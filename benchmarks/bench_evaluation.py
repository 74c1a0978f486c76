"""The comparison table (issue 6) on the benchmark world: real MIDI music, real Last.fm listeners,
over several training seeds.

Generates (once, into benchmarks/cache/<name>/, or takes --world-dir) a world whose music comes
from ../shared/data/midi_genres and whose listeners' genre affinities come from real Last.fm users
(../shared/data/lastfm_hetrec2011), then runs the whole pipeline at demo sizes in this process
(`htcl demo --local` with the output paths moved) once per training seed: preprocess, locked
towers' features, and per audio family stage 1, stage 2 (HTCL) and its HTCL_w_CF control, embed,
evaluate. Seed s sets pretrain.seed=s and finetune.seed=s; eval.seed and the world stay fixed, so
the held-out split, the held-out artists and the probe folds are the same in every seed. Each seed
runs in <out-dir>/seed<s>/; the first one computes mels/, quarantine/ and features/, the later ones
start from hard links of them (their caches are keyed by input and tower hashes, so the later
seeds' preprocess and features steps find nothing to do). A seed whose evaluation/results.json
exists (same world, config and overrides) is reused, so an interrupted run resumes.

With ../shared/data/emotify_real/manifest.tsv present, eval.real_audio points at it (the
real-audio genre column and the backbone claims); --no-real-audio skips it.

Writes benchmarks/results/evaluation_<name>.json (every seed's results.json and step timings, and
the aggregate: mean and sd per table cell over seeds, each claim's verdict per seed and whether it
holds in every seed) and .md (the mean ± sd table and the claims per seed), and prints the .md.

    python benchmarks/bench_evaluation.py [--songs 200] [--seeds 1] [--world-dir DIR] [--out-dir DIR] [k=v ...]
    python benchmarks/bench_evaluation.py --songs 2000 --seeds 3     # the README's table

--songs 2000 renders the world of the README's table when benchmarks/cache/bench_world_2000/ is
absent (`htcl sample-data --songs 2000 --seed 0 --seconds 30 --workers 2` from the shared MIDI and
Last.fm data: 467 s on 2 quiet cores, ~20 min on loaded ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl.files import write_atomically  # noqa: E402
from htcl.layout import Layout  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
REAL_AUDIO = SHARED / "emotify_real" / "manifest.tsv"
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / "cache"
BENCH_FILE = "bench_world.json"  # in a world this script rendered: the command and its seconds
SEED_FILE = "bench_seed.json"  # in a seed's output dir: what it was run with (reuse check)
# external embedding tables (htcl demo --embeddings), written once per out-dir: they depend on the
# world and the locked backbone only, not on the training seed
EXTERNAL_DIR = "external"
TASTE_ORACLE = "taste oracle (hidden factors)"
BACKBONE_POOLED = "musicnn pooled (external file)"

# The table's cells: (column, path in a results.json variant row, scale to points)
CELLS = [
    ("Genre acc.", ("semantics", "genre", "accuracy"), 100),
    ("Language acc.", ("semantics", "language", "accuracy"), 100),
    ("Real-audio genre acc.", ("real_audio", "accuracy"), 100),
    ("Hit-rate@10", ("matching", "hit_rate@10"), 100),
    ("Hit-rate@100", ("matching", "hit_rate@100"), 100),
    ("CTR AUC", ("ranking", "ctr_auc"), 100),
    ("CVR AUC", ("ranking", "cvr_auc"), 100),
    ("cos gap", ("cosine", "gap"), 1),
]


def default_name(songs: int) -> str:
    return "bench_world" if songs == 200 else f"bench_world_{songs}"


def world_command(world: Path, songs: int, seed: int, workers: int) -> list[str]:
    return [
        "sample-data",
        "--out",
        str(world),
        "--songs",
        str(songs),
        "--seed",
        str(seed),
        "--seconds",
        "30",
        "--source",
        f"midi:{SHARED / 'midi_genres'}",
        "--listeners",
        f"lastfm:{SHARED / 'lastfm_hetrec2011'}",
        "--workers",
        str(workers),
    ]


def ensure_world(world: Path, args) -> dict:
    """The world's catalog, rendered from the shared data when absent; what is known of its render."""
    from htcl.cli import main as htcl

    info_path = world / BENCH_FILE
    if (world / "catalog.parquet").is_file():
        print(f"bench_evaluation: reusing the world in {world}")
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        return {**info, "reused": True}
    for path in (SHARED / "midi_genres", SHARED / "lastfm_hetrec2011"):
        if not path.is_dir():
            raise SystemExit(
                f"bench_evaluation: {path} is missing (rendering the benchmark world needs "
                "../shared/data beside the repo; or pass --world-dir)"
            )
    cmd = world_command(world, args.songs, args.world_seed, args.workers)
    t0 = time.perf_counter()
    if htcl(cmd):
        raise SystemExit("bench_evaluation: sample-data failed")
    info = {
        "command": "htcl " + " ".join(cmd),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": platform.platform(),
    }
    info_path.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def _link_or_copy(src: str, dst: str) -> None:
    # Parquet shards are only ever replaced (os.replace), never written in place: a hard link is safe
    if src.endswith(".parquet"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def shared_caches(out: Path) -> tuple[Path, ...]:
    """The caches a later seed starts from (keyed by inputs and tower hashes: identical across
    training seeds): mels/, quarantine/ and features/."""
    layout = Layout(out)
    return layout.mels, layout.quarantine, layout.features_root


def seed_caches(first: Path, seed_dir: Path) -> list[str]:
    """Start seed_dir from the first seed's shared caches (those not already there)."""
    done = []
    for src, dst in zip(shared_caches(first), shared_caches(seed_dir)):
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
            done.append(src.name)
    return done


def seed_settings(
    seed: int, seed_dir: Path, world: Path, args, overrides: list[str], tables: dict[str, Path] | None = None
) -> dict:
    return {
        "config": args.config,
        "overrides": [
            f"output_dir={seed_dir}",
            f"data.root={world}",
            f"data.songs={args.songs}",
            f"pretrain.seed={seed}",
            f"finetune.seed={seed}",
            *overrides,
        ],
        "embeddings": {name: str(path) for name, path in (tables or {}).items()},
    }


def finished_seed(
    seed: int, seed_dir: Path, world: Path, args, overrides: list[str], tables: dict[str, Path]
) -> dict | None:
    """The seed's record when it finished with these settings, else None."""
    marker, results_path = seed_dir / SEED_FILE, Layout(seed_dir).evaluation / "results.json"
    if marker.is_file() and results_path.is_file():
        record = json.loads(marker.read_text())
        if record.get("settings") == seed_settings(seed, seed_dir, world, args, overrides, tables):
            return record
    return None


def run_seed(
    seed: int, seed_dir: Path, first: Path | None, world: Path, args, overrides: list[str], tables: dict[str, Path]
) -> dict:
    """One training seed's demo run (or its earlier results when it ran with the same settings)."""
    from htcl.cli import main as htcl

    settings = seed_settings(seed, seed_dir, world, args, overrides, tables)
    seed_overrides = settings["overrides"]
    marker = seed_dir / SEED_FILE
    if not args.rerun and (record := finished_seed(seed, seed_dir, world, args, overrides, tables)) is not None:
        print(f"bench_evaluation: seed {seed}: reusing {Layout(seed_dir).evaluation / 'results.json'}")
        return record
    seed_dir.mkdir(parents=True, exist_ok=True)
    if marker.is_file():
        marker.unlink()
    linked = seed_caches(first, seed_dir) if first is not None and first != seed_dir else []
    if linked:
        print(f"bench_evaluation: seed {seed}: {', '.join(linked)} linked from {first}")
    print(f"\nbench_evaluation: seed {seed} -> {seed_dir}", flush=True)
    t0 = time.perf_counter()
    external = [f"--embeddings={name}={path}" for name, path in tables.items()]
    code = htcl(["demo", "--local", "--config", args.config, *external, *seed_overrides])
    if code:
        raise SystemExit(f"bench_evaluation: seed {seed}: htcl demo failed with exit status {code}")
    record = {
        "seed": seed,
        "output_dir": str(seed_dir),
        "settings": settings,
        "caches_from": str(first) if linked else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "timings": json.loads((seed_dir / "demo_timings.json").read_text()),
    }
    marker.write_text(json.dumps(record, indent=2))
    return record


def write_embedding_table(path: Path, ids, vectors: np.ndarray) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"song_id": np.asarray(ids, np.int64), "embedding": list(np.asarray(vectors, np.float32))})
    return write_atomically(path, frame.to_parquet)


def taste_oracle_table(world: Path, path: Path) -> Path:
    """The world's hidden taste factors (truth.parquet: tempo, energy, mode, vocals, instrument
    family; never seen by training) as an embedding table. Favors follow closeness in this space,
    so its hit-rates show how far matching by audible taste can go on this world at all."""
    import pandas as pd

    from htcl.sample_world.listeners import listeners_from_frame
    from htcl.sample_world.validate import songs_from_truth

    truth = pd.read_parquet(world / "truth.parquet").sort_values("song_id")
    genres = listeners_from_frame(pd.read_parquet(world / "listeners.parquet")).genres
    return write_embedding_table(path, truth["song_id"], songs_from_truth(truth, genres).taste_vectors())


def backbone_pooled_table(cfg, path: Path) -> Path:
    """The locked musicnn's pooled features (max and mean of its 753 channels per 3 s patch, 1506-d)
    averaged over each song's patches: the off-the-shelf tagger as a team would export it, read back
    through `--embeddings` like any vendor's table. Runs preprocess and features first (cached, so
    the demo's own steps then find nothing to do)."""
    from htcl import pipeline

    pipeline.run_preprocess(cfg)
    pipeline.run_features(cfg)
    inputs = pipeline.audio_inputs(cfg)  # song_id -> (1506, patches)
    ids = sorted(inputs)
    return write_embedding_table(path, ids, np.stack([inputs[i].mean(axis=1) for i in ids]))


def external_table_paths(out: Path, cfg) -> dict[str, Path]:
    """The bench's external rows: name -> table path (the musicnn row when the config's family is
    a musicnn backbone)."""
    files = {TASTE_ORACLE: "taste_oracle.parquet"}
    if cfg.model.audio_backbone != "none":
        files[BACKBONE_POOLED] = f"{cfg.model.audio_backbone}_pooled.parquet"
    return {name: out / EXTERNAL_DIR / file for name, file in files.items()}


def write_external_tables(tables: dict[str, Path], world: Path, cfg) -> dict[str, float]:
    """Write the tables not yet there (cfg: seed 0's, whose caches the later seeds link); the
    seconds each took."""
    writers = {
        TASTE_ORACLE: lambda p: taste_oracle_table(world, p),
        BACKBONE_POOLED: lambda p: backbone_pooled_table(cfg, p),
    }
    seconds = {}
    for name, path in tables.items():
        if not path.is_file():
            print(f"bench_evaluation: writing the external table {name!r} -> {path}", flush=True)
            t0 = time.perf_counter()
            writers[name](path)
            seconds[f"external table: {name}"] = round(time.perf_counter() - t0, 1)
    return seconds


# --- aggregate -------------------------------------------------------------------------------


def _get(row: dict, path: tuple) -> float:
    for p in path:
        if not isinstance(row, dict) or p not in row:
            return float("nan")
        row = row[p]
    return float(row) if isinstance(row, (int, float)) and row is not None else float("nan")


def _stat(values: list[float]) -> dict:
    v = np.asarray([x for x in values if not np.isnan(x)], float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
        "values": [None if np.isnan(x) else x for x in values],
    }


def derived_claims(claims: dict) -> dict:
    """The issue's "HTCL's genre accuracy is not significantly below stage 1's", per family, from
    the "within 3 points" claim's paired difference (HTCL − stage 1) and its 95% interval: holds
    when the interval reaches 0 or above, does NOT hold when it lies below 0."""
    out = {}
    for htcl, stage1 in (("HTCL", "stage 1"), ("HTCL (backbone)", "stage 1 (backbone)")):
        c = claims.get(f"{htcl} genre accuracy within 3 points of {stage1}")
        if not isinstance(c, dict):
            continue
        ci = c.get("ci95")
        verdict = "n/a" if not ci else ("holds" if ci[1] >= 0 else "does NOT hold")
        out[f"{htcl} genre accuracy not significantly below {stage1}"] = {
            **c,
            "verdict": verdict,
            "threshold": 0.0,
            "derived_from": "the within-3-points claim's interval",
        }
    return out


def aggregate(per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    names = list(dict.fromkeys(n for s in seeds for n in per_seed[s]["variants"]))
    variants = {
        name: {
            col: _stat([_get(per_seed[s]["variants"].get(name, {}), path) * scale for s in seeds])
            for col, path, scale in CELLS
        }
        for name in names
    }
    claims: dict[str, dict] = {}
    for s in seeds:
        cs = {**per_seed[s]["claims"], **derived_claims(per_seed[s]["claims"])}
        for claim, c in cs.items():
            entry = claims.setdefault(claim, {"verdicts": {}, "differences": {}, "ci95": {}})
            c = c if isinstance(c, dict) else {"verdict": "holds" if c else "does NOT hold"}
            entry["verdicts"][s] = c.get("verdict")
            entry["differences"][s] = c.get("difference")
            entry["ci95"][s] = c.get("ci95")
    for entry in claims.values():
        v = list(entry["verdicts"].values())
        entry["holds_in_every_seed"] = len(v) == len(seeds) and all(x == "holds" for x in v)
        entry["summary"] = (
            "holds in every seed"
            if entry["holds_in_every_seed"]
            else f"holds in {sum(x == 'holds' for x in v)} of {len(seeds)} seeds"
        )
    return {"seeds": seeds, "variants": variants, "claims": claims}


def _cell(stat: dict, digits: int = 2) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _claim_seed(verdict: str | None, diff, ci) -> str:
    if diff is None:
        return str(verdict)
    return f"{verdict} ({diff:+.1f}" + (f", CI {ci[0]:+.1f} to {ci[1]:+.1f})" if ci else ")")


def markdown(agg: dict, first: dict, bench: dict) -> str:
    seeds = agg["seeds"]
    cols = [c for c, _, _ in CELLS if any(v[c]["mean"] is not None for v in agg["variants"].values())]
    lines = [
        f"# HTCL evaluation over {len(seeds)} training seed{'s' if len(seeds) > 1 else ''} ({bench['songs']}-song "
        "benchmark world)",
        "",
        f"World {bench['world']}; held out: events from {first['split_time']} on ({first['heldout_favor_pairs']} "
        f"distinct favor pairs); catalog {first['catalog_songs']} songs. Training seeds {seeds} "
        "(pretrain.seed = finetune.seed = s; world, held-out split and probe folds fixed). Each cell is the mean ± "
        "sd over the seeds (sample sd); figures in %, `cos gap` in cosine. The per-seed tables and their test-sample "
        "intervals are in each seed's evaluation/results.md.",
        "",
        "| Method | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for name, row in agg["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[c], 3 if c == "cos gap" else 2) for c in cols) + " |")
    lines += [
        "",
        "Expectations (from the paper; reported as measured, not tuned towards), each decided per seed on "
        "the paired difference over the same held-out items (points, positive = as claimed; 95% bootstrap "
        "interval): holds / not significant / does NOT hold, per seed " + ", ".join(map(str, seeds)) + ":",
        "",
    ]
    for claim, c in agg["claims"].items():
        per = "; ".join(
            f"seed {s}: {_claim_seed(c['verdicts'][s], c['differences'][s], c['ci95'][s])}"
            for s in seeds
            if s in c["verdicts"]
        )
        lines.append(f"- **{c['summary']}**: {claim} — {per}")
    lines += [
        "",
        "Wall time per step (seconds), per seed:",
        "",
        "| Step | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|" + "---|" * (len(seeds) + 1),
    ]
    steps = list(dict.fromkeys(k for s in seeds for k in bench["timings"][s]))
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(str(bench["timings"][s].get(step, "–")) for s in seeds) + " |")
    world = bench.get("world_render") or {}
    if world.get("seconds") is not None:
        lines.append(f"\nWorld render: {world['seconds']} s ({world.get('command', '')}).")
    for name, secs in (bench.get("external_table_seconds") or {}).items():
        lines.append(
            f"\n{name}: {secs} s (before seed 0's demo; for the musicnn table this includes seed 0's "
            "preprocess and features, so its demo finds them done)."
        )
    if bench.get("external_tables"):
        lines.append(
            "\nExternal rows (read through `--embeddings NAME=PATH`, scored like htcl's own): "
            + "; ".join(f"{name} = {path}" for name, path in bench["external_tables"].items())
            + "."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--songs", type=int, default=200)
    p.add_argument("--seed", dest="world_seed", type=int, default=0, help="the world's seed (sample-data --seed)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 (pretrain.seed = finetune.seed = s)")
    p.add_argument(
        "--name",
        default=None,
        help="results file stem evaluation_<name>.* and the world's cache folder "
        "benchmarks/cache/<name>/ (default bench_world for 200 songs, else bench_world_<songs>)",
    )
    p.add_argument(
        "--world-dir",
        default=None,
        help="a rendered world to use (default benchmarks/cache/<name>/, rendered there when absent)",
    )
    p.add_argument("--workers", type=int, default=2, help="sample-data render processes when rendering the world")
    p.add_argument("--out-dir", default=None, help="default outputs/<name>; one seed<s>/ folder per training seed")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--no-real-audio", action="store_true", help=f"skip eval.real_audio={REAL_AUDIO}")
    p.add_argument("--rerun", action="store_true", help="rerun seeds whose results exist")
    p.add_argument(
        "--no-external",
        action="store_true",
        help=f"skip the external rows ({TASTE_ORACLE!r} from the "
        f"world's truth.parquet, {BACKBONE_POOLED!r}) passed to the evaluation with --embeddings",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: aggregate the seeds among 0..N-1 that "
        "have finished with these settings (e.g. while a longer run is still going)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = p.parse_args(argv)
    name = args.name or default_name(args.songs)
    world = Path(args.world_dir) if args.world_dir else CACHE / name
    out = Path(args.out_dir or f"outputs/{name}")
    t_start = time.perf_counter()

    if args.report_only:
        info_path = world / BENCH_FILE
        world_info = {**(json.loads(info_path.read_text()) if info_path.is_file() else {}), "reused": True}
    else:
        world_info = ensure_world(world, args)
    overrides = list(args.overrides)
    if not args.no_real_audio and not any(o.startswith("eval.real_audio=") for o in overrides):
        if REAL_AUDIO.is_file():
            overrides.append(f"eval.real_audio={REAL_AUDIO}")
        else:
            print(
                f"bench_evaluation: note: {REAL_AUDIO} is absent, so no real-audio probe (and no backbone "
                "real-audio claims)"
            )

    from htcl.config import load_config

    first_cfg = load_config(args.config, seed_settings(0, out / "seed0", world, args, overrides)["overrides"])
    tables = {} if args.no_external else external_table_paths(out, first_cfg)
    table_seconds = {} if args.report_only else write_external_tables(tables, world, first_cfg)
    records, per_seed = {}, {}
    first = None
    for s in range(args.seeds):
        seed_dir = out / f"seed{s}"
        if args.report_only:
            record = finished_seed(s, seed_dir, world, args, overrides, tables)
            if record is None:
                print(f"bench_evaluation: seed {s} has not finished in {seed_dir}: left out")
                continue
            records[s] = record
        else:
            records[s] = run_seed(s, seed_dir, first, world, args, overrides, tables)
        per_seed[s] = json.loads((Layout(seed_dir).evaluation / "results.json").read_text())
        first = first or seed_dir
    if not per_seed:
        raise SystemExit("bench_evaluation: no seed has finished")

    agg = aggregate(per_seed)
    bench = {
        "world": str(world),
        "world_render": world_info,
        "songs": args.songs,
        "config": args.config,
        "overrides": overrides,
        "out_dir": str(out),
        "machine": platform.platform(),
        "command": "python benchmarks/bench_evaluation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds_this_invocation": round(time.perf_counter() - t_start, 1),
        "timings": {
            s: {
                **({"world": world_info["seconds"]} if s == 0 and not world_info.get("reused") else {}),
                **records[s]["timings"],
            }
            for s in records
        },
        "seed_seconds": {s: records[s]["seconds"] for s in records},
        "external_tables": {name: str(path) for name, path in tables.items()},
        "external_table_seconds": table_seconds,
        "caches_from": {s: records[s].get("caches_from") for s in records},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"bench": bench, "aggregate": agg, "seeds": {s: per_seed[s] for s in per_seed}}
    (RESULTS / f"evaluation_{name}.json").write_text(json.dumps(result, indent=2))
    md = markdown(agg, per_seed[min(per_seed)], bench)
    (RESULTS / f"evaluation_{name}.md").write_text(md)
    png = Layout(out / f"seed{min(per_seed)}").evaluation / "cosine_histograms.png"
    if png.is_file():
        shutil.copy(png, RESULTS / f"evaluation_{name}_cosines.png")
    print(md)
    print(f"bench_evaluation: {RESULTS / f'evaluation_{name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
