"""Fault injection for the Ray Train tests: a batch wrapper for ray_jobs.train_loop.fit that
SIGKILLs one training worker, once.

    fit(cfg, "pretrain", batch_wrapper="tests.fault_injection:kill_once",
        batch_wrapper_args={"rank": 1, "step": 3, "marker": "/tmp/killed.txt"})

The workers import it as `tests.fault_injection` (tests/ is a namespace package, no __init__.py):
the repository root is on their path (test_ray_train's Ray instance puts it on PYTHONPATH; a job
submitted with the repository as working_dir ships tests/ too: WORKING_DIR_EXCLUDES keeps it).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

from htcl.training import read_jsonl
from ray_jobs.train_loop import METRICS, WorkerContext


def kill_once(batches: Iterator[dict], worker: WorkerContext, *, rank: int, step: int, marker: str) -> Iterator[dict]:
    """SIGKILL worker `rank` when it is about to take the batch of step `step` + 1.

    It first waits until rank 0 has logged step `step` (so the failed attempt leaves log lines past
    the last checkpoint) and until the controller has committed the checkpoints reported so far: in
    Train V2 a report reaches the controller when it next polls the workers (every 2 s), and a
    worker that dies before that takes its part of the checkpoint with it. The marker file makes
    it happen once: the restarted attempt finds it and trains on.
    """
    import ray.train

    marker_file = Path(marker)
    for done, batch in enumerate(batches, start=worker.start_step):
        if worker.rank == rank and done == step and not marker_file.exists():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not _logged(worker.run_dir, done):
                time.sleep(0.05)
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
            )
            marker_file.write_text(f"killed rank {rank} (pid {os.getpid()}) before step {done + 1}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def _logged(run_dir: Path, step: int) -> bool:
    """Whether rank 0 has written the log line of `step` (or a later one) to metrics.jsonl."""
    return any(r["step"] >= step for r in read_jsonl(run_dir / METRICS))
