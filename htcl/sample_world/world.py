"""`generate_world`: plan a catalog, render it in parallel, simulate listeners, write the tables.

Every random choice is drawn here, in the parent process, from streams named after their purpose
and derived from the seed; workers only execute `SongPlan`s. So the same arguments and seed give
identical tables and identical audio bytes whatever the number of workers.

Outputs (in `out_dir`):
    catalog.parquet        song_id, audio_path (relative to out_dir: audio/NNNNNN.flac), title, artist, lyrics, tags,
                           genre, language, updated_at
    interactions.parquet   the similar-songs channel (favor rows are the stage-2 triplets)
    sessions.parquet       listening sessions (co-occurrence for HTCL_w_CF)
    listeners.parquet      the simulated listeners (genre affinities, taste)
    truth.parquet          hidden per-song factors: for evaluation and checks only, never for training
    audio/NNNNNN.flac      16 kHz mono FLAC
    world.json             parameters, counts and structure figures
    README.md              the card
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from htcl import schema
from htcl.sample_world import behaviour, card, lyrics, music
from htcl.sample_world.artists import FAMILY_NAMES, INSTRUMENTAL, Artist, invent_artists
from htcl.sample_world.corpus import MUSIC21_GENRES, Piece, list_pieces
from htcl.sample_world.listeners import make_listeners
from htcl.sample_world.tags import make_tags
from htcl.sample_world.validate import structure_figures

SAMPLE_RATE = 16000
FALLBACK_PIECES = 5  # extra pieces a song may fall back to when its piece cannot be rendered
P_ARTIST_SINGS_SONG = 0.9  # singing artists also release some instrumentals


class WorldError(RuntimeError):
    pass


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose, so adding draws to one leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def default_users(songs: int) -> int:
    return int(np.clip(songs // 2, 60, 20000))


def _world_genres(source: str, pieces: list[Piece]) -> tuple[str, ...]:
    present = {p.genre for p in pieces}
    if source == "music21":
        return tuple(g for g in MUSIC21_GENRES if g in present)
    return tuple(sorted(present))


def _assign_artists(rng: np.random.Generator, genre_of_song: np.ndarray, artists: list[Artist], genres) -> np.ndarray:
    """Artist index per song: every artist has a song, some artists have many (Zipf-like)."""
    out = np.empty(len(genre_of_song), dtype=np.int64)
    for g, genre in enumerate(genres):
        songs = rng.permutation(np.flatnonzero(genre_of_song == g))
        mine = np.array([i for i, a in enumerate(artists) if a.genre == genre])
        if len(songs) == 0:
            continue
        first = min(len(mine), len(songs))
        out[songs[:first]] = mine[:first]
        weights = 1.0 / np.arange(1, len(mine) + 1) ** 0.7
        out[songs[first:]] = rng.choice(mine, size=len(songs) - first, p=weights / weights.sum())
    return out


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def _render_all(plans: list[music.SongPlan], workers: int, progress: bool) -> list[music.RenderResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(plans), desc="rendering songs", unit="song", disable=not progress, file=sys.stderr)
    results = []
    if workers <= 1:
        for plan in plans:
            results.append(music.render_song(plan))
            bar.update()
    else:
        # forkserver: workers start clean (no inherited torch/OpenMP threads from the caller)
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(music.render_song, plan) for plan in plans]
            for future in as_completed(futures):  # progress as songs finish, in any order
                future.result()
                bar.update()
            results = [f.result() for f in futures]  # in plan order
    bar.close()
    return results


def _write(frame: pd.DataFrame, schema_: pa.Schema, path: Path) -> Path:
    pq.write_table(pa.Table.from_pandas(frame[schema_.names], schema=schema_, preserve_index=False), path)
    return path


@dataclass
class CatalogPlan:
    """Everything drawn before rendering: which genre, artist and pieces each song gets."""

    genres: tuple[str, ...]
    genre_of_song: np.ndarray  # (songs,) index into genres
    artists: list[Artist]
    songs: list[music.SongPlan]  # in song_id order
    info: list[dict]  # per song: genre, artist, energy, sings, lyrics (lines)


def _plan_catalog(
    seed: int,
    songs: int,
    seconds: float,
    source: str,
    vocal_share: float,
    audio_dir: Path,
    soundfont: str,
    text_rng: np.random.Generator,
) -> CatalogPlan:
    """Genres, artists and pieces of every song, then each song's performance (SongPlan).

    text_rng draws the lyrics here and the titles and tags later (`_song_tables`): one stream, in
    that order, so it is passed in rather than made here."""
    pieces = list_pieces(source)
    genres = _world_genres(source, pieces)
    rng = _rng(seed, "catalog")
    genre_of_song = rng.permutation(np.resize(np.arange(len(genres)), songs))  # balanced genres
    counts = {g: int((genre_of_song == i).sum()) for i, g in enumerate(genres)}
    artists = invent_artists(_rng(seed, "artists"), counts, vocal_share)
    artist_of_song = _assign_artists(rng, genre_of_song, artists, genres)

    piece_rng = _rng(seed, "pieces")
    pool = {g: [pieces[i] for i in piece_rng.permutation(len(pieces)) if pieces[i].genre == g] for g in genres}
    used = {g: 0 for g in genres}
    song_rng = _rng(seed, "songs")
    from_score_tempo = source == "music21"  # corpus scores carry no performance tempo: the artist sets it
    plans, info = [], []
    for s in range(songs):
        genre = genres[genre_of_song[s]]
        k = used[genre]
        used[genre] += 1
        candidates = pool[genre]
        # covers: a song past the end of its genre's pool replays a piece with another artist
        chosen = tuple(candidates[(k + j * counts[genre]) % len(candidates)] for j in range(FALLBACK_PIECES + 1))
        plan, song_info = _plan_song(
            s + 1,
            genre,
            artists[artist_of_song[s]],
            chosen,
            seconds,
            audio_dir,
            soundfont,
            from_score_tempo,
            song_rng,
            text_rng,
        )
        plans.append(plan)
        info.append(song_info)
    return CatalogPlan(genres, genre_of_song, artists, plans, info)


def _plan_song(
    song_id: int,
    genre: str,
    artist: Artist,
    pieces: tuple[Piece, ...],
    seconds: float,
    audio_dir: Path,
    soundfont: str,
    from_score_tempo: bool,
    song_rng: np.random.Generator,
    text_rng: np.random.Generator,
) -> tuple[music.SongPlan, dict]:
    """One song's performance (the artist's, varied a little) and lyrics: (SongPlan, song info)."""
    energy = float(np.clip(artist.energy + song_rng.normal(0, 0.08), 0.0, 1.0))
    bpm = artist.bpm_center * float(np.exp(song_rng.normal(0, 0.06)))
    tempo_scale = artist.tempo_scale * float(np.exp(song_rng.normal(0, 0.04)))
    sings = artist.language != INSTRUMENTAL and song_rng.random() < P_ARTIST_SINGS_SONG
    lyric_lines: list[str] = []
    if sings:
        n_words = max(6, int(artist.voice_speed / 60 * max(seconds - artist.vocal_start, 2.0) * 0.55))
        lyric_lines = lyrics.make_lyrics(text_rng, artist.language, n_words)
    plan = music.SongPlan(
        song_id=song_id,
        out_path=str(audio_dir / f"{song_id:06d}.flac"),
        pieces=pieces,
        seconds=float(seconds),
        sample_rate=SAMPLE_RATE,
        programs=artist.programs,
        bpm_target=bpm if from_score_tempo else None,
        tempo_scale=tempo_scale,
        transpose=artist.transpose,
        velocity_scale=0.45 + 0.8 * energy,
        gain_db=-12.0 + 12.0 * energy,
        lyrics=tuple(lyric_lines),
        voice=artist.voice,
        voice_pitch=artist.voice_pitch,
        voice_speed=artist.voice_speed,
        vocal_db=artist.vocal_db,
        vocal_start=artist.vocal_start,
        soundfont=soundfont,
    )
    return plan, dict(genre=genre, artist=artist, energy=energy, sings=sings, lyrics=lyric_lines)


def _render_checked(plans: list[music.SongPlan], workers: int, progress: bool) -> list[music.RenderResult]:
    """Every song rendered (in plan order), or WorldError naming the first songs that could not be."""
    results = _render_all(plans, workers, progress)
    failed = [r for r in results if not r.ok]
    if failed:
        detail = "; ".join(f"song {r.song_id}: {r.failures[-1] if r.failures else '?'}" for r in failed[:5])
        raise WorldError(f"{len(failed)} of {len(plans)} songs could not be rendered: {detail}")
    return results


@dataclass
class HiddenFactors:
    """Per-song factors behind the listeners' taste, each (songs,)."""

    energy: np.ndarray  # as performed, in [0, 1]
    popularity: np.ndarray  # standardized: the artist's plus per-song noise
    tempo_z: np.ndarray  # standardized log tempo
    energy_z: np.ndarray  # standardized energy


def _hidden_factors(seed: int, catalog: CatalogPlan, results: list[music.RenderResult]) -> HiddenFactors:
    bpm = np.array([r.bpm for r in results])
    energy = np.array([i["energy"] for i in catalog.info])
    songs = len(catalog.info)
    popularity = _standardize(
        np.array([i["artist"].popularity for i in catalog.info]) + _rng(seed, "popularity").normal(0, 0.7, songs)
    )
    return HiddenFactors(energy, popularity, _standardize(np.log(bpm)), _standardize(energy))


def _song_tables(
    seed: int,
    out_dir: Path,
    catalog: CatalogPlan,
    results: list[music.RenderResult],
    factors: HiddenFactors,
    text_rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog, truth): the catalog's text (titles, tags, dates) and the hidden per-song truth."""
    day_rng = _rng(seed, "dates")
    truth_rows, catalog_rows = [], []
    for s, (r, info, plan) in enumerate(zip(results, catalog.info, catalog.songs)):
        artist: Artist = info["artist"]
        language = artist.language if info["sings"] else INSTRUMENTAL
        if info["sings"]:
            title = lyrics.make_title(text_rng, info["lyrics"])
        else:
            title = r.piece.title or lyrics.make_title(text_rng, lyrics.make_lyrics(text_rng, "en", 3))
        tags = make_tags(
            text_rng,
            info["genre"],
            catalog.genres,
            artist.family,
            factors.tempo_z[s],
            factors.energy_z[s],
            r.mode,
            language,
        )
        updated = behaviour.BASE_TIME - pd.Timedelta(seconds=int(day_rng.integers(86400, 365 * 86400)))
        catalog_rows.append(
            {
                schema.SONG_ID: plan.song_id,
                # relative to the catalog's folder (htcl.mels.read_catalog resolves it): the world can move
                schema.AUDIO_PATH: Path(plan.out_path).relative_to(out_dir).as_posix(),
                schema.TITLE: title,
                schema.ARTIST: artist.name,
                schema.LYRICS: "\n".join(info["lyrics"]),
                schema.TAGS: tags,
                schema.GENRE: info["genre"],
                schema.LANGUAGE: language,
                schema.UPDATED_AT: updated,
            }
        )
        truth_rows.append(_truth_row(s, plan, r, info, language, factors))
    return pd.DataFrame(catalog_rows), pd.DataFrame(truth_rows)


