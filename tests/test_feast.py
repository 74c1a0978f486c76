"""Feast feature store: stats semantics, materialization (twice, new model version), point-in-time
backfill without leakage, online reads from SQLite and from the Redis server on 127.0.0.1:6379."""

import json
import socket

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from htcl import schema as S
from htcl.features import listener_stats, song_stats

T0 = pd.Timestamp("2026-03-02 10:00", tz="UTC")
# the module world's model is conftest's tiny one; evaluate builds a random-init model from the config
from conftest import TINY_MODEL as TINY_OVERRIDES  # noqa: E402

N_SONGS, N_USERS = 120, 12


# --- stats semantics (pure pandas) ---------------------------------------------------------


def test_song_stats_count_only_the_past_and_expire():
    log = pd.DataFrame(
        {
            S.USER_ID: [1, 1, 2, 1],
            S.REC_SONG_ID: [7, 7, 7, 8],
            S.CLICKED: [True, False, True, True],
            S.FAVORED: [True, False, False, False],
            S.EVENT_TIMESTAMP: [T0, T0 + pd.Timedelta(hours=1), T0 + pd.Timedelta(days=2), T0 + pd.Timedelta(days=9)],
        }
    )
    stats = song_stats(log, log[S.EVENT_TIMESTAMP].min(), log[S.EVENT_TIMESTAMP].max()).set_index(
        [S.SONG_ID, S.EVENT_TIMESTAMP]
    )
    day = lambda d: T0.floor("D") + pd.Timedelta(days=d)  # noqa: E731
    # the all-zero snapshot at the log's first midnight, for every song (Feast needs a row at or before each label)
    assert stats.loc[(7, day(0)), "impressions_7d"] == 0 and stats.loc[(8, day(0)), "impressions_30d"] == 0
    # as of the end of day 0: both impressions of day 0, one click, one favor
    s = stats.loc[(7, day(1))]
    assert (s.impressions_7d, s.clicks_7d, s.favors_7d) == (2, 1, 1)
    assert (7, day(2)) not in stats.index  # nothing changed on day 1: no row
    assert stats.loc[(7, day(3)), "impressions_7d"] == 3
    # the 7-day window as of the end of day 7 is days 1..7: day 0's two impressions left it;
    # the 30-day window keeps them
    assert (7, day(7)) not in stats.index  # unchanged since day(3): no row
    assert stats.loc[(7, day(8)), "impressions_7d"] == 1 and stats.loc[(7, day(8)), "impressions_30d"] == 3
    assert stats.loc[(7, day(10)), "impressions_7d"] == 0  # the window emptied: a zero row, not a stale one
    # smoothed rates shrink towards the global rates with few impressions
    ctr0 = log[S.CLICKED].mean()
    assert stats.loc[(7, day(0)), "ctr_7d"] == pytest.approx(ctr0)
    # 1 click in 2 impressions, shrunk by 10 pseudo-impressions at ctr0 = 0.75
    assert stats.loc[(7, day(1)), "ctr_30d"] == pytest.approx((1 + 10 * ctr0) / (2 + 10))


def test_listener_stats_genre_summary():
    log = pd.DataFrame(
        {
            S.USER_ID: [1, 1, 1, 1],
            S.REC_SONG_ID: [1, 2, 3, 4],
            S.CLICKED: [True, True, True, False],
            S.FAVORED: [False, True, False, False],
            S.EVENT_TIMESTAMP: [T0] * 4,
        }
    )
    genre = {1: "rock", 2: "rock", 3: "pop", 4: "pop"}
    stats = listener_stats(log, T0, T0, genre)
    last = stats.iloc[-1]
    assert (last.impressions_30d, last.clicks_30d, last.favors_30d, last.active_days_30d) == (4, 3, 1, 1)
    assert last.top_genre_30d == "rock" and last.top_genre_share_30d == pytest.approx(2 / 3)
    assert last.genre_entropy_30d == pytest.approx(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)), rel=1e-5)
    assert stats.iloc[0].impressions_30d == 0 and stats.iloc[0].top_genre_30d == ""


# --- the store -------------------------------------------------------------------------------


