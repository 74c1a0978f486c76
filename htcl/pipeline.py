"""The pipeline's steps in one process: preprocess -> pretrain -> finetune -> embed.

These are what `htcl <step>` runs on a laptop with no cluster; the Ray jobs (ray_jobs/) run the
same library pieces (MelExtractor, batching, training.train) spread over workers. Where the
outputs go under cfg.output_dir: htcl.layout.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from htcl import schema as S
from htcl.batching import epoch_order, stage1_batch, stage2_batch
from htcl.config import Config, ModelConfig, save_config
from htcl.files import write_atomically
from htcl.layout import CHECKPOINT, Layout, run_name
from htcl.mels import (
    MEL_COLUMNS,
    SHARD_ROW_GROUP_ROWS,
    MelExtractor,
    catalog_chunks,
    catalog_ids_by_artist,
    mel_shards,
    mels_from_table,
    read_catalog,
    read_mels,
    write_table,
)
from htcl.model import HTCLModel
from htcl.pairs import before, split_time, stage2_pairs
from htcl.streaming import ShardReader, read_ahead
from htcl.text import CATALOG_TEXT_COLUMNS, SongTokenizer, song_texts
from htcl.training import (
    JsonlLogger,
    TrainState,
    build_optimizer,
    model_from_checkpoint,
    save_checkpoint,
    seed_everything,
    train,
)


def catalog_path(cfg: Config) -> Path:
    return Path(cfg.data.root) / "catalog.parquet"


# --- preprocess ----------------------------------------------------------------------------


def done_song_ids(*dirs: Path) -> set[int]:
    """The song ids in every Parquet shard of these folders (mels/, quarantine/)."""
    done: set[int] = set()
    for d in dirs:
        for f in sorted(d.glob("*.parquet")):
            done.update(pq.read_table(f, columns=[S.SONG_ID]).column(0).to_pylist())
    return done


@dataclass
class PreprocessPlan:
    """What a preprocess run does: the catalog songs whose audio is new or changed since mels/ and
    quarantine/ were written (by song_id and the file's sha256), after their old rows are dropped."""

    todo: pd.DataFrame  # song_id, audio_path, input_hash
    catalog_songs: int
    new: int  # song ids in neither table
    changed: int  # recorded with another input hash (or before hashes were recorded)
    replaced_rows: int  # their old rows dropped from mels/ and quarantine/

    def summary(self) -> dict:
        return {
            "catalog_songs": self.catalog_songs,
            "new": self.new,
            "changed": self.changed,
            "unchanged_skipped": self.catalog_songs - self.new - self.changed,
            "replaced_stale_rows": self.replaced_rows,
        }


def plan_preprocess(cfg: Config, catalog: pd.DataFrame, force: bool = False) -> PreprocessPlan:
    """Hash every catalog song's audio file, compare with what mels/ and quarantine/ recorded, and
    drop the rows of changed songs (htcl.delta); force: start from empty tables."""
    from htcl.delta import drop_stale_rows, new_or_changed, recorded_hashes
    from htcl.towers import audio_hashes

    mels_dir, q_dir = Layout.of(cfg).mels, Layout.of(cfg).quarantine
    if force:
        for d in (mels_dir, q_dir):
            for f in d.glob("*.parquet"):
                f.unlink()
    paths = [str(p) for p in catalog[S.AUDIO_PATH]]
    inputs = pd.DataFrame(
        {
            S.SONG_ID: catalog[S.SONG_ID].astype("int64").to_numpy(),
            S.AUDIO_PATH: paths,
            S.INPUT_HASH: audio_hashes(paths),
        }
    )
    recorded = recorded_hashes(mels_dir, q_dir)
    todo = new_or_changed(inputs, recorded)
    new = int((~todo[S.SONG_ID].isin(list(recorded))).sum()) if len(todo) else 0
    current = dict(zip(inputs[S.SONG_ID].tolist(), inputs[S.INPUT_HASH]))
    replaced = sum(drop_stale_rows(d, current, SHARD_ROW_GROUP_ROWS) for d in (mels_dir, q_dir))
    return PreprocessPlan(todo, len(inputs), new, len(todo) - new, replaced)


def run_preprocess(cfg: Config, catalog: str | Path | None = None, force: bool = False) -> dict:
    """Decode + log-Mel every catalog song that is new or whose audio changed; bad files go to quarantine/."""
    from htcl.delta import new_shard_name

    catalog = Path(catalog or catalog_path(cfg))
    plan = plan_preprocess(cfg, read_catalog(catalog), force)
    todo = plan.todo
    mels_dir, q_dir = Layout.of(cfg).mels, Layout.of(cfg).quarantine
    extractor = MelExtractor(cfg.audio)
    mels, quarantine = [], []
    t0 = time.perf_counter()
    for sid, path, h in tqdm(
        zip(todo[S.SONG_ID], todo[S.AUDIO_PATH], todo[S.INPUT_HASH]), total=len(todo), desc="preprocess", unit="song"
    ):
        row, bad = extractor.extract_one(sid, path, h)
        (mels if row is not None else quarantine).append(row if row is not None else bad)
    elapsed = time.perf_counter() - t0
    part = new_shard_name()
    if mels:
        write_table(mels, S.MELS_SCHEMA, mels_dir / part)
    if quarantine:
        write_table(quarantine, S.QUARANTINE_SCHEMA, q_dir / part)
    # '_'-prefixed: Parquet dataset readers (pyarrow, Ray Data) skip it when reading mels/
    save_config(cfg, Layout.of(cfg).mels / "_config.yaml")
    return {
        "catalog": str(catalog),
        **plan.summary(),
        "skipped_already_done": plan.catalog_songs - len(todo),
        "processed": len(mels),
        "quarantined": len(quarantine),
        "seconds": round(elapsed, 2),
        "songs_per_s": round(len(todo) / elapsed, 2) if elapsed > 0 and len(todo) else None,
        "mels": str(mels_dir),
        "quarantine": str(q_dir),
    }


# --- training ------------------------------------------------------------------------------


def run_dir_name(cfg: Config, stage: str) -> str:
    """The config's run folder of a stage (htcl.layout.run_name)."""
    return run_name(stage, stage_config(cfg, stage).variant, cfg.model.audio_backbone)


@dataclass
class TrainingRows:
    """What one stage trains on: per-song audio inputs and texts, and the rows that make the batches.

    `mels` maps each song to its audio encoder input: its log-Mel (M, F) for the paper's family,
    or the locked backbone's cached patch features (C, P); training_rows gives a ShardReader
    (htcl.streaming: read from the shards as batches need them), a dict works the same.
    With a trainable text tower `texts` maps each song to its text; with a locked one
    `text_features` maps it to its cached pooled BERT output (H,) and `texts` is None
    (training_rows gives ShardReaders for both, over the catalog and the text tower's cache).
    Stage 1: `trigger` holds song ids (audio and text of the same song), `rec` is None.
    Stage 2: `trigger` and `rec` hold the song ids of each ⟨trigger, recommended⟩ pair.
    """

    stage: str
    mels: Mapping[int, np.ndarray]
    texts: Mapping[int, str] | None
    trigger: np.ndarray
    rec: np.ndarray | None = None
    text_features: Mapping[int, np.ndarray] | None = None
    # the held-out rows (same mels and texts; never in `trigger`/`rec`): see training_rows
    validation: "TrainingRows | None" = None

    def __len__(self) -> int:
        return len(self.trigger)

    def song_ids(self, idx: np.ndarray) -> np.ndarray:
        """The songs whose audio the rows at positions idx need (stage 2: triggers and recs)."""
        return self.trigger[idx] if self.rec is None else np.concatenate([self.trigger[idx], self.rec[idx]])

    def split(self) -> TrainingSplit:
        """The row ids of these rows and their validation rows (TrainingSplit: what a worker loads)."""
        val = self.validation
        empty = np.zeros(0, np.int64)
        return TrainingSplit(
            self.trigger,
            self.rec,
            val.trigger if val is not None else empty,
            (val.rec if val is not None else empty) if self.rec is not None else None,
        )

    def text_song_ids(self, idx: np.ndarray) -> np.ndarray:
        """The songs whose text the rows at positions idx need (stage 1: the songs; stage 2: recs)."""
        return self.trigger[idx] if self.rec is None else self.rec[idx]


# --- the held-out artists ------------------------------------------------------------------


def heldout_artists(artists, share: float, seed: int) -> set[str]:
    """The round(share x n) artists (at least 1, at most n - 1, when share > 0) with the lowest
    sha256(seed, artist): deterministic, and stable as the catalog grows (a new artist only
    enters or not; the others keep their place). Missing artists count as one artist ""."""
    names = sorted({"" if a is None or a != a else str(a) for a in artists})
    if share <= 0 or len(names) < 2:
        return set()
    k = min(len(names) - 1, max(1, round(share * len(names))))
    key = lambda a: hashlib.sha256(f"{seed}\x00{a}".encode()).hexdigest()  # noqa: E731
    return set(sorted(names, key=key)[:k])


def heldout_song_ids(cfg: Config, catalog: pd.DataFrame | None = None) -> set[int]:
    """Songs by the eval.retrieval_holdout_artists share of artists (seed eval.seed): no training
    stage trains on them; they are the validation split and the zero-shot retrieval test set."""
    catalog = read_catalog(catalog_path(cfg)) if catalog is None else catalog
    artists = catalog[S.ARTIST].astype(object).where(catalog[S.ARTIST].notna(), "").astype(str)
    held = heldout_artists(artists, cfg.eval.retrieval_holdout_artists, cfg.eval.seed)
    return set(catalog.loc[artists.isin(held), S.SONG_ID].astype(int).tolist())


def _seeded_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).permutation(n)


