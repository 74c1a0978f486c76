"""Invented artists and their persistent, audible way of playing.

An artist belongs to one genre and keeps the same choices on every song: an instrument family
(General MIDI programs), a tempo range, a transposition, a playing energy (velocity and level),
and, for singing artists, a language and a singer (espeak-ng voice variant, pitch, speed, level
in the mix). Genres lean towards some families and tempi, so the audible factors overlap with
genre without being the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# General MIDI programs (0-based) per instrument family
FAMILIES: dict[str, tuple[int, ...]] = {
    "piano": (0, 1, 2, 4, 6),  # grand, bright, electric grand, e-piano, harpsichord
    "organ": (19, 16, 20, 21),  # church, drawbar, reed organ, accordion
    "guitar": (24, 25, 26, 27),  # nylon, steel, jazz, clean electric
    "strings": (40, 41, 42, 48, 49),  # violin, viola, cello, string ensembles
    "brass": (56, 57, 60, 61, 58),  # trumpet, trombone, horn, brass section, tuba
    "reed": (68, 71, 65, 66, 70),  # oboe, clarinet, alto/tenor sax, bassoon
    "pipe": (73, 74, 75, 72, 79),  # flute, recorder, pan flute, piccolo, ocarina
    "plucked": (46, 105, 107, 13, 11),  # harp, banjo, koto, xylophone, vibraphone
    "synth": (81, 80, 89, 90, 50),  # saw and square leads, pads, synth strings
}
FAMILY_NAMES = tuple(FAMILIES)

# Families each genre leans towards (an artist picks among them with probability GENRE_FAMILY_BIAS)
GENRE_FAMILIES: dict[str, tuple[str, ...]] = {
    "chorale": ("organ", "strings", "brass"),
    "renaissance": ("strings", "pipe", "organ"),
    "madrigal": ("strings", "plucked", "reed"),
    "reel": ("strings", "organ", "plucked"),
    "jig": ("strings", "pipe", "plucked"),
    "hornpipe": ("strings", "reed", "brass"),
    "german_folk": ("organ", "brass", "guitar"),
    "chinese_folk": ("pipe", "plucked", "strings"),
    # shared/data/midi_genres
    "classic": ("piano", "strings", "reed"),
    "country": ("guitar", "plucked", "strings"),
    "pop": ("piano", "synth", "guitar"),
    "rap_hip_hop": ("synth", "piano", "brass"),
    "rnb_soul": ("piano", "organ", "brass"),
    "rock": ("guitar", "organ", "synth"),
}
GENRE_FAMILY_BIAS = 0.7

# Quarter-note tempo range (bpm) per genre for scores that carry no tempo of their own
GENRE_BPM: dict[str, tuple[float, float]] = {
    "chorale": (56, 96),
    "renaissance": (70, 120),
    "madrigal": (70, 120),
    "reel": (100, 150),
    "jig": (120, 180),
    "hornpipe": (80, 130),
    "german_folk": (70, 140),
    "chinese_folk": (60, 120),
}

# Sung languages: espeak-ng voice, share among singing artists, adjective for tags
LANGUAGES: dict[str, tuple[str, float, str]] = {
    "en": ("en-us", 0.26, "english"),
    "es": ("es", 0.12, "spanish"),
    "de": ("de", 0.10, "german"),
    "fr": ("fr-fr", 0.10, "french"),
    "it": ("it", 0.08, "italian"),
    "pt": ("pt", 0.08, "portuguese"),
    "nl": ("nl", 0.07, "dutch"),
    "pl": ("pl", 0.07, "polish"),
    "sv": ("sv", 0.06, "swedish"),
    "fi": ("fi", 0.06, "finnish"),
}
INSTRUMENTAL = "instrumental"
VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4")

_SYLLABLES = (
    "ka ri no ve la mo sa ten dor bel fin ra lu mi ko sen tar vel ana eli ost ber gan hal "
    "jor kel lin mar nor pet ros sol tom ul var wen yan zor cla dre fre glo pra sti tro"
).split()
_BAND_WORDS = (
    "Echoes Lanterns Rivers Foxes Embers Pilgrims Sparrows Drifters Harbours Meadows Ravens "
    "Wanderers Tides Comets Willows Strangers Orchards Bells"
).split()
_BAND_ADJECTIVES = "Silver Hollow Northern Quiet Velvet Wild Paper Golden Distant Crimson Little Midnight".split()


@dataclass(frozen=True)
class Artist:
    artist_id: int
    name: str
    genre: str
    family: str
    programs: tuple[int, ...]
    bpm_center: float  # used for scores without their own tempo
    tempo_scale: float  # used for real MIDI files, which carry their tempo
    transpose: int
    energy: float  # 0..1: velocity scale and level
    language: str  # ISO code, or INSTRUMENTAL
    voice: str  # espeak-ng voice+variant ("" for instrumental artists)
    voice_pitch: int  # espeak-ng -p, 0..99
    voice_speed: int  # espeak-ng -s, words per minute
    vocal_db: float  # vocal level relative to the music
    vocal_start: float  # seconds of intro before the voice comes in
    popularity: float  # log-scale popularity of the artist


def _name(rng: np.random.Generator, taken: set[str]) -> str:
    for _ in range(100):
        if rng.random() < 0.45:
            name = f"The {rng.choice(_BAND_ADJECTIVES)} {rng.choice(_BAND_WORDS)}"
        else:
            first = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
            last = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
            name = f"{first} {last}"
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("could not invent a new artist name")


def invent_artists(
    rng: np.random.Generator,
    genre_counts: dict[str, int],
    vocal_share: float,
    songs_per_artist: float = 2.5,
) -> list[Artist]:
    """Artists for each genre (about `songs_per_artist` songs each, at least one per genre).

    A share `vocal_share` of the artists sing; their languages cover as many of LANGUAGES as there
    are singing artists before the weighted draw takes over, so small worlds still mix languages.
    """
    plan = []
    for genre, n_songs in genre_counts.items():
        if n_songs:
            plan += [genre] * max(1, int(round(n_songs / songs_per_artist)))
    n = len(plan)
    n_vocal = int(round(vocal_share * n))
    is_vocal = np.zeros(n, dtype=bool)
    is_vocal[rng.permutation(n)[:n_vocal]] = True

    codes = list(LANGUAGES)
    weights = np.array([LANGUAGES[c][1] for c in codes])
    weights /= weights.sum()
    first_round = list(rng.permutation(codes))  # every language once, then by weight
    languages = iter(first_round + list(rng.choice(codes, size=n, p=weights)))

    taken: set[str] = set()
    artists = []
    for i, genre in enumerate(plan):
        leaning = GENRE_FAMILIES.get(genre, FAMILY_NAMES)
        pool = leaning if rng.random() < GENRE_FAMILY_BIAS else FAMILY_NAMES
        family = str(rng.choice(pool))
        palette = FAMILIES[family]
        start = int(rng.integers(len(palette)))
        programs = tuple(palette[(start + k) % len(palette)] for k in range(len(palette)))
        lo, hi = GENRE_BPM.get(genre, (80, 140))
        language = str(next(languages)) if is_vocal[i] else INSTRUMENTAL
        singing = language != INSTRUMENTAL
        artists.append(
            Artist(
                artist_id=i + 1,
                name=_name(rng, taken),
                genre=genre,
                family=family,
                programs=programs,
                bpm_center=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
                tempo_scale=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
                transpose=int(rng.integers(-5, 6)),
                energy=float(rng.uniform(0.1, 0.9)),
                language=language,
                voice=f"{LANGUAGES[language][0]}+{rng.choice(VOICE_VARIANTS)}" if singing else "",
                voice_pitch=int(rng.integers(25, 75)) if singing else 0,
                voice_speed=int(rng.integers(130, 175)) if singing else 0,
                vocal_db=float(rng.uniform(0.0, 6.0)) if singing else 0.0,  # voice on top of the mix
                vocal_start=float(rng.uniform(0.5, 3.0)) if singing else 0.0,
                popularity=float(rng.normal(0.0, 1.0)),
            )
        )
    return artists
