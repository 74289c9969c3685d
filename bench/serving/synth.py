"""Synthetic compressed tenants of a 7B-shaped model for the serving benchmark.

Speed does not depend on the numbers, only on the layout and its bytes, so each (codec, shape, ratio) gets one
stored codec entry with random contents, sized by the codec's own byte accounting at that ratio, packed once by the
kernel backend (the same `pack` path as a real delta: a template); every tenant is then a clone of the templates
with fresh random contents in its own memory (so no tenant's bytes are served from another's cache lines).

Codecs (what compress writes for each method at a ratio R, i.e. m*n*2/R stored bytes per matrix):
  delta-come  factors: delta-come's paper recipe with per-row grids: 2 singular pairs at 8 bits, 32 at 3 bits, then
              as many 2-bit pairs as the budget holds (a pair costs ceil(in/8)*b + ceil(out/8)*b bytes + 4 bytes of
              fp16 scale/zero per side)
  lowrank     factors: one bf16 group of rank floor(budget / (2 (in + out)))
  bitdelta    sign: one plane (1 bit per element: 16x), one fp32 scale per matrix
  dare        sparse: Bernoulli mask regenerated from a seed, 4-bit values with an fp16 scale+zero per 256 values
"""

from __future__ import annotations

import math

import torch

from deltapack.format.codecs import build_factor_parts
from deltapack.format.packing import packed_row_bytes
from deltapack.kernels import PackedDelta
from deltapack.quant.rtn import QMatrix
from deltapack.scale.synthetic import LlamaShape

CODECS = ("delta-come", "lowrank", "bitdelta", "dare")


def model_shapes(shape: LlamaShape, *, embedding: bool = False) -> dict[str, tuple[int, int]]:
    """Tensor name -> (out, in) of every matrix a tenant's delta covers (the linears and lm_head; the embedding too
    if asked: its deltas are read as rows, a few per token, so the decode benchmark leaves it out)."""
    return {n: s for n, s in shape.tensors().items()
            if len(s) == 2 and (embedding or n != "model.embed_tokens.weight")}


def _qmatrix(rows: int, cols: int, bits: int, g: torch.Generator) -> QMatrix:
    codes = torch.randint(0, 256, (rows, packed_row_bytes(cols, bits)), dtype=torch.uint8, generator=g)
    scale = (torch.rand(rows, 1, generator=g) * 1e-3 + 1e-3).to(torch.float16)
    zero = (-scale.float() * ((1 << bits) - 1) / 2).to(torch.float16)
    return QMatrix(codes, scale, zero, bits, cols, cols)


def delta_come_groups(m: int, n: int, budget: float) -> list[tuple[int, int]]:
    """(rank, bits) groups of the paper recipe that fit `budget` bytes (per-row grids)."""
    cost = {b: packed_row_bytes(n, b) + packed_row_bytes(m, b) + 8 for b in (8, 3, 2)}
    left = budget
    groups = []
    for bits, most in ((8, 2), (3, 32), (2, None)):
        r = int(left // cost[bits])
        if most is not None:
            r = min(r, most)
        if r > 0:
            groups.append((r, bits))
            left -= r * cost[bits]
    return groups


def entry(codec: str, shape: tuple[int, int], ratio: float, g: torch.Generator) -> tuple[str, dict, dict]:
    """A stored codec entry (codec name, params, parts) for a `shape` (out, in) matrix at `ratio`, random contents."""
    m, n = shape
    budget = m * n * 2 / ratio
    if codec == "delta-come":
        spec = [{"bits": b, "A": _qmatrix(r, n, b, g), "Bt": _qmatrix(r, m, b, g)} for r, b in delta_come_groups(m, n, budget)]
        params, parts = build_factor_parts(spec)
        return "factors", params, parts
    if codec == "lowrank":
        r = max(1, int(budget // (2 * (m + n))))
        A = torch.randn(r, n, generator=g) * 0.01
        Bt = torch.randn(r, m, generator=g) * 0.01
        params, parts = build_factor_parts([{"bits": 16, "A": A, "Bt": Bt}])
        return "factors", params, parts
    if codec == "bitdelta":
        signs = torch.randint(0, 256, (m, packed_row_bytes(n, 1)), dtype=torch.uint8, generator=g)
        return "sign", {"planes": 1, "scale": "matrix"}, {"signs": signs, "scale": torch.full((1, 1), 1e-3)}
    if codec == "dare":
        from deltapack.format.codecs import SparseCodec

        gs = 256
        keep = min(1.0, budget / (m * n * (0.5 + 4 / gs)))
        params = {"mask": "bernoulli", "keep_prob": keep, "seed": int(torch.randint(0, 2**31, (1,), generator=g)),
                  "bits": 4, "group_size_q": gs}
        nnz = int(SparseCodec.positions(params, shape).sum())
        ng = math.ceil(nnz / gs)
        scale = (torch.rand(1, ng, generator=g) * 1e-3 + 1e-3).to(torch.float16)
        parts = {
            "codes": torch.randint(0, 256, (1, packed_row_bytes(nnz, 4)), dtype=torch.uint8, generator=g),
            "scale": scale,
            "zero": (-scale.float() * 7.5).to(torch.float16),
        }
        return "sparse", params, parts
    raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def stored_bytes(parts: dict) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def template(kernels, codec: str, shape: tuple[int, int], ratio: float, dtype, device, seed: int = 0) -> PackedDelta:
    g = torch.Generator().manual_seed(seed)
    name, params, parts = entry(codec, shape, ratio, g)
    p = kernels.pack(name, params, parts, shape, dtype=dtype, device=device)
    p.meta["stored_bytes"] = stored_bytes(parts)
    return p


def clone(p: PackedDelta, seed: int) -> PackedDelta:
    """Same layout and sizes as `p`, fresh random contents, new memory on p's device."""
    dev = p.device
    g = torch.Generator(device=dev).manual_seed(seed)
    t = {}
    for k, v in p.tensors.items():
        if v.numel() == 0:
            t[k] = v.clone()
        elif v.dtype == torch.int32 and k.endswith("words"):
            t[k] = torch.randint(-(2**31), 2**31 - 1, v.shape, dtype=torch.int32, device=dev, generator=g)
        elif k in ("col", "tile_off"):  # sparse structure: same positions (as valid as the template's)
            t[k] = v.clone()
        elif k.endswith("zero"):
            t[k] = (-(torch.rand(v.shape, device=dev, generator=g) * 1e-3 + 1e-3) * 1.5).to(v.dtype)
        elif v.is_floating_point():
            r = torch.rand(v.shape, device=dev, generator=g)
            t[k] = ((r * 1e-3 + 1e-3) if k.endswith("scale") else (r - 0.5) * 0.02).to(v.dtype)
        else:
            t[k] = v.clone()
    return PackedDelta(p.kind, p.shape, t, dict(p.meta), None, False, p.source)


__all__ = ["CODECS", "model_shapes", "delta_come_groups", "entry", "template",
           "clone", "stored_bytes"]
