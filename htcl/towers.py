"""Locked towers and their cached features.

A locked tower never changes during training, so its output for a song is a feature: computed
once, stored, and read by training instead of running the tower. Two towers can be locked:

  text      the BERT's pooled output before the projection, (H,) per song (model.text_trainable false)
  musicnn_* the pretrained tagger's pooled features of each 3 s patch, (C, P) per song
            (model.audio_backbone; C = htcl.musicnn.POOLED_DIM, P patches of the first
            audio.max_seconds)

Cache layout, under <output_dir>/features/<tower>-<tower hash, 16 hex>/:
    part-*.parquet   song_id int64, input_hash str, shape list<int32>, feature (float32 bytes, C order)
    _tower.json      the tower spec the hash was taken of (weights hash, config)

The tower hash covers the tower's weights, its config and the feature format: a change to any of
them is a new folder, recomputed from scratch, never a silent reuse. The input hash covers what
the tower reads (the song's text, or the audio file's bytes): a rerun recomputes exactly the songs
whose input changed or that are new, and keeps the rest. The class UDFs (`TextFeatures`,
`BackboneFeatures`) have Ray Data's shape; ray_jobs/features.py maps them over the catalog, and
`htcl.pipeline.run_features` runs them in a loop.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from htcl import schema as S
from htcl.config import AudioConfig, Config, ModelConfig
from htcl.files import sha256_file, sha256_stream, write_atomically
from htcl.layout import Layout
from htcl.mels import SHARD_ROW_GROUP_ROWS

TEXT_TOWER = "text"
FEATURE_FORMAT = 1  # bump when what a tower's feature means changes
TOWER_FILE = "_tower.json"  # "_": Parquet dataset readers skip it
INPUT_HASH = S.INPUT_HASH
SHAPE, FEATURE, TEXT = "shape", "feature", "text"
FEATURES_SCHEMA = pa.schema(
    [
        pa.field(S.SONG_ID, pa.int64(), nullable=False),
        pa.field(INPUT_HASH, pa.string(), nullable=False),
        pa.field(SHAPE, pa.list_(pa.int32()), nullable=False),
        pa.field(FEATURE, pa.binary(), nullable=False),
    ]
)


class StaleFeaturesError(RuntimeError):
    """Cached features that do not belong to the current tower or input."""


# --- hashes --------------------------------------------------------------------------------


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def audio_file_hash(path: str) -> str:
    """sha256 of an audio file's bytes (local path, file:// or a pyarrow.fs URI)."""
    if "://" in path and not path.startswith("file://"):
        from pyarrow import fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as f:
            return sha256_stream(f)
    return sha256_file(path[len("file://") :] if path.startswith("file://") else path)


def audio_hashes(paths: list[str]) -> list[str]:
    """audio_file_hash of each path, on a few threads; htcl.delta.UNREADABLE for a file that cannot
    be read (decoding then quarantines it, and it is retried once its hash changes)."""
    from htcl.delta import hash_files

    return hash_files(paths, audio_file_hash)


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors in name order: its weights, wherever they came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _model_dir_hash(model_dir: str) -> str:
    """sha256 over a Hugging Face model directory's files (weights, config, tokenizer)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            h.update(f.name.encode())
            sha256_file(f, h)
    return h.hexdigest()


# --- tower specs ---------------------------------------------------------------------------


def text_tower_spec(model_cfg: ModelConfig) -> dict:
    from htcl.model import resolve_text_model

    model_dir = resolve_text_model(model_cfg.text_model)
    return {
        "tower": TEXT_TOWER,
        "format": FEATURE_FORMAT,
        "weights": _model_dir_hash(str(model_dir)),
        "max_length": model_cfg.text_max_length,
        "pooling": model_cfg.text_pooling,
    }


@functools.lru_cache(maxsize=4)
def _backbone_weights_hash(name: str) -> str:
    from htcl.musicnn import Musicnn

    return state_dict_hash(Musicnn(name, pretrained=True))


def audio_tower_spec(model_cfg: ModelConfig, audio_cfg: AudioConfig) -> dict:
    name = model_cfg.audio_backbone
    if name == "none":
        raise ValueError("model.audio_backbone is 'none': the paper's audio encoder trains, it has no cached features")
    return {
        "tower": name,
        "format": FEATURE_FORMAT,
        "weights": _backbone_weights_hash(name),
        "max_seconds": audio_cfg.max_seconds,
    }


def tower_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(spec), sort_keys=True).encode()).hexdigest()


def tower_name(spec: Mapping[str, Any]) -> str:
    """A tower's cache folder name: <tower>-<tower hash, 16 hex>."""
    return f"{spec['tower']}-{tower_hash(spec)[:16]}"


def tower_dir(output_dir: str | Path, spec: Mapping[str, Any]) -> Path:
    return Layout(output_dir).features(tower_name(spec))


