"""The local pipeline end to end on a tiny synthetic catalog: preprocess -> pretrain -> finetune -> embed."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL, write_tiny_bert, write_tiny_world

from htcl.cli import main


@pytest.fixture
def tiny_world(tmp_path):
    return write_tiny_world(tmp_path / "world", bad_file=True)


def overrides(tmp_path, world):
    return TINY_MODEL + [
        f"output_dir={tmp_path / 'out'}",
        f"data.root={world}",
        "audio.max_seconds=3",
        "pretrain.batch_size=4",
        "pretrain.max_steps=3",
        "pretrain.log_every=1",
        "pretrain.checkpoint_every=2",
        "finetune.batch_size=4",
        "finetune.max_steps=2",
        "finetune.log_every=1",
    ]


@pytest.mark.slow
def test_local_pipeline_end_to_end(tmp_path, tiny_world, capsys):
    ov = overrides(tmp_path, tiny_world)
    out = tmp_path / "out"
    assert main(["preprocess", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    mels = pq.read_table(out / "mels").to_pandas()
    quarantine = pq.read_table(out / "quarantine").to_pandas()
    assert sorted(mels.song_id) == list(range(1, 13))
    assert set(mels.n_frames) == {1 + 48000 // 1536}
    assert quarantine.song_id.tolist() == [13]
    assert quarantine.error_type.iloc[0] == "not_audio" and "13.wav" in quarantine.message.iloc[0]

    # Rerun is idempotent: nothing new is processed or written.
    capsys.readouterr()
    assert main(["preprocess", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["processed"] == 0 and rerun["quarantined"] == 0 and rerun["skipped_already_done"] == 13
    assert len(list((out / "mels").glob("*.parquet"))) == 1

    assert main(["pretrain", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    assert main(["finetune", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    assert main(["finetune", "--local", "--config", "configs/demo.yaml", "--variant", "cf", *ov]) == 0
    for run in ("pretrain", "finetune", "finetune_cf"):
        assert (out / run / "model.pt").is_file() and (out / run / "config.yaml").is_file()
        assert (out / run / "training_curves.png").stat().st_size > 10_000
    steps = [json.loads(line)["step"] for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    assert main(["embed", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    emb_files = list((out / "embeddings").glob("*/part-*.parquet"))
    assert len(emb_files) == 1
    emb = pq.read_table(emb_files[0]).to_pandas()
    assert sorted(emb.song_id) == list(range(1, 13))
    vectors = np.stack(emb.embedding.to_numpy())
    assert vectors.shape == (12, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert emb.model_version.nunique() == 1 and emb.model_version.iloc[0].startswith("finetune-2-")
    index = json.loads((out / "index" / emb.model_version.iloc[0] / "index.json").read_text())
    assert index["count"] == 12 and index["model_version"] == emb.model_version.iloc[0]

    # the comparison table: every variant, in-process point-in-time stats (no Feast)
    assert main(["evaluate", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert list(results["variants"]) == [
        "random-init encoder",
        "mel statistics",
        "stage 1 (CLAP-style)",
        "HTCL",
        "HTCL_w_CF",
        "no embedding (stats only)",
    ]
    assert results["heldout_favor_pairs"] > 0 and 0 <= results["variants"]["HTCL"]["matching"]["hit_rate@10"] <= 1
    # every impression of the tiny log is a click: no CTR ranker can train, and the report says so
    assert "both classes" in results["variants"]["HTCL"]["ranking"]["error"]
    assert (out / "evaluation" / "results.md").read_text().count("|") > 50
    # zero-shot retrieval on the held-out artist's songs (1 of the 3 artists: 4 songs), every text tower
    for name in ("random-init encoder", "stage 1 (CLAP-style)", "HTCL", "HTCL_w_CF"):
        r = results["variants"][name]["retrieval"]
        assert r["n"] == 4 and 0 <= r["audio_to_text"]["r@1"] <= 1 and 1 <= r["text_to_audio"]["median_rank"] <= 4
    assert "retrieval" not in results["variants"]["mel statistics"]
    assert results["retrieval_holdout"] == {"artists": 1, "songs": 5, "share": 0.2, "seed": 0}  # song 13: no mel
    assert (
        "Zero-shot retrieval on held-out artists (1 artist, 4 songs)" in (out / "evaluation" / "results.md").read_text()
    )


def test_bad_config_override_is_a_clear_error(capsys):
    assert main(["pretrain", "--local", "--config", "configs/demo.yaml", "pretrain.batchsize=3"]) == 2
    assert "pretrain.batchsize" in capsys.readouterr().err


def test_heldout_artists_are_deterministic_and_stable():
    from htcl.pipeline import heldout_artists

    artists = [f"artist {i}" for i in range(20)]
    held = heldout_artists(artists * 3, 0.2, seed=0)  # songs repeat artists: a set of whole artists
    assert len(held) == 4 and held == heldout_artists(list(reversed(artists)), 0.2, seed=0)
    assert heldout_artists(artists, 0.2, seed=1) != held
    assert heldout_artists(artists, 0.0, seed=0) == set() and heldout_artists(["one"], 0.5, seed=0) == set()
    assert len(heldout_artists(artists[:3], 0.2, seed=0)) == 1 and len(heldout_artists(artists[:2], 0.9, 0)) == 1
    grown = heldout_artists(artists + ["artist 20"], 0.2, seed=0)  # a new artist enters or not
    assert len(grown & held) >= 3


@pytest.mark.slow
def test_training_leaves_the_heldout_artists_out_and_validates_on_them(tmp_path):
    """Stage 1 trains on the other artists' songs and scores the held-out ones every log step;
    stage 2 drops every pair touching them; metrics.jsonl carries val_* beside the training figures."""
    from htcl.config import config_from_dict
    from htcl.pipeline import heldout_song_ids, run_preprocess, run_train, training_rows
    from htcl.training import read_jsonl

    world = write_tiny_world(tmp_path / "world")
    bert = write_tiny_bert(tmp_path / "bert")
    cfg = config_from_dict(
        {},
        overrides(tmp_path, world)
        + [f"model.text_model={bert}", "pretrain.save_best=true", "pretrain.checkpoint_every=0"],
    )
    run_preprocess(cfg)
    held = heldout_song_ids(cfg)
    assert held == heldout_song_ids(cfg) and len(held) == 4  # 1 of 3 artists, 4 songs each
    artists = {sid % 3 for sid in held}
    assert len(artists) == 1  # whole artists ("artist {i % 3}")
    rows = training_rows(cfg, "pretrain")
    assert set(rows.trigger.tolist()) == set(range(1, 13)) - held and set(rows.validation.trigger.tolist()) == held
    for variant in ("favor", "cf"):
        pairs = training_rows(
            config_from_dict({}, overrides(tmp_path, world) + [f"finetune.variant={variant}"]), "finetune"
        )
        train_songs = set(pairs.trigger.tolist()) | set(pairs.rec.tolist())
        val_songs = set(pairs.validation.trigger.tolist()) | set(pairs.validation.rec.tolist())
        assert not train_songs & held and len(pairs) >= 4 and val_songs & held

    ckpt = run_train(cfg, "pretrain")
    log = read_jsonl(ckpt.parent / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert np.isfinite(r["val_loss"]) and 0 <= r["val_top1_at"] <= 1 and r["val_loss"] == r["val_loss_at"]
    assert (ckpt.parent / "best.pt").is_file()
    import torch

    best = torch.load(ckpt.parent / "best.pt", map_location="cpu", weights_only=False)
    assert best["step"] == min(log, key=lambda r: r["val_loss"])["step"]

    ft = run_train(cfg, "finetune", ckpt)
    log = read_jsonl(ft.parent / "metrics.jsonl")
    assert {"val_loss", "val_loss_aa", "val_loss_af", "val_loss_at", "val_top1_aa", "val_top1_at"} <= set(log[-1])
