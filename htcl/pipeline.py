"""The pipeline's steps in one process: preprocess -> pretrain -> finetune -> embed.

These are what `htcl <step>` runs on a laptop with no cluster; the Ray jobs (ray_jobs/) run the
same library pieces (MelExtractor, batching, training.train) spread over workers. Output layout
under cfg.output_dir:

    mels/part-*.parquet        song_id, n_frames, mel (float16 bytes)
    quarantine/part-*.parquet  song_id, audio_path, stage, error_type, message
    pretrain/                  model.pt, config.yaml, metrics.jsonl, training_curves.png
    finetune/ (finetune_cf/)   the same for stage 2 (the HTCL_w_CF control)
    embeddings/<model_version>/part-0.parquet
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from htcl import schema as S
from htcl.batching import epoch_order, stage1_batch, stage2_batch
from htcl.config import Config, save_config
from htcl.mels import MelExtractor, read_catalog, read_mels, write_table
from htcl.model import HTCLModel
from htcl.pairs import before, split_time, stage2_pairs
from htcl.text import SongTokenizer, song_text
from htcl.training import (
    JsonlLogger,
    TrainState,
    build_optimizer,
    model_from_checkpoint,
    save_checkpoint,
    seed_everything,
    train,
)


def out_path(cfg: Config, *parts: str) -> Path:
    return Path(cfg.output_dir, *parts)


def catalog_path(cfg: Config) -> Path:
    return Path(cfg.data.root) / "catalog.parquet"


# --- preprocess ----------------------------------------------------------------------------


def done_song_ids(mels_dir: Path, quarantine_dir: Path) -> set[int]:
    done: set[int] = set()
    for d in (mels_dir, quarantine_dir):
        for f in sorted(d.glob("*.parquet")):
            done.update(pq.read_table(f, columns=[S.SONG_ID]).column(0).to_pylist())
    return done


def run_preprocess(cfg: Config, catalog: str | Path | None = None, force: bool = False) -> dict:
    """Decode + log-Mel every catalog song not done yet; bad files go to quarantine/."""
    catalog = Path(catalog or catalog_path(cfg))
    df = read_catalog(catalog)
    mels_dir, q_dir = out_path(cfg, "mels"), out_path(cfg, "quarantine")
    if force:
        for d in (mels_dir, q_dir):
            for f in d.glob("*.parquet"):
                f.unlink()
    done = done_song_ids(mels_dir, q_dir)
    todo = df[~df[S.SONG_ID].isin(done)]
    extractor = MelExtractor(cfg.audio)
    mels, quarantine = [], []
    t0 = time.perf_counter()
    for sid, path in tqdm(zip(todo[S.SONG_ID], todo[S.AUDIO_PATH]), total=len(todo), desc="preprocess", unit="song"):
        row, bad = extractor.extract_one(sid, path)
        (mels if row is not None else quarantine).append(row if row is not None else bad)
    elapsed = time.perf_counter() - t0
    part = f"part-{len(list(mels_dir.glob('*.parquet'))):05d}.parquet"
    if mels:
        write_table(mels, S.MELS_SCHEMA, mels_dir / part)
    if quarantine:
        write_table(quarantine, S.QUARANTINE_SCHEMA, q_dir / part)
    # '_'-prefixed: Parquet dataset readers (pyarrow, Ray Data) skip it when reading mels/
    save_config(cfg, out_path(cfg, "mels", "_config.yaml"))
    return {
        "catalog": str(catalog),
        "skipped_already_done": len(df) - len(todo),
        "processed": len(mels),
        "quarantined": len(quarantine),
        "seconds": round(elapsed, 2),
        "songs_per_s": round(len(todo) / elapsed, 2) if elapsed > 0 and len(todo) else None,
        "mels": str(mels_dir),
        "quarantine": str(q_dir),
    }


# --- training ------------------------------------------------------------------------------


def song_texts(catalog: pd.DataFrame) -> dict[int, str]:
    return {
        int(r[S.SONG_ID]): song_text(r[S.TITLE], r[S.ARTIST], r[S.TAGS], r[S.LYRICS])
        for r in catalog[[S.SONG_ID, S.TITLE, S.ARTIST, S.TAGS, S.LYRICS]].to_dict("records")
    }


def stage_dir_name(stage: str, variant: str) -> str:
    return "pretrain" if stage == "pretrain" else ("finetune" if variant == "favor" else f"finetune_{variant}")


@dataclass
class TrainingRows:
    """What one stage trains on: per-song mels and texts, and the rows that make the batches.

    Stage 1: `trigger` holds song ids (audio and text of the same song), `rec` is None.
    Stage 2: `trigger` and `rec` hold the song ids of each ⟨trigger, recommended⟩ pair.
    """

    stage: str
    mels: dict[int, np.ndarray]
    texts: dict[int, str]
    trigger: np.ndarray
    rec: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.trigger)


def stage_config(cfg: Config, stage: str):
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage={stage!r}: expected pretrain or finetune")
    return cfg.pretrain if stage == "pretrain" else cfg.finetune


def training_rows(cfg: Config, stage: str, verbose: bool = True) -> TrainingRows:
    """Load mels, song texts and the stage's rows (songs, favor triplets or co-occurrence pairs)."""
    tcfg = stage_config(cfg, stage)
    catalog = read_catalog(catalog_path(cfg))
    mels = read_mels(out_path(cfg, "mels"), cfg.audio.n_mels)
    texts = song_texts(catalog)
    if stage == "pretrain":
        ids = np.array(sorted(set(mels) & set(texts)))
        return TrainingRows(stage, mels, texts, ids)
    world = Path(cfg.data.root)
    interactions = pd.read_parquet(world / "interactions.parquet")
    sessions = pd.read_parquet(world / "sessions.parquet") if tcfg.variant == "cf" else None
    # Stage 2 sees only the training period: the held-out later days are what evaluation scores.
    cut = split_time(interactions[S.EVENT_TIMESTAMP], cfg.eval.holdout_fraction)
    pairs = before(stage2_pairs(tcfg.variant, interactions, sessions), cut)
    keep = pairs[S.TRIGGER_SONG_ID].isin(mels.keys()) & pairs[S.REC_SONG_ID].isin(mels.keys())
    trig, rec = pairs.loc[keep, S.TRIGGER_SONG_ID].to_numpy(), pairs.loc[keep, S.REC_SONG_ID].to_numpy()
    if verbose:
        print(f"finetune ({tcfg.variant}): {len(trig)} pairs before {cut:%Y-%m-%d} with mels for both songs")
    return TrainingRows(stage, mels, texts, trig, rec)


