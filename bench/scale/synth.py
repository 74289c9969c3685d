"""Synthetic Llama-shaped checkpoints written shard by shard with safetensors (no transformers, bounded memory).

A base and fine-tunes (base + small dense noise, each its own seed) share one generation pass: per tensor the base is
drawn once (on the GPU when there is one) and every fine-tune derived from it, so writing N+1 models costs one
generation. Shapes follow Llama-2-7B by default (hidden 4096, MLP 11008, 32 heads, vocab 32000, untied head).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA2_7B = {"hidden": 4096, "inter": 11008, "layers": 32, "vocab": 32000, "heads": 32, "kv_heads": 32}
TINY = {"hidden": 64, "inter": 172, "layers": 2, "vocab": 256, "heads": 4, "kv_heads": 4}


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"] = (h, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            out[p + "self_attn.o_proj.weight"] = (h, h)
            out[p + "mlp.gate_proj.weight"] = (self.inter, h)
            out[p + "mlp.up_proj.weight"] = (self.inter, h)
            out[p + "mlp.down_proj.weight"] = (h, self.inter)
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def nbytes(self) -> int:
        return sum(2 * torch.Size(s).numel() for s in self.tensors().values())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.inter, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        }


def _marker(d: Path) -> Path:
    return d / ".synth.json"


def write_family(root: Path, shape: Shape, n_finetunes: int, *, shard_bytes: int = 2 << 30, seed: int = 0,
                 device: str = "cpu", log=print) -> tuple[Path, list[Path], float]:
    """root/base and root/ft{i}; skipped when already written with these settings. Returns (base, fts, seconds)."""
    want = {"shape": asdict(shape), "fts": n_finetunes, "seed": seed, "shard_bytes": shard_bytes}
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(n_finetunes)]
    if all(_marker(d).is_file() and json.loads(_marker(d).read_text()) == want for d in dirs):
        return dirs[0], dirs[1:], 0.0
    t0 = time.perf_counter()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.safetensors"):
            f.unlink()
        (d / "config.json").write_text(json.dumps(shape.config()))
    shapes = shape.tensors()
    groups: list[list[str]] = [[]]
    size = 0
    for n, s in shapes.items():
        nb = 2 * torch.Size(s).numel()
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nb
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    for gi, names in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        shards = [{} for _ in dirs]
        for n in names:
            s = shapes[n]
            if len(s) == 1:
                b = torch.ones(s, device=device)
            else:
                b = torch.randn(s, generator=gen, device=device) * 0.02
            shards[0][n] = b.to(torch.bfloat16).cpu()
            for k in range(1, len(dirs)):
                noise = torch.randn(s, generator=gen, device=device) * (0.002 if len(s) == 2 else 0.01)
                shards[k][n] = (b + noise).to(torch.bfloat16).cpu()
                del noise
            del b
            weight_map[n] = fname
        for d, sd in zip(dirs, shards):
            save_file(sd, str(d / fname), metadata={"format": "pt"})
        del shards
        log(f"  shard {gi + 1}/{len(groups)} x {len(dirs)} models written ({time.perf_counter() - t0:.0f} s)")
    index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": weight_map}
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        _marker(d).write_text(json.dumps(want))
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
