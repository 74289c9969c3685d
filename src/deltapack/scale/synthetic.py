"""Synthetic Llama-shaped checkpoints for benchmarks and memory tests: real layouts and sizes, random numbers.

One shape description (`LlamaShape`) and one writer (`write_checkpoints`) serve the 7B timing benchmark, the scale
benchmark, the serving benchmark's tensor list and the bounded-memory test. Several checkpoints (a base and its
fine-tunes) are written in one pass, tensor by tensor through `io.writer.PlannedShardWriter`: per tensor the caller's
`make` draws every model's copy at once (so a fine-tune can be the base plus noise), and only those copies are in
memory, whatever the model and shard sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deltapack.io.writer import PlannedShardWriter, write_json_atomic

LINEAR_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    def role_shape(self, role: str) -> tuple[int, int]:
        """(out, in) of a decoder layer's linear."""
        kv = self.hidden // self.heads * self.kv_heads
        return {"q_proj": (self.hidden, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
                "o_proj": (self.hidden, self.hidden), "gate_proj": (self.inter, self.hidden),
                "up_proj": (self.inter, self.hidden), "down_proj": (self.hidden, self.inter)}[role]

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint (untied head), in HF's order."""
        h = self.hidden
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            for role in LINEAR_ROLES[:4]:
                out[p + f"self_attn.{role}.weight"] = self.role_shape(role)
            out[p + "post_attention_layernorm.weight"] = (h,)
            for role in LINEAR_ROLES[4:]:
                out[p + f"mlp.{role}.weight"] = self.role_shape(role)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensors().values())

    def nbytes(self) -> int:
        """Bytes of one bf16 checkpoint's tensors."""
        return 2 * self.params()

    def label(self) -> str:
        return f"llama h{self.hidden} i{self.inter} L{self.layers} V{self.vocab}"

    def config(self) -> dict:
        """A transformers `config.json` for a bf16 LlamaForCausalLM of this shape."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.inter, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2,
        }


LLAMA2_7B = LlamaShape(hidden=4096, inter=11008, layers=32, vocab=32000, heads=32, kv_heads=32)

# make(name, shape, index) -> one bf16 tensor per output directory
MakeTensors = Callable[[str, tuple[int, ...], int], list[torch.Tensor]]


def write_checkpoints(dirs: list[Path], shape: LlamaShape, make: MakeTensors, *, shard_bytes: int = 2 << 30,
                      log: Callable[[str], None] | None = None) -> None:
    """Write one bf16 HF checkpoint (shards, index, config.json) per directory. `make` is called once per tensor,
    in order, with the tensor's index in `shape.tensors()` (so a generator can be seeded per tensor)."""
    shapes = shape.tensors()
    index_of = {n: i for i, n in enumerate(shapes)}
    specs = [(n, torch.bfloat16, s) for n, s in shapes.items()]
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    writers = [PlannedShardWriter(d, "model", specs, shard_bytes, metadata={"format": "pt"}) for d in dirs]
    try:
        shard = None
        for n in writers[0].order:
            ts = make(n, shapes[n], index_of[n])
            if len(ts) != len(dirs):
                raise ValueError(f"make() returned {len(ts)} tensors for {len(dirs)} checkpoints")
            for w, t in zip(writers, ts):
                w.add(n, t.to(torch.bfloat16).cpu())
            if log and writers[0].location[n] != shard:
                shard = writers[0].location[n]
                log(f"writing {shard} x {len(dirs)} models")
        files = [w.close() for w in writers]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for d, w, f in zip(dirs, writers, files):
        if len(f) > 1:
            write_json_atomic(d / "model.safetensors.index.json", w.index())
        write_json_atomic(d / "config.json", shape.config())


def noisy_family(n_finetunes: int, *, seed: int = 0, device: str | torch.device = "cpu",
                 matrix_noise: float = 0.002, vector_noise: float = 0.01) -> MakeTensors:
    """`make` for a base (N(0, 0.02) matrices, ones for norms) and fine-tunes = base + independent Gaussian noise."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def make(name: str, s: tuple[int, ...], index: int) -> list[torch.Tensor]:
        matrix = len(s) == 2
        b = torch.randn(s, generator=gen, device=device) * 0.02 if matrix else torch.ones(s, device=device)
        out = [b.to(torch.bfloat16).cpu()]
        for _ in range(n_finetunes):
            noise = torch.randn(s, generator=gen, device=device) * (matrix_noise if matrix else vector_noise)
            out.append((b + noise).to(torch.bfloat16).cpu())
        return out

    return make


def read_marker(d: Path) -> dict | None:
    p = Path(d) / ".synth.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_marker(d: Path, settings: dict) -> None:
    """Records what was written, so a benchmark can reuse a checkpoint instead of writing 13 GB again."""
    write_json_atomic(Path(d) / ".synth.json", settings)
