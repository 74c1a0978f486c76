"""Stage 2 (preference fine-tuning from the stage-1 checkpoint) on Ray Train.

    ray job submit --working-dir . -- python -m ray_jobs.finetune --config configs/demo.yaml \\
        [--init-from P] [--variant favor|cf] finetune.num_workers=2 [key.path=value ...]

--variant favor (the default, HTCL) trains on favor triplets from interactions.parquet;
--variant cf (HTCL_w_CF, the paper's negative control) on songs adjacent in sessions.parquet.
Starts from --init-from (default <output_dir>/pretrain/model.pt). Same Ray Train setup as
ray_jobs.pretrain, with the finetune.* settings. Writes <output_dir>/finetune/ (or
finetune_cf/) like `htcl finetune`; prints and returns model.pt's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ray_jobs import train_loop


def main(argv: Sequence[str] | None = None) -> Path:
    return train_loop.main("finetune", argv, __doc__)


if __name__ == "__main__":
    main()
