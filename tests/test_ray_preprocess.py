"""Ray Data jobs on one local Ray instance (shared by this module): preprocess with a corpus of bad
files, idempotent reruns and --force, and embed against the local run_embed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import TINY_MODEL, write_tiny_bert

from htcl import schema as S
from htcl.config import config_from_dict
from htcl.mels import MelExtractor, read_mels
from htcl.pipeline import done_song_ids

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

SR = 16000
MAX_SECONDS = 10  # TINY_MODEL's audio.max_seconds
FRAMES_3S = 1 + 3 * SR // 1536  # 32
FRAMES_MAX = 1 + MAX_SECONDS * SR // 1536  # 105: a long song is cropped, not quarantined


@pytest.fixture(scope="module")
def ray_local():
    import os

    from ray_jobs.common import init_ray

    address = os.environ.pop("RAY_ADDRESS", None)  # always this module's own local instance
    started = init_ray(num_cpus=2, quiet=True)
    yield
    if started:
        ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


def tone(seconds: float, sr: int = SR, freq: float = 440.0, stereo: bool = False) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.stack([wave, 0.5 * wave], 1).astype(np.float32) if stereo else wave.astype(np.float32)


def truncated(dir_, name, fmt):
    good = dir_ / f"whole_{name}"
    sf.write(good, tone(4.0, 44100, stereo=True), 44100, format=fmt)
    data = good.read_bytes()
    (dir_ / name).write_bytes(data[: len(data) // 3])
    good.unlink()
    return dir_ / name


def wav_claiming_rate(path, claimed_rate: int):
    """A good 16 kHz PCM WAV whose header is then edited to claim another sample rate."""
    import struct

    sf.write(path, tone(3.0), SR, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    fmt = data.find(b"fmt ")
    data[fmt + 12 : fmt + 16] = struct.pack("<I", claimed_rate)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good files (incl. wrong extensions and a 10-minute song) and one of each kind of bad file.
    Returns (catalog path, {song_id: None for good | expected error_type for bad})."""
    d = tmp_path_factory.mktemp("corpus")
    files: dict[str, str | None] = {}
    for i in range(4):
        sf.write(d / f"good{i}.flac", tone(3.0, freq=220.0 * (i + 1)), SR)
        files[f"good{i}.flac"] = None
    sf.write(d / "stereo44k.flac", tone(3.0, 44100, stereo=True), 44100)
    files["stereo44k.flac"] = None
    sf.write(d / "flac_named.mp3", tone(3.0, 22050), 22050, format="FLAC")  # container decides
    files["flac_named.mp3"] = None
    sf.write(d / "wav_named.flac", tone(3.0), SR, format="WAV")
    files["wav_named.flac"] = None
    sf.write(d / "ten_minutes.flac", tone(600.0, 8000), 8000)  # cropped to max_seconds
    files["ten_minutes.flac"] = None

    (d / "empty.wav").write_bytes(b"")
    files["empty.wav"] = "empty"
    files[truncated(d, "truncated.mp3", "MP3").name] = "truncated"
    files[truncated(d, "truncated.flac", "FLAC").name] = "truncated"
    (d / "random.wav").write_bytes(np.random.default_rng(0).bytes(20000))
    files["random.wav"] = "not_audio"
    sf.write(d / "silence.flac", np.zeros(3 * SR, np.float32), SR)
    files["silence.flac"] = "silent"
    sf.write(d / "one_second.flac", tone(1.0), SR)
    files["one_second.flac"] = "too_short"
    files["missing.flac"] = "missing"  # never written
    t = np.arange(3 * SR) / SR  # float WAVs that decode, yet whose log-Mel would be inf/NaN (issue 13)
    sf.write(d / "huge.wav", (1e20 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, subtype="FLOAT")
    files["huge.wav"] = "invalid"
    sf.write(d / "constant.wav", np.full(3 * SR, 1e38, np.float32), SR, subtype="FLOAT")
    files["constant.wav"] = "invalid"
    files[wav_claiming_rate(d / "lying_rate.wav", 2**31 - 1).name] = "bad_sample_rate"

    rows = [
        {"song_id": 100 + k, "audio_path": str(d / name), "title": name, "artist": "a", "lyrics": "", "tags": ""}
        for k, name in enumerate(files)
    ]
    catalog = d / "catalog.parquet"
    pd.DataFrame(rows).to_parquet(catalog)
    expected = {r["song_id"]: files[r["title"]] for r in rows}
    return catalog, expected


def job_args(out, catalog, *extra):
    return ["--config", "configs/demo.yaml", *TINY_MODEL, f"output_dir={out}", "--catalog", str(catalog), *extra]


def run_job(capsys, argv):
    from ray_jobs.preprocess import main

    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") : out.rindex("}") + 1])


