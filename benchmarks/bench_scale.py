"""How the pipeline scales with the catalog: 10k, 100k and 1M songs (issue 14).

Synthetic catalogs, written straight to Parquet (no audio is rendered or decoded): catalog.parquet
and interactions.parquet (--interactions impressions over 30 days, of songs drawn from the whole
catalog: the same log size at every catalog size, so materialize's cost of the log's song and
listener stats, which follow traffic rather than the catalog, is a constant here), and the two
locked towers' feature caches a backbone-family model reads (htcl.towers layout, row groups of
htcl.mels.SHARD_ROW_GROUP_ROWS): random musicnn pooled patch features (1506, 1) float32 a song
(audio.max_seconds=3: one 3 s patch, 6 KB) and random text features (32,) of a tiny BERT, each
row with the input_hash training and embedding check. The checkpoint is a tiny backbone-family
model (the tests' sizes, --embed-dim output), saved untrained with htcl.training.save_checkpoint:
scaling does not depend on the weights.

Each step runs in a fresh child process (peak RSS only grows, so every figure needs its own
process), in this order, per size:

  train-check   the driver's work before Ray Train starts, as ray_jobs/train_loop.fit does it:
                training_rows with its input checks (one NaN/inf pass over the audio shards, the
                cached text features' hashes against the catalog's texts) and the rows planned,
                saved as the TrainingSplit workers load (training_rows(...).split().save)
  train-read    one Ray Train worker's data side: training_rows(check_inputs=False, split=the
                driver's TrainingSplit) + its tokenizer, then --train-steps batches of rank 0 of 2
                at global batch 32 through batch_stream (the per-rank streaming reader); rows/s =
                the streamed rows a second after the first batch
  embed         ray_jobs.embed.main, as `python -m ray_jobs.embed` runs (a local Ray instance,
                Ray Data actor pool, then the version's matching index); whatever the job does,
                incremental or not
  index         htcl.pipeline.build_index alone, again from the embeddings just written
  mat-sqlite    ray_jobs.materialize.main (stats with Ray Data, embeddings, Feast apply +
                materialize) into the SQLite online store
  mat-redis     the same into --online-store redis://... (its database flushed first; skipped
                when Redis does not answer)
  similar       the matching index loaded as serving's Matcher loads it (AnnIndex.load, one faiss
                thread) and --queries similar() calls: in process, not through Ray Serve
  feast-sqlite, feast-redis
                open_store + --queries one-song get_online_features of song_embedding, as
                serving's EmbeddingLookup reads it
  embed-2, mat-sqlite-2, mat-redis-2
                the same jobs again with nothing changed: measured, never assumed

Reported per step: seconds (wall, in the child, imports excluded), rows/s (n / seconds; for
train-read the streamed rows a second), peak RSS of the child (ru_maxrss) and, for steps that
start Ray, the peak of the sum of RSS over the child and all its descendants (Ray's GCS, raylet,
workers; sampled every 0.2 s, shared pages counted in each process). Then, per step, the growth
exponent k of a log-log least-squares fit of seconds against n (time ∝ n^k), and the goals:

  - a training worker's peak RSS flat in n: within 20% from the smallest to the largest size
  - every step's k <= 1.1 (second runs and single-request lookups included)
  - a second, no-change embed + materialize under 5% of the first, at the largest size

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py [--sizes 10000 100000 1000000]
        [--work-dir /tmp/bench_scale] [--online-store redis://127.0.0.1:6379/12] [--interactions 2000]
        [--embed-dim 32] [--steps STEP ...] [--keep] [--out benchmarks/results/bench_scale.json]
    .venv/bin/python benchmarks/bench_scale.py --report benchmarks/results/bench_scale.json

The k of a fit over 10k-100k reads fixed costs (a Ray instance's start, the log's stats) as
k < 1; the report also fits seconds = fixed + per-song cost and extrapolates both ways to 1M.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl.layout import CHECKPOINT, Layout  # noqa: E402

SEED = 0
TEXT_DIM = 32  # the tiny BERT's width: its pooled output is the cached text feature
SONGS_PER_FILE = 4096  # songs per synthetic feature shard (row groups of SHARD_ROW_GROUP_ROWS inside)
DAYS = 30
TRAIN_BATCH, TRAIN_WORLD = 32, 2

# The tests' tiny model (tests/conftest.py TINY_MODEL), in the backbone family with both towers locked.
TINY_BACKBONE = [
    "model.audio_backbone=musicnn_msd",
    "model.text_trainable=false",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.fusion_hidden=64",
    "model.dropout=0.0",
    "model.text_max_length=32",
    "audio.max_seconds=3",  # one musicnn patch a song: (1506, 1) features
    f"pretrain.batch_size={TRAIN_BATCH}",
    f"pretrain.num_workers={TRAIN_WORLD}",
]

STEPS_FIRST = [
    "train-check",
    "train-read",
    "embed",
    "index",
    "mat-sqlite",
    "mat-redis",
    "similar",
    "feast-sqlite",
    "feast-redis",
]
STEPS_SECOND = ["embed-2", "mat-sqlite-2", "mat-redis-2"]


# --- synthetic data ------------------------------------------------------------------------


def write_tiny_bert(path: Path) -> Path:
    """A 1-layer, 32-wide random BertModel with the bundled MiniLM's tokenizer files (as
    tests/conftest.py's write_tiny_bert): a cheap model.text_model whose tower hash is stable."""
    import torch
    from transformers import BertConfig, BertModel

    from htcl.model import default_text_model_dir

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(path)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_text_model_dir() / f, path / f)
    return path


