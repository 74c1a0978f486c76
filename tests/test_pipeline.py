"""The local pipeline end to end on a tiny synthetic catalog: preprocess -> pretrain -> finetune -> embed."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from htcl.cli import main
from conftest import TINY_MODEL, write_tiny_world



@pytest.fixture
def tiny_world(tmp_path):
    return write_tiny_world(tmp_path / "world", bad_file=True)


def overrides(tmp_path, world):
    return TINY_MODEL + [
        f"output_dir={tmp_path / 'out'}", f"data.root={world}", "audio.max_seconds=3",
        "pretrain.batch_size=4", "pretrain.max_steps=3", "pretrain.log_every=1", "pretrain.checkpoint_every=2",
        "finetune.batch_size=4", "finetune.max_steps=2", "finetune.log_every=1",
    ]


@pytest.mark.slow
def test_local_pipeline_end_to_end(tmp_path, tiny_world, capsys):
    ov = overrides(tmp_path, tiny_world)
    out = tmp_path / "out"
    assert main(["preprocess", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    mels = pq.read_table(out / "mels").to_pandas()
    quarantine = pq.read_table(out / "quarantine").to_pandas()
    assert sorted(mels.song_id) == list(range(1, 13))
    assert set(mels.n_frames) == {1 + 48000 // 1536}
    assert quarantine.song_id.tolist() == [13]
    assert quarantine.error_type.iloc[0] == "not_audio" and "13.wav" in quarantine.message.iloc[0]

    # Rerun is idempotent: nothing new is processed or written.
    capsys.readouterr()
    assert main(["preprocess", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["processed"] == 0 and rerun["quarantined"] == 0 and rerun["skipped_already_done"] == 13
    assert len(list((out / "mels").glob("*.parquet"))) == 1

    assert main(["pretrain", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    assert main(["finetune", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    assert main(["finetune", "--local", "--config", "configs/demo.yaml", "--variant", "cf", *ov]) == 0
    for run in ("pretrain", "finetune", "finetune_cf"):
        assert (out / run / "model.pt").is_file() and (out / run / "config.yaml").is_file()
        assert (out / run / "training_curves.png").stat().st_size > 10_000
    steps = [json.loads(line)["step"] for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    assert main(["embed", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    emb_files = list((out / "embeddings").glob("*/part-0.parquet"))
    assert len(emb_files) == 1
    emb = pq.read_table(emb_files[0]).to_pandas()
    assert sorted(emb.song_id) == list(range(1, 13))
    vectors = np.stack(emb.embedding.to_numpy())
    assert vectors.shape == (12, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert emb.model_version.nunique() == 1 and emb.model_version.iloc[0].startswith("finetune-2-")
    index = json.loads((out / "index" / emb.model_version.iloc[0] / "index.json").read_text())
    assert index["count"] == 12 and index["model_version"] == emb.model_version.iloc[0]

    # the comparison table: every variant, in-process point-in-time stats (no Feast)
    assert main(["evaluate", "--local", "--config", "configs/demo.yaml", *ov]) == 0
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert list(results["variants"]) == ["random-init encoder", "mel statistics", "stage 1 (CLAP-style)", "HTCL",
                                         "HTCL_w_CF", "no embedding (stats only)"]
    assert results["heldout_favor_pairs"] > 0 and 0 <= results["variants"]["HTCL"]["matching"]["hit_rate@10"] <= 1
    # every impression of the tiny log is a click: no CTR ranker can train, and the report says so
    assert "both classes" in results["variants"]["HTCL"]["ranking"]["error"]
    assert (out / "evaluation" / "results.md").read_text().count("|") > 50


def test_bad_config_override_is_a_clear_error(capsys):
    assert main(["pretrain", "--local", "--config", "configs/demo.yaml", "pretrain.batchsize=3"]) == 2
    assert "pretrain.batchsize" in capsys.readouterr().err
