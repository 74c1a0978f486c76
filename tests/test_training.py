import math

import pytest
import torch
from conftest import TINY_MODEL

from htcl.config import config_from_dict
from htcl.model import HTCLModel
from htcl.text import SongTokenizer
from htcl.training import (
    JsonlLogger,
    TrainState,
    build_optimizer,
    lr_factor,
    model_from_checkpoint,
    read_jsonl,
    resume,
    save_checkpoint,
    seed_everything,
    train,
    validate,
)

FRAMES = 64
WORDS = "red blue green amber violet silver golden crimson ivory jade coral olive azure teal onyx ruby".split()


def pairs_batch(cfg, n=16, seed=0):
    """n distinct audio clips, each paired with its own caption."""
    g = torch.Generator().manual_seed(seed)
    tok = SongTokenizer(cfg.model)
    texts = [f"title: {w} song. tags: {WORDS[(i * 7) % 16]}" for i, w in enumerate(WORDS[:n])]
    return {
        "mel": torch.randn(n, 128, FRAMES, generator=g) * 5 - 6,
        "mel_mask": torch.ones(n, FRAMES, dtype=torch.bool),
        **tok(texts),
    }


def make_state(cfg, seed=0):
    seed_everything(seed)
    model = HTCLModel(cfg.model, cfg.audio)
    return TrainState(model, build_optimizer(model, cfg.pretrain))


def tiny_cfg(*extra):
    return config_from_dict(
        {},
        TINY_MODEL
        + ["pretrain.lr=3e-3", "pretrain.warmup_steps=5", "pretrain.weight_decay=0.0", "pretrain.log_every=1"]
        + list(extra),
    )


@pytest.mark.slow
def test_tiny_model_overfits_16_pairs():
    cfg = tiny_cfg("pretrain.max_steps=60")
    state = make_state(cfg)
    batch = pairs_batch(cfg)
    log = []
    train(state, (batch for _ in range(1000)), cfg.pretrain, "pretrain", on_log=log.append)
    assert state.step == 60 and len(log) == 60
    first, last = log[0]["loss_at"], log[-1]["loss_at"]
    print(f"overfit: loss {first:.3f} -> {last:.3f}, top1 {log[-1]['top1_at']}")
    assert last <= first / 2
    assert log[-1]["top1_at"] == 1.0


def test_param_groups_and_schedule():
    cfg = tiny_cfg("pretrain.text_lr=1e-5", "pretrain.lr=1e-3")
    state = make_state(cfg)
    groups = {g["name"]: g for g in state.optimizer.param_groups}
    assert set(groups) == {"other", "other_no_decay", "text", "text_no_decay"}
    assert groups["text"]["lr"] == 1e-5 and groups["other"]["lr"] == 1e-3
    assert groups["other_no_decay"]["weight_decay"] == 0.0
    n_text = sum(p.numel() for g in ("text", "text_no_decay") for p in groups[g]["params"])
    assert n_text == sum(p.numel() for p in state.model.text.bert.parameters())
    assert any(p is state.model.logit_scale for p in groups["other_no_decay"]["params"])
    # warmup then cosine to min_lr_ratio
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_stage2_trains_the_fusion_layer():
    cfg = tiny_cfg("finetune.max_steps=3", "finetune.log_every=1")
    state = make_state(cfg)
    b = pairs_batch(cfg, n=8)
    batch = {
        "trigger_mel": b["mel"],
        "trigger_mask": b["mel_mask"],
        "rec_mel": b["mel"].flip(0),
        "rec_mask": b["mel_mask"],
        "rec_input_ids": b["input_ids"],
        "rec_attention_mask": b["attention_mask"],
    }
    before = state.model.fusion.mlp[0].weight.detach().clone()
    log = []
    train(state, [batch] * 3, cfg.finetune, "finetune", on_log=log.append)
    assert {"loss_aa", "loss_af", "loss_at", "top1_aa"} <= set(log[-1])
    w = cfg.finetune
    assert log[-1]["loss"] == pytest.approx(
        w.w_aa * log[-1]["loss_aa"] + w.w_af * log[-1]["loss_af"] + w.w_at * log[-1]["loss_at"], rel=1e-5
    )
    assert not torch.equal(before, state.model.fusion.mlp[0].weight)


def test_same_seed_same_losses():
    cfg = tiny_cfg("pretrain.max_steps=4")
    runs = []
    for _ in range(2):
        state, log = make_state(cfg, seed=7), []
        train(state, [pairs_batch(cfg, n=8)] * 4, cfg.pretrain, "pretrain", on_log=log.append)
        runs.append([r["loss"] for r in log])
    assert runs[0] == runs[1]


def test_checkpoint_reloads_to_identical_embeddings_and_resumes(tmp_path):
    cfg = tiny_cfg("pretrain.max_steps=6", "pretrain.checkpoint_every=3")
    batch = pairs_batch(cfg, n=8)
    state = make_state(cfg)
    saved = []

    def on_checkpoint(s):
        saved.append(s.step)
        save_checkpoint(tmp_path / "ckpt" / "model.pt", s, cfg, "pretrain")
        save_checkpoint(tmp_path / f"step{s.step}" / "model.pt", s, cfg, "pretrain")

    logger = JsonlLogger(tmp_path / "metrics.jsonl", echo=False)
    train(state, [batch] * 100, cfg.pretrain, "pretrain", on_log=logger, on_checkpoint=on_checkpoint)
    assert saved == [3, 6]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "ckpt" / "config.yaml").is_file()

    state.model.eval()
    model2, cfg2, ckpt = model_from_checkpoint(tmp_path / "ckpt" / "model.pt")
    assert cfg2 == cfg and ckpt["step"] == 6 and ckpt["stage"] == "pretrain"
    with torch.no_grad():
        assert torch.equal(state.model.encode_audio(batch["mel"]), model2.encode_audio(batch["mel"]))
        ids, att = batch["input_ids"], batch["attention_mask"]
        assert torch.equal(state.model.encode_text(ids, att), model2.encode_text(ids, att))

    # Resuming from step 3 (model, optimizer, RNG) reproduces steps 4..6 exactly.
    resumed, _, stage = resume(tmp_path / "step3" / "model.pt", cfg.pretrain)
    assert resumed.step == 3 and stage == "pretrain"
    train(resumed, [batch] * 100, cfg.pretrain, "pretrain")
    resumed.model.eval()
    with torch.no_grad():
        assert torch.allclose(resumed.model.encode_audio(batch["mel"]), model2.encode_audio(batch["mel"]), atol=1e-6)