def stage_config(cfg: Config, stage: str):
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage={stage!r}: expected pretrain or finetune")
    return cfg.pretrain if stage == "pretrain" else cfg.finetune


@dataclass
class CatalogKeys:
    """What training needs of every catalog song, in song_id order: (n,) arrays, not the table."""

    ids: np.ndarray  # (n,) int64, ascending
    held: np.ndarray  # (n,) bool: the song's artist is held out (heldout_song_ids)
    text_hash: np.ndarray | None = None  # (n,) uint64: towers.hash_prefix of its text's hash


def catalog_keys(cfg: Config, *, text_hashes: bool = False) -> CatalogKeys:
    """The catalog's song ids and held-out mask (mels.catalog_ids_by_artist: a training worker
    holds 9 bytes a song, not the catalog's columns) and, with text_hashes, its texts' hash prefixes
    (every song's text built and hashed a chunk of rows at a time: mels.catalog_chunks)."""
    from htcl.towers import hash_prefix, text_hash

    path = catalog_path(cfg)
    ids, held = catalog_ids_by_artist(
        path, lambda names: heldout_artists(names, cfg.eval.retrieval_holdout_artists, cfg.eval.seed)
    )
    hashes = None
    if text_hashes:  # in the catalog's row order, as ids
        hashes = np.concatenate(
            [
                np.array([hash_prefix(text_hash(t)) for t in song_texts(chunk).values()], np.uint64)
                for chunk in catalog_chunks(path, CATALOG_TEXT_COLUMNS)
            ]
            or [np.zeros(0, np.uint64)]
        )
    order = np.argsort(ids, kind="stable")
    return CatalogKeys(ids[order], held[order], hashes[order] if hashes is not None else None)


def song_text_reader(cfg: Config, cache_rows: int) -> Mapping[int, str]:
    """Every catalog song's text (song_texts) for a trainable text tower: from a Parquet catalog a
    ShardReader over its row groups (the texts a batch needs, read on demand through the cache);
    a CSV catalog, which cannot be read by row, is read whole into a dict."""
    path = catalog_path(cfg)
    if path.suffix == ".csv":
        return song_texts(read_catalog(path))

    def decode(table) -> dict[int, str]:
        frame = table.to_pandas()
        for col in S.CATALOG_TEXT:
            frame[col] = frame[col].fillna("").astype(str)  # as read_catalog
        return song_texts(frame)

    return ShardReader([path], CATALOG_TEXT_COLUMNS, decode, "song text", cache_rows, check_finite=False)


def text_feature_dir(cfg: Config) -> Path:
    from htcl.towers import text_tower_spec, tower_dir

    return tower_dir(cfg.output_dir, text_tower_spec(cfg.model))


def text_feature_reader(cfg: Config, cache_rows: int) -> ShardReader:
    """The locked text tower's cached features (towers layout), read from their shards on demand."""
    from htcl.towers import FEATURES_SCHEMA, feature_shards, features_from_table

    directory = text_feature_dir(cfg)
    return ShardReader(
        feature_shards(directory),
        FEATURES_SCHEMA.names,
        lambda t: features_from_table(t, where=directory),
        "text features",
        cache_rows,
    )


@dataclass(frozen=True)
class TrainingSplit:
    """A stage's rows without their inputs: the song ids (or pair ids) of its training and
    validation rows, in order. What the Ray job's driver computes once and every worker loads
    (TrainingRows.split, training_rows(split=...)), so no worker reads the catalog or the
    interaction log: a worker's memory is its readers' index and these arrays (8-16 bytes a row)."""

    trigger: np.ndarray  # (n,) int64
    rec: np.ndarray | None  # (n,) int64, stage 2
    validation_trigger: np.ndarray
    validation_rec: np.ndarray | None

    def save(self, path: str | Path) -> Path:
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, lambda tmp: _save_npz(tmp, arrays))

    @classmethod
    def load(cls, path: str | Path) -> "TrainingSplit":
        with np.load(path) as f:
            return cls(**{k.name: (f[k.name] if k.name in f.files else None) for k in fields(cls)})


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add .npz to a temp name
        np.savez(f, **arrays)


