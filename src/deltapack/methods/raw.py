"""raw: the lossless reference. Stores the delta densely in the narrowest float type that rebuilds the fine-tune
bit for bit (bf16 when base + bf16(delta) reproduces it, else fp32, else fp64)."""

from __future__ import annotations

import torch

from deltapack.errors import DeltapackError
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, register_method


def exact_dense(job: TensorJob) -> Encoded:
    ft, base = job.finetuned, job.base
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        if base is None or ft is None:
            v = job.delta.to(dt)
            return Encoded("dense", {}, {"values": v.cpu()})
        if dt == torch.float64:
            d = ft.double() - base.double()
            rebuilt = (base.double() + d).to(ft.dtype)
        else:
            d = (ft.float() - base.float()).to(dt)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            rebuilt = (base.to(acc) + d.to(acc)).to(ft.dtype)
        if torch.equal(rebuilt, ft):
            return Encoded("dense", {}, {"values": d.cpu()})
    raise DeltapackError(f"{job.name}: cannot store the delta exactly even in fp64")


@register_method
class Raw(DeltaMethod):
    name = "raw"
    paper = "-"
    summary = "lossless dense delta (bf16 where exact): the reference"
    lossless = True
    parts_per_tensor = 1

    def encode(self, job: TensorJob, ctx) -> Encoded:
        return exact_dense(job)