def _truth_row(
    s: int, plan: music.SongPlan, r: music.RenderResult, info: dict, language: str, factors: HiddenFactors
) -> dict:
    """One row of truth.parquet: what made song s (its index; song_id s + 1) sound and rank as it does."""
    artist: Artist = info["artist"]
    return {
        schema.SONG_ID: plan.song_id,
        schema.GENRE: info["genre"],
        schema.LANGUAGE: language,
        "vocal": bool(info["sings"]),
        "artist_id": artist.artist_id,
        "artist": artist.name,
        "piece": r.piece.key,
        "piece_title": r.piece.title,
        "instrument_family": artist.family,
        "programs": ",".join(map(str, artist.programs)),
        "tempo_bpm": float(r.bpm),
        "energy": float(factors.energy[s]),
        "mode": r.mode,
        "mode_margin": float(r.mode_margin),
        "transpose": artist.transpose,
        "velocity_scale": plan.velocity_scale,
        "gain_db": plan.gain_db,
        "voice": plan.voice if info["sings"] else "",
        "note_rate": float(r.note_rate),
        "piece_seconds": float(r.piece_seconds),
        "duration_s": float(r.duration_s),
        "popularity": float(factors.popularity[s]),
        "taste_tempo": float(factors.tempo_z[s]),
        "taste_energy": float(factors.energy_z[s]),
        "audio_sha256": r.sha256,
        "render_failures": len(r.failures),
    }


