import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HTCL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tiny model sizes for CPU tests; the text encoder is the real bundled MiniLM.
TINY_MODEL = [
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