def write_embeddings(out, version, vectors, made_at):
    rows = [
        {S.SONG_ID: i + 1, S.EMBEDDING: v.tolist(), S.MODEL_VERSION: version, S.EVENT_TIMESTAMP: made_at}
        for i, v in enumerate(vectors)
    ]
    path = out / "embeddings" / version / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=S.embeddings_schema(vectors.shape[1])), path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    """A catalog of 120 songs, 3 weeks of impressions, and embeddings from a real (tiny) HTCL model."""
    from htcl.model import HTCLModel
    from htcl.pipeline import embed_mels

    root = tmp_path_factory.mktemp("feast")
    world, out = root / "world", root / "out"
    world.mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            S.SONG_ID: np.arange(1, N_SONGS + 1),
            S.AUDIO_PATH: "",
            S.TITLE: "t",
            S.ARTIST: "a",
            S.LYRICS: "",
            S.TAGS: "",
            S.GENRE: rng.choice(["rock", "pop", "folk"], N_SONGS),
            S.LANGUAGE: "instrumental",
            S.UPDATED_AT: T0,
        }
    ).to_parquet(world / "catalog.parquet")
    n = 1500
    clicked = rng.random(n) < 0.3
    pd.DataFrame(
        {
            S.USER_ID: rng.integers(1, N_USERS + 1, n),
            S.TRIGGER_SONG_ID: rng.integers(1, N_SONGS + 1, n),
            S.REC_SONG_ID: rng.integers(1, N_SONGS + 1, n),
            S.CLICKED: clicked,
            S.FAVORED: clicked & (rng.random(n) < 0.5),
            S.EVENT_TIMESTAMP: T0 + pd.to_timedelta(np.sort(rng.integers(0, 21 * 86400, n)), unit="s"),
        }
    ).to_parquet(world / "interactions.parquet")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = HTCLModel(tiny_config.model, tiny_config.audio)
    mels = [rng.normal(-6, 3, (128, 40)).astype(np.float32) for _ in range(N_SONGS)]
    write_embeddings(out, "v1", embed_mels(model, mels), T0 + pd.Timedelta(days=30))
    return {
        "world": world,
        "out": out,
        "embed_dim": tiny_config.model.embed_dim,
        "overrides": [f"output_dir={out}", f"data.root={world}"],
    }


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from ray_jobs.common import init_ray

    init_ray(num_cpus=2, quiet=True)
    yield
    ray.shutdown()


