"""Song text: what the text encoder reads (title, artist, tags, lyrics) and its tokenizer."""

from __future__ import annotations

from typing import Sequence

import torch

from htcl import schema as S
from htcl.config import ModelConfig
from htcl.model import resolve_text_model


def _clean(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas
        return ""
    return str(value).strip()


def song_text(title=None, artist=None, tags=None, lyrics=None) -> str:
    """One string per song. Lyrics come last so truncation to max_length cuts them, not the title.

    Empty fields are left out rather than written as empty labels.
    """
    parts = []
    for label, value in (("title", title), ("artist", artist), ("tags", tags), ("lyrics", lyrics)):
        value = _clean(value)
        if value:
            parts.append(f"{label}: {value}")
    return ". ".join(parts)


CATALOG_TEXT_COLUMNS = [S.SONG_ID, S.TITLE, S.ARTIST, S.TAGS, S.LYRICS]  # what song_texts reads


def song_texts(catalog) -> dict[int, str]:
    """{song_id: song_text} of a catalog DataFrame's rows (read_catalog's or catalog_chunks')."""
    return {
        int(r[S.SONG_ID]): song_text(r[S.TITLE], r[S.ARTIST], r[S.TAGS], r[S.LYRICS])
        for r in catalog[CATALOG_TEXT_COLUMNS].to_dict("records")
    }


class SongTokenizer:
    """The text encoder's own tokenizer: texts -> {"input_ids", "attention_mask"} (B, L) int64."""

    def __init__(self, cfg: ModelConfig):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(resolve_text_model(cfg.text_model)), local_files_only=True)
        self.max_length = cfg.text_max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