def test_bad_files_are_quarantined_with_reasons_and_good_files_processed(ray_local, corpus, tmp_path, capsys):
    catalog, expected = corpus
    out = tmp_path / "out"
    summary = run_job(capsys, job_args(out, catalog))

    good = sorted(k for k, v in expected.items() if v is None)
    bad = {k: v for k, v in expected.items() if v is not None}
    assert summary["processed"] == len(good) and summary["quarantined"] == len(bad)
    assert summary["songs_per_s"] > 0

    # Written with the contract's schemas, readable by the local pipeline's readers.
    for f in (out / "mels").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(S.MELS_SCHEMA)
    for f in (out / "quarantine").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(S.QUARANTINE_SCHEMA)
    mels = read_mels(out / "mels", 128)
    assert sorted(mels) == good
    names = {r["song_id"]: r["title"] for r in pd.read_parquet(catalog).to_dict("records")}
    for sid in good:
        want = FRAMES_MAX if names[sid] == "ten_minutes.flac" else FRAMES_3S
        assert mels[sid].shape == (128, want), names[sid]
        assert np.isfinite(mels[sid]).all()

    # Exactly one quarantine row per bad file, with its reason and the path in the message.
    q = pq.read_table(sorted((out / "quarantine").glob("*.parquet"))).to_pandas()
    assert sorted(q.song_id) == sorted(bad)
    for r in q.to_dict("records"):
        assert r["error_type"] == bad[r["song_id"]], r
        assert names[r["song_id"]] in r["message"] and r["audio_path"].endswith(names[r["song_id"]])
        assert r["stage"] in ("decode", "validate")
    assert done_song_ids(out / "mels", out / "quarantine") == set(expected)

    # Same bytes as the plain single-process extractor.
    cfg = config_from_dict({}, TINY_MODEL)
    path = pd.read_parquet(catalog).set_index("song_id").audio_path[good[0]]
    row, _ = MelExtractor(cfg.audio).extract_one(good[0], path)
    shard = pq.read_table(sorted((out / "mels").glob("*.parquet"))).to_pandas().set_index("song_id")
    assert shard.mel[good[0]] == row["mel"]
    assert (out / "mels" / "_config.yaml").is_file()


def test_rerun_skips_done_songs_and_force_recomputes(ray_local, corpus, tmp_path, capsys):
    catalog, expected = corpus
    full = pd.read_parquet(catalog)
    good_id = next(k for k, v in expected.items() if v is None)
    bad_id = next(k for k, v in expected.items() if v == "not_audio")
    small = tmp_path / "catalog.parquet"
    full[full.song_id.isin([good_id, bad_id])].to_parquet(small)
    out = tmp_path / "out"

    first = run_job(capsys, job_args(out, small))
    assert (first["processed"], first["quarantined"]) == (1, 1)
    shards = sorted(p.name for p in out.glob("*/*.parquet"))

    again = run_job(capsys, job_args(out, small))
    assert (again["processed"], again["quarantined"], again["skipped_already_done"]) == (0, 0, 2)
    assert sorted(p.name for p in out.glob("*/*.parquet")) == shards  # nothing new written

    new_id = next(k for k, v in expected.items() if v is None and k != good_id)
    full[full.song_id.isin([good_id, bad_id, new_id])].to_parquet(small)
    more = run_job(capsys, job_args(out, small))
    assert (more["processed"], more["quarantined"], more["skipped_already_done"]) == (1, 0, 2)

    forced = run_job(capsys, job_args(out, small, "--force"))
    assert (forced["processed"], forced["quarantined"], forced["skipped_already_done"]) == (2, 1, 0)
    mel_ids = pq.read_table(sorted((out / "mels").glob("*.parquet"))).column("song_id").to_pylist()
    assert sorted(mel_ids) == sorted([good_id, new_id])  # replaced, not duplicated
    assert pq.read_table(sorted((out / "quarantine").glob("*.parquet"))).column("song_id").to_pylist() == [bad_id]


