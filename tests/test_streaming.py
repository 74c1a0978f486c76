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
from htcl.audio import mel_to_bytes
from htcl.config import config_from_dict
from htcl.mels import read_mels, write_table
from htcl.streaming import ShardReader, read_ahead
from htcl.text import SongTokenizer
from htcl.towers import audio_tower_spec, feature_row, tower_dir, write_features

N_SONGS, N_ARTISTS, BATCH = 48, 6, 8
REPEATED = 5  # written twice; the later shard's row is the one read
KINDS = {"mels": "model.audio_backbone=none", "features": "model.audio_backbone=musicnn_msd"}


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
                pipeline.out_path(cfg, "mels", f"part-{k:05d}.parquet"),
            )
        last = pa.Table.from_pylist([mel_row(i, later[i]) for i in chunks[-1]], schema=S.MELS_SCHEMA)
        pq.write_table(last, pipeline.out_path(cfg, "mels", "part-00009.parquet"), row_group_size=4)
    else:
        directory = tower_dir(cfg.output_dir, audio_tower_spec(cfg.model, cfg.audio))
        for k, chunk in enumerate(chunks):
            src = later if k == len(chunks) - 1 else inputs
            write_features([feature_row(i, "input-hash", src[i]) for i in chunk], directory)


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
            KINDS[kind],
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
    """The same rows with every audio input loaded into a dict up front (as training_rows did)."""
    inputs = pipeline.audio_inputs(cfg)
    return dataclasses.replace(rows, mels=inputs, validation=dataclasses.replace(rows.validation, mels=inputs))


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
    rows = pipeline.training_rows(cfg, "pretrain", verbose=False, check_finite=False)
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


def test_read_mels_and_the_reader_agree(world):
    cfg = world["mels"]
    everything = read_mels(pipeline.out_path(cfg, "mels"), cfg.audio.n_mels)
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
