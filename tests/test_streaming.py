"""The per-rank streaming reader (htcl.streaming) behind training's batches (issue 14, item 1).

A world of 48 songs with no audio: mels written as shards of one and of several row groups (a
song repeated in a later shard, whose row wins), and a backbone's cached features written with
htcl.towers.write_features. Against the batches of the same rows with every input in a dict
(what training read before the reader), the streamed batches must be equal tensor for tensor,
for 1, 2 and 4 ranks, from step 0 and from a resume step, in both stages and for both inputs.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import T0, TINY_MODEL

from htcl import pipeline
from htcl import schema as S
from htcl.config import config_from_dict
from htcl.layout import Layout
from htcl.mels import mel_to_bytes, read_catalog, read_mels, write_table
from htcl.pipeline import TrainingSplit
from htcl.streaming import ShardReader, read_ahead
from htcl.text import SongTokenizer, song_texts
from htcl.towers import (
    audio_tower_spec,
    feature_row,
    read_features,
    text_hash,
    text_tower_spec,
    tower_dir,
    write_features,
)

N_SONGS, N_ARTISTS, BATCH = 48, 6, 8
REPEATED = 5  # written twice; the later shard's row is the one read
KINDS = {
    "mels": ("model.audio_backbone=none",),
    "features": ("model.audio_backbone=musicnn_msd",),
    # the demo's family: the text tower locked too, its cached features streamed like the audio's
    "locked_text": ("model.audio_backbone=musicnn_msd", "model.text_trainable=false"),
}
TEXT_WIDTH = 16


def write_world(root, n_songs=N_SONGS):
    """catalog (no audio: training reads mels/features only), 400 impressions over 40 days."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            S.SONG_ID: np.arange(n_songs),
            S.AUDIO_PATH: "",
            S.TITLE: [f"song {i}" for i in range(n_songs)],
            S.ARTIST: [f"artist {i % N_ARTISTS}" for i in range(n_songs)],
            S.LYRICS: "",
            S.TAGS: "",
            S.GENRE: "",
            S.LANGUAGE: "",
            S.UPDATED_AT: T0,
        }
    ).to_parquet(root / "catalog.parquet")
    rng = np.random.default_rng(1)
    pd.DataFrame(
        {
            S.USER_ID: rng.integers(1, 9, 400),
            S.TRIGGER_SONG_ID: rng.integers(0, n_songs, 400),
            S.REC_SONG_ID: rng.integers(0, n_songs, 400),
            S.CLICKED: True,
            S.FAVORED: rng.random(400) < 0.6,
            S.EVENT_TIMESTAMP: [T0 + pd.Timedelta(hours=2.4 * m) for m in range(400)],
        }
    ).to_parquet(root / "interactions.parquet")
    return root


def write_inputs(cfg, inputs: dict[int, np.ndarray]):
    """The audio inputs as the pipeline stores them: mels/ in shards of 10 rows (one row group
    each, as htcl.mels.write_table writes) and a last shard in row groups of 4; features through
    write_features, one shard per 10 songs. REPEATED also goes to the last shard, changed."""
    ids = sorted(inputs)
    chunks = [ids[i : i + 10] for i in range(0, 30, 10)] + [ids[30:] + [REPEATED]]
    later = {**inputs, REPEATED: inputs[REPEATED] + 1.0}
    if cfg.model.audio_backbone == "none":
        mel_row = lambda i, x: {S.SONG_ID: i, S.N_FRAMES: x.shape[1], S.MEL: mel_to_bytes(x)}  # noqa: E731
        for k, chunk in enumerate(chunks[:-1]):
            write_table(
                [mel_row(i, inputs[i]) for i in chunk],
                S.MELS_SCHEMA,
                Layout.of(cfg).mels / f"part-{k:05d}.parquet",
            )
        last = pa.Table.from_pylist([mel_row(i, later[i]) for i in chunks[-1]], schema=S.MELS_SCHEMA)
        pq.write_table(last, Layout.of(cfg).mels / "part-00009.parquet", row_group_size=4)
    else:
        directory = tower_dir(cfg.output_dir, audio_tower_spec(cfg.model, cfg.audio))
        for k, chunk in enumerate(chunks):
            src = later if k == len(chunks) - 1 else inputs
            write_features([feature_row(i, "input-hash", src[i]) for i in chunk], directory)
    if not cfg.model.text_trainable:  # each song's text feature, under its text's hash, in 2 shards
        catalog = read_catalog(pipeline.catalog_path(cfg))
        texts = song_texts(catalog)
        rng = np.random.default_rng(7)
        rows = [feature_row(i, text_hash(texts[i]), rng.normal(0, 1, TEXT_WIDTH).astype(np.float32)) for i in ids]
        directory = tower_dir(cfg.output_dir, text_tower_spec(cfg.model))
        write_features(rows[:20], directory)
        write_features(rows[20:], directory)