def locked_tower_specs(cfg: Config) -> dict[str, dict]:
    """The towers this config locks: {"text": spec, "audio": spec}, each present when locked."""
    specs = {}
    if cfg.model.audio_backbone != "none":
        specs["audio"] = audio_tower_spec(cfg.model, cfg.audio)
    if not cfg.model.text_trainable:
        specs["text"] = text_tower_spec(cfg.model)
    return specs


# --- rows and the cache folder ------------------------------------------------------------


def feature_row(song_id: int, input_hash: str, feature: np.ndarray) -> dict:
    feature = np.ascontiguousarray(feature, dtype=np.float32)
    return {S.SONG_ID: int(song_id), INPUT_HASH: input_hash, SHAPE: list(feature.shape), FEATURE: feature.tobytes()}


def feature_from_row(shape, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(tuple(shape)).copy()


def write_tower_spec(directory: Path, spec: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOWER_FILE
    if not path.is_file():
        text = json.dumps({**spec, "hash": tower_hash(spec)}, indent=2, sort_keys=True)
        write_atomically(path, lambda tmp: tmp.write_text(text))


def check_tower(directory: Path, spec: Mapping[str, Any]) -> None:
    """The folder's recorded spec must be this spec (a folder named by a hash prefix could collide)."""
    path = directory / TOWER_FILE
    if path.is_file():
        recorded = json.loads(path.read_text()).get("hash")
        if recorded != tower_hash(spec):
            raise StaleFeaturesError(f"{directory}: cached for tower hash {recorded}, not {tower_hash(spec)}")


def write_features(rows: list[dict], directory: Path) -> Path | None:
    if not rows:
        return None
    from htcl.delta import new_shard_name, write_shard_atomic

    path = Path(directory) / new_shard_name()
    write_shard_atomic(pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA), path, SHARD_ROW_GROUP_ROWS)
    return path


def feature_shards(directory: str | Path) -> list[Path]:
    """A tower cache folder's shards, in name order (a later shard's row wins a repeated song_id)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no cached features (*.parquet) in {directory}; run `htcl features` first")
    return files


def features_from_table(
    table: pa.Table, expected: Mapping[int, str] | None = None, where: str | Path = ""
) -> dict[int, np.ndarray]:
    """Rows of a feature shard (a whole file or any slice of it) -> {song_id: feature}; `expected`
    as read_features, `where` (the shard) names the file in its error."""
    t = table.select(FEATURES_SCHEMA.names).to_pydict()
    out: dict[int, np.ndarray] = {}
    for sid, h, shape, data in zip(t[S.SONG_ID], t[INPUT_HASH], t[SHAPE], t[FEATURE]):
        if expected is not None and int(sid) in expected and expected[int(sid)] != h:
            raise StaleFeaturesError(
                f"{where}: song {sid}'s cached features are of another input (hash {h[:12]}, now "
                f"{expected[int(sid)][:12]}); run `htcl features` to recompute them"
            )
        out[int(sid)] = feature_from_row(shape, data)
    return out


def hash_prefix(hex_digest: str) -> int:
    """A sha256 hex digest's first 8 bytes as an int (a uint64): what a catalog-wide stale check
    holds per song (8 bytes, not a 64-character string; a stale row slips by with odds 2^-64)."""
    return int(hex_digest[:16], 16)


def require_current_features(directory: str | Path, ids: np.ndarray, expected: np.ndarray) -> None:
    """Refuse a tower cache row whose input hash is not the song's current one, as read_features
    does with `expected`, reading only the song_id and input_hash columns a row group at a time.

    ids: (n,) int64 ascending; expected: (n,) uint64, hash_prefix of each song's current input
    hash. Cached songs not in ids are not checked (they are not read)."""
    for f in feature_shards(directory):
        shard = pq.ParquetFile(f)
        for g in range(shard.metadata.num_row_groups):
            t = shard.read_row_group(g, columns=[S.SONG_ID, INPUT_HASH])
            sid = t.column(0).to_numpy().astype(np.int64)
            pos = np.minimum(np.searchsorted(ids, sid), max(len(ids) - 1, 0))
            known = (ids[pos] == sid) if len(ids) else np.zeros(len(sid), bool)
            hashes = t.column(1).to_pylist()
            for i in np.flatnonzero(known):
                if hash_prefix(hashes[i]) != expected[pos[i]]:
                    now = f"{int(expected[pos[i]]):016x}"
                    raise StaleFeaturesError(
                        f"{f}: song {sid[i]}'s cached features are of another input (hash {hashes[i][:12]}, "
                        f"now {now[:12]}); run `htcl features` to recompute them"
                    )


def read_features(directory: str | Path, expected: Mapping[int, str] | None = None) -> dict[int, np.ndarray]:
    """{song_id: feature} from a tower's cache folder.

    With `expected` (song_id -> current input hash), a cached row whose input hash differs is an
    error naming the song (rerun `htcl features`); songs missing from the cache are left out.
    """
    out: dict[int, np.ndarray] = {}
    for f in feature_shards(directory):
        out.update(features_from_table(pq.read_table(f), expected, f))
    return out


# --- the towers as Ray-Data-shaped class UDFs ------------------------------------------------


class TextFeatures:
    """{song_id, text, input_hash} columns -> feature rows: the locked BERT's pooled output (H,)."""

    def __init__(self, model_cfg: ModelConfig, batch_size: int = 32):
        from htcl.model import TextEncoder
        from htcl.text import SongTokenizer

        self.tokenizer = SongTokenizer(model_cfg)
        self.encoder = TextEncoder(model_cfg).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def pooled(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(texts[i : i + self.batch_size])
            out.append(self.encoder.pooled(tok["input_ids"], tok["attention_mask"]).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.encoder.bert.config.hidden_size), np.float32)

    def __call__(self, batch: dict) -> dict[str, list]:
        feats = self.pooled([str(t) for t in batch[TEXT]])
        rows = [feature_row(s, h, f) for s, h, f in zip(batch[S.SONG_ID], batch[INPUT_HASH], feats)]
        return {"features": rows, "quarantine": []}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with n intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def backbone_features(net, wave: np.ndarray) -> np.ndarray:
    """The tagger's pooled features of each 3 s patch of a 16 kHz waveform (T,): (C, P) float32.

    One thread: the tagger's per-patch convolutions are too small to split, and two threads on a
    busy 2-core machine were measured 30x slower than one."""
    from htcl.musicnn import log_mel, patches

    with torch.no_grad(), torch_threads(1):
        mel = log_mel(torch.as_tensor(wave, dtype=torch.float32))  # (1, F, 96)
        x, mask = patches(mel)  # (1, P, 187, 96), (1, P)
        pooled = net.pooled(x[0][mask[0]])  # (P, C)
    return pooled.float().numpy().T.copy()


class BackboneFeatures:
    """{song_id, audio_path, input_hash} columns -> feature rows: the tagger's pooled features of
    every 3 s patch of the song's first audio.max_seconds, (C, P). A file that cannot be decoded
    becomes a quarantine row (stage "features") and the batch goes on."""

    def __init__(self, model_cfg: ModelConfig, audio_cfg: AudioConfig, net=None):
        from htcl.musicnn import SAMPLE_RATE, Musicnn

        self.net = net if net is not None else Musicnn(model_cfg.audio_backbone, pretrained=True).eval()
        self.sample_rate, self.max_seconds = SAMPLE_RATE, audio_cfg.max_seconds

    def waveform_features(self, wave: np.ndarray) -> np.ndarray:
        return backbone_features(self.net, wave)

    def __call__(self, batch: dict) -> dict[str, list]:
        from htcl.audio import AudioDecodeError, load_audio
        from htcl.mels import MelExtractor

        rows, quarantine = [], []
        for sid, path, h in zip(batch[S.SONG_ID], batch[S.AUDIO_PATH], batch[INPUT_HASH]):
            try:
                wave = load_audio(path, self.sample_rate, self.max_seconds)
            except AudioDecodeError as e:
                quarantine.append(MelExtractor.quarantine_row(sid, path, "features", e.reason, str(e), h))
                continue
            rows.append(feature_row(sid, h, self.waveform_features(wave)))
        return {"features": rows, "quarantine": quarantine}


def tower_inputs(cfg: Config, catalog: pd.DataFrame, tower: str) -> pd.DataFrame:
    """The rows a tower reads, with their input hashes: (song_id, text, input_hash) for the text
    tower, (song_id, audio_path, input_hash) for an audio backbone."""
    if tower == "text":
        from htcl.text import song_texts

        texts = song_texts(catalog)
        ids = sorted(texts)
        return pd.DataFrame(
            {S.SONG_ID: ids, TEXT: [texts[i] for i in ids], INPUT_HASH: [text_hash(texts[i]) for i in ids]}
        )
    paths = [str(p) for p in catalog[S.AUDIO_PATH]]
    hashes = audio_hashes(paths)
    return pd.DataFrame(
        {S.SONG_ID: catalog[S.SONG_ID].astype("int64").to_numpy(), S.AUDIO_PATH: paths, INPUT_HASH: hashes}
    )


def audio_input(model, audio_cfg: AudioConfig, wave: np.ndarray) -> np.ndarray:
    """What a model's audio encoder reads for one 16 kHz waveform: the log-Mel (M, F) for the
    paper family, the backbone's pooled patch features (C, P) (through the checkpoint's own copy
    of the tagger, so it equals the cached features) for a backbone model."""
    backbone = model.audio.backbone
    if backbone is not None:
        return backbone_features(backbone, wave)
    from htcl.audio import LogMel

    logmel = LogMel(audio_cfg.sample_rate, audio_cfg.n_mels, audio_cfg.win_ms, audio_cfg.hop_ms)
    with torch.no_grad():
        return logmel(torch.as_tensor(wave, dtype=torch.float32))[0].numpy()