def test_jobs_take_the_cli_arguments_and_reject_bad_config(capsys):
    """What `htcl preprocess` / `htcl embed` pass on: --config, overrides (anywhere), --catalog,
    --force, --checkpoint. A bad override is exit status 2 naming the key, before Ray starts."""
    from ray_jobs import embed, preprocess
    from ray_jobs.common import parse_args

    args, cfg = parse_args(
        preprocess.build_parser(),
        [
            "--config",
            "configs/demo.yaml",
            "model.n_layers=2",
            "--catalog",
            "c.parquet",
            "audio.max_seconds=3",
            "--force",
        ],
    )
    assert (args.catalog, args.force, cfg.model.n_layers, cfg.audio.max_seconds) == ("c.parquet", True, 2, 3.0)
    args, cfg = parse_args(
        embed.build_parser(), ["--config", "configs/demo.yaml", "--checkpoint", "m.pt", "model.embed_dim=16"]
    )
    assert (args.checkpoint, cfg.model.embed_dim) == ("m.pt", 16)
    for mod in (preprocess, embed):
        with pytest.raises(SystemExit) as info:
            mod.main(["--config", "configs/demo.yaml", "model.nlayers=2"])
        assert info.value.code == 2
        assert "model.nlayers" in capsys.readouterr().err


