"""Audio-encoder training throughput: forward + backward samples/s.

On CPU: the demo and paper configs in fp32 (ratio against the demo row). On a GPU (when present):
the paper config in fp32 (the in-run reference), in bf16 autocast with PyTorch's fused SDPA
kernels, and in bf16 with the math attention kernel only, to show what fused attention adds.

    python benchmarks/bench_encoder.py [--batch 8] [--steps 3] [--out benchmarks/results/bench_encoder.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from htcl.config import load_config  # noqa: E402
from htcl.model import AudioEncoder, count_parameters  # noqa: E402


def frames_for(cfg) -> int:
    hop = round(cfg.audio.sample_rate * cfg.audio.hop_ms / 1000)
    return 1 + int(cfg.audio.sample_rate * cfg.audio.max_seconds) // hop


def measure(cfg, batch, steps, device, amp_dtype=None, backend=None) -> float:
    """samples/s of forward + backward + AdamW step, after one warm-up step."""
    torch.manual_seed(0)
    enc = AudioEncoder(cfg.model, cfg.audio.n_mels).to(device).train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    n_frames = frames_for(cfg)
    mel = torch.randn(batch, cfg.audio.n_mels, n_frames, device=device) * 5 - 6
    mask = torch.ones(batch, n_frames, dtype=torch.bool, device=device)

    def contexts():  # fresh context managers each step (a generator-based one enters once)
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        kernel = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        return amp, kernel

    def one_step():
        amp, kernel = contexts()
        with amp, kernel:
            loss = enc(mel, mask).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--paper-batch", type=int, default=2, help="paper config batch on CPU (it is slow)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_encoder.json"))
    args = ap.parse_args(argv)

    rows = []
    cpu = torch.device("cpu")
    demo_cfg = load_config(REPO / "configs" / "demo.yaml")
    measure(demo_cfg, args.batch, 2, cpu)  # warm the thread pool and allocator; not reported
    for name in ("demo", "paper"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        batch = args.batch if name == "demo" else args.paper_batch
        params = count_parameters(AudioEncoder(cfg.model, cfg.audio.n_mels))
        rows.append(
            {
                "config": name,
                "device": "cpu",
                "precision": "fp32",
                "attention": "default SDPA",
                "frames": frames_for(cfg),
                "params_M": round(params / 1e6, 1),
                "batch": batch,
                "samples_per_s": round(measure(cfg, batch, args.steps, cpu), 3),
            }
        )
    for r in rows:  # the reference is the first row of the same device
        r["ratio"] = round(r["samples_per_s"] / rows[0]["samples_per_s"], 4)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        cfg = load_config(REPO / "configs" / "paper.yaml")
        name = torch.cuda.get_device_name()
        batch, steps = args.gpu_batch, args.steps * 5
        measure(cfg, batch, 2, gpu)  # warm-up: cuDNN/cuBLAS autotuning, allocator
        gpu_rows = []
        for precision, dtype, backend in (
            ("fp32", None, None),
            ("bf16 autocast", torch.bfloat16, None),
            ("bf16 autocast", torch.bfloat16, SDPBackend.MATH),
        ):
            gpu_rows.append(
                {
                    "config": "paper",
                    "device": name,
                    "precision": precision,
                    "attention": "math only" if backend else "default SDPA (fused)",
                    "frames": frames_for(cfg),
                    "params_M": rows[-1]["params_M"],
                    "batch": batch,
                    "samples_per_s": round(measure(cfg, batch, steps, gpu, dtype, backend), 2),
                }
            )
        for r in gpu_rows:
            r["ratio"] = round(r["samples_per_s"] / gpu_rows[0]["samples_per_s"], 3)
        rows += gpu_rows

    header = (
        f"{'config':<7}{'device':<24}{'precision':<15}{'attention':<22}"
        f"{'frames':>7}{'params':>9}{'batch':>6}{'samples/s':>11}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<7}{r['device'][:23]:<24}{r['precision']:<15}{r['attention']:<22}{r['frames']:>7}"
            f"{r['params_M']:>8}M{r['batch']:>6}{r['samples_per_s']:>11}{r['ratio']:>8}"
        )
    print("ratio: samples/s over the first row of the same device (CPU: demo fp32; GPU: paper fp32)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_encoder",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
