"""lowrank: truncated SVD, Δ ≈ U_r S_r V_rᵀ stored as bf16 factors (√S folded into both sides)."""

from __future__ import annotations

import torch
from pydantic import Field

from deltapack.errors import BudgetError
from deltapack.format.codecs import build_factor_parts
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, register_method


def top_svd(delta: torch.Tensor, rank: int, exact_below: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets. Full SVD for small matrices or large ranks; randomized otherwise, since
    methods that need only the top vectors should not pay for all of them."""
    m, n = delta.shape
    k = min(m, n)
    rank = min(rank, k)
    if k <= exact_below or rank > k // 3:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    U, S, V = torch.svd_lowrank(delta, q=min(k, rank + max(16, rank // 4)), niter=4)
    return U[:, :rank], S[:rank], V[:, :rank].T


@register_method
class LowRank(DeltaMethod):
    name = "lowrank"
    paper = "truncated SVD baseline (e.g. Delta-CoMe's low-rank baseline; Ryu et al. 2023)"
    summary = "rank-r truncated SVD, bf16 factors; r from the byte budget"
    parts_per_tensor = 2
    rank: int | None = Field(None, description="fixed rank for every matrix (default: from --ratio)")

    def min_bytes(self, shape):
        return 2 * (shape[0] + shape[1])

    def max_useful_bytes(self, shape):
        return 2 * (shape[0] + shape[1]) * min(shape)

    def encode(self, job: TensorJob, ctx) -> Encoded:
        m, n = job.shape
        r = self.rank if self.rank is not None else job.budget_bytes // (2 * (m + n))
        r = min(r, min(m, n))
        if r < 1:
            raise BudgetError(f"{job.name}: budget of {job.budget_bytes} bytes is below one rank-1 factor pair")
        U, S, Vh = top_svd(job.delta, r)
        rs = S.sqrt()
        params, parts = build_factor_parts([{"bits": 16, "A": rs[:, None] * Vh, "Bt": rs[:, None] * U.T}])
        return Encoded("factors", params, {k: v.cpu() for k, v in parts.items()})