def training_rows(
    cfg: Config, stage: str, verbose: bool = True, check_inputs: bool = True, split: TrainingSplit | None = None
) -> TrainingRows:
    """The stage's rows (songs, favor triplets or co-occurrence pairs) and readers of their inputs:
    the audio inputs (audio_reader) and, with a locked text tower, the cached text features
    (text_feature_reader) or, with a trainable one, the song texts (song_text_reader), each
    holding its shards' index only (batches read their rows). Of the catalog only its song ids and
    held-out mask are read (catalog_keys); with `split` (a driver's TrainingSplit) not even those,
    nor the interaction log: memory grows by the readers' index, tens of bytes a song.

    The songs of the held-out artists (`heldout_song_ids`) are left out of the training rows and
    form `.validation`: stage 1 their songs, stage 2 the pairs whose trigger or recommended song
    is one of them (so no stage ever trains on a held-out song), in an eval.seed order.
    check_inputs: refuse, before the first step, inputs the stage must not train on: an audio input
    with NaN or inf (ShardReader.require_finite names the song: one pass over the shards, a row
    group at a time) and, with a locked text tower, a cached text feature of a text that has
    changed since (towers.require_current_features names it: rerun `htcl features`; the catalog's
    texts hashed a chunk at a time). The Ray job makes these checks once, on its driver, with the
    plan; its workers turn them off, and a NaN/inf row is still refused when a batch first reads it."""
    from htcl.towers import require_current_features

    tcfg = stage_config(cfg, stage)
    locked_text = not cfg.model.text_trainable
    mels = audio_reader(cfg, tcfg.reader_cache_rows)
    if check_inputs:
        mels.require_finite()
    texts = None if locked_text else song_text_reader(cfg, tcfg.reader_cache_rows)
    text_features = text_feature_reader(cfg, tcfg.reader_cache_rows) if locked_text else None
    check_texts = check_inputs and locked_text
    keys = catalog_keys(cfg, text_hashes=check_texts) if check_texts or split is None else None
    if check_texts:
        require_current_features(text_feature_dir(cfg), keys.ids, keys.text_hash)
    if split is None:
        split = plan_training_split(cfg, stage, keys, mels.ids, text_features.ids if locked_text else None, verbose)

    def rows(trigger: np.ndarray, rec: np.ndarray | None, validation: TrainingRows | None = None) -> TrainingRows:
        return TrainingRows(stage, mels, texts, trigger, rec, text_features=text_features, validation=validation)

    return rows(split.trigger, split.rec, rows(split.validation_trigger, split.validation_rec))


def plan_training_split(
    cfg: Config,
    stage: str,
    keys: CatalogKeys,
    audio_ids: np.ndarray,
    text_feature_ids: np.ndarray | None,
    verbose: bool = True,
) -> TrainingSplit:
    """training_rows's rows: the catalog's songs (keys) with an audio input (audio_ids) and, with a
    locked text tower, a cached text feature (text_feature_ids); stage 2 the pairs of the training
    period between such songs. Validation: those touching a held-out artist, in an eval.seed
    order."""
    usable = np.intersect1d(keys.ids, audio_ids)  # songs with both an audio input and a text
    if text_feature_ids is not None:
        usable = np.intersect1d(usable, text_feature_ids)  # a song not yet in the cache is left out
    held = keys.ids[keys.held]
    if stage == "pretrain":
        is_val = np.isin(usable, held)
        val = usable[is_val][_seeded_order(int(is_val.sum()), cfg.eval.seed)]
        if verbose and len(val):
            print(f"pretrain: {len(usable) - len(val)} training songs, {len(val)} held out (validation)")
        return TrainingSplit(usable[~is_val], None, val, None)
    tcfg = stage_config(cfg, stage)
    world = Path(cfg.data.root)
    interactions = pd.read_parquet(world / "interactions.parquet")
    sessions = pd.read_parquet(world / "sessions.parquet") if tcfg.variant == "cf" else None
    # Stage 2 sees only the training period: the held-out later days are what evaluation scores.
    cut = split_time(interactions[S.EVENT_TIMESTAMP], cfg.eval.holdout_fraction)
    pairs = before(stage2_pairs(tcfg.variant, interactions, sessions), cut)
    keep = pairs[S.TRIGGER_SONG_ID].isin(audio_ids) & pairs[S.REC_SONG_ID].isin(usable)
    trig, rec = pairs.loc[keep, S.TRIGGER_SONG_ID].to_numpy(), pairs.loc[keep, S.REC_SONG_ID].to_numpy()
    is_val = np.isin(trig, held) | np.isin(rec, held)
    order = _seeded_order(int(is_val.sum()), cfg.eval.seed)
    if verbose:
        print(
            f"finetune ({tcfg.variant}): {int((~is_val).sum())} pairs before {cut:%Y-%m-%d} with mels for both "
            f"songs, {int(is_val.sum())} more touching a held-out artist (validation)"
        )
    return TrainingSplit(trig[~is_val], rec[~is_val], trig[is_val][order], rec[is_val][order])


def audio_inputs(cfg: Config, model_cfg=None, audio_cfg=None) -> dict[int, np.ndarray]:
    """Every song's audio encoder input under cfg.output_dir: mels/ for the paper's family, the
    backbone's cached patch features (features/<backbone>-<hash>/) for a backbone family.
    model_cfg / audio_cfg: a checkpoint's own (default: cfg's)."""
    model_cfg, audio_cfg = model_cfg or cfg.model, audio_cfg or cfg.audio
    if model_cfg.audio_backbone == "none":
        return read_mels(Layout.of(cfg).mels, audio_cfg.n_mels)
    from htcl.towers import audio_tower_spec, read_features, tower_dir

    return read_features(tower_dir(cfg.output_dir, audio_tower_spec(model_cfg, audio_cfg)))


AUDIO_INPUT = "audio encoder input (mels/ or the backbone's cached features)"  # names it in refusals