def test_embed_blocks_give_every_actor_work_in_whole_batches_without_a_task_a_batch():
    """Embed's input blocks (an actor task and an output file each): a few per actor, whole batches,
    capped in bytes. One block a batch made 157 tasks and files at 10k songs and 15,600 at 1M."""
    from ray_jobs.embed import BLOCKS_PER_ACTOR, MAX_BLOCK_BYTES, rows_per_block

    # 10k songs of 6 KB features on 2 actors: 8 blocks, not 157
    rows = rows_per_block(10_000, 2, 64, 6024)
    assert rows % 64 == 0 and -(-10_000 // rows) == 2 * BLOCKS_PER_ACTOR
    # 1M songs: blocks capped at MAX_BLOCK_BYTES, about 90 of them
    rows = rows_per_block(1_000_000, 2, 64, 6024)
    assert rows % 64 == 0 and rows * 6024 <= MAX_BLOCK_BYTES < (rows + 64) * 6024
    # paper-size mels (320 KB a song): whole batches under the cap
    assert rows_per_block(1_000_000, 8, 64, 320_000) == 192
    # a tiny catalog on 4 actors, one song a batch: one song a block, so each actor gets some
    assert rows_per_block(12, 4, 1, 1000) == 1
    # never less than one batch, however big a row
    assert rows_per_block(10, 2, 8, 10 * MAX_BLOCK_BYTES) == 8


def test_unexpected_exception_becomes_a_quarantine_row(tmp_path):
    """No Ray needed: the UDF itself never lets one song's exception fail the batch."""
    from ray_jobs.preprocess import RESULT_SCHEMA, MelUDF, mel_rows, quarantine_rows

    path = tmp_path / "ok.flac"
    sf.write(path, tone(3.0), SR)
    udf = MelUDF(config_from_dict({}, TINY_MODEL).audio)
    real = udf.extractor.extract_one

    def flaky(song_id, p, input_hash=None):
        if song_id == 2:
            raise MemoryError("simulated")
        return real(song_id, p, input_hash)

    udf.extractor.extract_one = flaky
    table = udf({"song_id": np.array([1, 2]), "audio_path": np.array([str(path), str(path)])})
    assert table.schema.equals(RESULT_SCHEMA)
    assert mel_rows(table).column("song_id").to_pylist() == [1]
    q = quarantine_rows(table).to_pylist()
    assert [(r["song_id"], r["error_type"]) for r in q] == [(2, "unexpected")]
    assert "MemoryError: simulated" in q[0]["message"]


def test_embed_job_equals_local_run_embed(ray_local, corpus, tmp_path, capsys):
    import torch

    from htcl.model import HTCLModel
    from htcl.pipeline import model_version, run_embed, run_preprocess
    from htcl.training import TrainState, build_optimizer, save_checkpoint
    from ray_jobs.embed import main as embed_main

    catalog, expected = corpus
    out = tmp_path / "out"
    # A tiny random text encoder: only the audio tower embeds, and MiniLM's 88 MB would be saved
    # in the checkpoint and loaded by the local run and by every actor of both job runs.
    ov = [*TINY_MODEL, f"output_dir={out}", f"model.text_model={write_tiny_bert(tmp_path / 'bert')}"]
    cfg = config_from_dict({}, ov)
    # Mels of three songs of different lengths (10 min cropped vs 3 s), the long one second, so
    # the first batch of 2 is padded. Written by the local preprocess (the same bytes as the Ray
    # job's, test_bad_files_...): this test is about embed, and one Ray Data job less.
    full = pd.read_parquet(catalog).set_index("song_id")
    short = [k for k, v in expected.items() if v is None and full.title[k] != "ten_minutes.flac"][:2]
    keep = [short[0], int(full.index[full.title == "ten_minutes.flac"][0]), short[1]]
    small = tmp_path / "catalog.parquet"
    full.loc[keep].reset_index().to_parquet(small)
    assert run_preprocess(cfg, small)["processed"] == 3

    torch.manual_seed(0)
    model = HTCLModel(cfg.model, cfg.audio)
    ckpt = save_checkpoint(
        out / "s1" / "model.pt", TrainState(model, build_optimizer(model, cfg.pretrain)), cfg, "pretrain"
    )
    local = pd.read_parquet(run_embed(cfg, ckpt)).sort_values("song_id")
    (local_file,) = (out / "embeddings" / model_version(ckpt)).glob("part-*.parquet")
    local_file.rename(tmp_path / "local.parquet")

    capsys.readouterr()
    assert embed_main(["--config", "configs/demo.yaml", *ov, "--checkpoint", str(ckpt), "--batch-size", "2"]) == 0
    files = sorted((out / "embeddings" / model_version(ckpt)).glob("*.parquet"))
    assert files and all(f.name.startswith("part-") for f in files)
    assert (files[0].parent / "_config.yaml").is_file()
    ours = pq.read_table(files).to_pandas().sort_values("song_id")
    assert (
        pq.read_schema(files[0]).remove_metadata().equals(pq.read_schema(tmp_path / "local.parquet").remove_metadata())
    )
    assert ours.song_id.tolist() == sorted(keep) == local.song_id.tolist()
    np.testing.assert_allclose(np.stack(ours.embedding), np.stack(local.embedding), rtol=0, atol=1e-5)
    assert set(ours.model_version) == {model_version(ckpt)}

    # A rerun with nothing new embeds nothing and leaves the shards and the index as they were.
    index_meta = out / "index" / model_version(ckpt) / "index.json"
    stamp = (index_meta.stat().st_mtime_ns, [f.stat().st_mtime_ns for f in files])
    capsys.readouterr()
    assert embed_main(["--config", "configs/demo.yaml", *ov, "--checkpoint", str(ckpt)]) == 0
    again = pq.read_table(sorted((out / "embeddings" / model_version(ckpt)).glob("*.parquet"))).to_pandas()
    assert sorted(again.song_id) == sorted(keep)
    assert (index_meta.stat().st_mtime_ns, [f.stat().st_mtime_ns for f in files]) == stamp


def test_features_job_equals_local_features_and_embeds_a_backbone_model(ray_local, tmp_path, capsys):
    """The Ray Data features job caches what the local run caches (both towers; a bad file
    quarantined, the rest kept); a rerun computes nothing; the embed job reads that cache for a
    backbone checkpoint and equals the local run_embed."""
    import torch
    from conftest import write_tiny_world

    from htcl.model import HTCLModel
    from htcl.pipeline import run_embed, run_features
    from htcl.towers import audio_tower_spec, read_features, text_tower_spec, tower_dir
    from htcl.training import TrainState, build_optimizer, save_checkpoint
    from ray_jobs.embed import main as embed_main
    from ray_jobs.features import main as features_main

    world = write_tiny_world(tmp_path / "world", bad_file=True)
    bert = write_tiny_bert(tmp_path / "bert")
    ov = [
        *TINY_MODEL,
        f"data.root={world}",
        f"model.text_model={bert}",
        "model.audio_backbone=musicnn_msd",
        "model.text_trainable=false",
        "audio.max_seconds=4",
    ]
    local_cfg = config_from_dict({}, [*ov, f"output_dir={tmp_path / 'local'}"])
    run_features(local_cfg)
    out = tmp_path / "ray"
    cfg = config_from_dict({}, [*ov, f"output_dir={out}"])
    capsys.readouterr()
    assert features_main(["--config", "configs/demo.yaml", *ov, f"output_dir={out}"]) == 0
    summary = json.loads((lambda s: s[s.index("{") : s.rindex("}") + 1])(capsys.readouterr().out))
    assert summary["audio"]["computed"] == 12 and summary["audio"]["quarantined"] == 1
    assert summary["text"]["computed"] == 13
    q = pq.read_table(out / "quarantine").to_pandas()
    assert q.song_id.tolist() == [13] and q.stage.tolist() == ["features"]
    for spec in (audio_tower_spec(cfg.model, cfg.audio), text_tower_spec(cfg.model)):
        ours, local = read_features(tower_dir(out, spec)), read_features(tower_dir(local_cfg.output_dir, spec))
        assert sorted(ours) == sorted(local)
        for k in ours:
            np.testing.assert_allclose(ours[k], local[k], rtol=0, atol=1e-5)
    assert features_main(["--config", "configs/demo.yaml", *ov, f"output_dir={out}"]) == 0
    again = json.loads((lambda s: s[s.index("{") : s.rindex("}") + 1])(capsys.readouterr().out))
    assert again["audio"]["computed"] == 0 and again["text"]["computed"] == 0 and again["audio"]["kept"] == 12
    assert again["audio"]["skipped_quarantined"] == 1 and len(list((out / "quarantine").glob("*.parquet"))) == 1

    torch.manual_seed(0)
    model = HTCLModel(cfg.model, cfg.audio)
    ckpt = save_checkpoint(
        out / "s1" / "model.pt", TrainState(model, build_optimizer(model, cfg.pretrain)), cfg, "pretrain"
    )
    local = pd.read_parquet(run_embed(cfg, ckpt)).sort_values("song_id")
    assert embed_main(["--config", "configs/demo.yaml", *ov, f"output_dir={out}", "--checkpoint", str(ckpt)]) == 0
    files = sorted(p for p in (out / "embeddings").glob("*/*.parquet") if p.name != "part-0.parquet")
    ours = pq.read_table(files).to_pandas().sort_values("song_id")
    assert ours.song_id.tolist() == local.song_id.tolist() == list(range(1, 13))
    np.testing.assert_allclose(np.stack(ours.embedding), np.stack(local.embedding), rtol=0, atol=1e-5)


# --- the catalog: checked before any work, paths relative to its own folder, no good row lost ------


def tone_catalog(folder, n: int = 3, audio_dir: str = "audio") -> list[dict]:
    """n good three-second songs under folder/audio_dir; catalog rows with paths relative to folder."""
    (folder / audio_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, n + 1):
        sf.write(folder / audio_dir / f"{i}.flac", tone(3.0, freq=220.0 * i), SR)
        rows.append(
            {
                "song_id": i,
                "audio_path": f"{audio_dir}/{i}.flac",
                "title": f"t{i}",
                "artist": "a",
                "lyrics": "",
                "tags": "",
            }
        )
    return rows


def bad_catalogs(folder) -> dict:
    """Catalogs that break the contract -> what the refusal must name (besides the file)."""
    rows = pd.DataFrame(tone_catalog(folder))
    cases = {}
    text_id = rows.astype({"song_id": object})
    text_id.loc[1, "song_id"] = "x7"
    text_id.to_csv(folder / "text_id.csv", index=False)
    cases["text_id.csv"] = ["'song_id'", "data row 2", "'x7'"]
    rows.assign(song_id=[1.0, 2.5, 3.0]).to_parquet(folder / "fraction.parquet")
    cases["fraction.parquet"] = ["'song_id'", "data row 2", "2.5"]
    rows.assign(song_id=[1.0, None, 3.0]).to_parquet(folder / "null_id.parquet")
    cases["null_id.parquet"] = ["'song_id'", "data row 2", "nan"]
    rows.assign(song_id=[1, 2**63, 3]).astype({"song_id": np.uint64}).to_parquet(folder / "too_big.parquet")
    cases["too_big.parquet"] = ["'song_id'", "data row 2", str(2**63)]
    pd.concat([rows, rows.iloc[:1]]).to_csv(folder / "duplicate.csv", index=False)
    cases["duplicate.csv"] = ["song_id 1", "data rows 1, 4"]
    rows.drop(columns="tags").to_parquet(folder / "no_tags.parquet")
    cases["no_tags.parquet"] = ["missing column", "'tags'"]
    return cases


def test_catalog_types_are_checked_up_front_naming_row_and_column(tmp_path):
    from htcl.mels import read_catalog

    for name, named in bad_catalogs(tmp_path).items():
        with pytest.raises(ValueError) as info:  # htcl.mels.CatalogError
            read_catalog(tmp_path / name)
        for part in [name, *named]:
            assert part in str(info.value), f"{name}: {info.value}"
    # ids as text or whole floats (what CSV readers make of a column with a blank) are integers all the same
    pd.DataFrame(tone_catalog(tmp_path)).assign(song_id=["1", " 2", "+3"]).to_parquet(tmp_path / "text_ok.parquet")
    ids = read_catalog(tmp_path / "text_ok.parquet")["song_id"]
    assert ids.dtype == np.int64 and ids.tolist() == [1, 2, 3]


def test_a_refused_catalog_stops_the_job_before_ray_with_exit_1(tmp_path, capsys, monkeypatch):
    """A bad catalog is exit status 1 and a message naming it, before Ray starts (so no Ray
    teardown on the error path) and before any song is decoded."""
    from ray_jobs import preprocess

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a catalog that is refused")

    monkeypatch.setattr(preprocess, "init_ray", no_ray)
    for name, named in bad_catalogs(tmp_path).items():
        capsys.readouterr()
        assert preprocess.main(job_args(tmp_path / "out", tmp_path / name)) == 1, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and name in err and named[0] in err, err
    assert not (tmp_path / "out" / "mels").exists()


def test_local_commands_and_the_features_job_refuse_a_bad_catalog_with_exit_1(tmp_path, capsys, monkeypatch):
    """`htcl preprocess --local`, `htcl features --local` and the features job: the same one-line
    refusal and exit 1 as the preprocess job, no traceback, no Ray, nothing written."""
    from htcl.cli import main as htcl
    from ray_jobs import features

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a catalog that is refused")

    monkeypatch.setattr(features, "init_ray", no_ray)
    runs = {
        "htcl preprocess --local": lambda argv: htcl(["preprocess", "--local", *argv]),
        "htcl features --local": lambda argv: htcl(["features", "--local", *argv]),
        "features job": features.main,
    }
    for name, named in bad_catalogs(tmp_path).items():
        for what, run in runs.items():
            capsys.readouterr()
            assert run(job_args(tmp_path / "out", tmp_path / name)) == 1, (what, name)
            err = capsys.readouterr().err
            assert "Traceback" not in err and name in err and named[0] in err, (what, err)
    capsys.readouterr()
    assert htcl(["preprocess", "--local", *job_args(tmp_path / "out", tmp_path / "absent.parquet")]) == 1
    assert "absent.parquet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_a_refused_catalog_exits_1_in_a_real_process(tmp_path):
    """The process itself (what `htcl preprocess` and `ray job submit` run) ends with status 1
    and one line on stderr, not a traceback or an abort (rc 134) from tearing down a Ray instance."""
    import subprocess
    import sys

    from conftest import REPO

    bad_catalogs(tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.preprocess", *job_args(tmp_path / "out", tmp_path / "duplicate.csv")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "duplicate.csv" in done.stderr and "song_id 1" in done.stderr
    assert "Started a local Ray instance" not in done.stderr


def test_local_preprocess_refuses_a_bad_id_before_decoding_and_keeps_good_rows_past_a_crash(tmp_path, monkeypatch):
    """--local used to decode every song, then die at int("x7") and write nothing. Now the bad id is
    refused up front, and a song whose extraction raises anything is quarantined, not fatal."""
    import htcl.mels
    from htcl.pipeline import run_preprocess

    cfg = config_from_dict({}, [*TINY_MODEL, f"output_dir={tmp_path / 'out'}"])
    bad_catalogs(tmp_path)
    decoded = []
    real_load = htcl.mels.load_audio
    monkeypatch.setattr(htcl.mels, "load_audio", lambda path, *a: decoded.append(path) or real_load(path, *a))
    with pytest.raises(ValueError, match="data row 2"):  # htcl.mels.CatalogError, naming the row
        run_preprocess(cfg, tmp_path / "text_id.csv")
    assert decoded == []

    def flaky(path, *a):
        if path.endswith("2.flac"):
            raise MemoryError("simulated")
        return real_load(path, *a)

    monkeypatch.setattr(htcl.mels, "load_audio", flaky)
    catalog = tmp_path / "good.parquet"
    pd.DataFrame(tone_catalog(tmp_path)).to_parquet(catalog)
    summary = run_preprocess(cfg, catalog)
    assert (summary["processed"], summary["quarantined"]) == (2, 1)
    assert sorted(read_mels(tmp_path / "out" / "mels")) == [1, 3]
    q = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    assert [(r["song_id"], r["error_type"]) for r in q] == [(2, "unexpected")] and "MemoryError" in q[0]["message"]


def test_relative_audio_paths_resolve_against_the_catalog_folder(tmp_path, monkeypatch):
    """A catalog folder moved (or mounted elsewhere, or read from another working directory) still
    works: relative audio_path values are relative to the catalog file, and input hashes survive."""
    from htcl.mels import read_catalog
    from htcl.pipeline import run_preprocess
    from htcl.towers import tower_inputs

    team = tmp_path / "team"
    rows = tone_catalog(team)
    uri, absolute = "s3://bucket/song.flac", str(team / "audio" / "1.flac")
    extra = [
        {**rows[0], "song_id": 10, "audio_path": uri},
        {**rows[0], "song_id": 11, "audio_path": absolute},
        {**rows[0], "song_id": 12, "audio_path": None},
    ]
    pd.DataFrame(rows + extra).to_parquet(team / "mixed.parquet")
    pd.DataFrame(rows + extra[1:]).to_parquet(team / "catalog.parquet")  # no URI: nothing reaches for a network
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config_from_dict({}, [*TINY_MODEL, f"output_dir={tmp_path / 'out'}"])
    before = tower_inputs(cfg, read_catalog(team / "catalog.parquet"), "audio").set_index("song_id")

    moved = tmp_path / "mounted" / "catalogs"
    moved.parent.mkdir()
    team.rename(moved)
    df = read_catalog(Path("..") / "mounted" / "catalogs" / "mixed.parquet").set_index("song_id")
    assert df.audio_path[1] == str(moved / "audio" / "1.flac")
    assert (df.audio_path[10], df.audio_path[11], df.audio_path[12]) == (uri, absolute, "")
    after = tower_inputs(cfg, df.reset_index(), "audio").set_index("song_id")
    assert (after.input_hash[[1, 2, 3]] == before.input_hash[[1, 2, 3]]).all()  # the feature cache stays valid
    assert "unreadable" not in set(after.input_hash[[1, 2, 3]])

    summary = run_preprocess(cfg, moved / "catalog.parquet")
    assert summary["processed"] == 3  # the relative ones; the others are quarantined, each for itself
    q = pq.read_table(tmp_path / "out" / "quarantine").to_pandas().set_index("song_id")
    assert q.error_type.to_dict() == {11: "missing", 12: "missing"}


def test_jobs_on_a_grown_catalog_compute_only_what_is_new(ray_local, tmp_path, capsys):
    """The preprocess and embed jobs on a catalog with 2 new songs and 1 changed file: 3 songs
    computed (each counted on the node that did it), a changed song's old rows gone, the index
    holding the new songs; a rerun with nothing new computes and writes nothing."""
    import torch
    from conftest import write_tiny_world
    from test_incremental import grow, mtimes

    from htcl.model import HTCLModel
    from htcl.pipeline import model_version
    from htcl.retrieval import AnnIndex
    from htcl.training import TrainState, build_optimizer, save_checkpoint
    from ray_jobs.embed import main as embed_main
    from ray_jobs.preprocess import main as preprocess_main

    world = write_tiny_world(tmp_path / "world")
    out = tmp_path / "out"
    ov = [
        "--config",
        "configs/demo.yaml",
        *TINY_MODEL,
        f"output_dir={out}",
        f"data.root={world}",
        "audio.max_seconds=3",
        f"model.text_model={write_tiny_bert(tmp_path / 'bert')}",
    ]
    cfg = config_from_dict({}, ov[2:])
    torch.manual_seed(0)
    model = HTCLModel(cfg.model, cfg.audio)
    ckpt = save_checkpoint(
        out / "s1" / "model.pt", TrainState(model, build_optimizer(model, cfg.pretrain)), cfg, "pretrain"
    )
    embed = [*ov, "--checkpoint", str(ckpt)]
    node = ray.get_runtime_context().get_node_id()

    def summary(main, argv) -> dict:
        capsys.readouterr()
        assert main(argv) == 0
        text = capsys.readouterr().out
        return json.loads(text[text.index("\n{") + 1 if not text.startswith("{") else 0 : text.rindex("}") + 1])

    first = summary(preprocess_main, ov)
    assert first["processed"] == 12 and first["nodes"] == {node: 12}
    assert summary(embed_main, embed)["nodes"] == {node: 12}
    grow(world)
    second = summary(preprocess_main, ov)
    assert (second["new"], second["changed"], second["processed"], second["replaced_stale_rows"]) == (2, 1, 3, 1)
    assert second["nodes"] == {node: 3}
    grown = summary(embed_main, embed)
    assert (grown["new"], grown["changed"], grown["embedded"], grown["index_rebuilt"]) == (2, 1, 3, True)
    assert sorted(pq.read_table(out / "embeddings" / model_version(ckpt)).column(S.SONG_ID).to_pylist()) == list(
        range(1, 15)
    )
    assert sorted(AnnIndex.load(out / "index" / model_version(ckpt)).song_ids.tolist()) == list(range(1, 15))

    files = (mtimes(out / "mels"), mtimes(out / "embeddings" / model_version(ckpt)))
    assert summary(preprocess_main, ov)["processed"] == 0
    again = summary(embed_main, embed)
    assert (again["embedded"], again["index_rebuilt"], again["nodes"]) == (0, False, {})
    assert (mtimes(out / "mels"), mtimes(out / "embeddings" / model_version(ckpt))) == files