def materialize(world, capsys, *extra):
    from ray_jobs import materialize

    capsys.readouterr()
    assert materialize.main(["--config", "configs/demo.yaml", *world["overrides"], *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n") :])


def online_embeddings(store, song_ids, version):
    rows = [{S.SONG_ID: int(s), S.MODEL_VERSION: version} for s in song_ids]
    got = store.get_online_features(features=["song_embedding:embedding"], entity_rows=rows).to_dict()
    return got["embedding"]


@pytest.mark.slow
def test_materialize_is_idempotent_and_switches_versions_without_a_gap(world, ray_instance, capsys):
    from feature_repo.store import open_store

    first = materialize(world, capsys, "--model-version", "v1")
    data = world["out"] / "feast"
    assert first["current_model_version"] == "v1" and first["embed_dim"] == world["embed_dim"]
    assert first["rows"]["song_stats"] > N_SONGS and first["rows"]["listener_stats"] > N_USERS
    store = open_store(data, "")
    # The vector Feast stores is the model's size, in the registry and in the online store.
    field = next(f for f in store.get_feature_view("song_embedding").schema if f.name == "embedding")
    assert field.vector_index and field.vector_length == world["embed_dim"]
    v1 = online_embeddings(store, range(1, N_SONGS + 1), "v1")
    assert all(v is not None and len(v) == world["embed_dim"] for v in v1)
    stored = pq.read_table(world["out"] / "embeddings" / "v1").to_pandas().sort_values(S.SONG_ID)
    np.testing.assert_allclose(np.array(v1), np.stack(stored[S.EMBEDDING]), rtol=1e-6)
    stats_before = store.get_online_features(
        features=["song_stats:impressions_30d", "song_stats:ctr_7d"],
        entity_rows=[{S.SONG_ID: s} for s in range(1, N_SONGS + 1)],
    ).to_dict()
    files = {p.name: p.read_bytes() for p in data.glob("*.parquet")}

    # A second run changes nothing: same source bytes, nothing new materialized, same online values.
    second = materialize(world, capsys, "--model-version", "v1")
    assert "song_embedding" not in second["materialized"] and second["stats"] == "inputs unchanged: reused"
    assert {p.name: p.read_bytes() for p in data.glob("*.parquet")} == files
    assert (
        store.get_online_features(
            features=["song_stats:impressions_30d", "song_stats:ctr_7d"],
            entity_rows=[{S.SONG_ID: s} for s in range(1, N_SONGS + 1)],
        ).to_dict()
        == stats_before
    )

    # A new model version is backfilled next to the old one; v1 stays current and readable ...
    new = np.random.default_rng(1).standard_normal((N_SONGS, world["embed_dim"])).astype(np.float32)
    write_embeddings(world["out"], "v2", new / np.linalg.norm(new, axis=1, keepdims=True), T0 + pd.Timedelta(days=31))
    third = materialize(world, capsys, "--model-version", "v2", "--no-switch")
    assert third["current_model_version"] == "v1" and third["rows"]["song_embeddings (all versions)"] == 2 * N_SONGS
    assert online_embeddings(store, range(1, N_SONGS + 1), "v1") == v1
    assert all(v is not None for v in online_embeddings(store, range(1, N_SONGS + 1), "v2"))
    # ... until the switch, which only renames the current version.
    fourth = materialize(world, capsys, "--model-version", "v2")
    assert fourth["current_model_version"] == "v2" and fourth["previous_model_version"] == "v1"
    assert online_embeddings(store, [1], "v1") == v1[:1]


@pytest.mark.slow
def test_backfill_is_point_in_time_and_loses_no_row(world, ray_instance, capsys):
    if not (world["out"] / "feast" / "online" / "sqlite" / "current_model_version").is_file():
        materialize(world, capsys, "--model-version", "v1")
    # The test plants rows in the log and in the stats; the module's world is put back after it,
    # so later tests reuse its stats (same log hash) instead of recomputing them with Ray.
    touched = [world["world"] / "interactions.parquet", world["out"] / "feast" / "song_stats.parquet"]
    saved = {p: p.read_bytes() for p in touched}
    try:
        _check_backfill(world, capsys)
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def _check_backfill(world, capsys):
    from ray_jobs import backfill

    log = pd.read_parquet(world["world"] / "interactions.parquet")
    label = log.iloc[700]
    song, at = int(label[S.REC_SONG_ID]), label[S.EVENT_TIMESTAMP]
    # Plant a value that appears one second after this label row: the row must not see it, a
    # row after it must.
    stats_path = world["out"] / "feast" / "song_stats.parquet"
    stats = pd.read_parquet(stats_path)
    planted = (
        stats[stats[S.SONG_ID] == song]
        .iloc[[-1]]
        .assign(
            **{
                S.EVENT_TIMESTAMP: at + pd.Timedelta(seconds=1),
                "created": at + pd.Timedelta(seconds=1),
                "impressions_7d": 99999,
            }
        )
    )
    pd.concat([stats, planted]).to_parquet(stats_path, index=False)
    later = pd.DataFrame([{**label.to_dict(), S.EVENT_TIMESTAMP: at + pd.Timedelta(seconds=2)}])
    pd.concat([log, later], ignore_index=True).to_parquet(world["world"] / "interactions.parquet")

    capsys.readouterr()
    start, end = (at - pd.Timedelta(days=3)).isoformat(), (at + pd.Timedelta(days=3)).isoformat()
    assert backfill.main(["--config", "configs/demo.yaml", *world["overrides"], "--start", start, "--end", end]) == 0
    summary = json.loads(capsys.readouterr().out)
    frame = pd.read_parquet(summary["frame"])
    window = log[
        (log[S.EVENT_TIMESTAMP] >= at - pd.Timedelta(days=3)) & (log[S.EVENT_TIMESTAMP] < at + pd.Timedelta(days=3))
    ]
    assert len(frame) == len(window) + 1  # every impression, duplicates included
    mine = frame[(frame[S.SONG_ID] == song) & (frame[S.EVENT_TIMESTAMP] == at)]
    assert len(mine) >= 1 and (mine["song_stats__impressions_7d"] != 99999).all()
    after = frame[(frame[S.SONG_ID] == song) & (frame[S.EVENT_TIMESTAMP] == at + pd.Timedelta(seconds=2))]
    assert (after["song_stats__impressions_7d"] == 99999).all()
    # The features the row does see are the snapshot of the end of the previous day, as computed.
    expected = stats[(stats[S.SONG_ID] == song) & (stats[S.EVENT_TIMESTAMP] <= at)].iloc[-1]
    assert mine["song_stats__impressions_7d"].iloc[0] == expected["impressions_7d"]
    assert len(mine["candidate_embedding__embedding"].iloc[0]) == world["embed_dim"]
    assert mine["trigger_embedding__embedding"].notna().all() and mine["listener_stats__ctr_30d"].notna().all()

    # Feast's point-in-time join equals the in-process one that `--local` evaluation uses
    # (htcl.features.point_in_time_stats), on every row the planted values do not touch.
    from htcl.features import point_in_time_stats

    catalog = pd.read_parquet(world["world"] / "catalog.parquet")
    local = point_in_time_stats(log, dict(zip(catalog[S.SONG_ID], catalog[S.GENRE])))
    rows = frame[(frame["impression_id"] < len(log)) & (frame[S.SONG_ID] != song)]
    theirs = local.iloc[rows["impression_id"].to_numpy()]
    numeric = [
        c
        for c in frame.columns
        if c.startswith(("song_stats__", "listener_stats__")) and c != "listener_stats__top_genre_30d"
    ]
    assert len(rows) > 100 and len(numeric) == 17
    np.testing.assert_allclose(rows[numeric].to_numpy(float), theirs[numeric].to_numpy(float), rtol=1e-6)
    assert (
        rows["listener_stats__top_genre_30d"].to_numpy() == theirs["listener_stats__top_genre_30d"].to_numpy()
    ).all()


def redis_reachable(host="127.0.0.1", port=6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_online_lookup_of_1_and_100_songs(world, ray_instance, capsys, backend):
    from feature_repo.store import open_store

    url = ""
    if backend == "redis":
        if not redis_reachable():
            pytest.skip("no Redis server answers on 127.0.0.1:6379")
        import redis

        url = "redis://127.0.0.1:6379/13"
        redis.Redis(host="127.0.0.1", port=6379, db=13).flushdb()
    summary = materialize(world, capsys, "--model-version", "v1", "--online-store", url)
    assert summary["online_store"] == ("RedisOnlineStoreConfig" if url else "SqliteOnlineStoreConfig")
    store = open_store(world["out"] / "feast", url)
    service = store.get_feature_service("ranker_v1")
    one = store.get_online_features(
        features=service,
        full_feature_names=True,
        entity_rows=[{S.SONG_ID: 5, S.TRIGGER_SONG_ID: 6, S.USER_ID: 1, S.MODEL_VERSION: "v1"}],
    ).to_dict()
    assert len(one["candidate_embedding__embedding"][0]) == world["embed_dim"]
    assert one["song_stats__impressions_30d"][0] is not None and one["listener_stats__ctr_30d"][0] is not None
    hundred = online_embeddings(store, range(1, 101), "v1")
    assert len(hundred) == 100 and all(len(v) == world["embed_dim"] for v in hundred)
    expected = pq.read_table(world["out"] / "embeddings" / "v1").to_pandas().sort_values(S.SONG_ID)
    np.testing.assert_allclose(np.array(hundred), np.stack(expected[S.EMBEDDING])[:100], rtol=1e-6)
    assert online_embeddings(store, [N_SONGS + 50], "v1") == [None]  # an unknown song is absent, not an error


@pytest.mark.slow
def test_train_rankers_and_evaluate_jobs_on_the_feast_frame(world, ray_instance, capsys):
    """`htcl train-rankers` and `htcl evaluate` (the Ray/Feast edges) on the module's store."""
    from htcl.mels import mel_to_bytes, write_table
    from htcl.ranking import Rankers
    from ray_jobs import evaluate, train_rankers

    if not (world["out"] / "feast" / "online" / "sqlite" / "current_model_version").is_file():
        materialize(world, capsys, "--model-version", "v1")
    capsys.readouterr()
    assert train_rankers.main(["--config", "configs/demo.yaml", *world["overrides"]]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])  # after the backfill's progress line
    rankers = Rankers.load(summary["rankers"])
    assert rankers.model_version == "v1" and rankers.feature_names[0] == "emb_cosine"
    assert summary["train_rows"] + summary["heldout_rows"] == 1500 and 0 <= summary["heldout_ctr_auc"] <= 1

    # evaluate scores every variant it finds: here no checkpoints, so random-init and mel statistics
    rng = np.random.default_rng(1)
    mels = [
        {S.SONG_ID: i, S.N_FRAMES: 40, S.MEL: mel_to_bytes(rng.normal(-6, 3, (128, 40)).astype(np.float32))}
        for i in range(1, N_SONGS + 1)
    ]
    write_table(mels, S.MELS_SCHEMA, world["out"] / "mels" / "part-00000.parquet")
    capsys.readouterr()
    assert evaluate.main(["--config", "configs/demo.yaml", *world["overrides"], *TINY_OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert "| random-init encoder |" in out and "| no embedding (stats only) |" in out
    results = json.loads((world["out"] / "evaluation" / "results.json").read_text())
    assert set(results["variants"]) == {"random-init encoder", "mel statistics", "no embedding (stats only)"}
    assert (world["out"] / "evaluation" / "cosine_histograms.png").stat().st_size > 1000