def size_config(root: Path, bert: Path, embed_dim: int):
    """The config of one catalog size, saved as root/config.yaml for the jobs' --config."""
    from htcl.config import config_from_dict, save_config

    cfg = config_from_dict(
        {},
        [
            *TINY_BACKBONE,
            f"model.embed_dim={embed_dim}",
            f"model.text_model={bert}",
            f"output_dir={root / 'out'}",
            f"data.root={root / 'world'}",
        ],
    )
    save_config(cfg, root / "config.yaml")
    return cfg


def write_world(cfg, n: int, interactions: int) -> None:
    """catalog.parquet (songs 1..n) and interactions.parquet (`interactions` rows, 1 listener a
    20 impressions)."""
    import pandas as pd

    from htcl import schema as S

    rng = np.random.default_rng([SEED, n])
    world = Path(cfg.data.root)
    world.mkdir(parents=True, exist_ok=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    genres = np.array(["rock", "jazz", "folk", "pop", "electronic", "classical", "hiphop", "blues"])
    genre = genres[rng.integers(0, len(genres), n)]
    artists = max(2, n // 10)  # 10 songs an artist
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    pd.DataFrame(
        {
            S.SONG_ID: ids,
            S.AUDIO_PATH: [f"audio/{i}.flac" for i in ids],  # never read: the features are cached
            S.TITLE: [f"song {i}" for i in ids],
            S.ARTIST: [f"artist {i % artists}" for i in ids],
            S.LYRICS: "",
            S.TAGS: genre,
            S.GENRE: genre,
            "language": "instrumental",
            "updated_at": t0,
        }
    ).to_parquet(world / "catalog.parquet", index=False)
    m = interactions
    clicked = rng.random(m) < 0.3
    pd.DataFrame(
        {
            S.USER_ID: rng.integers(1, max(2, m // 20) + 1, m),
            S.TRIGGER_SONG_ID: rng.integers(1, n + 1, m),
            S.REC_SONG_ID: rng.integers(1, n + 1, m),
            S.CLICKED: clicked,
            S.FAVORED: clicked & (rng.random(m) < 0.5),
            S.EVENT_TIMESTAMP: t0 + pd.to_timedelta(np.sort(rng.integers(0, DAYS * 86400, m)), unit="s"),
        }
    ).to_parquet(world / "interactions.parquet", index=False)


def write_feature_cache(
    directory: Path,
    spec: dict,
    ids: np.ndarray,
    hashes: list[str],
    shape: tuple[int, ...],
    rng: np.random.Generator,
    desc: str,
) -> None:
    """A tower's cache folder, as `htcl features` writes it: _tower.json and part-*.parquet of
    FEATURES_SCHEMA in row groups of SHARD_ROW_GROUP_ROWS, random float32 features of `shape`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from htcl import schema as S
    from htcl.mels import SHARD_ROW_GROUP_ROWS
    from htcl.towers import FEATURES_SCHEMA, write_tower_spec

    write_tower_spec(directory, spec)
    width = int(np.prod(shape))
    for start in tqdm(range(0, len(ids), SONGS_PER_FILE), desc=desc, unit="shard", leave=False):
        chunk = ids[start : start + SONGS_PER_FILE]
        feats = rng.standard_normal((len(chunk), width), dtype=np.float32)  # (k, C*P), C order of (C, P)
        table = pa.table(
            {
                S.SONG_ID: pa.array(chunk, pa.int64()),
                S.INPUT_HASH: pa.array(hashes[start : start + len(chunk)], pa.string()),
                "shape": pa.array([list(shape)] * len(chunk), pa.list_(pa.int32())),
                "feature": pa.array([row.tobytes() for row in feats], pa.binary()),
            },
            schema=FEATURES_SCHEMA,
        )
        pq.write_table(
            table, directory / f"part-{start // SONGS_PER_FILE:06d}.parquet", row_group_size=SHARD_ROW_GROUP_ROWS
        )


def write_features(cfg, n: int) -> None:
    """Both locked towers' caches for songs 1..n: the audio tower's input hash stands for the
    audio file's sha256 (fixed per song, so a rerun sees no change), the text tower's is the real
    text_hash of the song text (training checks it)."""
    from htcl.mels import read_catalog
    from htcl.musicnn import POOLED_DIM
    from htcl.pipeline import catalog_path
    from htcl.text import song_texts
    from htcl.towers import audio_tower_spec, text_hash, text_tower_spec, tower_dir

    rng = np.random.default_rng([SEED, n, 1])
    ids = np.arange(1, n + 1, dtype=np.int64)
    audio_spec = audio_tower_spec(cfg.model, cfg.audio)
    audio_hashes = [hashlib.sha256(f"audio {i}".encode()).hexdigest() for i in ids]
    write_feature_cache(
        tower_dir(cfg.output_dir, audio_spec), audio_spec, ids, audio_hashes, (POOLED_DIM, 1), rng, "audio features"
    )
    texts = song_texts(read_catalog(catalog_path(cfg)))
    text_spec = text_tower_spec(cfg.model)
    write_feature_cache(
        tower_dir(cfg.output_dir, text_spec),
        text_spec,
        ids,
        [text_hash(texts[int(i)]) for i in ids],
        (TEXT_DIM,),
        rng,
        "text features",
    )


def write_checkpoint(cfg, path: Path) -> Path:
    """An untrained tiny backbone-family model saved as a stage-2 checkpoint (save_checkpoint)."""
    import torch

    from htcl.model import HTCLModel
    from htcl.training import TrainState, build_optimizer, save_checkpoint

    if path.is_file():
        return path
    torch.manual_seed(SEED)
    model = HTCLModel(cfg.model, cfg.audio)
    return save_checkpoint(path, TrainState(model, build_optimizer(model, cfg.finetune)), cfg, "finetune")


# --- measuring in a child process ------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space. Not
    ru_maxrss, which a child keeps from the parent it was forked from (exec does not reset it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on BSDs, bytes on macOS


class TreeRss:
    """The peak, over time, of the summed RSS of this process and all its descendants (Ray's
    processes are started by the driver), sampled on a thread."""

    def __init__(self, every_s: float = 0.2):
        import psutil

        self.me, self.every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # gone between the listing and the read
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def latencies(fn, ids: np.ndarray) -> dict:
    times = []
    for i in ids:
        t0 = time.perf_counter()
        fn(int(i))
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "queries": len(ids),
        "query_seconds": float(ms.sum() / 1e3),
    }


# What each step imports before its clock starts: an import is a constant cost, not the step's.
STEP_IMPORTS = {
    "imports": ["htcl.pipeline"],
    "train-check": ["htcl.pipeline"],
    "train-read": ["htcl.pipeline", "htcl.text"],
    "embed": ["ray", "ray.data", "ray_jobs.common", "ray_jobs.embed", "htcl.pipeline", "htcl.retrieval", "faiss"],
    "index": ["htcl.pipeline", "htcl.retrieval", "faiss"],
    "mat-sqlite": [
        "ray",
        "ray.data",
        "feast",
        "feature_repo.store",
        "feature_repo.definitions",
        "ray_jobs.materialize",
    ],
    "similar": ["htcl.retrieval", "faiss"],
    "feast-sqlite": ["feast", "feature_repo.store", "ray_jobs.materialize"],
}
STEP_IMPORTS["mat-redis"] = STEP_IMPORTS["mat-sqlite"]
STEP_IMPORTS["feast-redis"] = STEP_IMPORTS["feast-sqlite"]


def job_summary(main, argv: list[str], name: str) -> dict:
    """Run a job's entry point (`python -m ray_jobs.<name>` as a function) and return the summary
    it prints (print_summary's indented JSON object); its other output goes to stderr (the log)."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    text = printed.getvalue()
    print(text, file=sys.stderr)
    if code:
        raise RuntimeError(f"{name} exited {code}: {text[-2000:]}")
    start = text.rfind("\n{\n") + 1 if "\n{\n" in text else text.index("{")
    return json.loads(text[start : text.rfind("\n}") + 2])


def split_file(cfg) -> Path:
    """Where train-check leaves the driver's TrainingSplit for train-read, as fit() does."""
    from htcl.layout import Layout, run_name

    return Layout.of(cfg).training_split(run_name("pretrain", audio_backbone=cfg.model.audio_backbone))


def run_step(spec: dict) -> dict:
    """One step in this (fresh) process: {seconds, rows_per_s?, ...}."""
    import importlib

    from htcl.config import load_config

    cfg = load_config(spec["config"], [])
    step, n = spec["step"], spec["songs"]
    base = step.removesuffix("-2")
    for module in STEP_IMPORTS[base]:
        importlib.import_module(module)
    out: dict = {}
    with TreeRss() as tree:
        t0 = time.perf_counter()
        if step == "imports":
            pass
        elif step == "train-check":
            from htcl.pipeline import training_rows

            training_rows(cfg, "pretrain", verbose=False).split().save(split_file(cfg))
        elif step == "train-read":
            from htcl.pipeline import TrainingSplit, batch_stream, training_rows
            from htcl.text import SongTokenizer

            split = TrainingSplit.load(split_file(cfg))
            rows = training_rows(cfg, "pretrain", verbose=False, check_inputs=False, split=split)
            tokenizer = SongTokenizer(cfg.model)
            stream = batch_stream(rows, tokenizer, TRAIN_BATCH, SEED, rank=0, world=TRAIN_WORLD)
            next(stream)  # the first batch waits for the first reads; the rate is the steady state's
            out["ready_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(spec["train_steps"]):
                batch = next(stream)
            per_rank = TRAIN_BATCH // TRAIN_WORLD
            assert len(batch["mel"]) == per_rank
            out["rows_per_s"] = spec["train_steps"] * per_rank / (time.perf_counter() - t1)
            out["training_songs"] = len(rows)
            out["reader_row_group_reads"] = rows.mels.row_group_reads
            stream.close()
        elif base == "embed":
            from ray_jobs.embed import main

            summary = job_summary(main, ["--config", spec["config"], "--checkpoint", spec["checkpoint"]], "embed")
            out["job"] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        elif step == "index":
            from htcl.pipeline import build_index

            out["index_dir"] = str(build_index(cfg, Layout.of(cfg).embeddings(spec["version"])))
        elif base in ("mat-sqlite", "mat-redis"):
            from ray_jobs.materialize import main

            argv = ["--config", spec["config"], "--model-version", spec["version"]]
            if base == "mat-redis":
                argv += ["--online-store", spec["online_store"]]
            summary = job_summary(main, argv, "materialize")
            out["job"] = {
                k: summary.get(k)
                for k in (
                    "materialized",
                    "stats",
                    "rows",
                    "materialize_seconds",
                    "rows_per_s_materialize",
                    "seconds",
                    "repaired",
                )
            }
        elif step == "similar":
            import faiss

            from htcl.retrieval import AnnIndex

            faiss.omp_set_num_threads(1)  # as serving's Matcher: one core a replica
            index = AnnIndex.load(Layout.of(cfg).index(spec["version"]), spec["version"])
            out["load_s"] = time.perf_counter() - t0
            ids = np.random.default_rng(SEED).integers(1, n + 1, spec["queries"])
            out.update(latencies(lambda s: index.similar(s, spec["k"]), ids))
        elif step in ("feast-sqlite", "feast-redis"):
            from feature_repo.store import open_store

            store = open_store(Layout.of(cfg).feast, spec["online_store"] if step == "feast-redis" else None)

            def lookup(song_id: int):
                rows = [{"song_id": song_id, "model_version": spec["version"]}]
                got = store.get_online_features(features=["song_embedding:embedding"], entity_rows=rows).to_dict()
                if got["embedding"][0] is None:
                    raise RuntimeError(f"{step}: song {song_id} has no embedding online")

            lookup(1)  # registry load and connection: not a lookup
            out["open_s"] = time.perf_counter() - t0
            ids = np.random.default_rng(SEED).integers(1, n + 1, spec["queries"])
            out.update(latencies(lookup, ids))
        else:
            raise ValueError(f"unknown step {step!r}")
        out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["tree_peak_rss_mb"] = tree.peak / 2**20
    return out


def measure(spec: dict, log: Path) -> dict:
    """run_step in a fresh process; its stderr and stdout go to `log`."""
    with log.open("a") as f:
        f.write(f"\n===== {spec['step']} n={spec.get('songs')} =====\n")
        f.flush()
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, stderr=f, text=True
        )
    lines = done.stdout.strip().splitlines()
    with log.open("a") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    if done.returncode or not lines:
        raise RuntimeError(f"step {spec['step']} at n={spec.get('songs')} failed (exit {done.returncode}); see {log}")
    return json.loads(lines[-1])


def redis_answers(url: str) -> str | None:
    """None when Redis at url answers a PING, else why not."""
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: skip the Redis steps, saying why
        return f"{type(e).__name__}: {e}"


def flush_redis_db(url: str) -> None:
    """FLUSHDB of the URL's own database only (never database 0)."""
    import redis

    client = redis.Redis.from_url(url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    if int(db) == 0:
        raise SystemExit(f"--online-store {url}: refusing to flush Redis database 0; name another (e.g. /12)")
    client.flushdb()


# --- fits and goals --------------------------------------------------------------------------


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """k of seconds ∝ n^k: the slope of a least-squares line through (log n, log seconds)."""
    pts = [(math.log(n), math.log(s)) for n, s in zip(sizes, seconds) if s and s > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def summarize(results: list[dict], sizes: list[int]) -> tuple[dict, dict]:
    by_step: dict[str, dict[int, dict]] = {}
    for r in results:
        by_step.setdefault(r["step"], {})[r["songs"]] = r
    exponents = {}
    for step, at in by_step.items():
        ns = sorted(at)
        exponents[step] = growth_exponent(ns, [at[n]["seconds"] for n in ns])
    goals: dict = {}
    reads = by_step.get("train-read", {})
    if len(reads) >= 2:
        lo, hi = min(reads), max(reads)
        ratio = reads[hi]["peak_rss_mb"] / reads[lo]["peak_rss_mb"]
        goals["train_worker_peak_rss_flat"] = {
            "goal": "peak RSS of a training worker at the largest size within 20% of the smallest's",
            "sizes": [lo, hi],
            "peak_rss_mb": [reads[lo]["peak_rss_mb"], reads[hi]["peak_rss_mb"]],
            "ratio": ratio,
            "above_imports_mb": [reads[lo]["above_imports_mb"], reads[hi]["above_imports_mb"]],
            "met": ratio <= 1.2,
        }
    fitted = {s: k for s, k in exponents.items() if k is not None}
    if fitted:
        goals["every_k_at_most_1_1"] = {
            "goal": "time ∝ n^k with k <= 1.1 for every step",
            "k": fitted,
            "over": sorted(s for s, k in fitted.items() if k > 1.1),
            "met": all(k <= 1.1 for k in fitted.values()),
        }
    top = max(sizes)
    for store in ("sqlite", "redis"):
        steps = ["embed", f"mat-{store}"]
        first = [by_step.get(s, {}).get(top) for s in steps]
        second = [by_step.get(f"{s}-2", {}).get(top) for s in steps]
        if all(first) and all(second):
            t1, t2 = sum(r["seconds"] for r in first), sum(r["seconds"] for r in second)
            goals[f"second_run_under_5pct_{store}"] = {
                "goal": f"a no-change embed + materialize ({store}) under 5% of the first, at the largest size",
                "songs": top,
                "first_s": t1,
                "second_s": t2,
                "ratio": t2 / t1,
                "met": t2 / t1 < 0.05,
                "at_1m": top >= 1_000_000,
            }
    return exponents, goals


def affine_fit(sizes: list[int], values: list[float]) -> tuple[float, float] | None:
    """(a, b) of values ≈ a + b·n, least squares: a fixed cost (Ray's start, imports of Feast)
    plus a cost a song, which a power law fitted over small sizes reads as k < 1."""
    if len(set(sizes)) < 2:
        return None
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)
    return float(a), float(b)


def report(data: dict) -> dict:
    """Print the table, the exponents, the extrapolations to 1M and the goals of a run's results;
    return `data` with them added (what the JSON holds)."""
    results, sizes = data["results"], sorted(data["sizes"])
    top = max(sizes)
    exponents, goals = summarize(results, sizes)
    print(
        f"\nbackbone family (musicnn_msd features (1506, 1), tiny model, embed_dim {data['embed_dim']}); "
        f"{data['interactions']} impressions in the log; peak RSS of the child process "
        f"(imports alone: {data['imports_peak_rss_mb']:.0f} MB), tree = with its Ray processes\n"
    )
    head = ("songs", "step", "seconds", "rows/s", "peak RSS MB", "tree peak MB")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        print(
            f"| {r['songs']} | {r['step']} | {r['seconds']:.2f} | {r['rows_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['tree_peak_rss_mb']:.0f} |"
        )
    extrapolate = top < 1_000_000
    print(
        "\n| step | k (time ∝ n^k) | fixed s + ms a song |"
        + (" 1M s by n^k | 1M s by a + b·n |" if extrapolate else "")
        + "\n|---|---|---|"
        + ("---|---|" if extrapolate else "")
    )
    by_power, by_affine, fits = {}, {}, {}
    for step, k in exponents.items():
        rows = sorted((r for r in results if r["step"] == step), key=lambda r: r["songs"])
        fit = affine_fit([r["songs"] for r in rows], [r["seconds"] for r in rows])
        fits[step] = None if fit is None else {"fixed_s": fit[0], "ms_per_song": fit[1] * 1e3}
        line = (
            f"| {step} | {'-' if k is None else f'{k:.2f}'} | "
            + ("-" if fit is None else f"{fit[0]:.1f} + {fit[1] * 1e3:.3f}")
            + " |"
        )
        if extrapolate and k is not None:
            by_power[step] = rows[-1]["seconds"] * (1_000_000 / top) ** k
            by_affine[step] = max(rows[-1]["seconds"], fit[0] + fit[1] * 1_000_000)
            line += f" {by_power[step]:.0f} | {by_affine[step]:.0f} |"
        print(line)
    memory = {}
    for step in ("train-read", "mat-sqlite", "embed"):
        rows = sorted((r for r in results if r["step"] == step), key=lambda r: r["songs"])
        fit = affine_fit([r["songs"] for r in rows], [r["peak_rss_mb"] for r in rows])
        if fit is not None:
            memory[step] = {
                "fixed_mb": fit[0],
                "kb_per_song": fit[1] * 1024,
                "peak_rss_mb_at_1m": fit[0] + fit[1] * 1_000_000,
            }
    if extrapolate and by_power:
        write_min = data["setup"][str(top)]["write_seconds"] * 1_000_000 / top / 60
        print(
            f"\nextrapolated time at 1M: {sum(by_power.values()) / 60:.0f} min by each step's n^k, "
            f"{sum(by_affine.values()) / 60:.0f} min by its fixed + per-song cost (+ writing the catalog: "
            f"{write_min:.0f} min)"
        )
    for step, m in memory.items():
        print(
            f"peak RSS {step}: {m['fixed_mb']:.0f} MB + {m['kb_per_song']:.2f} KB a song "
            f"-> {m['peak_rss_mb_at_1m']:.0f} MB at 1M (driver process)"
        )
    if "train-read" in memory and extrapolate:
        lo = next(r for r in results if r["step"] == "train-read" and r["songs"] == min(sizes))
        at_1m = memory["train-read"]["peak_rss_mb_at_1m"]
        goals["train_worker_peak_rss_flat_extrapolated_to_1m"] = {
            "goal": "the same, the largest size replaced by 1M on the a + b·n fit of the measured sizes",
            "sizes": [min(sizes), 1_000_000],
            "peak_rss_mb": [lo["peak_rss_mb"], at_1m],
            "ratio": at_1m / lo["peak_rss_mb"],
            "measured": False,
            "met": at_1m / lo["peak_rss_mb"] <= 1.2,
        }
    print()
    for name, g in goals.items():
        shown = {k: v for k, v in g.items() if k not in ("goal", "met")}
        print(f"{'MET    ' if g['met'] else 'NOT MET'}  {name}: {json.dumps(shown, default=str)}")
    print(f"\n(load average {data['load_average']:.1f} on {data['cpus']} CPUs at the end of the run)")
    return {
        **data,
        "k_exponents": exponents,
        "affine_fits": fits,
        "peak_rss_fits": memory,
        "extrapolated_seconds_at_1m": {"power_law": by_power, "affine": by_affine} if by_power else None,
        "goals": goals,
    }


# --- the run -------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument(
        "--work-dir",
        default=str(Path(tempfile.gettempdir()) / "bench_scale"),
        help="synthetic catalogs and outputs, one size at a time (default: %(default)s; never the repo)",
    )
    p.add_argument(
        "--online-store",
        default="redis://127.0.0.1:6379/12",
        help="Redis for the mat-redis/feast-redis steps; its database is flushed (default: %(default)s)",
    )
    p.add_argument(
        "--embed-dim", type=int, default=32, help="embedding size (default: %(default)s, the tests' tiny model)"
    )
    p.add_argument(
        "--interactions",
        type=int,
        default=2000,
        help="impressions in the log at every size (default: %(default)s; materialize's stats cost "
        "follows it: one Ray Data group a song and a listener)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        choices=STEPS_FIRST + STEPS_SECOND,
        help="only these steps, in the usual order (default: all; e.g. train-check train-read for the "
        "training worker's memory alone)",
    )
    p.add_argument("--train-steps", type=int, default=64, help="batches one worker reads after the first")
    p.add_argument("--queries", type=int, default=200, help="/similar and Feast lookups a size")
    p.add_argument("--k", type=int, default=100, help="neighbours a /similar query asks for (serving's default)")
    p.add_argument("--keep", action="store_true", help="keep each size's folder (default: removed after the size)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_scale.json"))
    p.add_argument(
        "--report",
        metavar="JSON",
        help="print the report of an earlier run's JSON again (and rewrite "
        "it with the fits and goals of this version) instead of running",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_step(json.loads(args.child))))
        return 0
    if args.report:
        path = Path(args.report)
        data = json.loads(path.read_text())
        path.write_text(json.dumps(report(data), indent=2, default=str))
        print(f"wrote {path}")
        return 0

    work = Path(args.work_dir).resolve()
    if work == REPO or REPO in work.parents:
        raise SystemExit(f"--work-dir {work} is inside the repository; use a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench_scale.log"
    log.write_text("")
    free_gb = shutil.disk_usage(work).free / 2**30
    # features 6 KB + text 128 B + embeddings and Feast copies: ~8 KB a song at most, twice for safety
    need_gb = max(args.sizes) * 16e3 / 2**30
    if free_gb < need_gb:
        raise SystemExit(f"{work}: {free_gb:.0f} GiB free, the largest size needs ~{need_gb:.0f} GiB")
    redis_skip = redis_answers(args.online_store)
    if redis_skip:
        print(f"Redis at {args.online_store} does not answer ({redis_skip}): Redis steps skipped", flush=True)
    steps = [
        s
        for s in STEPS_FIRST + STEPS_SECOND
        if not (redis_skip and "redis" in s) and (not args.steps or s in args.steps)
    ]

    print(f"bench_scale: sizes {args.sizes}, work dir {work} ({free_gb:.0f} GiB free), log {log}", flush=True)
    bert = write_tiny_bert(work / "tiny_bert")
    size_config(work / "imports", bert, args.embed_dim)
    imports = measure({"step": "imports", "config": str(work / "imports" / "config.yaml"), "songs": 0}, log)
    results, setup = [], {}
    for n in sorted(args.sizes):
        root = work / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        cfg = size_config(root, bert, args.embed_dim)
        write_world(cfg, n, args.interactions)
        write_features(cfg, n)
        checkpoint = write_checkpoint(cfg, root / "checkpoint" / CHECKPOINT)
        from htcl.pipeline import model_version

        version = model_version(checkpoint)
        setup[n] = {
            "write_seconds": time.perf_counter() - t0,
            "disk_mb": sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20,
        }
        print(
            f"n={n}: synthetic catalog written in {setup[n]['write_seconds']:.1f} s ({setup[n]['disk_mb']:.0f} MB)",
            flush=True,
        )
        if not redis_skip:
            flush_redis_db(args.online_store)
        for step in steps:
            spec = {
                "step": step,
                "songs": n,
                "config": str(root / "config.yaml"),
                "checkpoint": str(checkpoint),
                "version": version,
                "online_store": args.online_store,
                "train_steps": args.train_steps,
                "queries": args.queries,
                "k": args.k,
            }
            got = measure(spec, log)
            rows_per_s = got.pop("rows_per_s", None) or n / got["seconds"]
            row = {
                "songs": n,
                "step": step,
                "rows_per_s": rows_per_s,
                "above_imports_mb": got["peak_rss_mb"] - imports["peak_rss_mb"],
                **got,
            }
            results.append(row)
            extra = f"  p50 {got['p50_ms']:.2f} ms p99 {got['p99_ms']:.2f} ms" if "p50_ms" in got else ""
            print(
                f"n={n:>8} {step:<13} {got['seconds']:9.2f} s {rows_per_s:11.0f} rows/s "
                f"peak {got['peak_rss_mb']:7.0f} MB (tree {got['tree_peak_rss_mb']:7.0f} MB){extra}",
                flush=True,
            )
        disk_after = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        setup[n]["disk_mb_after"] = disk_after
        if not args.keep:
            shutil.rmtree(root)
    if not redis_skip:
        flush_redis_db(args.online_store)

    data = {
        "benchmark": "bench_scale",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "sizes": sorted(args.sizes),
        "embed_dim": args.embed_dim,
        "interactions": args.interactions,
        "train_batch": TRAIN_BATCH,
        "train_world": TRAIN_WORLD,
        "train_steps": args.train_steps,
        "queries": args.queries,
        "k": args.k,
        "redis": None if redis_skip else args.online_store,
        "redis_skipped": redis_skip,
        "imports_peak_rss_mb": imports["peak_rss_mb"],
        "setup": {str(n): s for n, s in setup.items()},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(data), indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
