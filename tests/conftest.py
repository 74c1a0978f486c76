import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HTCL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tiny model sizes for CPU tests; the text encoder is the real bundled MiniLM.
TINY_MODEL = [
    "model.audio_backbone=none",  # the paper's encoder, trainable text (tests/test_towers.py covers the rest)
    "model.text_trainable=true",
    "model.embed_dim=32",
    "model.conv_channels=32",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.fusion_hidden=64",
    "model.dropout=0.0",
    "model.text_max_length=32",
    "audio.max_seconds=10",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set HTCL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_config():
    from htcl.config import config_from_dict

    return config_from_dict({}, TINY_MODEL)


T0 = pd.Timestamp("2026-01-01", tz="UTC")


def write_tiny_world(root: Path, bad_file: bool = False) -> Path:
    """A catalog of 12 three-second FLAC tones (genres "low"/"high"), 60 impressions over 20 days and 3
    sessions of 8 plays; with bad_file, song 13 is text bytes named .wav (for the quarantine)."""
    import soundfile as sf

    (root / "audio").mkdir(parents=True)
    rows, sr = [], 16000
    for i in range(1, 13):
        t = np.arange(3 * sr) / sr
        wave = 0.3 * np.sin(2 * np.pi * (110 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * i * t))
        path = root / "audio" / f"{i}.flac"
        sf.write(path, wave.astype(np.float32), sr)
        rows.append(
            {
                "song_id": i,
                "audio_path": str(path),
                "title": f"tone {i}",
                "artist": f"artist {i % 3}",
                "lyrics": "",
                "tags": "low" if i < 7 else "high",
                "genre": "low" if i < 7 else "high",
                "language": "instrumental",
                "updated_at": T0,
            }
        )
    if bad_file:
        bad = root / "audio" / "13.wav"
        bad.write_bytes(b"this is not audio at all" * 10)
        rows.append({**rows[0], "song_id": 13, "audio_path": str(bad), "title": "broken"})
    pd.DataFrame(rows).to_parquet(root / "catalog.parquet")
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "user_id": rng.integers(1, 5, 60),
            "trigger_song_id": rng.integers(1, 13, 60),
            "rec_song_id": rng.integers(1, 13, 60),
            "clicked": True,
            "favored": rng.random(60) < 0.7,
            "event_timestamp": [T0 + pd.Timedelta(hours=8 * m) for m in range(60)],  # 20 days: a holdout split
        }
    ).to_parquet(root / "interactions.parquet")
    pd.DataFrame(
        {
            "user_id": np.repeat([1, 2, 3], 8),
            "session_id": np.repeat([1, 2, 3], 8),
            "position": np.tile(np.arange(8), 3),
            "song_id": rng.integers(1, 13, 24),
            "event_timestamp": [T0 + pd.Timedelta(hours=8 * m) for m in range(24)],
        }
    ).to_parquet(root / "sessions.parquet")
    return root


def write_tiny_bert(path: Path, dropout: float = 0.0) -> Path:
    """A 1-layer, 32-wide random BertModel with the bundled MiniLM tokenizer files: a cheap
    model.text_model for tests of the jobs' plumbing (MiniLM's weights are 88 MB per checkpoint)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from htcl.model import default_text_model_dir

    src = default_text_model_dir()
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    )
    bert.save_pretrained(path)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, path / f)
    return path
