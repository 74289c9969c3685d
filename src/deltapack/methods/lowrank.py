"""lowrank: truncated SVD, Δ ≈ U_r S_r V_rᵀ stored as bf16 factors (√S folded into both sides)."""

from __future__ import annotations

import torch
from pydantic import Field

from deltapack.errors import BudgetError
from deltapack.format.codecs import build_factor_parts
from deltapack.linalg import gram_eigh, smaller_gram
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, fit_coded_budget, register_method


def top_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets (U: m×r, S: r, Vh: r×n), exact.

    Through the eigendecomposition of the Gram matrix of the smaller side: one k×k `eigh` (k = min(m, n)) instead
    of a full SVD — ~10x faster (GPU.md: 0.10 s vs 1.1 s for 4096×11008) and only the top vectors are used. The
    Gram matrix is accumulated in fp64 and decomposed in fp32 (fp64 eigh is ~7x slower on CPU); squaring the
    spectrum costs precision only far below the ranks any budget buys.
    """
    m, n = delta.shape
    k = min(m, n)
    rank = min(rank, k)
    d64 = delta.double()
    gram, right = smaller_gram(d64)  # k × k
    evals, evecs = gram_eigh(gram.float())  # ascending
    evals, evecs = evals.double(), evecs.double()
    evals, evecs = evals.flip(0)[:rank].clamp_min(0), evecs.flip(1)[:, :rank]
    S = evals.sqrt()
    inv = torch.where(S > S[:1] * 1e-12, 1.0 / S, torch.zeros_like(S))
    if right:
        Vh = evecs.T
        U = (d64 @ Vh.T) * inv[None, :]
    else:
        U = evecs
        Vh = (U.T @ d64) * inv[:, None]
    return U.to(delta.dtype), S.to(delta.dtype), Vh.to(delta.dtype)


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
        r = self._rank_for(job, job.budget_bytes)
        return self._factors(*top_svd(job.delta, r), r)

    def encode_coded(self, job: TensorJob, ctx) -> Encoded:
        """Fill the budget as stored on disk (bf16 factors lose ~10-20% to zstd's byte planes): one SVD, at up to
        twice the nominal rank, then the fit only truncates it."""
        if self.rank is not None:
            return self.encode(job, ctx)
        m, n = job.shape
        pair = 2 * (m + n)
        cap = min(m, n, max(1, 2 * job.budget_bytes // pair))
        U, S, Vh = top_svd(job.delta, cap)
        return fit_coded_budget(lambda b: self._factors(U, S, Vh, min(cap, self._rank_for(job, b))), job.budget_bytes,
                                max(job.budget_bytes, cap * pair), self.coded_fit_rounds, job.delta.device, self.name)

    def _rank_for(self, job: TensorJob, budget: int) -> int:
        m, n = job.shape
        r = self.rank if self.rank is not None else budget // (2 * (m + n))
        r = min(r, min(m, n))
        if r < 1:
            raise BudgetError(f"{job.name}: budget of {budget} bytes is below one rank-1 factor pair")
        return r

    @staticmethod
    def _factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> Encoded:
        rs = S[:r].sqrt()
        params, parts = build_factor_parts([{"bits": 16, "A": rs[:, None] * Vh[:r], "Bt": rs[:, None] * U[:, :r].T}])
        return Encoded("factors", params, {k: v.cpu() for k, v in parts.items()})
