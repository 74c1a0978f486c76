"""Lyrics and titles made of real words of the sung language (word lists in `words.txt`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

WORDS_FILE = Path(__file__).with_name("words.txt")


@lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    lists: dict[str, list[str]] = {}
    current = None
    for line in WORDS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            lists[current] = []
        elif current is not None:
            lists[current].extend(line.split())
    return {code: tuple(dict.fromkeys(words)) for code, words in lists.items()}


def make_lyrics(rng: np.random.Generator, language: str, n_words: int) -> list[str]:
    """Lines of 3-7 words; a chorus line comes back, as in songs."""
    words = word_lists()[language]
    lines: list[str] = []
    chorus = None
    total = 0
    while total < n_words:
        if chorus is not None and len(lines) % 3 == 2:
            line = chorus
        else:
            line = " ".join(rng.choice(words, size=int(rng.integers(3, 8))))
            chorus = chorus or line
        lines.append(line)
        total += len(line.split())
    return [line[0].upper() + line[1:] for line in lines]


def make_title(rng: np.random.Generator, lyrics: list[str]) -> str:
    """A title taken from the chorus, as songs are usually named."""
    words = lyrics[0].split()
    start = int(rng.integers(0, max(1, len(words) - 2)))
    return " ".join(words[start : start + int(rng.integers(1, 4))]).title()