def test_non_finite_loss_stops_with_the_step():
    cfg = tiny_cfg("pretrain.max_steps=2")
    state = make_state(cfg)
    batch = pairs_batch(cfg, n=4)
    batch["mel"][0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="step 0"):
        train(state, [batch], cfg.pretrain, "pretrain")


def test_validation_in_eval_mode_draws_no_rng_and_keeps_the_best():
    cfg = tiny_cfg("pretrain.max_steps=3", "model.dropout=0.1")
    state = make_state(cfg)
    val = [pairs_batch(cfg, n=8, seed=1)]
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    first = validate(state.model, val, cfg.pretrain, "pretrain")
    assert state.model.training and torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    assert validate(state.model, val, cfg.pretrain, "pretrain") == first  # eval mode: deterministic
    assert set(first) == {"val_loss", "val_loss_at", "val_top1_at"}
    log, best = [], []
    train(
        state,
        [pairs_batch(cfg, n=8)] * 3,
        cfg.pretrain,
        "pretrain",
        on_log=log.append,
        val_batches=val,
        on_best=lambda s: best.append((s.step, log[-1]["val_loss"])),
    )
    assert all("val_loss" in r for r in log) and best[0][0] == 1
    assert [b[1] for b in best] == sorted(b[1] for b in best)[::-1] or len(best) == 1
    assert best[-1][1] == min(r["val_loss"] for r in log)


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_training_refuses_a_non_finite_input_row_naming_the_song(tmp_path, poison):
    """A mel row of inf/NaN (what decoding let through before issue 13) would train on garbage or
    stop at 'non-finite loss' with no hint of why: training refuses it up front, naming the song."""
    import numpy as np
    from conftest import write_tiny_world

    from htcl import schema as S
    from htcl.mels import mel_to_bytes, write_table
    from htcl.pipeline import training_rows

    world = write_tiny_world(tmp_path / "world")
    cfg = tiny_cfg(f"data.root={world}", f"output_dir={tmp_path / 'out'}")
    rng = np.random.default_rng(0)
    mels = {i: rng.normal(-6, 2, (128, 32)).astype(np.float32) for i in range(1, 13)}
    mels[7][5, 3] = poison
    write_table(
        [{S.SONG_ID: i, S.N_FRAMES: 32, S.MEL: mel_to_bytes(m)} for i, m in mels.items()],
        S.MELS_SCHEMA,
        tmp_path / "out" / "mels" / "part-00000.parquet",
    )
    for stage in ("pretrain", "finetune"):
        with pytest.raises(ValueError, match=r"song_id 7\b.*(NaN|inf)"):
            training_rows(cfg, stage, verbose=False)
    mels[7][5, 3] = 0.0  # and the same world with the row repaired trains
    write_table(
        [{S.SONG_ID: i, S.N_FRAMES: 32, S.MEL: mel_to_bytes(m)} for i, m in mels.items()],
        S.MELS_SCHEMA,
        tmp_path / "out" / "mels" / "part-00000.parquet",
    )
    assert len(training_rows(cfg, "pretrain", verbose=False).mels) == 12


def test_one_process_trains_the_bare_stage_module():
    """Without a process group data_parallel adds no DDP; its forward is the stage's embeddings
    (the scale included, so a DDP forward covers every parameter the loss uses)."""
    from torch.nn.parallel import DistributedDataParallel

    from htcl.training import GLOBAL_LOSSES, StageEmbeddings, data_parallel, stage1_forward, unwrap

    cfg = tiny_cfg()
    state = make_state(cfg)
    net = data_parallel(state.model, "pretrain")
    assert isinstance(net, StageEmbeddings) and not isinstance(net, DistributedDataParallel)
    assert unwrap(net) is state.model and unwrap(state.model) is state.model
    batch = pairs_batch(cfg, n=4)
    z = net(batch)
    assert set(z) == {"audio", "text", "scale"} and z["audio"].shape == (4, cfg.model.embed_dim)
    loss, _ = GLOBAL_LOSSES["pretrain"](z, batch, cfg.pretrain)
    assert torch.equal(loss, stage1_forward(state.model, batch, cfg.pretrain)[0])
    assert set(
        data_parallel(state.model, "finetune")(
            {
                "trigger_mel": batch["mel"],
                "trigger_mask": batch["mel_mask"],
                "rec_mel": batch["mel"],
                "rec_mask": batch["mel_mask"],
                "rec_input_ids": batch["input_ids"],
                "rec_attention_mask": batch["attention_mask"],
            }
        )
    ) == {"trigger_audio", "rec_audio", "rec_text", "rec_fused", "scale"}
    with pytest.raises(ValueError, match="stage="):
        data_parallel(state.model, "nope")
