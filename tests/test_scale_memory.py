"""Bounded memory: compress and merge a sharded checkpoint pair several times larger than the memory the child
process may use.

A Llama-shaped bf16 pair (~580 MB per model: 88 layers of width 512, written tensor by tensor with safetensors) is
compressed (bitdelta) and rebuilt in child processes. Each child reports its peak RSS (VmHWM); the test asserts the
growth above the baseline stays under BUDGET while the pair is ~9x BUDGET. As a hard guard against loading a whole
model (576 MB), each child also caps its data segment (RLIMIT_DATA: heap plus private writable mappings) at its
baseline + 2 x BUDGET after its imports. That cap counts address space, not memory in use: thread stacks and
glibc's per-thread malloc arenas are reserved whole, and how many arenas a run creates depends on thread timing, so
a cap at 1 x BUDGET failed on one CI machine while resident growth stayed well under it.

Shard sizes are small on purpose: `merge` still reads through `safe_open` (each open maps a whole shard, which counts
against RLIMIT_DATA, the delta's shards included) and writes through a writer that buffers one output shard, so its
peak follows the shard sizes. compress reads and writes through deltapack.scale.lazyio, whatever the shard sizes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

MB = 1 << 20
BUDGET = 128 * MB
SHARD_BYTES = 16 * MB
HIDDEN, INTER, LAYERS, VOCAB = 512, 1536, 88, 2048

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
    rss0 = status("VmRSS")
    data0 = status("VmData")
    resource.setrlimit(resource.RLIMIT_DATA, (data0 + 2 * budget, data0 + 2 * budget))
    t0 = time.perf_counter()
    extra = {}
    if step == "compress":
        api.compress(base, ft, delta, method="bitdelta", ratio=12, progress=False, max_shard_bytes=4 << 20)
    else:
        api.merge(base, delta, merged, progress=False, max_shard_bytes=8 << 20)
    # VmHWM: this process's own peak RSS (ru_maxrss would include the RSS of the parent it was forked from)
    peak = max(status("VmHWM"), 0)
    print(json.dumps({"step": step, "baseline_rss": rss0, "peak_rss": peak, "growth": peak - rss0,
                      "limit_data": data0 + 2 * budget, "seconds": time.perf_counter() - t0, **extra}))
    """
)


def _llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{k}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return shapes


def _write_pair(base_dir, ft_dir) -> int:
    """Base and fine-tune (base + small noise), shard by shard; only one shard's tensors are in memory."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": VOCAB,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    total = 0
    shapes = _llama_shapes()
    for n, s in shapes.items():
        nb = 2 * torch.Size(s).numel()
        if shards[-1] and size + nb > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
        total += nb
    for d in (base_dir, ft_dir):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        b, f = {}, {}
        for n in names:
            s = shapes[n]
            t = torch.randn(s, generator=gen) * 0.02 if len(s) == 2 else torch.ones(s)
            b[n] = t.to(torch.bfloat16)
            f[n] = (t + torch.randn(s, generator=gen) * 0.002).to(torch.bfloat16)
            weight_map[n] = fname
        save_file(b, str(base_dir / fname), metadata={"format": "pt"})
        save_file(f, str(ft_dir / fname), metadata={"format": "pt"})
        del b, f
    for d in (base_dir, ft_dir):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


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
        assert set(idx) == set(_llama_shapes())
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
