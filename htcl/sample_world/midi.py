"""A small Standard MIDI File reader/writer and the edits an artist's style applies to a score.

Both sources (music21 scores written to MIDI, and real .mid files) go through the same edits:
program changes per instrument family, tempo scaling, transposition, velocity scaling and
truncation to the part that will be heard. Doing it at the MIDI level keeps one code path and
avoids a dependency on `mido`.

Events are kept as `(absolute_tick, status, data)`:
- channel messages: status 0x80..0xEF, data = the 1 or 2 data bytes;
- meta events: status 0xFF, data = bytes([meta_type]) + payload;
- sysex: status 0xF0 / 0xF7, data = payload.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

Event = tuple[int, int, bytes]

DRUM_CHANNEL = 9
META_TEMPO = 0x51
META_END_OF_TRACK = 0x2F
DEFAULT_TEMPO_US = 500_000  # 120 quarter notes per minute, the SMF default


class MidiError(ValueError):
    pass


@dataclass
class MidiFile:
    ticks_per_beat: int
    tracks: list[list[Event]] = field(default_factory=list)
    fmt: int = 1


# --- reading and writing ---------------------------------------------------------------------


def _read_varlen(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for _ in range(4):
        byte = buf[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    raise MidiError("variable-length quantity longer than 4 bytes")


def _write_varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def _data_length(status: int) -> int:
    return 1 if status & 0xF0 in (0xC0, 0xD0) else 2


def read_midi(data: bytes) -> MidiFile:
    if data[:4] != b"MThd":
        raise MidiError("not a Standard MIDI File (no MThd header)")
    header_len = int.from_bytes(data[4:8], "big")
    fmt = int.from_bytes(data[8:10], "big")
    n_tracks = int.from_bytes(data[10:12], "big")
    division = int.from_bytes(data[12:14], "big")
    if division & 0x8000:
        raise MidiError("SMPTE time division is not supported")
    mf = MidiFile(ticks_per_beat=division, fmt=fmt)
    pos = 8 + header_len
    while pos + 8 <= len(data) and len(mf.tracks) < n_tracks:
        chunk, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "big")
        pos += 8
        end = min(pos + length, len(data))
        if chunk == b"MTrk":
            mf.tracks.append(_read_track(data, pos, end))
        pos = end
    if not mf.tracks:
        raise MidiError("no MTrk chunk")
    return mf


def _read_track(buf: bytes, pos: int, end: int) -> list[Event]:
    events: list[Event] = []
    tick = 0
    running = 0
    while pos < end:
        delta, pos = _read_varlen(buf, pos)
        tick += delta
        status = buf[pos]
        if status == 0xFF:
            meta_type = buf[pos + 1]
            length, pos = _read_varlen(buf, pos + 2)
            events.append((tick, 0xFF, bytes([meta_type]) + buf[pos : pos + length]))
            pos += length
            if meta_type == META_END_OF_TRACK:
                break
        elif status in (0xF0, 0xF7):
            length, pos = _read_varlen(buf, pos + 1)
            events.append((tick, status, buf[pos : pos + length]))
            pos += length
        else:
            if status & 0x80:
                running = status
                pos += 1
            elif not running:
                raise MidiError("data byte without a running status")
            n = _data_length(running)
            events.append((tick, running, bytes(buf[pos : pos + n])))
            pos += n
    return events


def write_midi(mf: MidiFile) -> bytes:
    chunks = []
    for events in mf.tracks:
        body = bytearray()
        last = 0
        for tick, status, data in sorted(events, key=_event_order):
            if status == 0xFF and data[0] == META_END_OF_TRACK:
                continue  # written once, at the end
            body += _write_varlen(tick - last)
            last = tick
            if status == 0xFF:
                body += bytes([0xFF, data[0]]) + _write_varlen(len(data) - 1) + data[1:]
            elif status in (0xF0, 0xF7):
                body += bytes([status]) + _write_varlen(len(data)) + data
            else:
                body += bytes([status]) + data
        body += b"\x00\xff\x2f\x00"
        chunks.append(b"MTrk" + len(body).to_bytes(4, "big") + bytes(body))
    header = (
        b"MThd"
        + (6).to_bytes(4, "big")
        + (1 if len(mf.tracks) > 1 else mf.fmt).to_bytes(2, "big")
        + len(mf.tracks).to_bytes(2, "big")
        + mf.ticks_per_beat.to_bytes(2, "big")
    )
    return header + b"".join(chunks)


def _event_order(event: Event) -> tuple[int, int]:
    # at equal ticks: meta and program changes before notes, note-offs before note-ons, so a
    # re-sorted track never cuts a repeated note short
    tick, status, data = event
    kind = status & 0xF0
    if status >= 0xF0:
        rank = 0
    elif kind in (0xB0, 0xC0):
        rank = 1
    elif kind == 0x80 or (kind == 0x90 and data[1] == 0):
        rank = 2
    else:
        rank = 3
    return tick, rank


# --- time ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TempoMap:
    """Ticks -> seconds, from the tempo events of all tracks."""

    ticks_per_beat: int
    ticks: tuple[int, ...]
    tempos_us: tuple[int, ...]
    seconds_at: tuple[float, ...]

    @classmethod
    def of(cls, mf: MidiFile) -> "TempoMap":
        changes = sorted(
            (tick, int.from_bytes(data[1:4], "big"))
            for track in mf.tracks
            for tick, status, data in track
            if status == 0xFF and data[0] == META_TEMPO and len(data) >= 4
        )
        if not changes or changes[0][0] > 0:
            changes.insert(0, (0, DEFAULT_TEMPO_US))
        ticks, tempos, seconds = [], [], []
        t_sec = 0.0
        for tick, tempo in changes:
            if ticks:
                t_sec += (tick - ticks[-1]) * tempos[-1] / 1e6 / mf.ticks_per_beat
                if tick == ticks[-1]:  # two tempi at one tick: the later one wins
                    tempos[-1] = max(tempo, 1)
                    continue
            ticks.append(tick)
            tempos.append(max(tempo, 1))
            seconds.append(t_sec)
        return cls(mf.ticks_per_beat, tuple(ticks), tuple(tempos), tuple(seconds))

    def seconds(self, tick: int) -> float:
        i = bisect.bisect_right(self.ticks, tick) - 1
        return self.seconds_at[i] + (tick - self.ticks[i]) * self.tempos_us[i] / 1e6 / self.ticks_per_beat

    def tick_at(self, seconds: float) -> int:
        i = bisect.bisect_right(self.seconds_at, seconds) - 1
        return self.ticks[i] + int((seconds - self.seconds_at[i]) * 1e6 * self.ticks_per_beat / self.tempos_us[i])

    @property
    def first_bpm(self) -> float:
        return 60e6 / self.tempos_us[0]


def midi_seconds(data: bytes) -> float:
    """Length of a Standard MIDI File in seconds (its last event)."""
    mf = read_midi(data)
    last = max((e[0] for track in mf.tracks for e in track), default=0)
    return TempoMap.of(mf).seconds(last)


# --- analysis --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    end: float
    pitch: int
    velocity: int
    channel: int


def notes(mf: MidiFile) -> list[Note]:
    """Sounding notes with their times in seconds (note-on paired with the next note-off)."""
    tempo = TempoMap.of(mf)
    out = []
    for track in mf.tracks:
        open_notes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for tick, status, data in sorted(track, key=_event_order):
            kind, channel = status & 0xF0, status & 0x0F
            if kind == 0x90 and data[1] > 0:
                open_notes.setdefault((channel, data[0]), []).append((tick, data[1]))
            elif kind == 0x80 or (kind == 0x90 and data[1] == 0):
                stack = open_notes.get((channel, data[0]))
                if stack:
                    start, velocity = stack.pop(0)
                    out.append(Note(tempo.seconds(start), tempo.seconds(tick), data[0], velocity, channel))
    out.sort(key=lambda n: (n.start, n.pitch))
    return out


# Krumhansl-Kessler key profiles (major, minor), the standard key-finding weights
KEY_PROFILE_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KEY_PROFILE_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def estimate_mode(note_list: list[Note]) -> tuple[str, float]:
    """('major' | 'minor', margin): Krumhansl-Schmuckler over duration-weighted pitch classes.

    The margin is the best major correlation minus the best minor one (positive = major).
    """
    hist = np.zeros(12)
    for n in note_list:
        if n.channel != DRUM_CHANNEL:
            hist[n.pitch % 12] += max(n.end - n.start, 0.05)
    if hist.sum() == 0:
        return "major", 0.0
    best = {}
    for name, profile in (("major", KEY_PROFILE_MAJOR), ("minor", KEY_PROFILE_MINOR)):
        best[name] = max(np.corrcoef(hist, np.roll(profile, k))[0, 1] for k in range(12))
    margin = float(best["major"] - best["minor"])
    return ("major" if margin >= 0 else "minor"), margin


# --- the artist's edits ----------------------------------------------------------------------


@dataclass(frozen=True)
class Restyle:
    programs: tuple[int, ...]  # General MIDI programs (0-based) dealt to the melodic channels
    tempo_scale: float = 1.0  # > 1 is faster
    transpose: int = 0  # semitones, melodic channels only
    velocity_scale: float = 1.0
    max_seconds: float | None = None  # drop everything after this (after tempo scaling)
    keep_bass: bool = True  # channels that play a GM bass (programs 32-39) keep it


def restyle(mf: MidiFile, style: Restyle) -> MidiFile:
    """A copy of `mf` played the artist's way."""
    # which program each channel starts with (bass channels may keep theirs)
    first_program: dict[int, int] = {}
    channels: set[int] = set()
    for track in mf.tracks:
        for _, status, data in sorted(track, key=_event_order):
            kind, channel = status & 0xF0, status & 0x0F
            if kind == 0xC0:
                first_program.setdefault(channel, data[0])
            elif kind == 0x90:
                channels.add(channel)
    melodic = sorted(c for c in channels if c != DRUM_CHANNEL)
    program_of = {}
    for i, channel in enumerate(melodic):
        original = first_program.get(channel, 0)
        if style.keep_bass and 32 <= original <= 39:
            program_of[channel] = original
        else:
            program_of[channel] = style.programs[i % len(style.programs)]

    tracks: list[list[Event]] = []
    for track in mf.tracks:
        out: list[Event] = []
        for tick, status, data in track:
            kind, channel = status & 0xF0, status & 0x0F
            if status == 0xFF and data[0] == META_TEMPO and len(data) >= 4:
                tempo = int.from_bytes(data[1:4], "big")
                tempo = min(max(int(round(tempo / style.tempo_scale)), 1), 0xFFFFFF)
                out.append((tick, status, bytes([META_TEMPO]) + tempo.to_bytes(3, "big")))
            elif kind == 0xC0 and channel != DRUM_CHANNEL:
                continue  # replaced below
            elif kind in (0x80, 0x90) and channel != DRUM_CHANNEL:
                pitch = data[0] + style.transpose
                while pitch > 127:
                    pitch -= 12
                while pitch < 0:
                    pitch += 12
                velocity = data[1]
                if kind == 0x90 and velocity > 0:
                    velocity = min(max(int(round(velocity * style.velocity_scale)), 1), 127)
                out.append((tick, status, bytes([pitch, velocity])))
            else:
                out.append((tick, status, data))
        tracks.append(out)
    if not any(s == 0xFF and d[0] == META_TEMPO for t in tracks for _, s, d in t):
        tempo = int(round(DEFAULT_TEMPO_US / style.tempo_scale))
        tracks[0].append((0, 0xFF, bytes([META_TEMPO]) + tempo.to_bytes(3, "big")))
    tracks[0].extend((0, 0xC0 | ch, bytes([prog])) for ch, prog in program_of.items())
    result = MidiFile(ticks_per_beat=mf.ticks_per_beat, tracks=tracks, fmt=mf.fmt)

    if style.max_seconds is not None:
        cutoff = TempoMap.of(result).tick_at(style.max_seconds)
        for track in result.tracks:
            track[:] = [e for e in track if e[0] < cutoff]
            track.extend(_close_notes(track, cutoff))
        # and silence whatever still sounds at the cut (CC 123: all notes off)
        result.tracks[0].extend((cutoff, 0xB0 | ch, bytes([123, 0])) for ch in sorted(channels))
    return result


def _close_notes(track: list[Event], tick: int) -> list[Event]:
    """Note-offs at `tick` for every note of `track` still on there.

    Needed, not cosmetic: fluidsynth's file renderer waits for every voice to end, so a note left
    on with a looped sample (organ, strings) renders forever.
    """
    on: dict[tuple[int, int], int] = {}
    for _, status, data in sorted(track, key=_event_order):
        kind, channel = status & 0xF0, status & 0x0F
        if kind == 0x90 and data[1] > 0:
            on[channel, data[0]] = on.get((channel, data[0]), 0) + 1
        elif (kind == 0x80 or kind == 0x90) and on.get((channel, data[0])):
            on[channel, data[0]] -= 1
    return [(tick, 0x80 | ch, bytes([pitch, 0])) for (ch, pitch), n in sorted(on.items()) for _ in range(n)]
