"""Where every output lives under a config's output_dir: the one place the tree's names are spelled.

    <output_dir>/
      mels/part-*.parquet                song_id, n_frames, mel (float16 bytes)       preprocess
      quarantine/part-*.parquet          song_id, audio_path, stage, error_type, message
      features/<tower>-<hash>/           a locked tower's cached features            htcl.towers
      features/real_audio/<tower>-<hash>/  the same for eval.real_audio's recordings
      pretrain/, finetune/, finetune_cf/ a training run: model.pt, config.yaml, metrics.jsonl,
                                         training_curves.png (+ _<backbone> for a backbone family);
                                         a Ray run's training_split.npz
      ray_train/<run name>/              Ray Train's checkpoints of a Ray job's run
      embeddings/<version>/part-*.parquet  song embeddings of one model version       embed
      index/<version>/                   the ANN index of embeddings/<version>/
      feast/                             Feast's offline sources and online-store states (feature_repo)
      rankers/<version>/                 CTR/CVR rankers on that version's features  train-rankers
      backfill/                          point-in-time ranker frames                 backfill
      evaluation/                        results.json, results.md, plots             evaluate

Every reader and writer takes its paths from a Layout; tests/test_boundary.py fails on these names
spelled in a path anywhere else. Standard library only: the Feast repo imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = "model.pt"  # a training run's checkpoint file (also inside Ray Train's checkpoints)
TRAINING_SPLIT = "training_split.npz"  # a Ray run's rows, planned by its driver (pipeline.TrainingSplit)

# What each Layout member is called under the root (the names tests/test_boundary.py guards).
MELS = "mels"
QUARANTINE = "quarantine"
FEATURES = "features"
REAL_AUDIO = "real_audio"
RAY_TRAIN = "ray_train"
EMBEDDINGS = "embeddings"
INDEX = "index"
FEAST = "feast"
RANKERS = "rankers"
BACKFILL = "backfill"
EVALUATION = "evaluation"
NAMES = (MELS, QUARANTINE, FEATURES, REAL_AUDIO, RAY_TRAIN, EMBEDDINGS, INDEX, FEAST, RANKERS, BACKFILL, EVALUATION)


def run_name(stage: str, variant: str = "favor", audio_backbone: str = "none") -> str:
    """A training run's folder: pretrain, finetune, finetune_cf for the paper's family; the same
    + _<backbone> for a backbone family (pretrain_musicnn_msd, ...), so both families train side
    by side."""
    name = "pretrain" if stage == "pretrain" else ("finetune" if variant == "favor" else f"finetune_{variant}")
    return name if audio_backbone == "none" else f"{name}_{audio_backbone}"


@dataclass(frozen=True)
class Layout:
    """The output tree under `root` (a config's output_dir). Paths only: nothing is created."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, cfg) -> Layout:
        """The layout of a config's output_dir."""
        return cls(cfg.output_dir)

    @property
    def mels(self) -> Path:
        return self.root / MELS

    @property
    def quarantine(self) -> Path:
        return self.root / QUARANTINE

    @property
    def features_root(self) -> Path:
        return self.root / FEATURES

    def features(self, tower: str) -> Path:
        """One tower's feature cache; `tower` is its folder name, <tower>-<hash> (htcl.towers.tower_dir)."""
        return self.features_root / tower

    def real_audio_features(self, tower: str) -> Path:
        """One tower's features of the real recordings the evaluation scores (eval.real_audio)."""
        return self.features_root / REAL_AUDIO / tower

    def run(self, name: str) -> Path:
        """A training run's folder; `name` from run_name."""
        return self.root / name

    def checkpoint(self, name: str) -> Path:
        return self.run(name) / CHECKPOINT

    def training_split(self, name: str) -> Path:
        return self.run(name) / TRAINING_SPLIT

    @property
    def ray_train(self) -> Path:
        """Ray Train's storage: one folder per run name."""
        return self.root / RAY_TRAIN

    @property
    def embeddings_root(self) -> Path:
        return self.root / EMBEDDINGS

    def embeddings(self, version: str) -> Path:
        return self.embeddings_root / version

    @property
    def index_root(self) -> Path:
        return self.root / INDEX

    def index(self, version: str) -> Path:
        return self.index_root / version

    @property
    def feast(self) -> Path:
        return self.root / FEAST

    @property
    def rankers_root(self) -> Path:
        return self.root / RANKERS

    def rankers(self, version: str) -> Path:
        return self.rankers_root / version

    @property
    def backfill(self) -> Path:
        return self.root / BACKFILL

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION
