"""Where the music comes from: real scores, each with a genre label taken from its metadata.

Two sources:
- `music21` (default): the corpus that the music21 wheel ships (BSD). Genre classes come from
  the corpus layout and tune titles: Bach chorales, Palestrina masses, Italian madrigals
  (Monteverdi, Trecento), fiddle tunes by dance type from Ryan's Mammoth Collection (reels,
  jigs, hornpipes), and Essen folk songs by region (German, Chinese).
- `midi:PATH`: a folder of .mid files with a `manifest.tsv` (`file`, `genre` columns), e.g.
  `shared/data/midi_genres` (2,227 real songs, 6 genres).

A `Piece` is a cheap reference (listing never parses a score); `piece_midi` turns one into MIDI
bytes inside a render worker.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from htcl.sample_world.midi import DRUM_CHANNEL, Event, MidiError, MidiFile, read_midi, write_midi


@dataclass(frozen=True)
class Piece:
    key: str  # stable identifier, e.g. "music21:ryansMammoth/AcaciaReel.abc" or "midi:rock/1.mid"
    genre: str
    title: str  # from the score's metadata when it has one ("" otherwise)
    path: str  # file to read
    tune: int | None = None  # reference number (X:) inside a multi-tune ABC file


def music21_corpus_dir() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


def _split_camel(name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z0-9])", " ", name)


def _abc_tunes(path: Path) -> list[tuple[int, str]]:
    """(reference number, title) of every tune in an ABC file, read as text (fast)."""
    tunes = []
    number, title = None, ""
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("X:"):
            if number is not None:
                tunes.append((number, title))
            digits = re.sub(r"\D", "", line[2:])
            number, title = (int(digits) if digits else None), ""
        elif line.startswith("T:") and number is not None and not title:
            title = line[2:].strip()
    if number is not None:
        tunes.append((number, title))
    # a file can reuse a reference number; music21 would pick the first, so keep only that one
    seen, unique = set(), []
    for number, title in tunes:
        if number not in seen:
            seen.add(number)
            unique.append((number, title))
    return unique


# Essen folk song collections by region (file stems in corpus/essenFolksong)
_ESSEN_REGIONS = {
    "german_folk": ("altdeu10", "altdeu20", "ballad10", "ballad20", "boehme10", "erk10", "fink0"),
    "chinese_folk": ("han1", "han2"),
}
_FIDDLE_DANCES = {"reel": ("Reel",), "jig": ("Jig", "Slipjig"), "hornpipe": ("Hornpipe", "Clog")}

MUSIC21_GENRES = ("chorale", "renaissance", "madrigal", "reel", "jig", "hornpipe", "german_folk", "chinese_folk")


def music21_pieces() -> list[Piece]:
    """Every usable piece of the music21 corpus, labelled with one of `MUSIC21_GENRES`."""
    root = music21_corpus_dir()
    pieces: list[Piece] = []

    for path in sorted((root / "bach").glob("bwv*.mxl")):
        pieces.append(Piece(f"music21:bach/{path.name}", "chorale", f"Chorale BWV {path.stem[3:]}", str(path)))
    for path in sorted((root / "palestrina").glob("*.krn")):
        title = _split_camel(path.stem.replace("_", " ")).strip()
        pieces.append(Piece(f"music21:palestrina/{path.name}", "renaissance", title, str(path)))
    for path in sorted((root / "monteverdi").glob("madrigal*.mxl")):
        book = path.stem.split(".", 1)[1] if "." in path.stem else path.stem
        pieces.append(Piece(f"music21:monteverdi/{path.name}", "madrigal", f"Madrigal {book}", str(path)))
    for path in sorted((root / "trecento").glob("*.xml")):
        title = re.sub(r"^PMFC_\d+-", "", path.stem).replace("_", " ").strip()
        pieces.append(Piece(f"music21:trecento/{path.name}", "madrigal", title, str(path)))

    for path in sorted((root / "ryansMammoth").glob("*.abc")):
        for genre, suffixes in _FIDDLE_DANCES.items():
            if any(path.stem.endswith(s) for s in suffixes):
                title = _split_camel(path.stem)
                pieces.append(Piece(f"music21:ryansMammoth/{path.name}", genre, title, str(path)))
                break

    for genre, stems in _ESSEN_REGIONS.items():
        for stem in stems:
            path = root / "essenFolksong" / f"{stem}.abc"
            if not path.is_file():
                continue
            for number, title in _abc_tunes(path):
                if number is not None:
                    key = f"music21:essenFolksong/{path.name}#{number}"
                    pieces.append(Piece(key, genre, title, str(path), tune=number))
    return pieces


def midi_folder_pieces(folder: str | Path) -> list[Piece]:
    """Pieces of a MIDI folder described by `manifest.tsv` (columns `file` and `genre`)."""
    folder = Path(folder)
    manifest = folder / "manifest.tsv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: a midi source needs a manifest.tsv with file and genre columns")
    pieces = []
    with manifest.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            path = folder / row["file"]
            if path.is_file():
                pieces.append(Piece(f"midi:{row['file']}", row["genre"], "", str(path)))
    if not pieces:
        raise FileNotFoundError(f"no MIDI files of {manifest} exist under {folder}")
    return pieces


def list_pieces(source: str) -> list[Piece]:
    if source == "music21":
        return music21_pieces()
    if source.startswith("midi:"):
        return midi_folder_pieces(source[len("midi:") :])
    raise ValueError(f"unknown source {source!r}: use 'music21' or 'midi:PATH'")


def _abc_tune_text(path: Path, number: int) -> str:
    text = path.read_text(encoding="latin-1")
    blocks = re.split(r"(?m)^(?=X:)", text)
    for block in blocks:
        head = block.split("\n", 1)[0]
        if head.startswith("X:") and re.sub(r"\D", "", head[2:]) == str(number):
            return block
    raise KeyError(f"tune X:{number} not in {path}")


TICKS_PER_BEAT = 480
DEFAULT_VELOCITY = 90


def score_to_midi(score) -> bytes:
    """A music21 score as Standard MIDI File bytes: one track and channel per part, at 120 bpm.

    Written here instead of with `music21.midi.translate`, which expands repeats by deep-copying
    the whole score and costs about a second per piece (most of a song's rendering time). The
    score is played once through (repeats are not expanded: short pieces are repeated whole later
    to fill the song), tied notes are merged, grace notes dropped. No tempo is written: the artist
    sets the felt tempo (`music.SongPlan.bpm_target`), and no program: the artist's instruments
    are dealt to the channels by `midi.restyle`.
    """
    parts = list(score.parts) or [score]
    channels = [c for c in range(16) if c != DRUM_CHANNEL]
    tracks = []
    for k, part in enumerate(parts[: len(channels)]):
        channel = channels[k]
        notes: list[list[int]] = []  # [start_tick, end_tick, pitch, velocity]
        last_of_pitch: dict[int, int] = {}
        for element in part.flatten().notes:
            quarters = float(element.duration.quarterLength)
            if element.duration.isGrace or quarters <= 0:
                continue
            start = int(round(float(element.offset) * TICKS_PER_BEAT))
            end = start + max(1, int(round(quarters * TICKS_PER_BEAT)))
            velocity = DEFAULT_VELOCITY
            if element.hasVolumeInformation() and element.volume.velocity:
                velocity = int(element.volume.velocity)
            for sub in element.notes if element.isChord else (element,):
                if sub.pitch.isTwelveTone() is False:
                    continue
                pitch = int(sub.pitch.midi)
                if not 0 <= pitch <= 127:
                    continue
                i = last_of_pitch.get(pitch)
                tie = sub.tie.type if sub.tie is not None else None
                if i is not None and tie in ("stop", "continue") and notes[i][1] == start:
                    notes[i][1] = end  # a tied continuation lengthens the sounding note
                    continue
                last_of_pitch[pitch] = len(notes)
                notes.append([start, end, pitch, min(max(velocity, 1), 127)])
        events: list[Event] = []
        for start, end, pitch, velocity in notes:
            events.append((start, 0x90 | channel, bytes([pitch, velocity])))
            events.append((end, 0x80 | channel, bytes([pitch, 0])))
        tracks.append(events)
    if not any(tracks):
        raise MidiError("the score has no notes")
    return write_midi(MidiFile(ticks_per_beat=TICKS_PER_BEAT, tracks=tracks, fmt=1))


def piece_midi(piece: Piece) -> bytes:
    """The piece as Standard MIDI File bytes (parses the score for music21 pieces)."""
    if piece.key.startswith("midi:"):
        data = Path(piece.path).read_bytes()
        read_midi(data)  # fail early, with a clear error, on a broken file
        return data

    import warnings

    from music21 import converter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21 warns about many harmless notation details
        if piece.tune is not None:
            score = converter.parse(_abc_tune_text(Path(piece.path), piece.tune), format="abc")
        else:
            # forceSource: no pickle cache in the shared temp folder (no cross-process state)
            score = converter.parse(piece.path, forceSource=True)
    return score_to_midi(score)
