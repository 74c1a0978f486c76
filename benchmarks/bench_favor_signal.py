"""How much a stage-2 batch of favor pairs can teach: the in-batch L_aa that embeddings would score
on a world's training favor pairs, at several logit scales.

Stage 2's L_aa (htcl.losses.info_nce between trigger and favored-song audio embeddings, repeated
songs masked out of the negatives) can only fall as far below its chance value (≈ log B) as the
favor pairs are predictable from the embeddings. This measures that floor on the world's own
training-period favor pairs (before the evaluation's held-out cut) with:
  - the world's hidden taste factors (truth.parquet; never seen by training): favors follow
    closeness in this space, so it is about the best any audio embedding could do;
  - random unit vectors: chance, with the same masking;
  - one vector for every song: the collapsed space (L_aa = log of the unmasked columns);
  - any embedding table given with --embeddings NAME=PATH (the format of `htcl evaluate
    --embeddings`), e.g. the locked backbone's pooled features.

Each figure is the mean over the same --batches random batches of --batch pairs (drawn as training
draws them: pairs sampled without replacement within a batch). Prints a table and writes
benchmarks/results/bench_favor_signal_<world>.json.

    python benchmarks/bench_favor_signal.py [--world-dir benchmarks/cache/bench_world_2000] [--embeddings NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl import schema as S  # noqa: E402
from htcl.config import load_config  # noqa: E402
from htcl.evaluation import read_external_embeddings  # noqa: E402
from htcl.losses import in_batch_top1, info_nce, same_song_mask  # noqa: E402
from htcl.pairs import before, favor_triplets, split_time  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORLDS = [REPO / "benchmarks" / "cache" / name for name in ("bench_world_2000", "bench_world")]
SCALES = (1.0, 2.0, 3.0, 5.0, 10.0, 14.7)  # 3: the demo's finetune.pref_logit_scale; 14.7: stage 1's learned scale


def taste_vectors(world: Path) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    from htcl.sample_world.listeners import listeners_from_frame
    from htcl.sample_world.validate import songs_from_truth

    truth = pd.read_parquet(world / "truth.parquet").sort_values(S.SONG_ID)
    genres = listeners_from_frame(pd.read_parquet(world / "listeners.parquet")).genres
    return truth[S.SONG_ID].to_numpy(np.int64), songs_from_truth(truth, genres).taste_vectors()


def unit(x: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x, np.float32))
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def measure(table: dict[int, torch.Tensor], batches: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean L_aa per scale and in-batch top-1 over the batches: trigger (B,) and favored (B,) ids."""
    losses = {s: [] for s in SCALES}
    top1 = []
    for trig, rec in batches:
        a = torch.stack([table[int(i)] for i in trig])  # (B, D)
        b = torch.stack([table[int(i)] for i in rec])  # (B, D)
        mask = same_song_mask(torch.as_tensor(trig), torch.as_tensor(rec))
        for s in SCALES:
            losses[s].append(float(info_nce(a, b, torch.tensor(s), mask)))
        top1.append(in_batch_top1(a, b))
    return {"l_aa": {str(s): float(np.mean(v)) for s, v in losses.items()}, "top1": float(np.mean(top1))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--world-dir",
        default=None,
        help="a rendered world (default: benchmarks/cache/bench_world_2000, "
        "else benchmarks/cache/bench_world, as bench_evaluation.py renders them)",
    )
    p.add_argument("--config", default="configs/demo.yaml", help="for eval.holdout_fraction and finetune.batch_size")
    p.add_argument("--embeddings", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--batches", type=int, default=500)
    p.add_argument("--batch", type=int, default=None, help="default: the config's finetune.batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results/bench_favor_signal_<world folder>.json")
    args = p.parse_args(argv)
    import pandas as pd

    t0 = time.perf_counter()
    world = Path(args.world_dir) if args.world_dir else next((w for w in DEFAULT_WORLDS if w.is_dir()), None)
    if world is None or not (world / "truth.parquet").is_file():
        print(
            f"bench_favor_signal: no rendered world at {world or ' or '.join(map(str, DEFAULT_WORLDS))}: run "
            "benchmarks/bench_evaluation.py (--songs 2000) first, or pass --world-dir",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(args.config)
    batch = args.batch or cfg.finetune.batch_size
    log = pd.read_parquet(world / "interactions.parquet")
    cut = split_time(log[S.EVENT_TIMESTAMP], cfg.eval.holdout_fraction)
    pairs = favor_triplets(before(log, cut))
    rng = np.random.default_rng(args.seed)
    trig, rec = pairs[S.TRIGGER_SONG_ID].to_numpy(), pairs[S.REC_SONG_ID].to_numpy()
    draws = [rng.choice(len(pairs), batch, replace=False) for _ in range(args.batches)]
    batches = [(trig[d], rec[d]) for d in draws]

    ids, taste = taste_vectors(world)
    tables = {
        "taste oracle (hidden factors)": dict(zip(ids.tolist(), unit(taste))),
        "random unit vectors (chance)": dict(zip(ids.tolist(), unit(rng.standard_normal((len(ids), 64))))),
        # every song one vector: L_aa = log(unmasked columns) at any scale, what a stage 2 that
        # learns nothing but collapse reaches
        "collapsed space (one vector)": dict.fromkeys(ids.tolist(), unit(np.ones((1, 8)))[0]),
    }
    for spec in args.embeddings:
        name, _, path = spec.partition("=")
        emb, coverage = read_external_embeddings(path, ids)  # unit rows over the catalog ids
        if coverage["missing"]:
            raise SystemExit(f"bench_favor_signal: {path} lacks {coverage['missing']} catalog song(s)")
        tables[name] = dict(zip(emb.song_ids.tolist(), torch.as_tensor(emb.vectors)))
    rows = {}
    for name, table in tables.items():
        rows[name] = measure(table, batches)

    header = "| embedding | " + " | ".join(f"L_aa @ {s:g}" for s in SCALES) + " | in-batch top-1 |"
    lines = [
        f"Training-period favor pairs of {world.name}: {len(pairs)} (before {cut.date()}); {args.batches} batches "
        f"of {batch}; log {batch} = {np.log(batch):.3f} (repeated songs masked out of the negatives make the "
        "collapsed space's a little less)",
        "",
        header,
        "|" + "---|" * (len(SCALES) + 2),
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['l_aa'][str(s)]:.3f}" for s in SCALES) + f" | {r['top1']:.3f} |")
    print("\n".join(lines))
    out = Path(args.out or RESULTS / f"bench_favor_signal_{world.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "world": world.name,
                "favor_pairs": len(pairs),
                "cut": str(cut),
                "batch": batch,
                "batches": args.batches,
                "seed": args.seed,
                "scales": list(SCALES),
                "rows": rows,
                "seconds": round(time.perf_counter() - t0, 1),
                "command": "python benchmarks/bench_favor_signal.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            indent=2,
        )
    )
    print(f"\nbench_favor_signal: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
