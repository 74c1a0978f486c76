"""A catalog that grows and changes, through the local preprocess and embed (the Ray jobs share
the planning: tests/test_ray_preprocess.py runs them): only new or changed songs are computed,
a changed song's old rows are dropped, the index gains the new songs, and a run with nothing new
writes nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import TINY_MODEL, write_tiny_bert, write_tiny_world

from htcl import schema as S
from htcl.config import config_from_dict
from htcl.delta import UNREADABLE, drop_stale_rows, new_or_changed, recorded_hashes

SR = 16000


def tone(freq: float, seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def grow(world, new_ids=(13, 14), changed_id=5) -> None:
    """Two new songs in the catalog, and song `changed_id`'s audio file rewritten with another tone."""
    catalog = pd.read_parquet(world / "catalog.parquet")
    rows = []
    for sid in new_ids:
        path = world / "audio" / f"{sid}.flac"
        sf.write(path, tone(90.0 * sid), SR)
        rows.append({**catalog.iloc[0].to_dict(), S.SONG_ID: sid, S.AUDIO_PATH: str(path), S.TITLE: f"new {sid}"})
    sf.write(world / "audio" / f"{changed_id}.flac", tone(1234.0), SR)
    pd.concat([catalog, pd.DataFrame(rows)], ignore_index=True).to_parquet(world / "catalog.parquet")


def mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_delta_helpers(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "t"
    folder.mkdir()
    pq.write_table(
        pa.table({S.SONG_ID: [1, 2, 3], S.INPUT_HASH: ["a", "b", "c"], "x": [10, 20, 30]}), folder / "p1.parquet"
    )
    pq.write_table(pa.table({S.SONG_ID: [4], "x": [40]}), folder / "old.parquet")  # before hashes were recorded
    assert recorded_hashes(folder) == {1: "a", 2: "b", 3: "c", 4: None}
    inputs = pd.DataFrame({S.SONG_ID: [1, 2, 4, 5], S.INPUT_HASH: ["a", "B", "d", "e"]})
    assert new_or_changed(inputs, recorded_hashes(folder))[S.SONG_ID].tolist() == [2, 4, 5]
    # song 3 is not among the inputs: its row stays; 2 and 4 changed: theirs go (old.parquet with them)
    assert drop_stale_rows(folder, dict(zip(inputs[S.SONG_ID], inputs[S.INPUT_HASH]))) == 2
    assert pq.read_table(folder / "p1.parquet").to_pydict() == {
        S.SONG_ID: [1, 3],
        S.INPUT_HASH: ["a", "c"],
        "x": [10, 30],
    }
    assert not (folder / "old.parquet").exists()


@pytest.mark.slow
def test_grown_catalog_preprocesses_and_embeds_only_what_is_new(tmp_path):
    import torch

    from htcl.model import HTCLModel
    from htcl.pipeline import model_version, run_embed, run_preprocess
    from htcl.retrieval import AnnIndex
    from htcl.training import TrainState, build_optimizer, save_checkpoint

    world = write_tiny_world(tmp_path / "world")
    out = tmp_path / "out"
    cfg = config_from_dict(
        {},
        [
            *TINY_MODEL,
            f"output_dir={out}",
            f"data.root={world}",
            "audio.max_seconds=3",
            f"model.text_model={write_tiny_bert(tmp_path / 'bert')}",
        ],
    )
    first = run_preprocess(cfg)
    assert (first["processed"], first["new"], first["changed"]) == (12, 12, 0)
    torch.manual_seed(0)
    model = HTCLModel(cfg.model, cfg.audio)
    ckpt = save_checkpoint(
        out / "s1" / "model.pt", TrainState(model, build_optimizer(model, cfg.pretrain)), cfg, "pretrain"
    )
    version = model_version(ckpt)
    emb_dir = run_embed(cfg, ckpt)
    before = pq.read_table(emb_dir).to_pandas().set_index(S.SONG_ID)
    assert len(before) == 12 and AnnIndex.load(out / "index" / version).song_ids.size == 12
    mels_before = pq.read_table(out / "mels").to_pandas().set_index(S.SONG_ID)

    grow(world)
    second = run_preprocess(cfg)
    assert (second["new"], second["changed"], second["unchanged_skipped"]) == (2, 1, 12 - 1)
    assert (second["processed"], second["replaced_stale_rows"]) == (3, 1)
    mels = pq.read_table(out / "mels").to_pandas()
    assert sorted(mels[S.SONG_ID]) == list(range(1, 15))  # each song once
    mels = mels.set_index(S.SONG_ID)
    assert mels.mel[5] != mels_before.mel[5] and mels.mel[1] == mels_before.mel[1]
    assert mels.input_hash[5] != mels_before.input_hash[5]

    mel_files = mtimes(out / "mels")
    third = run_preprocess(cfg)
    assert (third["processed"], third["new"], third["changed"], third["replaced_stale_rows"]) == (0, 0, 0, 0)
    assert mtimes(out / "mels") == mel_files  # nothing written

    run_embed(cfg, ckpt)
    after = pq.read_table(emb_dir).to_pandas()
    assert sorted(after[S.SONG_ID]) == list(range(1, 15))
    after = after.set_index(S.SONG_ID)
    np.testing.assert_array_equal(np.stack(after.embedding[[1, 2, 12]]), np.stack(before.embedding[[1, 2, 12]]))
    assert not np.allclose(after.embedding[5], before.embedding[5])  # re-embedded from its new audio
    index = AnnIndex.load(out / "index" / version)
    assert sorted(index.song_ids.tolist()) == list(range(1, 15))  # the index gained the new songs

    files, index_stamp = mtimes(emb_dir), (out / "index" / version / "index.json").stat().st_mtime_ns
    run_embed(cfg, ckpt)
    assert mtimes(emb_dir) == files
    assert (out / "index" / version / "index.json").stat().st_mtime_ns == index_stamp  # not rebuilt


def test_a_missing_file_is_retried_once_it_appears(tmp_path):
    """A missing file is quarantined with the input hash `unreadable`; rerunning does not retry it
    until the file is there (its hash then differs), and then its quarantine row goes."""
    from htcl.pipeline import run_preprocess

    world = write_tiny_world(tmp_path / "world")
    catalog = pd.read_parquet(world / "catalog.parquet")
    missing = world / "audio" / "late.flac"
    row = {**catalog.iloc[0].to_dict(), S.SONG_ID: 99, S.AUDIO_PATH: str(missing)}
    pd.concat([catalog.iloc[:2], pd.DataFrame([row])], ignore_index=True).to_parquet(world / "catalog.parquet")
    cfg = config_from_dict(
        {}, [*TINY_MODEL, f"output_dir={tmp_path / 'out'}", f"data.root={world}", "audio.max_seconds=3"]
    )
    assert run_preprocess(cfg)["quarantined"] == 1
    q = pq.read_table(tmp_path / "out" / "quarantine").to_pandas()
    assert q[S.INPUT_HASH].tolist() == [UNREADABLE] and q[S.ERROR_TYPE].tolist() == ["missing"]
    assert run_preprocess(cfg)["processed"] + run_preprocess(cfg)["quarantined"] == 0
    sf.write(missing, tone(300.0), SR)
    again = run_preprocess(cfg)
    assert (again["processed"], again["changed"], again["replaced_stale_rows"]) == (1, 1, 1)
    assert not list((tmp_path / "out" / "quarantine").glob("*.parquet"))
