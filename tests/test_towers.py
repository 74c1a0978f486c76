"""Locked towers and their cached features (htcl.towers): the cache is keyed by tower and input,
training reads it, and embedding later runs the same towers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from htcl import pipeline
from htcl.config import config_from_dict
from htcl.text import song_texts
from htcl.towers import (
    StaleFeaturesError,
    audio_input,
    audio_tower_spec,
    read_features,
    text_hash,
    text_tower_spec,
    tower_dir,
    tower_hash,
)
from tests.conftest import TINY_MODEL, write_tiny_bert, write_tiny_world

TRAIN = [
    "pretrain.batch_size=4",
    "pretrain.max_steps=2",
    "pretrain.warmup_steps=1",
    "pretrain.log_every=1",
    "finetune.batch_size=4",
    "finetune.max_steps=2",
    "finetune.warmup_steps=1",
    "finetune.log_every=1",
    "eval.holdout_fraction=0.25",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


def make_cfg(tmp_path, tiny_bert, *extra):
    return config_from_dict(
        {},
        [
            *TINY_MODEL,
            *TRAIN,
            f"output_dir={tmp_path / 'out'}",
            f"data.root={tmp_path / 'world'}",
            f"model.text_model={tiny_bert}",
            "audio.max_seconds=4",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory, tiny_bert):
    """A tiny world with both towers locked: features computed, stage 1 trained."""
    tmp = tmp_path_factory.mktemp("backbone")
    write_tiny_world(tmp / "world")
    cfg = make_cfg(tmp, tiny_bert, "model.audio_backbone=musicnn_msd", "model.text_trainable=false")
    summary = pipeline.run_features(cfg)
    ckpt = pipeline.run_train(cfg, "pretrain")
    return tmp, cfg, summary, ckpt


def test_features_are_cached_per_tower_and_reused(backbone_run):
    _, cfg, summary, _ = backbone_run
    assert summary["audio"]["computed"] == 12 and summary["text"]["computed"] == 12
    feats = read_features(tower_dir(cfg.output_dir, audio_tower_spec(cfg.model, cfg.audio)))
    from htcl.musicnn import POOLED_DIM

    assert len(feats) == 12 and all(f.shape == (POOLED_DIM, 1) for f in feats.values())  # 3 s = one patch
    text = read_features(tower_dir(cfg.output_dir, text_tower_spec(cfg.model)))
    assert all(f.shape == (32,) for f in text.values())  # the tiny BERT's pooled width
    again = pipeline.run_features(cfg)
    assert again["audio"]["computed"] == 0 and again["audio"]["kept"] == 12
    assert again["text"]["computed"] == 0


def test_changed_inputs_are_redone_and_the_rest_kept(tmp_path, tiny_bert):
    write_tiny_world(tmp_path / "world")
    cfg = make_cfg(tmp_path, tiny_bert, "model.audio_backbone=musicnn_msd", "model.text_trainable=false")
    pipeline.run_features(cfg)
    audio_dir = tower_dir(cfg.output_dir, audio_tower_spec(cfg.model, cfg.audio))
    before = read_features(audio_dir)
    # song 3's audio and song 5's title change
    sr = 16000
    t = np.arange(3 * sr) / sr
    sf.write(
        tmp_path / "world" / "audio" / "3.flac", (0.3 * np.sign(np.sin(2 * np.pi * 220 * t))).astype(np.float32), sr
    )
    cat = pd.read_parquet(tmp_path / "world" / "catalog.parquet")
    cat.loc[cat.song_id == 5, "title"] = "a new title"
    cat.to_parquet(tmp_path / "world" / "catalog.parquet")
    summary = pipeline.run_features(cfg)
    assert (summary["audio"]["computed"], summary["audio"]["kept"], summary["audio"]["replaced_stale"]) == (1, 11, 1)
    assert (summary["text"]["computed"], summary["text"]["kept"], summary["text"]["replaced_stale"]) == (1, 11, 1)
    after = read_features(audio_dir)
    assert len(after) == 12
    assert not np.allclose(after[3], before[3])
    assert all(np.array_equal(after[i], before[i]) for i in before if i != 3)


def test_stale_text_features_are_refused_not_reused(tmp_path, tiny_bert):
    write_tiny_world(tmp_path / "world")
    cfg = make_cfg(tmp_path, tiny_bert, "model.text_trainable=false")
    pipeline.run_preprocess(cfg)
    pipeline.run_features(cfg)
    cat = pd.read_parquet(tmp_path / "world" / "catalog.parquet")
    cat.loc[cat.song_id == 2, "title"] = "renamed"
    cat.to_parquet(tmp_path / "world" / "catalog.parquet")
    with pytest.raises(StaleFeaturesError, match="song 2"):
        pipeline.training_rows(cfg, "pretrain")


def test_another_tower_gets_another_cache(tmp_path, tiny_bert):
    cfg = make_cfg(tmp_path, tiny_bert, "model.audio_backbone=musicnn_msd")
    other_len = config_from_dict(
        {}, [f"output_dir={cfg.output_dir}", "model.audio_backbone=musicnn_msd", "audio.max_seconds=30"]
    )
    other_net = config_from_dict(
        {}, [f"output_dir={cfg.output_dir}", "model.audio_backbone=musicnn_mtt", "audio.max_seconds=4"]
    )
    dirs = {tower_dir(c.output_dir, audio_tower_spec(c.model, c.audio)) for c in (cfg, other_len, other_net)}
    assert len(dirs) == 3
    longer_text = config_from_dict({}, [f"model.text_model={tiny_bert}", "model.text_max_length=64"])
    assert tower_dir("o", text_tower_spec(cfg.model)) != tower_dir("o", text_tower_spec(longer_text.model))


def test_training_reads_features_and_records_locked_towers(backbone_run):
    _, cfg, _, ckpt = backbone_run
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert payload["locked_towers"] == {"text": True, "audio_backbone": True}
    # the locked BERT is named by its tower hash, not stored; loading checks the hash
    assert not any(k.startswith("text.bert.") for k in payload["model"]) and "text.proj.weight" in payload["model"]
    assert payload["locked_text_tower"] == tower_hash(text_tower_spec(cfg.model))
    steps = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) for r in steps)
    rows = pipeline.training_rows(cfg, "pretrain")
    batch = pipeline.make_batch(rows, np.arange(4), tokenizer=None)
    assert "input_ids" not in batch and batch["text_features"].shape == (4, 32)
    assert batch["mel"].shape[:2] == (4, 1506)


def test_locked_parameters_do_not_train(backbone_run, tiny_bert, tmp_path):
    from htcl.model import HTCLModel
    from htcl.training import build_optimizer

    _, cfg, _, _ = backbone_run
    model = HTCLModel(cfg.model, cfg.audio)
    trained = {id(p) for g in build_optimizer(model, cfg.pretrain).param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in model.text.bert.parameters())
    assert not any(id(p) in trained for p in model.audio.backbone.parameters())
    assert all(id(p) in trained for p in model.text.proj.parameters())
    top = make_cfg(
        tmp_path,
        tiny_bert,
        "model.audio_backbone=musicnn_msd",
        "model.backbone_train_top=true",
        "pretrain.backbone_lr=2e-5",
    )
    model = HTCLModel(top.model, top.audio)
    groups = {g["name"]: g for g in build_optimizer(model, top.pretrain).param_groups}
    assert groups["backbone"]["lr"] == 2e-5
    assert {id(p) for p in groups["backbone"]["params"]} | {id(p) for p in groups["backbone_no_decay"]["params"]} == {
        id(p) for p in model.audio.backbone.backend.parameters()
    }
    model.train()
    assert not model.audio.backbone.training and model.text.bert.training  # the tagger stays locked
    locked = HTCLModel(cfg.model, cfg.audio).train()
    assert not locked.audio.backbone.training and not locked.text.bert.training and locked.audio.transformer.training


def test_embedding_later_runs_the_same_towers(backbone_run):
    """Batch embed reads the cache; a raw waveform (what /v1/embed gets) goes through the
    checkpoint's own tagger: both equal the training-time features to 1e-5."""
    from htcl.audio import load_audio
    from htcl.training import model_from_checkpoint

    tmp, cfg, _, ckpt = backbone_run
    model, ckpt_cfg, _ = model_from_checkpoint(ckpt)
    cached = read_features(tower_dir(cfg.output_dir, audio_tower_spec(cfg.model, cfg.audio)))
    for sid in (1, 7):
        wave = load_audio(tmp / "world" / "audio" / f"{sid}.flac", 16000, cfg.audio.max_seconds)
        live = audio_input(model, ckpt_cfg.audio, wave)
        np.testing.assert_allclose(live, cached[sid], atol=1e-5)
    path = pipeline.run_embed(cfg, ckpt)
    emb = pd.read_parquet(path).set_index("song_id")["embedding"]
    live = pipeline.embed_mels(
        model,
        [
            audio_input(
                model, ckpt_cfg.audio, load_audio(tmp / "world" / "audio" / "7.flac", 16000, cfg.audio.max_seconds)
            )
        ],
    )[0]
    np.testing.assert_allclose(np.asarray(emb.loc[7]), live, atol=1e-5)