def make_batch(rows: TrainingRows, idx: np.ndarray, tokenizer) -> dict:
    """The training batch (training.py's dict layout) of the rows at positions idx."""
    if rows.rec is None:
        ids = rows.trigger[idx]
        return stage1_batch([rows.mels[i] for i in ids], [rows.texts[i] for i in ids], tokenizer)
    trig, rec = rows.trigger[idx], rows.rec[idx]
    return stage2_batch(
        [rows.mels[i] for i in trig], [rows.mels[i] for i in rec], [rows.texts[i] for i in rec], tokenizer, trig, rec
    )


def batch_stream(
    rows: TrainingRows,
    tokenizer,
    batch_size: int,
    seed: int,
    *,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[dict]:
    """Endless batches, epoch after epoch, starting at optimizer step `start_step`.

    Global batch k is the k-th full batch of batch_size rows in the (seed, epoch) order of
    batching.epoch_order; rank r of `world` gets its r-th contiguous slice of batch_size/world
    rows, so the ranks' slices concatenated in rank order are the one-process batch
    (gather_with_grad is rank-ordered). Steps before start_step are skipped without building
    their batches, so a resumed run sees exactly the batches an unbroken one would.
    """
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by {world} workers")
    per = batch_size // world
    steps_per_epoch = len(rows) // batch_size
    if steps_per_epoch == 0:
        epoch_order(len(rows), batch_size, seed, 0)  # raises the "cannot fill one batch" error
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        for idx in epoch_order(len(rows), batch_size, seed, epoch)[skip:]:
            yield make_batch(rows, idx[rank * per : (rank + 1) * per], tokenizer)
        epoch, skip = epoch + 1, 0


def init_model(cfg: Config, stage: str, init_from: str | Path | None = None) -> HTCLModel:
    """A fresh model (stage 1) or one initialised from the stage-1 checkpoint (stage 2)."""
    model = HTCLModel(cfg.model, cfg.audio)
    if stage == "finetune":
        init_from = Path(init_from or out_path(cfg, "pretrain", "model.pt"))
        stage1, _, _ = model_from_checkpoint(init_from)
        model.load_state_dict(stage1.state_dict())
        print(f"finetune: initialised from {init_from}")
    return model


def run_train(cfg: Config, stage: str, init_from: str | Path | None = None) -> Path:
    """Train one stage in this process; returns the checkpoint path."""
    tcfg = stage_config(cfg, stage)
    seed_everything(tcfg.seed)
    rows = training_rows(cfg, stage)
    tokenizer = SongTokenizer(cfg.model)
    run_dir = out_path(cfg, stage_dir_name(stage, tcfg.variant))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    model = init_model(cfg, stage, init_from)
    state = TrainState(model, build_optimizer(model, tcfg))
    ckpt_path = run_dir / "model.pt"
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    train(
        state,
        batch_stream(rows, tokenizer, tcfg.batch_size, tcfg.seed),
        tcfg,
        stage,
        on_log=logger,
        on_checkpoint=lambda s: save_checkpoint(ckpt_path, s, cfg, stage),
    )
    from htcl.evaluation import plot_training_curves

    plot_training_curves([run_dir / "metrics.jsonl"], run_dir / "training_curves.png")
    return ckpt_path


# --- embed ---------------------------------------------------------------------------------


def model_version(checkpoint: str | Path) -> str:
    """'<stage>-<step>-<sha256 of the checkpoint file, 10 hex>': changes whenever weights or config do."""
    checkpoint = Path(checkpoint)
    h = hashlib.sha256()
    with checkpoint.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return f"{ckpt['stage']}-{ckpt['step']}-{h.hexdigest()[:10]}"


@torch.no_grad()
def embed_mels(model: HTCLModel, mels: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """(n, D) float32 L2-normalized audio embeddings, in input order."""
    from htcl.audio import mel_batch

    model.eval()
    out = []
    for i in range(0, len(mels), batch_size):
        mel, mask = mel_batch(mels[i : i + batch_size])
        out.append(model.encode_audio(torch.as_tensor(mel), torch.as_tensor(mask)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


def run_embed(cfg: Config, checkpoint: str | Path) -> Path:
    model, _, _ = model_from_checkpoint(checkpoint)
    version = model_version(checkpoint)
    mels = read_mels(out_path(cfg, "mels"), cfg.audio.n_mels)
    ids = sorted(mels)
    emb = embed_mels(model, [mels[i] for i in tqdm(ids, desc="embed", unit="song")])
    now = datetime.now(timezone.utc)
    rows = [
        {S.SONG_ID: sid, S.EMBEDDING: e.tolist(), S.MODEL_VERSION: version, S.EVENT_TIMESTAMP: now}
        for sid, e in zip(ids, emb)
    ]
    path = out_path(cfg, "embeddings", version, "part-0.parquet")
    write_table(rows, S.embeddings_schema(model.cfg.embed_dim), path)
    save_config(cfg, path.parent / "_config.yaml")  # "_": Parquet dataset readers skip it
    build_index(cfg, path.parent)
    return path


def build_index(cfg: Config, embeddings_dir: str | Path) -> Path:
    """The matching index of one embeddings/<version>/ folder, at <output_dir>/index/<version>/."""
    from htcl.retrieval import build_index_from_embeddings

    return build_index_from_embeddings(embeddings_dir, out_path(cfg, "index"))


# --- evaluation ----------------------------------------------------------------------------

def variant_embeddings(cfg: Config, verbose: bool = True) -> dict:
    """Every embedding variant the comparison can score from this run's outputs, by table name:
    a random-init encoder (same architecture, seed eval.seed), mel statistics, and each trained
    checkpoint found (stage 1, HTCL, HTCL_w_CF)."""
    from htcl.evaluation import HTCL, HTCL_CF, MEL_STATS, RANDOM_INIT, STAGE1, Embeddings, mel_statistics

    mels = read_mels(out_path(cfg, "mels"), cfg.audio.n_mels)
    ids = sorted(mels)
    songs = [mels[i] for i in ids]
    torch.manual_seed(cfg.eval.seed)
    variants = {RANDOM_INIT: Embeddings(ids, embed_mels(HTCLModel(cfg.model, cfg.audio), songs)),
                MEL_STATS: mel_statistics(mels)}
    for name, run in ((STAGE1, "pretrain"), (HTCL, "finetune"), (HTCL_CF, "finetune_cf")):
        ckpt = out_path(cfg, run, "model.pt")
        if not ckpt.is_file():
            if verbose:
                print(f"evaluate: no {ckpt}; {name} left out")
            continue
        model, _, _ = model_from_checkpoint(ckpt)
        variants[name] = Embeddings(ids, embed_mels(model, songs))
    return variants


def run_evaluate(cfg: Config, ranker_frame: pd.DataFrame | None = None, out_dir: str | Path | None = None) -> dict:
    """The comparison table of every variant on the held-out period; writes results.json/.md and
    plots to <output_dir>/evaluation/. ranker_frame None = the in-process point-in-time stats
    (htcl.features.point_in_time_stats); the Ray/Feast job passes Feast's backfill instead."""
    from htcl.evaluation import compare_variants, write_report
    from htcl.features import point_in_time_stats

    catalog = read_catalog(catalog_path(cfg))
    interactions = pd.read_parquet(Path(cfg.data.root) / "interactions.parquet")
    cut = split_time(interactions[S.EVENT_TIMESTAMP], cfg.eval.holdout_fraction)
    if ranker_frame is None:
        genre = dict(zip(catalog[S.SONG_ID], catalog[S.GENRE].fillna(""))) if S.GENRE in catalog else None
        ranker_frame = point_in_time_stats(interactions, genre)
    variants = variant_embeddings(cfg)
    results = compare_variants(variants, catalog, interactions, ranker_frame, cut, cfg.eval.hit_rate_ks,
                               cfg.eval.probe_folds, cfg.eval.seed)
    out_dir = Path(out_dir or out_path(cfg, "evaluation"))
    metric_files = [out_path(cfg, d, "metrics.jsonl") for d in ("pretrain", "finetune", "finetune_cf")]
    paths = write_report(results, out_dir, metric_files)
    save_config(cfg, out_dir / "config.yaml")
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results