def audio_reader(
    cfg: Config, cache_rows: int, model_cfg=None, audio_cfg=None, files: list[Path] | None = None
) -> ShardReader:
    """The songs of audio_inputs(cfg), read from their shards on demand (htcl.streaming) through
    a cache of at most cache_rows rows: what training reads instead of holding them all.
    model_cfg / audio_cfg: a checkpoint's own (default: cfg's); files: only these input shards."""
    model_cfg, audio_cfg = model_cfg or cfg.model, audio_cfg or cfg.audio
    if model_cfg.audio_backbone == "none":
        return ShardReader(
            files or mel_shards(Layout.of(cfg).mels),
            MEL_COLUMNS,
            lambda t: mels_from_table(t, audio_cfg.n_mels),
            AUDIO_INPUT,
            cache_rows,
        )
    from htcl.towers import FEATURES_SCHEMA, audio_tower_spec, feature_shards, features_from_table, tower_dir

    directory = tower_dir(cfg.output_dir, audio_tower_spec(model_cfg, audio_cfg))
    return ShardReader(
        files or feature_shards(directory),
        FEATURES_SCHEMA.names,
        lambda t: features_from_table(t, where=directory),
        AUDIO_INPUT,
        cache_rows,
    )


# --- locked towers' features ----------------------------------------------------------------


@dataclass
class TowerPlan:
    """One locked tower's cache update: which songs to compute (new or changed input)."""

    tower: str  # "text" | "audio"
    spec: dict
    directory: Path
    inputs: pd.DataFrame  # every catalog song's input: song_id, input_hash, text or audio_path
    todo: pd.DataFrame  # the rows of inputs to compute
    dropped: int  # cached rows of changed inputs removed
    skipped_quarantined: int = 0  # songs in quarantine/ (a file that did not decode): not retried


def plan_features(cfg: Config, catalog: str | Path | None = None, force: bool = False) -> list[TowerPlan]:
    """For each tower cfg locks: check its cache folder's spec, drop rows whose input changed,
    and list the songs to compute."""
    from htcl.delta import drop_stale_rows, new_or_changed, recorded_hashes
    from htcl.towers import INPUT_HASH, check_tower, locked_tower_specs, tower_dir, tower_inputs

    catalog_df = read_catalog(Path(catalog or catalog_path(cfg)))
    plans = []
    for tower, spec in locked_tower_specs(cfg).items():
        directory = tower_dir(cfg.output_dir, spec)
        if force:
            for f in directory.glob("*.parquet"):
                f.unlink()
        check_tower(directory, spec)
        inputs = tower_inputs(cfg, catalog_df, tower)
        todo = new_or_changed(inputs, recorded_hashes(directory))
        skipped = 0
        if tower == "audio":  # as preprocess: a quarantined file is not retried (--force retries it)
            q_dir = Layout.of(cfg).quarantine
            quarantined = done_song_ids(q_dir) if not force else set()
            skipped = int(todo[S.SONG_ID].isin(quarantined).sum())
            todo = todo[~todo[S.SONG_ID].isin(quarantined)].reset_index(drop=True)
        current = dict(zip(inputs[S.SONG_ID].tolist(), inputs[INPUT_HASH]))
        dropped = drop_stale_rows(directory, current, SHARD_ROW_GROUP_ROWS)
        plans.append(TowerPlan(tower, spec, directory, inputs, todo, dropped, skipped))
    return plans


def tower_udf(cfg: Config, tower: str):
    from htcl.towers import BackboneFeatures, TextFeatures

    return TextFeatures(cfg.model) if tower == "text" else BackboneFeatures(cfg.model, cfg.audio)


def finish_features(cfg: Config, plan: TowerPlan, rows: list[dict], quarantine: list[dict], seconds: float) -> dict:
    """Write one tower's new rows (and quarantine rows) and its spec; the summary line."""
    from htcl.towers import write_features, write_tower_spec

    write_features(rows, plan.directory)
    write_tower_spec(plan.directory, plan.spec)
    if quarantine:
        name = f"features-{plan.spec['tower']}-{time.strftime('%Y%m%d%H%M%S')}.parquet"
        write_table(quarantine, S.QUARANTINE_SCHEMA, Layout.of(cfg).quarantine / name)
    return {
        "tower": plan.spec["tower"],
        "dir": str(plan.directory),
        "computed": len(rows),
        "kept": len(plan.inputs) - len(plan.todo) - plan.skipped_quarantined,
        "replaced_stale": plan.dropped,
        "skipped_quarantined": plan.skipped_quarantined,
        "quarantined": len(quarantine),
        "seconds": round(seconds, 2),
    }


def run_features(cfg: Config, catalog: str | Path | None = None, force: bool = False, batch_size: int = 8) -> dict:
    """Compute and cache the features of every tower cfg locks (htcl.towers), in this process,
    for the songs that are new or whose input changed; the rest are kept."""
    summary: dict = {}
    for plan in plan_features(cfg, catalog, force):
        t0 = time.perf_counter()
        udf = tower_udf(cfg, plan.tower) if len(plan.todo) else None
        rows, quarantine = [], []
        cols = list(plan.todo.columns)
        with tqdm(total=len(plan.todo), desc=f"features {plan.spec['tower']}", unit="song") as bar:
            for i in range(0, len(plan.todo), batch_size):
                chunk = plan.todo.iloc[i : i + batch_size]
                out = udf({c: chunk[c].tolist() for c in cols})
                rows += out["features"]
                quarantine += out["quarantine"]
                bar.update(len(chunk))
        summary[plan.tower] = finish_features(cfg, plan, rows, quarantine, time.perf_counter() - t0)
    return summary


class BatchInputs(NamedTuple):
    """What the rows of one batch read: audio inputs, and texts (a trainable text tower) or cached
    text features (a locked one), each a mapping song_id -> input holding at least their songs."""

    audio: Mapping[int, np.ndarray]
    texts: Mapping[int, str] | None
    text_features: Mapping[int, np.ndarray] | None


def read_inputs(rows: TrainingRows, idx: np.ndarray) -> BatchInputs:
    """The inputs of the songs the rows at positions idx need: from a ShardReader one read per row
    group (only these songs decoded), a mapping in memory as it is."""

    def read(source: Mapping | None, song_ids: np.ndarray) -> Mapping | None:
        return source.read(song_ids) if isinstance(source, ShardReader) else source

    return BatchInputs(
        read(rows.mels, rows.song_ids(idx)),
        read(rows.texts, rows.text_song_ids(idx)),
        read(rows.text_features, rows.text_song_ids(idx)),
    )


