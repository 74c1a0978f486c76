"""ANN matching: HNSW recall against exact search, save/load with the model version, exclusions."""

import numpy as np
import pytest

from htcl.retrieval import AnnIndex, RetrievalError, UnknownSong, exact_search, recall_at_k


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Embedding-like data: unit vectors around a few dozen directions."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_at_100_against_exact_search():
    x = clustered(5000)
    ids = np.arange(5000) + 1000
    index = AnnIndex.build(ids, x, "v1")
    queries = x[:200]
    approx, _ = index.search(queries, 100)
    exact = ids[exact_search(x, queries, 100)]
    assert recall_at_k(approx, exact) >= 0.95


def test_scores_are_cosines_and_sorted():
    x = clustered(500, seed=1) * 3.0  # not unit: the index normalizes
    index = AnnIndex.build(np.arange(500), x, "v1")
    ids, scores = index.search(x[:5], 10)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.sum(unit[:5, None, :] * unit[ids], axis=2)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_similar_excludes_the_song_and_save_load_keeps_the_version(tmp_path):
    x = clustered(300, seed=2)
    ids = np.arange(300) * 7 + 3
    index = AnnIndex.build(ids, x, "finetune-80-abc")
    got, _ = index.similar(int(ids[10]), 20)
    assert len(got) == 20 and int(ids[10]) not in got
    index.save(tmp_path / "idx")
    loaded = AnnIndex.load(tmp_path / "idx", model_version="finetune-80-abc")
    assert loaded.model_version == "finetune-80-abc" and len(loaded) == 300
    np.testing.assert_array_equal(loaded.similar(int(ids[10]), 20)[0], got)
    np.testing.assert_allclose(loaded.vector(int(ids[3])), x[3], atol=1e-6)
    with pytest.raises(RetrievalError, match="holds model_version"):
        AnnIndex.load(tmp_path / "idx", model_version="other")
    with pytest.raises(UnknownSong):
        loaded.similar(999999, 5)
    with pytest.raises(FileNotFoundError, match="htcl embed"):
        AnnIndex.load(tmp_path / "nothing")


def test_more_k_than_songs_pads_and_bad_input_is_named():
    index = AnnIndex.build([1, 2, 3], clustered(3, seed=3), "v")
    ids, scores = index.search(clustered(1, seed=4), 5)
    assert sorted(ids[0][:3]) == [1, 2, 3] and list(ids[0][3:]) == [-1, -1] and np.isinf(scores[0][3:]).all()
    with pytest.raises(RetrievalError, match="unique"):
        AnnIndex.build([1, 1], clustered(2), "v")
    with pytest.raises(RetrievalError, match="dims"):
        index.search(np.ones((1, 7), np.float32), 2)


def test_ivf_hnsw_index_recalls_saves_loads_and_reads_vectors_back(tmp_path):
    """The large-catalog kind (IVF over k-means lists, an HNSW quantizer), forced on a small one."""
    from htcl.retrieval import IVF_HNSW, IvfParams

    x = clustered(5000, seed=5)
    ids = np.arange(5000) * 3 + 1
    index = AnnIndex.build(ids, x, "v2", kind=IVF_HNSW)
    assert index.ivf == IvfParams() and index.index.nlist == IvfParams().lists(5000) == 282
    queries = x[:200]
    approx, scores = index.search(queries, 100)
    assert recall_at_k(approx, ids[exact_search(x, queries, 100)]) >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    got, _ = index.similar(int(ids[7]), 20)
    assert len(got) == 20 and int(ids[7]) not in got
    index.save(tmp_path / "ivf")
    loaded = AnnIndex.load(tmp_path / "ivf", model_version="v2")
    assert loaded.ivf == index.ivf and len(loaded) == 5000
    np.testing.assert_array_equal(loaded.similar(int(ids[7]), 20)[0], got)
    np.testing.assert_allclose(loaded.vector(int(ids[9])), x[9], atol=1e-6)


def test_index_kind_follows_catalog_size_and_unknown_kinds_are_refused():
    from htcl.retrieval import HNSW, HNSW_MAX_SONGS, IVF_HNSW, index_kind

    assert index_kind(HNSW_MAX_SONGS) == HNSW and index_kind(HNSW_MAX_SONGS + 1) == IVF_HNSW
    assert AnnIndex.build(np.arange(50), clustered(50), "v").ivf is None  # small: HNSW
    with pytest.raises(RetrievalError, match="unknown index kind 'flat'"):
        AnnIndex.build(np.arange(50), clustered(50), "v", kind="flat")


def test_the_config_index_section_chooses_the_kind_and_nprobe_and_is_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from htcl import schema as S
    from htcl.config import ConfigError, IndexConfig, load_config
    from htcl.retrieval import build_index_from_embeddings

    emb_dir = tmp_path / "embeddings" / "v1"
    emb_dir.mkdir(parents=True)
    x = clustered(400, seed=6)
    pq.write_table(
        pa.table({S.SONG_ID: np.arange(400), S.EMBEDDING: list(x), S.MODEL_VERSION: ["v1"] * 400}),
        emb_dir / "part-0.parquet",
    )
    auto = AnnIndex.load(build_index_from_embeddings(emb_dir, tmp_path / "auto"))
    assert auto.ivf is None  # 400 songs: HNSW
    cfg = load_config(None, ["index.kind=ivf_hnsw", "index.nprobe=7"])
    assert cfg.index == IndexConfig(kind="ivf_hnsw", nprobe=7)
    ivf = AnnIndex.load(build_index_from_embeddings(emb_dir, tmp_path / "ivf", cfg.index))
    assert ivf.ivf.nprobe == 7 and ivf.index.nprobe == 7
    small = AnnIndex.load(build_index_from_embeddings(emb_dir, tmp_path / "small", IndexConfig(hnsw_max_songs=100)))
    assert small.ivf is not None  # above the configured limit
    with pytest.raises(ConfigError, match="index.kind: 'flat' is not one of"):
        load_config(None, ["index.kind=flat"])
    with pytest.raises(ConfigError, match="nprobe must be >= 1"):
        load_config(None, ["index.nprobe=0"])
