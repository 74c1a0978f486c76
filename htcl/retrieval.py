"""Matching: an approximate nearest-neighbour index over song embeddings, by cosine.

    index = AnnIndex.build(song_ids, embeddings, model_version="finetune-80-ab12cd34ef")
    index.save("outputs/demo/index/finetune-80-ab12cd34ef")
    index = AnnIndex.load("outputs/demo/index/finetune-80-ab12cd34ef")
    ids, scores = index.search(queries, k=100)        # (Q, k) song ids and cosines
    ids, scores = index.similar(song_id=42, k=100)    # the song itself left out

Why faiss (inner product on L2-normalized vectors = cosine): faiss is maintained by Meta, ships
CPU wheels for every platform we pin, serializes an index to one file, releases the GIL while
searching batches across threads, and has the exact index (IndexFlatIP) we measure recall against
in the same library. hnswlib has HNSW too but is barely maintained; usearch is fast too but would
be one more native dependency.

Two kinds, by catalog size (`index_kind`):
- up to HNSW_MAX_SONGS songs, HNSW (IndexHNSWFlat): recall@100 ~1.0, but its build costs
  n log n with a constant that grows once the graph outgrows the CPU caches: 0.8 s at 10k songs,
  23 s at 100k, 475 s at 1M on 2 cores (time ∝ n^1.39, benchmarks/bench_scale.py);
- above, an inverted file (IndexIVFFlat) over 4·√n k-means lists whose coarse quantizer is itself a
  small HNSW over the centroids (faiss's "IVF..._HNSW32" recipe for 1M-100M vectors): training
  on 64 points a list and one quantizer lookup per song make the build linear (22 s at 1M), and a
  query scans `nprobe` lists. Its recall needs embeddings with cluster structure (trained ones
  have it; isotropic noise does not): the config's `index` section sets the kind, the size limit
  and nprobe.

Both store the vectors ("Flat"), so a song's own vector is read back by id without another lookup.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from htcl.config import HNSW, IVF_HNSW, IndexConfig

INDEX_FILE = "index.faiss"
IDS_FILE = "song_ids.npy"
META_FILE = "index.json"


class RetrievalError(ValueError):
    pass


class UnknownSong(KeyError):
    """A song id the index does not hold."""


@dataclass(frozen=True)
class HnswParams:
    # Chosen on 100k x 128 isotropic vectors, the hardest case (benchmarks/bench_retrieval.py):
    # recall@100 0.870 at m=32/efC=200/ef=256, 0.951 at ef=512; 0.965 at m=48/efC=300/ef=256 with
    # 0.56 ms a query (build 63 s on 2 cores). Embedding-like clustered vectors reach 1.0.
    m: int = 48  # graph degree: recall vs memory (each vector keeps 2*m links on layer 0)
    ef_construction: int = 300  # build-time beam width
    ef_search: int = 256  # query-time beam width; raised to k when k is larger


@dataclass(frozen=True)
class IvfParams:
    # nlist = lists_per_sqrt_song · √n: faiss's guideline is 4-16·√n lists.
    lists_per_sqrt_song: float = 4.0
    # k-means sample a list (faiss warns below 39); training costs sample × nlist ∝ n.
    train_points_per_list: int = 64
    # Lists a query scans (3.2% of them at 1M songs): recall vs latency. recall@100 at 1M x 128
    # (benchmarks/results/bench_retrieval_1m.json): 0.998 on embedding-like vectors (1,000
    # clusters), 0.26 on structureless isotropic ones, where HNSW keeps ~0.96.
    nprobe: int = IndexConfig.nprobe
    quantizer_m: int = 32  # graph degree of the HNSW over the centroids

    def lists(self, n: int) -> int:
        return max(1, int(self.lists_per_sqrt_song * np.sqrt(n)))


HNSW_MAX_SONGS = IndexConfig.hnsw_max_songs  # above: IVF_HNSW, whose build stays linear in the catalog


def index_kind(n: int, hnsw_max_songs: int = HNSW_MAX_SONGS) -> str:
    return HNSW if n <= hnsw_max_songs else IVF_HNSW


def normalize(x: np.ndarray) -> np.ndarray:
    """(n, D) float32 rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class AnnIndex:
    """HNSW, or an IVF with an HNSW quantizer, over unit vectors; rows are addressed by position,
    song ids kept beside."""

    def __init__(
        self,
        index,
        song_ids: np.ndarray,
        model_version: str,
        params: HnswParams,
        build_seconds: float = 0.0,
        ivf: IvfParams | None = None,
    ):
        self.index = index  # IndexHNSWFlat, or IndexIVFFlat (ivf given) with an HNSW quantizer
        self.song_ids = np.asarray(song_ids, dtype=np.int64)
        self.model_version = model_version
        self.params = params
        self.ivf = ivf
        self.build_seconds = build_seconds
        self._row = {int(s): i for i, s in enumerate(self.song_ids)}

    # -- build / save / load -------------------------------------------------------------
    @classmethod
    def build(
        cls,
        song_ids,
        embeddings: np.ndarray,
        model_version: str,
        params: HnswParams = HnswParams(),
        kind: str | None = None,
        ivf: IvfParams = IvfParams(),
        seed: int = 0,
    ) -> "AnnIndex":
        """kind: HNSW or IVF_HNSW; None picks by size (index_kind). seed: the k-means sample's."""
        import faiss

        song_ids = np.asarray(song_ids, dtype=np.int64)
        x = normalize(embeddings)
        if x.ndim != 2 or len(x) != len(song_ids):
            raise RetrievalError(f"{len(song_ids)} song ids but embeddings of shape {tuple(np.shape(embeddings))}")
        if len(np.unique(song_ids)) != len(song_ids):
            raise RetrievalError("song ids must be unique: one vector per song")
        kind = kind or index_kind(len(x))
        if kind not in (HNSW, IVF_HNSW):
            raise RetrievalError(f"unknown index kind {kind!r}: {HNSW!r} or {IVF_HNSW!r}")
        t0 = time.perf_counter()
        if kind == HNSW:
            index = faiss.IndexHNSWFlat(x.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
            index.add(x)
        else:
            nlist = ivf.lists(len(x))
            quantizer = faiss.IndexHNSWFlat(x.shape[1], ivf.quantizer_m, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = min(len(x), ivf.train_points_per_list * nlist)
            index.train(x[np.sort(rng.choice(len(x), sample, replace=False))])
            index.add(x)
            index.make_direct_map()  # reconstruct(row): a song's own vector; write_index keeps it
        built = cls(index, song_ids, model_version, params, time.perf_counter() - t0, ivf if kind == IVF_HNSW else None)
        built._set_search_width(1)
        return built

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        np.save(directory / IDS_FILE, self.song_ids)
        meta = {
            "model_version": self.model_version,
            "count": len(self),
            "dim": self.dim,
            "metric": "cosine",
            "kind": "faiss.IndexHNSWFlat" if self.ivf is None else "faiss.IndexIVFFlat+IndexHNSWFlat",
            "m": self.params.m,
            "ef_construction": self.params.ef_construction,
            "ef_search": self.params.ef_search,
            **({} if self.ivf is None else {"nlist": int(self.index.nlist), "ivf": asdict(self.ivf)}),
            "build_seconds": round(self.build_seconds, 3),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model_version: str | None = None) -> "AnnIndex":
        """Load a saved index; with model_version given, refuse an index of another version."""
        import faiss

        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise FileNotFoundError(f"no ANN index in {directory} (missing {META_FILE}); run `htcl embed` first")
        meta = json.loads((directory / META_FILE).read_text())
        if model_version is not None and meta["model_version"] != model_version:
            raise RetrievalError(f"{directory} holds model_version {meta['model_version']!r}, not {model_version!r}")
        index = faiss.read_index(str(directory / INDEX_FILE))
        params = HnswParams(meta["m"], meta["ef_construction"], meta["ef_search"])
        ivf = IvfParams(**meta["ivf"]) if "ivf" in meta else None
        loaded = cls(
            index, np.load(directory / IDS_FILE), meta["model_version"], params, meta.get("build_seconds", 0.0), ivf
        )
        loaded._set_search_width(1)
        return loaded

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __contains__(self, song_id) -> bool:
        return int(song_id) in self._row

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def vector(self, song_id: int) -> np.ndarray:
        """(D,) the song's unit vector."""
        row = self._row.get(int(song_id))
        if row is None:
            raise UnknownSong(song_id)
        return self.index.reconstruct(row)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine for each query row: song ids (Q, k) int64 and cosines (Q, k) float32.

        Fewer than k hits (k > catalog) are padded with id -1 and score -inf.
        """
        q = normalize(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have {q.shape[1]} dims, the index {self.dim}")
        if k < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        self._set_search_width(k)
        scores, rows = self.index.search(q, k)
        ids = np.where(rows >= 0, self.song_ids[np.maximum(rows, 0)], -1)
        return ids, np.where(rows >= 0, scores, -np.inf).astype(np.float32)

    def _set_search_width(self, k: int) -> None:
        """HNSW's beam is at least k wide; an IVF scans ivf.nprobe lists, found by a beam over the
        centroids at least twice as wide."""
        if self.ivf is None:
            self.index.hnsw.efSearch = max(self.params.ef_search, k)
        else:
            self.index.nprobe = min(self.ivf.nprobe, int(self.index.nlist))
            faiss_quantizer(self.index).hnsw.efSearch = max(64, 2 * self.index.nprobe)

    def similar(self, song_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k songs nearest to a catalog song, the song itself excluded: (k,) ids, (k,) cosines."""
        ids, scores = self.search(self.vector(song_id)[None], k + 1)
        keep = ids[0] != int(song_id)
        return ids[0][keep][:k], scores[0][keep][:k]


def faiss_quantizer(ivf_index):
    """The coarse quantizer of an IndexIVF, as its own class (IndexHNSWFlat here)."""
    import faiss

    return faiss.downcast_index(ivf_index.quantizer)


def exact_search(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions (Q, k) of the exact top-k by cosine (faiss IndexFlatIP): the recall reference."""
    import faiss

    x = normalize(corpus)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return flat.search(normalize(queries), k)[1]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate top-k (both (Q, k))."""
    hits = [len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))


def read_embeddings(directory: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """song_ids (n,), embeddings (n, D) float32 and the model_version of embeddings/<version>/."""
    import pyarrow.parquet as pq

    from htcl import schema as S

    directory = Path(directory)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no embeddings in {directory} (expected part-*.parquet)")
    table = pq.ParquetDataset([str(f) for f in files]).read(columns=[S.SONG_ID, S.EMBEDDING, S.MODEL_VERSION])
    ids = table.column(S.SONG_ID).to_numpy()
    emb = np.stack(table.column(S.EMBEDDING).to_numpy(zero_copy_only=False)).astype(np.float32)
    versions = set(table.column(S.MODEL_VERSION).to_pylist())
    if len(versions) != 1:
        raise RetrievalError(f"{directory} mixes model versions {sorted(versions)}")
    order = np.argsort(ids, kind="stable")
    return ids[order], emb[order], versions.pop()


def build_index_from_embeddings(
    embeddings_dir: str | Path, index_root: str | Path, index_cfg: IndexConfig = IndexConfig()
) -> Path:
    """embeddings/<version>/ -> <index_root>/<version>/ (index.faiss, song_ids.npy, index.json),
    of the kind index_cfg says ("auto": by size, index_kind)."""
    ids, emb, version = read_embeddings(embeddings_dir)
    kind = index_kind(len(ids), index_cfg.hnsw_max_songs) if index_cfg.kind == "auto" else index_cfg.kind
    ivf = IvfParams(nprobe=index_cfg.nprobe)
    return AnnIndex.build(ids, emb, version, kind=kind, ivf=ivf).save(Path(index_root) / version)