def test_text_features_equal_the_towers_output(backbone_run):
    from htcl.model import HTCLModel
    from htcl.text import SongTokenizer

    _, cfg, _, _ = backbone_run
    catalog = pd.read_parquet(cfg.data.root + "/catalog.parquet")
    texts = song_texts(catalog)
    cached = read_features(
        tower_dir(cfg.output_dir, text_tower_spec(cfg.model)), {i: text_hash(t) for i, t in texts.items()}
    )
    model = HTCLModel(cfg.model, cfg.audio).train()  # a locked BERT stays in eval mode in training
    tok = SongTokenizer(cfg.model)([texts[4]])
    with torch.no_grad():
        live = model.text.pooled(tok["input_ids"], tok["attention_mask"])[0].numpy()
    np.testing.assert_allclose(live, cached[4], atol=1e-5)


def test_a_locked_text_checkpoint_refuses_another_bert(backbone_run, tmp_path):
    from htcl.training import model_from_checkpoint

    _, _, _, ckpt = backbone_run
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    other = write_tiny_bert(tmp_path / "other_bert", dropout=0.1)  # same shapes, another config
    payload["config"]["model"]["text_model"] = str(other)
    torch.save(payload, tmp_path / "moved.pt")
    with pytest.raises(ValueError, match="locked text tower"):
        model_from_checkpoint(tmp_path / "moved.pt")
