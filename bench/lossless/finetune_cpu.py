"""Short real full fine-tunes of SmolLM2-135M-Instruct on a CPU, for the lossless benchmark.

Uses the quality benchmark's Trainer (bench/quality/finetune.py: AdamW with fp32 master weights, warmup then cosine,
loss on completion tokens) on one of its tasks, then saves in bf16 like every fine-tune there. A CPU affords only a
few dozen steps at a small batch: such a fine-tune leaves more bf16 weights bit-identical to the base than the GPU
benchmark's 300-600 steps at batch 64 do, so its lossless ratio is an upper end (the GPU mode of run.py measures
those).

`--layers 0,1,2` trains only those decoder layers (everything else frozen, so bit-identical after the bf16 save):
the "fine-tune that trains only some layers" case.

    PYTHONPATH=src python bench/lossless/finetune_cpu.py --task arithmetic --steps 40 --out /tmp/ft-arith
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "quality"))

log = logging.getLogger("bench.lossless.finetune")


def make_finetune(base: Path, out: Path, *, task: str = "arithmetic", steps: int = 40, lr: float = 3e-4,
                  batch_size: int = 16, n_train: int = 2000, layers: list[int] | None = None) -> Path:
    """Fine-tune `base` on `task` for `steps` steps on the CPU and save a bf16 checkpoint at `out` (with
    finetune.json: the recipe). `layers`: train only these decoder layers."""
    from finetune import Trainer
    from tasks import make_splits

    t0 = time.perf_counter()
    splits = make_splits(task, n_train, 8, 8)
    tr = Trainer(base, device=torch.device("cpu"), lr=lr, max_tokens=4096)
    trainable = None
    if layers is not None:
        keep = tuple(f".layers.{i}." for i in layers)
        trainable = 0
        for n, p in tr.model.named_parameters():
            p.requires_grad_(any(k in n for k in keep))
            trainable += p.numel() if p.requires_grad else 0
    data = tr.encode(splits["train"])
    rec = tr.train(data, steps, batch_size=batch_size, warmup=min(10, steps), log_every=max(1, steps // 5))
    info = {"task": task, "steps": rec["steps"], "lr": lr, "batch_size": batch_size, "layers": layers,
            "trainable_params": trainable, "final_loss": rec["final_loss"], "loss_history": rec["loss_history"],
            "seconds": round(time.perf_counter() - t0, 1), "device": "cpu", "dtype_saved": "bfloat16"}
    tr.save(out, extra_files={"finetune.json": info})
    log.info("saved %s: %d steps in %.0f s, loss %s", out, rec["steps"], info["seconds"], rec["final_loss"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", default=None, help="comma-separated decoder layer indices to train (others frozen)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.base is None:
        from deltapack.io.embedded import embedded_model_dir

        a.base = embedded_model_dir()
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    make_finetune(a.base, a.out, task=a.task, steps=a.steps, lr=a.lr, batch_size=a.batch_size, layers=layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
