"""Render one song: score -> artist-styled MIDI -> fluidsynth (General MIDI SoundFont) -> + vocals -> FLAC.

`render_song(plan)` runs in a worker process and depends only on its `SongPlan`, so a world renders
identically with any number of workers. fluidsynth's output is deterministic for a given MIDI file
and SoundFont (checked by the determinism test, reverb and chorus included).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from htcl.sample_world import midi, vocals
from htcl.sample_world.corpus import Piece, piece_midi
from htcl.sample_world.features import audio_features

FLUIDSYNTH = "fluidsynth"
DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
SYNTH_GAIN = 0.6
MIN_NOTES = 8  # pieces with fewer notes are treated as unusable and replaced by a fallback
TAIL_S = 0.6  # let the last notes ring


class RenderError(RuntimeError):
    pass


@dataclass(frozen=True)
class SongPlan:
    song_id: int
    out_path: str
    pieces: tuple[Piece, ...]  # the piece, then fallbacks in case it cannot be parsed or rendered
    seconds: float
    sample_rate: int
    programs: tuple[int, ...]
    bpm_target: float | None  # set the tempo (scores without a tempo of their own) ...
    tempo_scale: float  # ... or scale the file's own tempo
    transpose: int
    velocity_scale: float
    gain_db: float
    lyrics: tuple[str, ...] = ()
    voice: str = ""
    voice_pitch: int = 50
    voice_speed: int = 150
    vocal_db: float = 0.0
    vocal_start: float = 1.0
    soundfont: str = DEFAULT_SOUNDFONT


@dataclass
class RenderResult:
    song_id: int
    piece: Piece | None = None
    bpm: float = float("nan")
    mode: str = ""
    mode_margin: float = float("nan")
    note_rate: float = float("nan")  # notes per second in what is heard
    piece_seconds: float = float("nan")  # length of one pass through the piece, after the tempo change
    duration_s: float = float("nan")  # length of the audio file
    sha256: str = ""
    features: np.ndarray | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.sha256)


def find_soundfont(explicit: str | None = None) -> str:
    candidates = [explicit, os.environ.get("HTCL_SOUNDFONT"), DEFAULT_SOUNDFONT, "/usr/share/sounds/sf2/FluidR3_GM.sf2"]
    for path in candidates:
        if path and Path(path).is_file():
            return path
    raise RenderError(
        "no General MIDI SoundFont found (expected /usr/share/sounds/sf2/TimGM6mb.sf2): "
        "run scripts/install_system_deps.sh or set HTCL_SOUNDFONT"
    )


def check_tools(need_vocals: bool) -> None:
    missing = [t for t in (FLUIDSYNTH,) if shutil.which(t) is None]
    if need_vocals and not vocals.espeak_available():
        missing.append(vocals.ESPEAK)
    if missing:
        raise RenderError(
            f"missing system tool(s) {missing}: run scripts/install_system_deps.sh "
            "(Debian packages fluidsynth, timgm6mb-soundfont, espeak-ng)"
        )


def synthesize(midi_bytes: bytes, soundfont: str, sample_rate: int, timeout: float | None = None) -> np.ndarray:
    """Mono float32 audio of a MIDI file, rendered offline by the fluidsynth CLI."""
    if timeout is None:  # a runaway render (see midi._close_notes) must fail, not fill the disk
        timeout = 60.0 + 2.0 * midi.midi_seconds(midi_bytes)
    with tempfile.TemporaryDirectory(prefix="htcl_render_") as tmp:
        mid, wav = Path(tmp, "in.mid"), Path(tmp, "out.wav")
        mid.write_bytes(midi_bytes)
        cmd = [
            FLUIDSYNTH,
            "-ni",
            "-q",
            "-g",
            str(SYNTH_GAIN),
            "-r",
            str(sample_rate),
            "-F",
            str(wav),
            soundfont,
            str(mid),
        ]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        if proc.returncode != 0 or not wav.is_file():
            raise RenderError(f"fluidsynth failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:300]}")
        audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1)


def arrange_length(audio: np.ndarray, piece_seconds: float, seconds: float, sample_rate: int) -> np.ndarray:
    """Crop long pieces to `seconds`; repeat short ones whole (as verses) while they fit.

    So the catalog keeps songs of varied real length: a 13 s folk tune becomes 26 s, a 16 s reel
    32 s cropped to 30 s, a 2-minute chorale 30 s.
    """
    one_pass = int(round(min(piece_seconds + TAIL_S, seconds) * sample_rate))
    one_pass = max(min(one_pass, len(audio)), 1)
    repeats = max(1, int(seconds * sample_rate // one_pass))
    out = np.tile(audio[:one_pass], repeats)[: int(seconds * sample_rate)]
    fade = min(int(0.5 * sample_rate), len(out) // 4)
    if fade:
        out[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return out


def typical_onset_quarters(note_list: list[midi.Note], first_bpm: float) -> float:
    """Median time between successive onsets (any voice) in quarter notes, rounded to a
    power-of-two note value (1/32 to whole note)."""
    onsets = np.unique(np.round([n.start for n in note_list if n.channel != midi.DRUM_CHANNEL], 4))
    gaps = np.diff(onsets)
    gaps = gaps[gaps > 1e-3]
    if len(gaps) == 0:
        return 0.5
    median_quarters = float(np.median(gaps)) * first_bpm / 60.0
    return float(2.0 ** np.clip(np.round(np.log2(median_quarters)), -3, 2))


def _render_piece(plan: SongPlan, piece: Piece, result: RenderResult) -> np.ndarray:
    source = midi.read_midi(piece_midi(piece))
    note_list = midi.notes(source)
    if len(note_list) < MIN_NOTES:
        raise RenderError(f"only {len(note_list)} notes")
    first_bpm = midi.TempoMap.of(source).first_bpm
    if plan.bpm_target:
        # Scores notate the same pulse with different note values (a folk song in 6/2 with
        # L:1/4, a reel in eighths). Take the typical inter-onset interval as half a beat, so
        # `bpm_target` means the same felt tempo whatever the notation.
        beat_quarters = 2 * typical_onset_quarters(note_list, first_bpm)
        tempo_scale = plan.bpm_target * beat_quarters / first_bpm
        bpm = plan.bpm_target
    else:
        tempo_scale = plan.tempo_scale
        bpm = first_bpm * tempo_scale
    style = midi.Restyle(
        programs=plan.programs,
        tempo_scale=tempo_scale,
        transpose=plan.transpose,
        velocity_scale=plan.velocity_scale,
        max_seconds=plan.seconds + TAIL_S,
    )
    styled = midi.restyle(source, style)
    heard = midi.notes(styled)
    if len(heard) < MIN_NOTES:
        raise RenderError(f"only {len(heard)} notes in the first {plan.seconds} s")
    piece_seconds = max(n.end for n in note_list) / tempo_scale
    audio = synthesize(midi.write_midi(styled), plan.soundfont, plan.sample_rate)
    if not np.any(np.abs(audio) > 1e-4):
        raise RenderError("silent rendering")
    result.piece = piece
    result.bpm = bpm
    result.mode, result.mode_margin = midi.estimate_mode(note_list)
    result.piece_seconds = piece_seconds
    result.note_rate = len(heard) / max(min(piece_seconds, plan.seconds), 1.0)
    return arrange_length(audio, piece_seconds, plan.seconds, plan.sample_rate)


def render_song(plan: SongPlan) -> RenderResult:
    """Render, mix and write one song; never raises for a bad piece (tries the fallbacks)."""
    result = RenderResult(song_id=plan.song_id)
    music = None
    for piece in plan.pieces:
        try:
            music = _render_piece(plan, piece, result)
            break
        except Exception as e:  # a broken score must not stop a 20,000-song build
            result.failures.append(f"{piece.key}: {type(e).__name__}: {str(e)[:200]}")
    if music is None:
        return result

    music = music * np.float32(10 ** (plan.gain_db / 20))
    if plan.lyrics:
        try:
            voice = vocals.synthesize(
                list(plan.lyrics), plan.voice, plan.voice_pitch, plan.voice_speed, plan.sample_rate
            )
            music = vocals.mix_vocals(music, voice, plan.sample_rate, plan.vocal_start, plan.vocal_db)
        except Exception as e:
            result.failures.append(f"vocals: {type(e).__name__}: {str(e)[:200]}")
            return result
    peak = float(np.abs(music).max())
    if peak > 0.98:  # keep the mix from clipping; louder artists stay louder below that
        music = music * np.float32(0.98 / peak)

    out = Path(plan.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, music.astype(np.float32), plan.sample_rate, format="FLAC", subtype="PCM_16")
    data = out.read_bytes()
    result.sha256 = hashlib.sha256(data).hexdigest()
    decoded, sr = sf.read(out, dtype="float32")  # features of what was written, not of the buffer
    result.duration_s = len(decoded) / sr
    result.features = audio_features(decoded, sr)
    return result
