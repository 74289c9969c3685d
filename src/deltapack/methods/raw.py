"""raw (alias of `lossless`, methods/lossless.py) and `dense-exact`, the old raw storage.

`dense-exact` stores the float delta in the narrowest float type that rebuilds the fine-tune bit for bit (bf16 when
base + bf16(delta) reproduces it, else fp32, else fp64): usable without the base's bits, but larger than the
fine-tune itself on real fine-tunes. It stays as the reference that `lossless`'s merge speed is measured against
(bench/lossless/run.py).
"""

from __future__ import annotations

import torch

from deltapack.errors import DeltapackError
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, register_method
from deltapack.methods.lossless import Raw  # noqa: F401  (registered there)


def exact_dense(job: TensorJob) -> Encoded:
    ft, base = job.finetuned, job.base
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        if base is None:
            d = ft.to(dt)  # no base: the delta is the tensor itself
            if torch.equal(d.to(ft.dtype), ft):
                return Encoded("dense", {}, {"values": d.cpu()})
            continue
        if dt == torch.float64:
            d = ft.double() - base.double()
            rebuilt = (base.double() + d).to(ft.dtype)
        else:
            d = (ft.float() - base.float()).to(dt)
            rebuilt = (base.float() + d.float()).to(ft.dtype)
        if torch.equal(rebuilt, ft):
            return Encoded("dense", {}, {"values": d.cpu()})
    raise DeltapackError(f"{job.name}: cannot store the delta exactly even in fp64")


@register_method
class DenseExact(DeltaMethod):
    name = "dense-exact"
    paper = "-"
    summary = "the old raw: exact float delta (fp32 where bf16 is inexact); larger than the fine-tune"
    lossless = True
    parts_per_tensor = 1
    entropy_stage = False  # the old storage as it was: the reference for merge speed

    def encode(self, job: TensorJob, ctx) -> Encoded:
        if not job.finetuned.is_floating_point():
            from deltapack.methods.lossless import Lossless

            return Lossless().encode(job, ctx)
        return exact_dense(job)
