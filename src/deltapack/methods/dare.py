"""dare: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario"). Each delta element survives with
probability p = keep_prob, survivors are divided by p. The mask is regenerated from a seed derived from the tensor's
name, so positions cost no storage; survivors are stored bf16 or quantized to `bits` bits."""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field

from deltapack.errors import BudgetError
from deltapack.format.masks import BernoulliHashes, seed_for
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, register_method
from deltapack.quant.rtn import quantize_rows


def value_bytes(count: int, bits: int, group_size: int) -> int:
    if bits >= 16:
        return 2 * count
    from deltapack.format.packing import packed_row_bytes

    return packed_row_bytes(count, bits) + 4 * ((count + group_size - 1) // group_size)


@register_method
class Dare(DeltaMethod):
    name = "dare"
    paper = "Yu et al. 2024, Language Models are Super Mario (DARE)"
    summary = "random drop + rescale, seeded mask (free positions), k-bit survivors"
    parts_per_tensor = 3
    keep_prob: float | None = Field(None, gt=0, le=1, description="fixed keep rate p (default: from --ratio)")
    bits: int = Field(4, description="bits per kept value (16 = bf16)")
    group_size: int = Field(256, ge=8, description="kept values per quantization scale")
    seed: int = Field(0, description="salt for the per-tensor mask seeds")

    def model_post_init(self, _):
        if self.bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
            raise ValueError("bits must be 1-8 or 16")

    def _bytes_per_elem(self, shape) -> float:
        return value_bytes(shape[0] * shape[1], self.bits, self.group_size) / (shape[0] * shape[1])

    def min_bytes(self, shape):
        return 64

    def max_useful_bytes(self, shape):
        return value_bytes(shape[0] * shape[1], self.bits, self.group_size)

    def encode(self, job: TensorJob, ctx, hashes: BernoulliHashes | None = None) -> Encoded:
        m, n = job.shape
        p = self.keep_prob
        if p is None:
            p = min(1.0, job.budget_bytes / (m * n * self._bytes_per_elem(job.shape)))
        seed = seed_for(job.name, self.seed)
        if hashes is None:
            hashes = BernoulliHashes((m, n), seed, job.delta.device)
        for _ in range(20):  # the count under a seeded Bernoulli mask is random: shrink p until it fits
            mask = hashes.mask(p)
            nnz = int(mask.sum())
            if self.keep_prob is not None or value_bytes(nnz, self.bits, self.group_size) <= job.budget_bytes:
                break
            p *= 0.995 * job.budget_bytes / max(1, value_bytes(nnz, self.bits, self.group_size))
        if nnz == 0:
            raise BudgetError(f"{job.name}: budget of {job.budget_bytes} bytes keeps no element")
        vals = job.delta[mask] / p
        params = {"mask": "bernoulli", "keep_prob": p, "seed": seed, "bits": self.bits}
        if self.bits >= 16:
            return Encoded("sparse", params, {"values": vals.to(torch.bfloat16).cpu()})
        q = quantize_rows(vals.view(1, -1), self.bits, self.group_size)
        params["group_size_q"] = q.group_size
        return Encoded(
            "sparse", params, {"codes": q.codes.reshape(-1).cpu(), "scale": q.scale.reshape(-1).cpu(), "zero": q.zero.reshape(-1).cpu()}
        )

    def encode_coded(self, job: TensorJob, ctx) -> Encoded:
        """The budget fit after entropy coding re-encodes at a few budgets: the mask hashes are made once for all."""
        hashes = BernoulliHashes(job.shape, seed_for(job.name, self.seed), job.delta.device)
        if self.keep_prob is not None:
            return self.encode(job, ctx, hashes)  # a fixed rate: the budget changes nothing
        return self.fit_coded(job, lambda b: self.encode(dataclasses.replace(job, budget_bytes=b), ctx, hashes))
