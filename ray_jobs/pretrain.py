"""Stage 1 (audio-text contrastive pre-training) on Ray Train.

    ray job submit --working-dir . -- python -m ray_jobs.pretrain --config configs/demo.yaml \\
        pretrain.num_workers=2 [key.path=value ...] [--run-name NAME]

TorchTrainer with pretrain.num_workers workers (pretrain.use_gpu), global batch
pretrain.batch_size split evenly over the workers, negatives gathered from every worker,
a checkpoint every pretrain.checkpoint_every steps and pretrain.max_failures restarts from the
last one. Writes <output_dir>/pretrain/ (model.pt, config.yaml, metrics.jsonl,
training_curves.png) like `htcl pretrain`, and keeps Ray Train's checkpoints under
<output_dir>/ray_train/<run name>/. Prints and returns model.pt's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ray_jobs import train_loop


def main(argv: Sequence[str] | None = None) -> Path:
    return train_loop.main("pretrain", argv, __doc__)


if __name__ == "__main__":
    main()