def make_batch(rows: TrainingRows, idx: np.ndarray, tokenizer, inputs: BatchInputs | None = None) -> dict:
    """The training batch (training.py's dict layout) of the rows at positions idx; inputs: their
    songs' inputs already read (read_inputs; batch_stream reads them ahead), else read here."""
    audio, texts, feats = read_inputs(rows, idx) if inputs is None else inputs

    def texts_of(ids: np.ndarray) -> list[str]:  # a locked tower's batches carry features, not texts
        return [texts[i] for i in ids] if feats is None else [""] * len(ids)

    if rows.rec is None:
        ids = rows.trigger[idx]
        batch = stage1_batch([audio[i] for i in ids], texts_of(ids), None if feats is not None else tokenizer)
        if feats is not None:
            batch["text_features"] = torch.as_tensor(np.stack([feats[i] for i in ids]))
        return batch
    trig, rec = rows.trigger[idx], rows.rec[idx]
    batch = stage2_batch(
        [audio[i] for i in trig],
        [audio[i] for i in rec],
        texts_of(rec),
        None if feats is not None else tokenizer,
        trig,
        rec,
    )
    if feats is not None:
        batch["rec_text_features"] = torch.as_tensor(np.stack([feats[i] for i in rec]))
    return batch


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

    With ShardReaders behind the rows' inputs (audio, texts, text features), a rank reads the
    inputs of its own slice only, on a background thread, READ_AHEAD_BATCHES slices ahead
    (htcl.streaming.read_ahead); tokenizing and padding stay on this thread (one tokenizer, one
    thread).
    """
    slices = rank_slices(len(rows), batch_size, seed, start_step=start_step, rank=rank, world=world)
    if any(isinstance(m, ShardReader) for m in (rows.mels, rows.texts, rows.text_features)):
        for idx, inputs in read_ahead(lambda idx: read_inputs(rows, idx), slices):
            yield make_batch(rows, idx, tokenizer, inputs)
    else:  # a dict in memory: nothing to read
        for idx in slices:
            yield make_batch(rows, idx, tokenizer)


def rank_slices(
    n: int, batch_size: int, seed: int, *, start_step: int = 0, rank: int = 0, world: int = 1
) -> Iterator[np.ndarray]:
    """Endless row positions of rank's slice of each global batch from start_step (batch_stream)."""
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by {world} workers")
    per = batch_size // world
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        epoch_order(n, batch_size, seed, 0)  # raises the "cannot fill one batch" error
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        for idx in epoch_order(n, batch_size, seed, epoch)[skip:]:
            yield idx[rank * per : (rank + 1) * per]
        epoch, skip = epoch + 1, 0


def validation_batches(rows: TrainingRows, tokenizer, batch_size: int, max_rows: int) -> list[dict]:
    """The fixed validation batches: the first max_rows of rows.validation in full batches of
    min(batch_size, those rows) (the in-batch top-1 of a full training batch, where there are
    enough). Every rank builds all of them: validation needs no collective."""
    val = rows.validation
    n = min(len(val), max_rows) if val is not None and max_rows > 0 else 0
    if n < 2:
        return []
    size = min(batch_size, n)
    return [make_batch(val, np.arange(i, i + size), tokenizer) for i in range(0, n - size + 1, size)]


def init_model(cfg: Config, stage: str, init_from: str | Path | None = None) -> HTCLModel:
    """A fresh model (stage 1) or one initialised from the stage-1 checkpoint (stage 2)."""
    model = HTCLModel(cfg.model, cfg.audio)
    if stage == "finetune":
        init_from = Path(init_from or Layout.of(cfg).checkpoint(run_dir_name(cfg, "pretrain")))
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
    run_dir = Layout.of(cfg).run(run_dir_name(cfg, stage))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    model = init_model(cfg, stage, init_from)
    state = TrainState(model, build_optimizer(model, tcfg))
    ckpt_path = run_dir / CHECKPOINT
    (run_dir / "best.pt").unlink(missing_ok=True)
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    train(
        state,
        batch_stream(rows, tokenizer, tcfg.batch_size, tcfg.seed),
        tcfg,
        stage,
        on_log=logger,
        on_checkpoint=lambda s: save_checkpoint(ckpt_path, s, cfg, stage),
        val_batches=validation_batches(rows, tokenizer, tcfg.batch_size, tcfg.val_max_rows),
        on_best=(lambda s: save_checkpoint(run_dir / "best.pt", s, cfg, stage)) if tcfg.save_best else None,
    )
    from htcl.plots import plot_training_curves

    plot_training_curves([run_dir / "metrics.jsonl"], run_dir / "training_curves.png")
    return ckpt_path


# --- embed ---------------------------------------------------------------------------------


def model_version(checkpoint: str | Path) -> str:
    """'<stage>-<step>-<sha256 of the checkpoint file, 10 hex>': changes whenever weights or config do."""
    from htcl.files import sha256_file

    checkpoint = Path(checkpoint)
    digest = sha256_file(checkpoint)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return f"{ckpt['stage']}-{ckpt['step']}-{digest[:10]}"


