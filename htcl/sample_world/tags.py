"""Catalog tags: informative but imperfect, as user and editor tags are.

The genre tag is right most of the time, sometimes wrong, sometimes missing; descriptive tags hint
at the audible factors (tempo, energy, mode, instrument, language) with the same unreliability;
some tags say nothing about the music at all.
"""

from __future__ import annotations

import numpy as np

from htcl.sample_world.artists import INSTRUMENTAL, LANGUAGES

P_GENRE_RIGHT = 0.65
P_GENRE_WRONG = 0.10  # otherwise missing
FAMILY_TAGS = {
    "piano": "piano",
    "organ": "organ",
    "guitar": "guitar",
    "strings": "strings",
    "brass": "brass",
    "reed": "woodwinds",
    "pipe": "flute",
    "plucked": "plucked",
    "synth": "synth",
}
NOISE_TAGS = (
    "favorites",
    "chill",
    "seen live",
    "party",
    "road trip",
    "love it",
    "workout",
    "study",
    "beautiful",
    "sad",
)


def make_tags(
    rng: np.random.Generator,
    genre: str,
    all_genres: tuple[str, ...],
    family: str,
    tempo_z: float,
    energy_z: float,
    mode: str,
    language: str,
) -> str:
    tags: list[str] = []
    r = rng.random()
    if r < P_GENRE_RIGHT:
        tags.append(genre.replace("_", " "))
    elif r < P_GENRE_RIGHT + P_GENRE_WRONG and len(all_genres) > 1:
        tags.append(str(rng.choice([g for g in all_genres if g != genre])).replace("_", " "))
    if rng.random() < 0.35:
        tags.append(FAMILY_TAGS[family])
    if tempo_z > 0.8 and rng.random() < 0.5:
        tags.append("upbeat")
    elif tempo_z < -0.8 and rng.random() < 0.5:
        tags.append("slow")
    if energy_z > 0.8 and rng.random() < 0.4:
        tags.append("energetic")
    elif energy_z < -0.8 and rng.random() < 0.4:
        tags.append("mellow")
    if mode == "minor" and rng.random() < 0.3:
        tags.append("melancholic")
    if language == INSTRUMENTAL:
        if rng.random() < 0.4:
            tags.append("instrumental")
    elif rng.random() < 0.4:
        tags.append(LANGUAGES[language][2])
    if rng.random() < 0.3:
        tags.append(str(rng.choice(NOISE_TAGS)))
    order = rng.permutation(len(tags))
    return ", ".join(tags[i] for i in order)
