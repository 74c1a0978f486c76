import pytest
import torch
from conftest import REPO, TINY_MODEL

from htcl.config import config_from_dict, load_config
from htcl.model import HTCLModel, conv_out_lengths, count_parameters, default_text_model_dir
from htcl.text import SongTokenizer, song_text


def test_conv_front_end_gives_157_tokens_for_120_s():
    lengths = conv_out_lengths(torch.tensor([1251, 417, 1]), (5, 3, 3), (2, 2, 2))
    assert lengths.tolist() == [157, 53, 1]


@pytest.mark.slow
def test_paper_config_builds_and_reports_its_size():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    model = HTCLModel(cfg.model, cfg.audio)
    n_audio, n_total = count_parameters(model.audio), count_parameters(model)
    print(f"paper config: audio encoder {n_audio / 1e6:.1f} M parameters, whole model {n_total / 1e6:.1f} M")
    # 12 pre-norm layers of width 768 hold ~85 M parameters; the conv front end ~2 M more.
    assert 80e6 < n_audio < 100e6
    assert len(model.audio.transformer.layers) == 12
    with torch.no_grad():
        z = model.encode_audio(torch.randn(1, 128, 1251) * 5 - 6)
    assert z.shape == (1, 512)
    assert torch.allclose(z.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_demo_config_backbone_family_forward_and_backward():
    """The demo's served family: cached musicnn patch features -> the tagger's top -> Transformer;
    the tagger and the BERT are locked, their projections and the Transformer train."""
    from htcl.musicnn import POOLED_DIM

    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.audio_backbone == "musicnn_msd" and not cfg.model.text_trainable
    model = HTCLModel(cfg.model, cfg.audio).train()
    feats = torch.randn(2, POOLED_DIM, 10).abs()
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    z_audio = model.encode_audio(feats, mask)
    z_text = model.encode_text_features(torch.randn(2, model.text.bert.config.hidden_size))
    (-(z_audio * z_text).sum() * model.scale()).backward()
    assert z_audio.shape == z_text.shape == (2, cfg.model.embed_dim)
    assert model.audio.out_proj.weight.grad is not None and model.audio.in_proj.weight.grad is not None
    assert model.text.proj.weight.grad is not None
    assert all(p.grad is None for p in model.audio.backbone.parameters())
    assert all(p.grad is None for p in model.text.bert.parameters())
    # padded patches never change an embedding
    model.eval()
    with torch.no_grad():
        short = model.encode_audio(feats[1:, :, :6])
        padded = model.encode_audio(feats[1:], mask[1:])
    assert torch.allclose(short, padded, atol=1e-5)


def test_demo_config_paper_family_forward_and_backward():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.audio_backbone=none", "model.text_trainable=true"])
    model = HTCLModel(cfg.model, cfg.audio)
    tok = SongTokenizer(cfg.model)
    frames = 313  # 30 s
    batch = tok([song_text("Reel", "Ann", "folk", "la la"), song_text("Chorale", "Bach", "", "")])
    mel = torch.randn(2, 128, frames) * 5 - 6
    out = model(mel, torch.ones(2, frames, dtype=torch.bool), **batch)
    loss = -(out["audio_embeds"] * out["text_embeds"]).sum() * out["logit_scale"]
    loss.backward()
    assert out["audio_embeds"].shape == out["text_embeds"].shape == (2, cfg.model.embed_dim)
    assert model.audio.out_proj.weight.grad is not None
    assert model.text.bert.embeddings.word_embeddings.weight.grad is not None
    assert model.logit_scale.grad is not None


@pytest.mark.parametrize("pooling", ["mean", "cls", "attention"])
def test_padding_does_not_change_the_embedding(pooling):
    """A 40 s song padded to 120 s embeds exactly as the unpadded song (mask honoured end to end)."""
    cfg = config_from_dict({}, TINY_MODEL + [f"model.pooling={pooling}", "model.max_tokens=200"])
    model = HTCLModel(cfg.model, cfg.audio).eval()
    short = torch.randn(1, 128, 417) * 5 - 6
    padded = torch.full((1, 128, 1251), -23.0)
    padded[..., :417] = short
    mask = torch.zeros(1, 1251, dtype=torch.bool)
    mask[:, :417] = True
    with torch.no_grad():
        z_short = model.encode_audio(short)
        z_padded = model.encode_audio(padded, mask)
    assert torch.allclose(z_short, z_padded, atol=1e-5)


def test_too_many_frames_for_positions_is_a_clear_error():
    cfg = config_from_dict({}, TINY_MODEL + ["model.max_tokens=8"])
    model = HTCLModel(cfg.model, cfg.audio)
    with pytest.raises(ValueError, match="max_tokens"):
        model.encode_audio(torch.zeros(1, 128, 313))


def test_any_bert_directory_by_config(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    bert_dir = tmp_path / "tiny-bert"
    BertModel(
        BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(bert_dir)
    AutoTokenizer.from_pretrained(str(default_text_model_dir())).save_pretrained(bert_dir)
    cfg = config_from_dict({}, TINY_MODEL + [f"model.text_model={bert_dir}"])
    model = HTCLModel(cfg.model, cfg.audio)
    assert model.text.bert.config.hidden_size == 48
    batch = SongTokenizer(cfg.model)(["title: a", "title: b c"])
    assert model.encode_text(**batch).shape == (2, 32)


def test_missing_text_model_names_the_path(tmp_path):
    cfg = config_from_dict({}, TINY_MODEL + [f"model.text_model={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HTCLModel(cfg.model, cfg.audio)


def test_song_text_orders_fields_and_skips_empty_ones():
    assert song_text("T", "A", "", "words here") == "title: T. artist: A. lyrics: words here"
    assert song_text(None, float("nan"), "rock, live", None) == "tags: rock, live"
