"""The world's card (README.md in the output folder): what it is, its parameters, counts, figures."""

from __future__ import annotations

from htcl import schema
from htcl.sample_world.validate import figures_table


def world_stats(catalog, truth, interactions, sessions, listeners_frame, artists) -> dict:
    clicks = int(interactions[schema.CLICKED].sum())
    favors = int(interactions[schema.FAVORED].sum())
    return {
        "songs": int(len(catalog)),
        "artists": int(truth["artist_id"].nunique()),
        "artists_invented": len(artists),
        "genres": {k: int(v) for k, v in catalog[schema.GENRE].value_counts().sort_index().items()},
        "languages": {k: int(v) for k, v in catalog[schema.LANGUAGE].value_counts().sort_index().items()},
        "instrument_families": {k: int(v) for k, v in truth["instrument_family"].value_counts().sort_index().items()},
        "modes": {k: int(v) for k, v in truth["mode"].value_counts().sort_index().items()},
        "duration_s": {
            "min": round(float(truth["duration_s"].min()), 1),
            "median": round(float(truth["duration_s"].median()), 1),
            "max": round(float(truth["duration_s"].max()), 1),
        },
        "tempo_bpm": {"min": round(float(truth["tempo_bpm"].min())), "max": round(float(truth["tempo_bpm"].max()))},
        "songs_with_fallback_piece": int((truth["render_failures"] > 0).sum()),
        "covers": int(truth["piece"].duplicated().sum()),
        "listeners": int(len(listeners_frame)),
        "sessions": int(sessions[schema.SESSION_ID].nunique()),
        "plays": int(len(sessions)),
        "impressions": int(len(interactions)),
        "clicks": clicks,
        "favors": favors,
        "ctr": round(clicks / max(len(interactions), 1), 4),
        "cvr": round(favors / max(clicks, 1), 4),
        "first_event": str(interactions[schema.EVENT_TIMESTAMP].min()),
        "last_event": str(interactions[schema.EVENT_TIMESTAMP].max()),
    }


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def render_card(params: dict, stats: dict, figures: dict | None) -> str:
    p = params
    source_line = (
        "the corpus that the `music21` wheel ships (BSD): Bach chorales, Palestrina masses, Italian madrigals "
        "(Monteverdi, Trecento), fiddle tunes from Ryan's Mammoth Collection by dance type, Essen folk songs by region"
        if p["source"] == "music21"
        else f"MIDI files listed in `{p['source'][5:]}/manifest.tsv` (genre labels from the manifest)"
    )
    cmd = (
        f"htcl sample-data --out DIR --songs {p['songs']} --seed {p['seed']} --seconds {p['seconds']:g} "
        f"--source {p['source']} --listeners {p['listeners']} --vocal-share {p['vocal_share']:g} --users {p['users']}"
    )
    lines = [
        "# htcl sample world",
        "",
        "A simulated music catalog with real music: symbolic scores rendered through a General MIDI SoundFont "
        "synthesizer (fluidsynth), by invented artists with persistent audible choices (instrument family, tempo, "
        "transposition, energy, mix); a share of songs carries a vocal line (espeak-ng) in one of several languages, "
        "with lyrics made of real words of that language. Simulated listeners play sessions and react to a "
        "similar-songs channel. The tables follow htcl's data contracts, so the pipeline cannot tell "
        "this world from a real catalog.",
        "",
        "## Parameters",
        "",
        f"- songs {p['songs']}, seed {p['seed']}, up to {p['seconds']:g} s per song, {p['sample_rate']} Hz mono FLAC",
        f"- music: {source_line}",
        f"- listeners: {p['listeners']} ({p['users']} listeners), vocal share of artists {p['vocal_share']:g}",
        f"- SoundFont: `{p['soundfont']}`",
        f"- reproduce: `{cmd}` (same arguments and seed give identical tables and audio bytes)",
        "",
        "## Contents",
        "",
        "| file | what |",
        "|---|---|",
        "| `catalog.parquet` | song_id, audio_path (the FLAC's path relative to this folder), title, artist, lyrics, tags, genre, language, updated_at |",
        "| `interactions.parquet` | similar-songs impressions: user_id, trigger_song_id, rec_song_id, clicked, favored, event_timestamp; favored rows are the stage-2 triplets |",
        "| `sessions.parquet` | listening sessions: user_id, session_id, position, song_id, event_timestamp |",
        "| `listeners.parquet` | listeners: genre affinities, taste over audible factors, origin (synthetic or a Last.fm user id) |",
        "| `truth.parquet` | hidden per-song factors (tempo, energy, mode, vocal, instrument family, popularity...): **for checks only, training must never read it** |",
        "| `audio/` | one FLAC per song |",
        "| `world.json` | parameters, counts, figures and timings, machine-readable |",
        "",
        "## Counts",
        "",
        f"- {stats['songs']} songs by {stats['artists']} artists; {stats['covers']} covers (a piece replayed by another artist); "
        f"{stats['songs_with_fallback_piece']} songs fell back to another piece because theirs could not be rendered",
        f"- genres: {_counts(stats['genres'])}",
        f"- languages: {_counts(stats['languages'])}",
        f"- instrument families: {_counts(stats['instrument_families'])}",
        f"- modes: {_counts(stats['modes'])}; tempo {stats['tempo_bpm']['min']}-{stats['tempo_bpm']['max']} bpm; "
        f"duration {stats['duration_s']['min']}-{stats['duration_s']['max']} s (median {stats['duration_s']['median']})",
        f"- {stats['listeners']} listeners, {stats['sessions']} sessions ({stats['plays']} plays), "
        f"{stats['impressions']} impressions, {stats['clicks']} clicks (CTR {stats['ctr']:.3f}), "
        f"{stats['favors']} favors (CVR {stats['cvr']:.3f})",
        f"- events from {stats['first_event']} to {stats['last_event']} (fixed base date plus seeded offsets)",
        "",
        "## Structure",
        "",
        "Text carries semantics (genre, language); listener preference lives in a taste space over audible factors "
        "that overlaps with genre but is not genre, and shows only through favor behaviour. Checked with simple "
        "cross-validated models on plain audio features (log-Mel statistics, loudness, rhythm, chroma) computed "
        "from the written FLAC files, not by construction. Each audio figure is given twice: with songs split at "
        "random, and with whole artists held out (the honest one: an artist's persistent sound cannot carry a "
        "label from training to test). Chance is the majority-class share of the songs scored. Favor AUCs are "
        "cross-validated logistic regressions on the logged impressions: from the true hidden taste factors "
        "(trigger-candidate similarity in the taste space, listener-song taste match) against everything genre "
        "can tell (same genre as the trigger, the listener's affinity for the genre, the genre itself).",
        "",
    ]
    if figures:
        lines += ["| figure | songs split at random | artists held out | baseline |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in figures_table(figures)]
    else:
        lines.append("(not computed: generated with validation off)")
    lines += [
        "",
        "## How it is made",
        "",
        "- Scores are written to MIDI and restyled per artist (General MIDI programs of one instrument family, tempo, "
        "transposition, velocity), then rendered by `fluidsynth` with the TimGM6mb SoundFont; long pieces are cropped, "
        "short ones repeated whole while they fit, so songs keep varied real lengths.",
        "- Vocal lines are espeak-ng speech of the lyrics in the artist's language and voice, mixed under the music.",
        "- Click and favor depend on the listener's genre affinity, trigger-candidate similarity in the hidden taste "
        "space, the listener's taste, popularity and noise; favor leans harder on taste. Sessions follow genre "
        "affinity with exploration jumps, so co-occurrence differs from semantic similarity.",
        "- System tools: `fluidsynth`, `timgm6mb-soundfont` and `espeak-ng` (Debian), installed by "
        "`scripts/install_system_deps.sh`, which `make demo` and `make test` run.",
        "",
    ]
    return "\n".join(lines)
