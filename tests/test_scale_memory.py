"""Bounded memory: compress and merge a sharded checkpoint pair several times larger than the memory the child
process may use.

A Llama-shaped bf16 pair (~580 MB per model: 88 layers of width 512, written tensor by tensor with safetensors) is
compressed (bitdelta) and rebuilt in child processes. Each child reports its peak RSS (VmHWM); the test asserts the
growth above the baseline stays under BUDGET while the pair is ~9x BUDGET. As a hard guard against loading a whole
model (576 MB), each child also caps its data segment (RLIMIT_DATA: heap plus private writable mappings) at its
baseline + 2 x BUDGET after its imports. That cap counts address space, not memory in use: thread stacks and
glibc's per-thread malloc arenas are reserved whole, and how many arenas a run creates depends on thread timing, so
a cap at 1 x BUDGET failed on one CI machine while resident growth stayed well under it.

Shards are larger than the cap on purpose (input shards 3 x BUDGET, merged shards up to 2 x BUDGET): compress and merge
read each tensor by its byte range and write through shard writers that hold one tensor at a time (io.writer), so
their peak does not follow the shard sizes. (`safe_open` would map a whole input shard, which alone exceeds the cap.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open

from deltapack.scale.synthetic import LlamaShape, noisy_family, write_checkpoints

MB = 1 << 20
BUDGET = 128 * MB
SHARD_BYTES = 3 * BUDGET
SHAPE = LlamaShape(hidden=512, inter=1536, layers=88, vocab=2048, heads=16, kv_heads=16)

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from deltapack import api
    from deltapack.methods import get_method  # noqa: F401  (import everything before the cap)
    torch.set_num_threads(2)
    torch.ones(512, 512) @ torch.ones(512, 512)  # start torch's thread pool before measuring the baseline

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    budget, step, base, ft, delta, merged = int(sys.argv[1]), *sys.argv[2:7]
    # warm up on a tiny model first: lazy imports, thread pools and first-use kernels are a fixed cost (~60 MB),
    # not memory that grows with the model; then reset the peak (clear_refs 5) so VmHWM measures the real run
    import pathlib, shutil, tempfile
    from deltapack.scale.synthetic import LlamaShape, noisy_family, write_checkpoints
    warm = pathlib.Path(tempfile.mkdtemp())
    write_checkpoints([warm / "b", warm / "f"], LlamaShape(64, 128, 1, 128, 4, 4), noisy_family(1))
    api.compress(warm / "b", warm / "f", warm / "d", method="bitdelta", ratio=1.5, progress=False)
    api.merge(warm / "b", warm / "d", warm / "m", progress=False)
    shutil.rmtree(warm)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # no reset: the warm-up's small peak stays in VmHWM, which only makes the check stricter
        pass
    rss0 = status("VmRSS")
    data0 = status("VmData")
    resource.setrlimit(resource.RLIMIT_DATA, (data0 + 2 * budget, data0 + 2 * budget))
    t0 = time.perf_counter()
    extra = {}
    if step == "compress":
        api.compress(base, ft, delta, method="bitdelta", ratio=12, progress=False, max_shard_bytes=1 << 30)
    else:
        api.merge(base, delta, merged, progress=False, max_shard_bytes=256 << 20)
    # VmHWM: this process's own peak RSS (ru_maxrss would include the RSS of the parent it was forked from)
    peak = max(status("VmHWM"), 0)
    print(json.dumps({"step": step, "baseline_rss": rss0, "peak_rss": peak, "growth": peak - rss0,
                      "limit_data": data0 + 2 * budget, "seconds": time.perf_counter() - t0, **extra}))
    """
)


def _write_pair(base_dir, ft_dir) -> int:
    """Base and fine-tune (base + small noise), tensor by tensor; returns one model's bytes."""
    write_checkpoints([base_dir, ft_dir], SHAPE, noisy_family(1), shard_bytes=SHARD_BYTES)
    return SHAPE.nbytes()


def _child(step: str, *paths) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(BUDGET), step, *map(str, paths)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{step} failed under the memory cap:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_compress_and_merge_within_memory_cap(tmp_path):
    base, ft, delta, merged = tmp_path / "base", tmp_path / "ft", tmp_path / "delta", tmp_path / "merged"
    try:
        model_bytes = _write_pair(base, ft)
        assert 2 * model_bytes > 4 * BUDGET  # the pair is several times the memory the children may use
        reports = [_child("compress", base, ft, delta, merged), _child("merge", base, ft, delta, merged)]
        for rep in reports:
            print(
                f"{rep['step']}: peak RSS {rep['peak_rss'] / MB:.0f} MB = baseline {rep['baseline_rss'] / MB:.0f} MB "
                f"+ {rep['growth'] / MB:.0f} MB (cap: baseline + {BUDGET / MB:.0f} MB; pair {2 * model_bytes / MB:.0f} MB) "
                f"in {rep['seconds']:.1f} s"
            )
            assert rep["growth"] < BUDGET, rep
        # the rebuilt checkpoint is the fine-tune's shape, and closer to the fine-tune than the base is
        idx = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(idx) == set(SHAPE.tensors()) and len(set(idx.values())) > 1
        name = "model.layers.7.mlp.down_proj.weight"
        with safe_open(str(merged / idx[name]), "pt") as h:
            got = h.get_tensor(name).float()
        want_idx = json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(ft / want_idx[name]), "pt") as h:
            want = h.get_tensor(name).float()
        with safe_open(str(base / want_idx[name]), "pt") as h:
            b = h.get_tensor(name).float()
        assert got.shape == want.shape
        assert float((got - want).norm()) < float((b - want).norm())
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # ~1.7 GB: do not leave it to pytest's keep-3 policy