def _simulate_listeners(
    seed: int,
    listeners: str,
    n_users: int,
    catalog: CatalogPlan,
    factors: HiddenFactors,
    truth: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(listeners, sessions, interactions): the listeners, then their sessions and impressions."""
    people = make_listeners(_rng(seed, "listeners"), listeners, n_users, catalog.genres)
    song_factors = behaviour.SongFactors(
        genre=catalog.genre_of_song.astype(np.int64),
        popularity=factors.popularity,
        tempo=factors.tempo_z,
        energy=factors.energy_z,
        mode=np.where(truth["mode"] == "major", 1.0, -1.0),
        vocal=np.where(truth["vocal"], 1.0, -1.0),
        family=truth["instrument_family"].map({f: i for i, f in enumerate(FAMILY_NAMES)}).to_numpy(np.int64),
        n_families=len(FAMILY_NAMES),
        duration_s=truth["duration_s"].to_numpy(),
    )
    taste = behaviour.TasteModel(song_factors, people, _rng(seed, "taste"))
    sessions = behaviour.simulate_sessions(_rng(seed, "sessions"), song_factors, people, taste)
    interactions = behaviour.simulate_impressions(_rng(seed, "impressions"), song_factors, people, taste, sessions)
    return people.to_frame(), sessions, interactions


def _write_tables(
    out_dir: Path,
    catalog: pd.DataFrame,
    interactions: pd.DataFrame,
    sessions: pd.DataFrame,
    listeners: pd.DataFrame,
    truth: pd.DataFrame,
) -> dict[str, Path]:
    paths = {
        "catalog": _write(catalog, schema.CATALOG_SCHEMA, out_dir / "catalog.parquet"),
        "interactions": _write(interactions, schema.INTERACTIONS_SCHEMA, out_dir / "interactions.parquet"),
        "sessions": _write(sessions, schema.SESSIONS_SCHEMA, out_dir / "sessions.parquet"),
        "listeners": out_dir / "listeners.parquet",
        "truth": out_dir / "truth.parquet",
    }
    listeners.to_parquet(paths["listeners"], index=False)
    truth.to_parquet(paths["truth"], index=False)
    return paths


def _write_card(
    out_dir: Path,
    params: dict,
    stats: dict,
    figures: dict | None,
    timing: dict,
) -> dict[str, Path]:
    """world.json (params, stats, figures, timing) and README.md (the card, without the timing)."""
    paths = {"world_json": out_dir / "world.json", "card": out_dir / "README.md"}
    # timings vary run to run: world.json keeps them, the card (part of the deterministic output) does not
    paths["world_json"].write_text(
        json.dumps({"params": params, "stats": stats, "figures": figures, "timing": timing}, indent=2, default=str)
    )
    paths["card"].write_text(card.render_card(params, stats, figures))
    return paths


def generate_world(
    out_dir: str | Path,
    songs: int = 200,
    seed: int = 0,
    seconds: float = 30.0,
    source: str = "music21",
    listeners: str = "synthetic",
    workers: int | None = None,
    vocal_share: float = 0.5,
    users: int | None = None,
    validate: bool = True,
    progress: bool = True,
    soundfont: str | None = None,
) -> dict[str, Path]:
    """Generate a sample world in `out_dir`; returns the paths written (see the module docstring).

    source: "music21" (the corpus in the music21 wheel) or "midi:PATH" (a folder with manifest.tsv).
    listeners: "synthetic" or "lastfm:PATH" (HetRec 2011 Last.fm-2k folder).
    """
    if songs < 1:
        raise ValueError("songs must be >= 1")
    if not 0.0 <= vocal_share <= 1.0:
        raise ValueError("vocal_share must be in [0, 1]")
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, int(workers or os.cpu_count() or 1))
    n_users = int(users) if users else default_users(songs)
    music.check_tools(need_vocals=vocal_share > 0)
    soundfont = music.find_soundfont(soundfont)

    text_rng = _rng(seed, "text")
    plan = _plan_catalog(seed, songs, seconds, source, vocal_share, audio_dir, soundfont, text_rng)
    render_started = time.perf_counter()
    results = _render_checked(plan.songs, workers, progress)
    render_seconds = time.perf_counter() - render_started
    factors = _hidden_factors(seed, plan, results)
    catalog, truth = _song_tables(seed, out_dir, plan, results, factors, text_rng)
    listeners_frame, sessions, interactions = _simulate_listeners(seed, listeners, n_users, plan, factors, truth)
    paths = _write_tables(out_dir, catalog, interactions, sessions, listeners_frame, truth)
    paths["audio"] = audio_dir

    figures = None
    if validate:
        features = np.stack([r.features for r in results])
        figures = structure_figures(features, truth, interactions, listeners_frame)
    params = dict(
        songs=songs,
        seed=seed,
        seconds=seconds,
        source=source,
        listeners=listeners,
        users=n_users,
        vocal_share=vocal_share,
        workers=workers,
        sample_rate=SAMPLE_RATE,
        soundfont=soundfont,
    )
    stats = card.world_stats(catalog, truth, interactions, sessions, listeners_frame, plan.artists)
    timing = {"render_seconds": round(render_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2)}
    paths.update(_write_card(out_dir, params, stats, figures, timing))
    return paths