@torch.no_grad()
def embed_mels(
    model: HTCLModel, mels: list[np.ndarray], batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """(n, D) float32 L2-normalized audio embeddings, in input order: the one embedding path
    (local embed, the Ray embed job, serving). mels: (M, F_i) each, or a backbone's cached (C, P_i)
    features; padded batch_size at a time. device: where the model is."""
    from htcl.batching import mel_batch

    model.eval()
    out = []
    for i in range(0, len(mels), batch_size):
        mel, mask = mel_batch(mels[i : i + batch_size])  # (B, M, F), (B, F)
        emb = model.encode_audio(torch.as_tensor(mel, device=device), torch.as_tensor(mask, device=device))
        out.append(emb.float().cpu().numpy())  # (B, D)
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@dataclass
class EmbedPlan:
    """What an embed run does for one model version: the input rows (mels/, or a backbone's cached
    features) whose song is not in embeddings/<version>/ yet or whose input hash changed, after the
    old rows of changed songs are dropped from it."""

    checkpoint: Path
    version: str
    model_cfg: ModelConfig  # the checkpoint's: which inputs it reads
    inputs_dir: Path
    columns: list[str]  # what the embedder reads of an input shard
    shards: list[Path]  # the input shards that hold a row to embed
    todo: dict[int, str]  # song_id -> input_hash to embed
    input_songs: int
    new: int
    changed: int
    replaced_rows: int
    out_dir: Path

    def summary(self) -> dict:
        return {
            "input_songs": self.input_songs,
            "new": self.new,
            "changed": self.changed,
            "unchanged_skipped": self.input_songs - self.new - self.changed,
            "replaced_stale_rows": self.replaced_rows,
        }


def embed_inputs(cfg: Config, model_cfg, audio_cfg) -> tuple[Path, list[str]]:
    """(folder, columns) of what a model of model_cfg embeds from: mels/ for the paper family, the
    backbone's cached patch features for a backbone family."""
    if model_cfg.audio_backbone == "none":
        return Layout.of(cfg).mels, [*MEL_COLUMNS, S.INPUT_HASH]
    from htcl.towers import FEATURE, SHAPE, audio_tower_spec, tower_dir

    return tower_dir(cfg.output_dir, audio_tower_spec(model_cfg, audio_cfg)), [S.SONG_ID, SHAPE, FEATURE, S.INPUT_HASH]


def plan_embed(cfg: Config, checkpoint: str | Path, force: bool = False) -> EmbedPlan:
    """Compare the inputs' hashes with embeddings/<version>/'s, drop the rows of changed songs
    (htcl.delta) and list what to embed; force: re-embed every song."""
    from htcl.config import config_from_dict
    from htcl.delta import drop_stale_rows, recorded_hashes
    from htcl.training import load_checkpoint

    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    ckpt_cfg = config_from_dict(load_checkpoint(checkpoint)["config"])
    inputs_dir, columns = embed_inputs(cfg, ckpt_cfg.model, ckpt_cfg.audio)
    shards = sorted(inputs_dir.glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no input shards (*.parquet) in {inputs_dir}; run preprocess (and features) first")
    version = model_version(checkpoint)
    out_dir = Layout.of(cfg).embeddings(version)
    if force:
        for f in out_dir.glob("*.parquet"):
            f.unlink()
    recorded = recorded_hashes(out_dir)
    inputs: dict[int, str] = {}
    todo: dict[int, str] = {}
    todo_shards = []
    for f in shards:
        if S.INPUT_HASH not in pq.read_schema(f).names:
            raise ValueError(
                f"{f}: no {S.INPUT_HASH} column (written by an older htcl): run `htcl preprocess` "
                f"once, which records every song's audio hash, then embed again"
            )
        t = pq.read_table(f, columns=[S.SONG_ID, S.INPUT_HASH])
        pairs = dict(zip(t.column(S.SONG_ID).to_pylist(), t.column(S.INPUT_HASH).to_pylist()))
        inputs.update(pairs)
        stale = {sid: h for sid, h in pairs.items() if sid not in recorded or recorded[sid] != h}
        if stale:
            todo.update(stale)
            todo_shards.append(f)
    new = sum(1 for sid in todo if sid not in recorded)
    replaced = drop_stale_rows(out_dir, inputs)
    return EmbedPlan(
        checkpoint,
        version,
        ckpt_cfg.model,
        inputs_dir,
        columns,
        todo_shards,
        todo,
        len(inputs),
        new,
        len(todo) - new,
        replaced,
        out_dir,
    )


def run_embed(cfg: Config, checkpoint: str | Path, force: bool = False) -> Path:
    """Embed, in this process, the songs whose input is new or changed for this checkpoint's
    version; append them to embeddings/<version>/ and rebuild its index when rows changed.
    Returns the embeddings folder."""
    from htcl.delta import new_shard_name

    plan = plan_embed(cfg, checkpoint, force)
    if plan.todo:
        model, ckpt_cfg, _ = model_from_checkpoint(plan.checkpoint)
        # only the shards holding songs to embed, a chunk of songs at a time: memory is the chunk
        reader = audio_reader(cfg, EMBED_CHUNK, ckpt_cfg.model, ckpt_cfg.audio, plan.shards)
        ids = sorted(plan.todo)
        parts = []
        with tqdm(total=len(ids), desc="embed", unit="song") as bar:
            for i in range(0, len(ids), EMBED_CHUNK):
                chunk = reader.read(ids[i : i + EMBED_CHUNK])
                parts.append(embed_mels(model, [chunk[s] for s in ids[i : i + EMBED_CHUNK]]))
                bar.update(len(chunk))
        emb = np.concatenate(parts)
        now = datetime.now(timezone.utc)
        rows = [
            {
                S.SONG_ID: sid,
                S.EMBEDDING: e.tolist(),
                S.MODEL_VERSION: plan.version,
                S.EVENT_TIMESTAMP: now,
                S.INPUT_HASH: plan.todo[sid],
            }
            for sid, e in zip(ids, emb)
        ]
        write_table(rows, S.embeddings_schema(model.cfg.embed_dim), plan.out_dir / new_shard_name())
        save_config(cfg, plan.out_dir / "_config.yaml")  # "_": Parquet dataset readers skip it
    print(json.dumps({"model_version": plan.version, **plan.summary(), "embedded": len(plan.todo)}), flush=True)
    if plan.todo or plan.replaced_rows or not index_is_current(cfg, plan.out_dir):
        build_index(cfg, plan.out_dir)
    return plan.out_dir


EMBED_CHUNK = 1024  # songs read and embedded at a time by the local embed

INDEX_SOURCE = "source.json"  # beside an index: the embeddings parts it was built from


def embeddings_fingerprint(embeddings_dir: Path) -> list[list]:
    """[name, bytes, mtime_ns] of each part of embeddings/<version>/: changes with any rewrite."""
    from htcl.delta import file_fingerprint

    return [[f.name, *file_fingerprint(f)] for f in sorted(Path(embeddings_dir).glob("part-*.parquet"))]


def index_is_current(cfg: Config, embeddings_dir: Path) -> bool:
    """Whether index/<version>/ was built from exactly the parts embeddings/<version>/ holds now."""
    source = Layout.of(cfg).index(Path(embeddings_dir).name) / INDEX_SOURCE
    try:
        return json.loads(source.read_text()) == embeddings_fingerprint(embeddings_dir)
    except (OSError, ValueError):
        return False


def build_index(cfg: Config, embeddings_dir: str | Path) -> Path:
    """The matching index of one embeddings/<version>/ folder, at <output_dir>/index/<version>/,
    rebuilt from every part (new songs included), with the parts it was built from beside it."""
    from htcl.retrieval import build_index_from_embeddings

    fingerprint = embeddings_fingerprint(Path(embeddings_dir))
    index_dir = build_index_from_embeddings(embeddings_dir, Layout.of(cfg).index_root, cfg.index)
    (index_dir / INDEX_SOURCE).write_text(json.dumps(fingerprint))
    return index_dir


# --- evaluation ----------------------------------------------------------------------------


def family_runs(cfg: Config) -> dict[str, tuple[str, str, str]]:
    """Run folders of each audio family's stage 1, HTCL and HTCL_w_CF: the paper's encoder, and
    the config's backbone (musicnn_msd when the config is the paper's)."""
    backbone = cfg.model.audio_backbone if cfg.model.audio_backbone != "none" else "musicnn_msd"
    return {
        fam: tuple(run_name(st, v, bb) for st, v in (("pretrain", "favor"), ("finetune", "favor"), ("finetune", "cf")))
        for fam, bb in (("scratch", "none"), ("backbone", backbone))
    }


@dataclass
class Variant:
    """One row of the comparison: a model (or a fixed feature map) and what it reads."""

    name: str
    model: HTCLModel | None  # None: "mel statistics" or "backbone as is"
    model_cfg: object
    audio_cfg: object


def variant_models(cfg: Config, verbose: bool = True) -> list[Variant]:
    """Every variant this run's outputs can score: a random-init paper encoder (seed eval.seed),
    mel statistics, each trained checkpoint found of both families, and the backbone as is (its
    pooled penultimate features, untrained) when the backbone's features are cached."""
    from htcl.config import replace
    from htcl.evaluation import BACKBONE_AS_IS, FAMILY_VARIANTS, MEL_STATS, RANDOM_INIT

    scratch_cfg = replace(cfg.model, audio_backbone="none")
    torch.manual_seed(cfg.eval.seed)
    out = [
        Variant(RANDOM_INIT, HTCLModel(scratch_cfg, cfg.audio).eval(), scratch_cfg, cfg.audio),
        Variant(MEL_STATS, None, scratch_cfg, cfg.audio),
    ]
    runs = family_runs(cfg)
    for family in ("scratch", "backbone"):
        for name, run in zip(FAMILY_VARIANTS[family], runs[family]):
            ckpt = Layout.of(cfg).checkpoint(run)
            if not ckpt.is_file():
                if verbose:
                    print(f"evaluate: no {ckpt}; {name} left out")
                continue
            model, ckpt_cfg, _ = model_from_checkpoint(ckpt)
            out.append(Variant(name, model, ckpt_cfg.model, ckpt_cfg.audio))
        if family == "scratch":
            backbone = runs["backbone"][0].split("_", 1)[1]
            out.append(Variant(BACKBONE_AS_IS, None, replace(cfg.model, audio_backbone=backbone), cfg.audio))
    return out


@torch.no_grad()
def backbone_as_is(inputs: dict[int, np.ndarray], backbone: str) -> tuple[list[int], np.ndarray]:
    """The untrained tagger's song vector: its penultimate features (200-d) averaged over patches."""
    from htcl.musicnn import Musicnn

    net = Musicnn(backbone, pretrained=True).eval()
    ids = sorted(inputs)
    vecs = [net.penultimate(torch.as_tensor(inputs[i]).T).mean(0).numpy() for i in ids]
    return ids, np.stack(vecs) if vecs else np.zeros((0, 200), np.float32)


def variant_embeddings(cfg: Config, verbose: bool = True, models: list[Variant] | None = None) -> dict:
    """Every variant's catalog embeddings (htcl.evaluation.Embeddings), by table name.
    models: variant_models(cfg), when the caller has them loaded already."""
    from htcl.evaluation import MEL_STATS, Embeddings, mel_statistics

    variants: dict = {}
    for v in models if models is not None else variant_models(cfg, verbose):
        try:
            inputs = audio_inputs(cfg, v.model_cfg, v.audio_cfg)
        except FileNotFoundError as e:
            if verbose:
                print(f"evaluate: {v.name} left out ({e})")
            continue
        ids = sorted(inputs)
        if v.name == MEL_STATS:
            variants[v.name] = mel_statistics(inputs)
        elif v.model is None:
            variants[v.name] = Embeddings(*backbone_as_is(inputs, v.model_cfg.audio_backbone))
        else:
            variants[v.name] = Embeddings(ids, embed_mels(v.model, [inputs[i] for i in ids]))
    return variants


def real_audio_inputs(cfg: Config, manifest: pd.DataFrame, waves: list[np.ndarray], model_cfg) -> list[np.ndarray]:
    """The audio encoder inputs of real recordings: log-Mel for the paper family; for a backbone,
    its patch features, cached in the layout's real_audio_features (keyed by the files' hashes)."""
    from htcl.delta import new_or_changed, recorded_hashes
    from htcl.towers import (
        INPUT_HASH,
        BackboneFeatures,
        audio_file_hash,
        audio_tower_spec,
        read_features,
        tower_name,
        write_features,
        write_tower_spec,
    )

    if model_cfg.audio_backbone == "none":
        from htcl.audio import LogMel

        logmel = LogMel(cfg.audio.sample_rate, cfg.audio.n_mels, cfg.audio.win_ms, cfg.audio.hop_ms)
        with torch.no_grad():
            return [logmel(torch.as_tensor(w))[0].numpy() for w in waves]
    spec = audio_tower_spec(model_cfg, cfg.audio)
    directory = Layout.of(cfg).real_audio_features(tower_name(spec))
    hashes = [audio_file_hash(p) for p in manifest["path"]]
    inputs = pd.DataFrame({S.SONG_ID: np.arange(len(waves)), INPUT_HASH: hashes})
    todo = new_or_changed(inputs, recorded_hashes(directory))
    if len(todo):
        from htcl.towers import feature_row

        tower = BackboneFeatures(model_cfg, cfg.audio)
        rows = [
            feature_row(i, hashes[i], tower.waveform_features(waves[i]))
            for i in tqdm(todo[S.SONG_ID].tolist(), desc=f"real audio {spec['tower']}", unit="song")
        ]
        write_features(rows, directory)
        write_tower_spec(directory, spec)
    cached = read_features(directory, dict(enumerate(hashes)))
    return [cached[i] for i in range(len(waves))]


def real_audio_results(cfg: Config, verbose: bool = True, models: list[Variant] | None = None) -> dict | None:
    """Genre accuracy of every variant on the labelled real recordings of eval.real_audio."""
    if not cfg.eval.real_audio:
        return None
    from htcl.evaluation import MEL_STATS, load_manifest_audio, mel_statistics, read_audio_manifest, real_audio_probe

    manifest = read_audio_manifest(cfg.eval.real_audio)
    waves, failed = load_manifest_audio(manifest, cfg.audio.sample_rate, cfg.audio.max_seconds)
    bad = {f["path"] for f in failed}
    manifest = manifest[~manifest["path"].isin(bad)].reset_index(drop=True)
    if verbose and failed:
        print(f"evaluate: {len(failed)} real recordings could not be decoded and are left out")
    groups = manifest["group"] if manifest["group"].notna().any() else None
    out: dict = {}
    inputs_by_family: dict[str, list[np.ndarray]] = {}
    for v in models if models is not None else variant_models(cfg, verbose=False):
        key = v.model_cfg.audio_backbone
        if key not in inputs_by_family:
            inputs_by_family[key] = real_audio_inputs(cfg, manifest, waves, v.model_cfg)
        inputs = dict(enumerate(inputs_by_family[key]))
        if v.name == MEL_STATS:
            x = mel_statistics(inputs).vectors
        elif v.model is None:
            x = backbone_as_is(inputs, key)[1]
        else:
            x = embed_mels(v.model, [inputs[i] for i in range(len(inputs))])
        out[v.name] = real_audio_probe(
            x, manifest["label"], groups, cfg.eval.probe_folds, cfg.eval.seed, return_correct=True
        )
        if verbose:
            print(f"evaluate: {v.name}: real-audio genre {out[v.name]['accuracy']:.3f}", flush=True)
    return out


@torch.no_grad()
def embed_song_texts(
    cfg: Config, model: HTCLModel, texts: dict[int, str], ids: list[int], batch_size: int = 64
) -> np.ndarray:
    """(n, D) text embeddings of songs `ids`: a locked text tower's cached features through the
    text projection when the cache holds them all (equal to the BERT's output), else the BERT."""
    model.eval()
    if not ids:
        return np.zeros((0, model.cfg.embed_dim), np.float32)
    if not model.cfg.text_trainable:
        from htcl.towers import StaleFeaturesError, read_features, text_hash, text_tower_spec, tower_dir

        try:
            feats = read_features(
                tower_dir(cfg.output_dir, text_tower_spec(model.cfg)), {i: text_hash(texts[i]) for i in ids}
            )
        except (FileNotFoundError, StaleFeaturesError):  # no cache, or a stale one: the BERT gives the same
            feats = {}
        if all(i in feats for i in ids):
            return model.encode_text_features(torch.as_tensor(np.stack([feats[i] for i in ids]))).float().numpy()
    tokenizer = SongTokenizer(model.cfg)
    out = [
        model.encode_text(**tokenizer([texts[i] for i in ids[k : k + batch_size]])).float().numpy()
        for k in range(0, len(ids), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


def retrieval_results(
    cfg: Config, verbose: bool = True, models: list[Variant] | None = None
) -> tuple[dict[str, dict], dict] | None:
    """Zero-shot audio<->text retrieval (htcl.evaluation.zero_shot_retrieval) of every variant with
    a text tower (the random-init encoder and the trained checkpoints) among the songs of the
    held-out artists (`heldout_song_ids`, which no training stage saw). Returns (variant name ->
    figures, {"artists", "songs", "share", "seed"}), or None when no artist is held out."""
    from htcl.evaluation import zero_shot_retrieval

    catalog = read_catalog(catalog_path(cfg))
    held = heldout_song_ids(cfg, catalog)
    if not held:
        return None
    texts = song_texts(catalog)
    out: dict[str, dict] = {}
    for v in models if models is not None else variant_models(cfg, verbose=False):
        if v.model is None:
            continue
        try:
            inputs = audio_inputs(cfg, v.model_cfg, v.audio_cfg)
        except FileNotFoundError:
            continue
        ids = sorted(held & set(inputs) & set(texts))
        audio = embed_mels(v.model, [inputs[i] for i in ids])
        out[v.name] = zero_shot_retrieval(audio, embed_song_texts(cfg, v.model, texts, ids))
        if verbose:
            r = out[v.name]
            print(
                f"evaluate: {v.name}: zero-shot retrieval on {r['n']} held-out songs, A->T R@1 "
                f"{r['audio_to_text']['r@1']:.3f} R@10 {r['audio_to_text']['r@10']:.3f}, T->A R@1 "
                f"{r['text_to_audio']['r@1']:.3f} R@10 {r['text_to_audio']['r@10']:.3f}",
                flush=True,
            )
    artists = catalog.loc[catalog[S.SONG_ID].isin(held), S.ARTIST].fillna("").astype(str).nunique()
    return out, {
        "artists": int(artists),
        "songs": len(held),
        "share": cfg.eval.retrieval_holdout_artists,
        "seed": cfg.eval.seed,
    }


def run_evaluate(
    cfg: Config,
    ranker_frame: pd.DataFrame | None = None,
    out_dir: str | Path | None = None,
    external: dict[str, str] | None = None,
) -> dict:
    """The comparison table of every variant on the held-out period; writes results.json/.md and
    plots to <output_dir>/evaluation/. ranker_frame None = the in-process point-in-time stats
    (htcl.features.point_in_time_stats); the Ray/Feast job passes Feast's backfill instead.
    external: row name -> an embedding table (`htcl evaluate --embeddings NAME=PATH`, read by
    htcl.evaluation.read_external_embeddings over the catalog), scored as rows of their own after
    htcl's variants; its coverage goes to results["coverage"]. A name may not be a built-in one."""
    from htcl.evaluation import BUILTIN_VARIANTS, compare_variants, read_external_embeddings, write_report
    from htcl.features import point_in_time_stats

    catalog = read_catalog(catalog_path(cfg))
    interactions = pd.read_parquet(Path(cfg.data.root) / "interactions.parquet")
    cut = split_time(interactions[S.EVENT_TIMESTAMP], cfg.eval.holdout_fraction)
    taken = sorted(set(external or {}) & set(BUILTIN_VARIANTS))
    if taken:
        raise ValueError(f"--embeddings: {taken} name(s) of htcl's own variants; choose other names")
    outside, coverage = {}, {}
    for name, table in (external or {}).items():  # read first: a bad file fails before the long part
        outside[name], coverage[name] = read_external_embeddings(table, catalog[S.SONG_ID])
        print(
            f"evaluate: {name}: {coverage[name]['covered']} of {coverage[name]['catalog_songs']} catalog songs "
            f"have a vector in {table}",
            flush=True,
        )
    if ranker_frame is None:
        genre = dict(zip(catalog[S.SONG_ID], catalog[S.GENRE].fillna(""))) if S.GENRE in catalog else None
        ranker_frame = point_in_time_stats(interactions, genre)
    models = variant_models(cfg)  # every checkpoint loaded once, for all three uses below
    variants = {**variant_embeddings(cfg, models=models), **outside}
    results = compare_variants(
        variants,
        catalog,
        interactions,
        ranker_frame,
        cut,
        cfg.eval.hit_rate_ks,
        cfg.eval.probe_folds,
        cfg.eval.seed,
        real_audio=real_audio_results(cfg, models=models),
        coverage=coverage,
    )
    out_dir = Path(out_dir or Layout.of(cfg).evaluation)
    metric_files = [Layout.of(cfg).run(d) / "metrics.jsonl" for runs in family_runs(cfg).values() for d in runs]
    retrieval, held = retrieval_results(cfg, models=models) or ({}, None)
    for name, r in retrieval.items():
        if name in results["variants"]:
            results["variants"][name]["retrieval"] = r
    results["retrieval_holdout"] = held
    paths = write_report(results, out_dir, metric_files)
    if retrieval:  # the second table, after the main one (htcl.evaluation.retrieval_markdown)
        from htcl.evaluation import retrieval_markdown

        with paths["markdown"].open("a") as f:
            f.write("\n" + retrieval_markdown(retrieval, held["artists"]))
    save_config(cfg, out_dir / "config.yaml")
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results