def random_inputs(kind: str, seed: int = 0) -> dict[int, np.ndarray]:
    """log-Mels (128, F) exact in float16 (as stored), or features (6, P): lengths vary, so
    batches pad and their masks matter."""
    rng = np.random.default_rng(seed)
    if kind == "mels":
        return {
            i: rng.normal(-6, 2, (128, int(rng.integers(20, 40)))).astype(np.float16).astype(np.float32)
            for i in range(N_SONGS)
        }
    return {i: rng.normal(0, 1, (6, int(rng.integers(1, 5)))).astype(np.float32) for i in range(N_SONGS)}


def make_cfg(tmp, kind, *extra):
    return config_from_dict(
        {},
        [
            *TINY_MODEL,
            *KINDS[kind],
            f"data.root={tmp / 'world'}",
            f"output_dir={tmp / 'out'}",
            f"pretrain.batch_size={BATCH}",
            f"finetune.batch_size={BATCH}",
            "pretrain.reader_cache_rows=12",
            "finetune.reader_cache_rows=12",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    write_world(tmp / "world")
    cfgs = {kind: make_cfg(tmp, kind) for kind in KINDS}
    for kind, cfg in cfgs.items():
        write_inputs(cfg, random_inputs(kind))
    return cfgs


@pytest.fixture(scope="module")
def tokenizer(world):
    return SongTokenizer(world["mels"].model)


def in_memory(rows: pipeline.TrainingRows, cfg) -> pipeline.TrainingRows:
    """The same rows with every audio input (and text feature) loaded into a dict up front."""
    inputs = {"mels": pipeline.audio_inputs(cfg)}
    if rows.texts is not None:
        inputs["texts"] = song_texts(read_catalog(pipeline.catalog_path(cfg)))
    if rows.text_features is not None:
        inputs["text_features"] = read_features(tower_dir(cfg.output_dir, text_tower_spec(cfg.model)))
    return dataclasses.replace(rows, **inputs, validation=dataclasses.replace(rows.validation, **inputs))


def assert_same_batch(got: dict, want: dict, where: str):
    assert got.keys() == want.keys(), where
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{where}: {k} differs"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_streamed_batches_equal_the_in_memory_ones_for_any_world_and_resume(world, tokenizer, kind, stage):
    cfg = world[kind]
    rows = pipeline.training_rows(cfg, stage, verbose=False)
    assert isinstance(rows.mels, ShardReader) and len(rows.mels) == N_SONGS
    reference = in_memory(rows, cfg)
    assert isinstance(reference.mels, dict)
    if kind == "locked_text":
        assert isinstance(rows.text_features, ShardReader) and rows.texts is None
        assert isinstance(reference.text_features, dict) and len(reference.text_features) == N_SONGS
    else:  # the texts read from the catalog's row groups
        assert isinstance(rows.texts, ShardReader) and rows.text_features is None
        assert isinstance(reference.texts, dict) and len(reference.texts) == N_SONGS
    np.testing.assert_array_equal(rows.mels[REPEATED], reference.mels[REPEATED])  # the later shard's row
    steps_per_epoch = len(rows) // BATCH
    assert steps_per_epoch >= 3, "the world must give several batches an epoch"
    for world_size in (1, 2, 4):
        for start in (0, steps_per_epoch + 2):  # a resume past an epoch boundary
            for rank in range(world_size):
                streamed = pipeline.batch_stream(
                    rows, tokenizer, BATCH, seed=3, start_step=start, rank=rank, world=world_size
                )
                loaded = pipeline.batch_stream(
                    reference, tokenizer, BATCH, seed=3, start_step=start, rank=rank, world=world_size
                )
                for step in range(start, start + steps_per_epoch + 1):  # across the next epoch boundary
                    assert_same_batch(next(streamed), next(loaded), f"world {world_size} rank {rank} step {step}")
                streamed.close()
    val = pipeline.validation_batches(rows, tokenizer, BATCH, 64)
    assert val and len(val) == len(pipeline.validation_batches(reference, tokenizer, BATCH, 64))
    for got, want in zip(val, pipeline.validation_batches(reference, tokenizer, BATCH, 64)):
        assert_same_batch(got, want, "validation")


def test_each_rank_reads_its_slice_through_a_bounded_cache(world, tokenizer):
    """48 songs, a cache of 12 rows (a quarter of the catalog): the cache never holds more than 12
    rows, row groups are read again once evicted, and a rank of 4 decodes only its 2 rows a step."""
    cfg = world["mels"]
    rows = pipeline.training_rows(cfg, "pretrain", verbose=False)
    reader = rows.mels
    assert reader.cache_rows == 12 and reader.cached_rows == 0  # the index alone: no input read yet
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in reader.files)
    steps = 4 * (len(rows) // BATCH)
    stream = pipeline.batch_stream(rows, tokenizer, BATCH, seed=3, rank=1, world=4)
    for _ in range(steps):
        next(stream)
        assert reader.cached_rows <= 12
    stream.close()
    assert 0 < reader.peak_cached_rows <= 12
    assert reader.row_group_reads > groups  # evicted row groups were read again: the cache is bounded
    # read-ahead may have read up to READ_AHEAD_BATCHES + 1 slices past the last one taken
    assert steps * 2 <= reader.rows_decoded <= (steps + 4) * 2


def test_a_row_group_larger_than_the_cache_is_held_alone(world):
    cfg = world["mels"]
    reader = pipeline.audio_reader(cfg, cache_rows=3)  # the shards' row groups hold 10 and 4 rows
    for i in range(N_SONGS):
        reader[i]
        assert reader.cached_rows <= 10
    assert reader.peak_cached_rows == 10
    with pytest.raises(KeyError):
        reader[N_SONGS]
    assert N_SONGS - 1 in reader and N_SONGS not in reader and "x" not in reader


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_non_finite_row_is_refused_naming_the_song_up_front_and_when_read(tmp_path, tokenizer, kind):
    write_world(tmp_path / "world")
    cfg = make_cfg(tmp_path, kind)
    inputs = random_inputs(kind)
    held = pipeline.heldout_song_ids(cfg)
    bad = min(set(range(N_SONGS)) - held - {REPEATED})
    inputs[bad][0, 1] = np.inf
    inputs[bad + 1][1, 0] = np.nan
    write_inputs(cfg, inputs)
    for stage in ("pretrain", "finetune"):
        with pytest.raises(ValueError, match=rf"song_id {bad}\b.*(NaN|inf).*2 songs in all"):
            pipeline.training_rows(cfg, stage, verbose=False)
    # the up-front pass off: the batch that first holds the song refuses it, from the read-ahead thread
    rows = pipeline.training_rows(cfg, "pretrain", verbose=False, check_inputs=False)
    with pytest.raises(ValueError, match=r"song_id \d+\b.*(NaN|inf)"):
        for batch in pipeline.batch_stream(rows, tokenizer, BATCH, seed=0):  # one epoch reads every song
            pass
    with pytest.raises(ValueError, match=rf"song_id {bad}\b"):
        rows.mels.read([bad, bad + 2])


def test_read_ahead_keeps_order_raises_where_it_failed_and_stops():
    def read(i):
        if i == 5:
            raise RuntimeError("row 5")
        return {i: i * i}

    got = []
    with pytest.raises(RuntimeError, match="row 5"):
        for i, out in read_ahead(read, iter(range(10)), depth=2):
            got.append((i, out))
    assert got == [(i, {i: i * i}) for i in range(5)]
    assert [i for i, _ in read_ahead(lambda i: {}, range(3))] == [0, 1, 2]  # finite items end the stream
    endless = read_ahead(lambda i: {}, iter(int, 1))  # closing an endless stream stops its thread
    next(endless)
    assert "htcl-read-ahead" in [t.name for t in threading.enumerate()]
    endless.close()
    deadline = time.monotonic() + 5
    while "htcl-read-ahead" in [t.name for t in threading.enumerate()] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "htcl-read-ahead" not in [t.name for t in threading.enumerate()]


def test_closing_read_ahead_waits_for_the_read_in_progress():
    """A process must not exit while the thread is inside a read (pyarrow aborts the process):
    close() returns only once the thread has ended."""
    started = threading.Event()

    def slow_read(i):
        if i == 1:
            started.set()
            time.sleep(0.5)
        return {i: i}

    stream = read_ahead(slow_read, iter(range(100)), depth=1)
    next(stream)
    assert started.wait(5)
    stream.close()  # the thread is sleeping inside read(1)
    assert "htcl-read-ahead" not in [t.name for t in threading.enumerate()]


def test_read_mels_and_the_reader_agree(world):
    cfg = world["mels"]
    everything = read_mels(Layout.of(cfg).mels, cfg.audio.n_mels)
    reader = pipeline.audio_reader(cfg, cache_rows=100)
    assert sorted(reader) == sorted(everything)
    got = reader.read(list(everything))
    assert all(np.array_equal(got[i], everything[i]) for i in everything)


def test_the_ray_job_refuses_a_non_finite_row_before_any_worker_starts(tmp_path, monkeypatch):
    """Workers skip the up-front pass (ray_jobs.train_loop); fit() makes it once on the driver."""
    import ray_jobs.train_loop as train_loop

    write_world(tmp_path / "world")
    cfg = make_cfg(tmp_path, "mels")
    inputs = random_inputs("mels")
    inputs[7][3, 3] = np.nan
    write_inputs(cfg, inputs)
    started = []
    monkeypatch.setattr("ray.train.torch.TorchTrainer", lambda *a, **k: started.append(1))
    with pytest.raises(ValueError, match=r"song_id 7\b.*(NaN|inf)"):
        train_loop.fit(cfg, "pretrain")
    assert not started


def test_shards_are_written_in_small_row_groups(tmp_path):
    """A cache miss reads a whole row group: the writers behind mels/ and features/ (the local
    preprocess, the features step) cut shards into SHARD_ROW_GROUP_ROWS-row groups, so a catalog
    preprocessed in one shard is not one group that every worker holds whole."""
    from htcl.mels import SHARD_ROW_GROUP_ROWS

    inputs = random_inputs("mels")
    ids = sorted(inputs)[:40]
    mels = write_table(
        [{S.SONG_ID: i, S.N_FRAMES: inputs[i].shape[1], S.MEL: mel_to_bytes(inputs[i])} for i in ids],
        S.MELS_SCHEMA,
        tmp_path / "mels" / "part-0.parquet",
    )
    features = write_features([feature_row(i, "h", np.ones((6, 3), np.float32)) for i in ids], tmp_path / "features")
    for path in (mels, features):
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert sizes == [SHARD_ROW_GROUP_ROWS, len(ids) - SHARD_ROW_GROUP_ROWS], (path, sizes)


def test_catalog_chunks_read_as_read_catalog_and_refuse_what_it_refuses(tmp_path, monkeypatch):
    """Training reads the catalog a chunk at a time (mels.catalog_chunks): the same song ids and
    texts as read_catalog, from Parquet and CSV, and a repeated song_id refused with
    read_catalog's own error, whichever chunks the two rows fall in."""
    from htcl import mels as mels_module

    monkeypatch.setattr(mels_module, "CATALOG_CHUNK_ROWS", 7)
    root = write_world(tmp_path / "world")
    catalog = pd.read_parquet(root / "catalog.parquet")
    catalog.loc[3, S.TITLE] = None  # a missing text field reads as ""
    catalog.to_parquet(root / "catalog.parquet")
    catalog.to_csv(root / "catalog.csv", index=False)
    columns = [S.SONG_ID, S.ARTIST, S.TITLE, S.TAGS, S.LYRICS]
    for path in (root / "catalog.parquet", root / "catalog.csv"):
        chunks = list(mels_module.catalog_chunks(path, columns))
        assert len(chunks) == 7  # 48 rows in chunks of 7
        got = pd.concat(chunks, ignore_index=True)
        want = read_catalog(path)[columns]
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
        assert got[S.SONG_ID].dtype == np.int64 and got.loc[3, S.TITLE] == ""
    catalog.loc[40, S.SONG_ID] = 2  # a repeat in another chunk than its first
    catalog.to_parquet(root / "catalog.parquet")
    with pytest.raises(mels_module.CatalogError) as refused:
        list(mels_module.catalog_chunks(root / "catalog.parquet", columns))
    with pytest.raises(mels_module.CatalogError) as by_read_catalog:
        read_catalog(root / "catalog.parquet")
    assert str(refused.value) == str(by_read_catalog.value) and "data rows 3, 41" in str(refused.value)


@pytest.mark.parametrize("kind", ["mels", "locked_text"])
def test_training_rows_do_not_depend_on_how_the_catalog_is_chunked(world, kind, monkeypatch):
    from htcl import mels as mels_module

    cfg = world[kind]
    whole = {stage: pipeline.training_rows(cfg, stage, verbose=False) for stage in ("pretrain", "finetune")}
    monkeypatch.setattr(mels_module, "CATALOG_CHUNK_ROWS", 5)
    for stage, want in whole.items():
        got = pipeline.training_rows(cfg, stage, verbose=False)
        for rows, ref in ((got, want), (got.validation, want.validation)):
            np.testing.assert_array_equal(rows.trigger, ref.trigger)
            if ref.rec is not None:
                np.testing.assert_array_equal(rows.rec, ref.rec)
            assert (rows.texts is None) == (kind == "locked_text")
            assert rows.texts is None or dict(rows.texts) == dict(ref.texts)
    assert len(whole["pretrain"].validation) > 0  # the held-out artists' songs


def test_catalog_ids_by_artist_read_as_read_catalog_and_refuse_what_it_refuses(tmp_path, monkeypatch):
    """What a training worker reads of the catalog (mels.catalog_ids_by_artist): each song's id and
    whether its artist is chosen, from the artists as read_catalog gives them, through Arrow
    (Parquet, string artists) or the chunked DataFrame path (CSV, a numeric artist column), and
    read_catalog's refusals."""
    from htcl import mels as mels_module

    monkeypatch.setattr(mels_module, "CATALOG_CHUNK_ROWS", 7)
    root = write_world(tmp_path / "world")
    catalog = pd.read_parquet(root / "catalog.parquet")
    catalog.loc[[4, 30], S.ARTIST] = None  # missing artists read as ""
    variants = {"catalog.parquet": catalog, "catalog.csv": catalog}
    variants["numeric.parquet"] = catalog.assign(**{S.ARTIST: catalog[S.SONG_ID] % 5})
    for name, frame in variants.items():
        path = root / name
        frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path)
        want = read_catalog(path)
        seen = []

        def choose(names):
            seen.append(names)
            return {names[0], names[-1]}

        ids, chosen = mels_module.catalog_ids_by_artist(path, choose)
        assert seen == [sorted(set(want[S.ARTIST]))], name  # asked once, with every distinct artist
        np.testing.assert_array_equal(ids, want[S.SONG_ID].to_numpy())
        np.testing.assert_array_equal(chosen, want[S.ARTIST].isin({seen[0][0], seen[0][-1]}).to_numpy())
        assert chosen.any() and not chosen.all()
    ids, chosen = mels_module.catalog_ids_by_artist(root / "catalog.parquet", lambda names: {""})
    assert np.flatnonzero(chosen).tolist() == [4, 30]
    catalog.loc[40, S.SONG_ID] = 2
    catalog.to_parquet(root / "catalog.parquet")
    with pytest.raises(mels_module.CatalogError, match=r"song_id 2 appears more than once \(data rows 3, 41"):
        mels_module.catalog_ids_by_artist(root / "catalog.parquet", set)
    catalog[S.SONG_ID] = catalog[S.SONG_ID].astype("Int64")
    catalog.loc[40, S.SONG_ID] = None
    catalog.to_parquet(root / "catalog.parquet")
    with pytest.raises(mels_module.CatalogError, match=r"data row 41"):
        mels_module.catalog_ids_by_artist(root / "catalog.parquet", set)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_workers_rows_from_the_drivers_split_equal_its_own_without_the_catalog(world, tmp_path, stage, monkeypatch):
    """The Ray job's driver plans the rows once (TrainingRows.split, saved); a worker given the
    split reads neither the catalog nor the interaction log, and gets the same rows."""
    cfg = world["locked_text"]
    own = pipeline.training_rows(cfg, stage, verbose=False)
    path = own.split().save(tmp_path / "split.npz")

    def no_catalog(*args, **kwargs):
        raise AssertionError("a worker given a split read the catalog or the log")

    monkeypatch.setattr(pipeline, "catalog_keys", no_catalog)
    monkeypatch.setattr(pipeline.pd, "read_parquet", no_catalog)
    got = pipeline.training_rows(cfg, stage, verbose=False, check_inputs=False, split=TrainingSplit.load(path))
    for rows, ref in ((got, own), (got.validation, own.validation)):
        np.testing.assert_array_equal(rows.trigger, ref.trigger)
        assert (rows.rec is None) == (stage == "pretrain")
        if ref.rec is not None:
            np.testing.assert_array_equal(rows.rec, ref.rec)
    assert len(got) and len(got.validation)
