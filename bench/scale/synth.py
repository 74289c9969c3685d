"""Synthetic Llama-shaped families for the scale benchmark: a base and fine-tunes (base + small dense noise, each
its own seed) written in one pass by `deltapack.scale.synthetic` (per tensor the base is drawn once, on the GPU when
there is one, and every fine-tune derived from it). Shapes follow Llama-2-7B by default.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from deltapack.scale.synthetic import LLAMA2_7B, LlamaShape, noisy_family, read_marker, write_checkpoints, write_marker

TINY = LlamaShape(hidden=64, inter=172, layers=2, vocab=256, heads=4, kv_heads=4)
__all__ = ["LLAMA2_7B", "TINY", "LlamaShape", "write_family", "evict_page_cache"]


def write_family(root: Path, shape: LlamaShape, n_finetunes: int, *, shard_bytes: int = 2 << 30, seed: int = 0,
                 device: str = "cpu", log=print) -> tuple[Path, list[Path], float]:
    """root/base and root/ft{i}; skipped when already written with these settings. Returns (base, fts, seconds)."""
    want = {"shape": asdict(shape), "fts": n_finetunes, "seed": seed, "shard_bytes": shard_bytes, "version": 2}
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(n_finetunes)]
    if all(read_marker(d) == want for d in dirs):
        return dirs[0], dirs[1:], 0.0
    t0 = time.perf_counter()
    for d in dirs:
        for f in d.glob("*.safetensors"):
            f.unlink()
    write_checkpoints(dirs, shape, noisy_family(n_finetunes, seed=seed, device=device), shard_bytes=shard_bytes,
                      log=lambda m: log(f"  {m} ({time.perf_counter() - t0:.0f} s)"))
    for d in dirs:
        write_marker(d, want)
    return dirs[0], dirs[1:], time.perf_counter() - t0


def evict_page_cache(*paths: Path) -> bool:
    """Drop these files' pages from the page cache (fsync + POSIX_FADV_DONTNEED, no root needed), so the next read
    comes from the disk. Returns False where the platform cannot."""
    ok = True
    for root in paths:
        for f in Path(root).rglob("*"):
            if not f.is_file():
                continue
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                ok = False
    return ok
