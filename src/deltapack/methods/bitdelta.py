"""bitdelta: Δ ≈ α·sign(Δ) (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit").

α = mean|Δ| per matrix or per row. Below 16x (more than one bit per element) further sign planes code the residual
(the multi-bit extension). Optional scale distillation: only the scales are trained so the compressed model's logits
match the fine-tune's on calibration text (KL), as in the paper (≈200 steps, batch 4).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from deltapack.errors import BudgetError
from deltapack.format.packing import pack_bits, packed_row_bytes, unpack_bits
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, TensorStat, register_method

log = logging.getLogger(__name__)


@register_method
class BitDelta(DeltaMethod):
    name = "bitdelta"
    paper = "Liu et al. 2024, BitDelta: Your Fine-Tune May Only Be Worth One Bit"
    summary = "sign x scale (1 bit/element), optional scale distillation on calibration text"
    uses_calibration = True
    parts_per_tensor = 2
    scale: Literal["matrix", "row"] = Field("matrix", description="one scale per matrix or per output row")
    planes: int | None = Field(None, ge=1, le=8, description="sign planes (default: as many as the budget allows)")
    distill: bool = Field(False, description="train the scales to match the fine-tune's logits")
    distill_steps: int = Field(200, ge=1)
    distill_lr: float = Field(0.05, gt=0, description="Adam lr on relative scale multipliers (see calib/distill.py)")
    distill_batch: int = Field(4, ge=1)
    distill_seq_len: int = Field(128, ge=8)

    @property
    def uses_calibration_now(self) -> bool:
        return self.distill

    def _plane_bytes(self, shape) -> int:
        m, n = shape
        return m * packed_row_bytes(n, 1) + 4 * (m if self.scale == "row" else 1)

    def min_bytes(self, shape):
        return self._plane_bytes(shape)

    def max_useful_bytes(self, shape):
        return self._plane_bytes(shape) * (self.planes or 8)

    def allocate(self, stats: list[TensorStat], total_bytes: int) -> dict[str, int]:
        """Whole sign planes per tensor. A proportional split floored to whole planes strands up to a plane per
        tensor (at 8x every tensor would get 1 plane, i.e. 16x); the stranded bytes buy extra planes for the
        tensors with the most delta energy per plane byte, so the true ratio lands near the target."""
        alloc = super().allocate(stats, total_bytes)
        if self.planes is not None:
            return alloc
        by_name = {s.name: s for s in stats}
        planes = {n: max(1, min(8, b // self._plane_bytes(by_name[n].shape))) for n, b in alloc.items()}
        used = sum(k * self._plane_bytes(by_name[n].shape) for n, k in planes.items())
        left = total_bytes - used
        order = sorted(planes, key=lambda n: by_name[n].sq_norm / self._plane_bytes(by_name[n].shape), reverse=True)
        progress = True
        while progress and left > 0:  # round-robin by priority: each pass adds at most one plane per tensor
            progress = False
            for n in order:
                cost = self._plane_bytes(by_name[n].shape)
                if planes[n] < 8 and cost <= left:
                    planes[n] += 1
                    left -= cost
                    progress = True
        return {n: k * self._plane_bytes(by_name[n].shape) for n, k in planes.items()}

    def encode(self, job: TensorJob, ctx) -> Encoded:
        k = self.planes or job.budget_bytes // self._plane_bytes(job.shape)
        if k < 1:
            raise BudgetError(f"{job.name}: {job.budget_bytes} bytes cannot hold one sign plane")
        k = min(k, 8)
        resid = job.delta.clone()
        signs, scales = [], []
        for _ in range(k):
            sgn = resid >= 0
            a = resid.abs().mean(dim=1, keepdim=True) if self.scale == "row" else resid.abs().mean().view(1, 1)
            resid -= (sgn.float() * 2 - 1) * a
            signs.append(pack_bits(sgn.to(torch.uint8), 1))
            scales.append(a.view(-1))
        return Encoded(
            "sign",
            {"planes": k, "scale": self.scale},
            {"signs": torch.cat(signs, 0).cpu(), "scale": torch.stack(scales, 0).float().cpu()},
        )

    @property
    def has_refine(self) -> bool:
        return self.distill

    def refine(self, encoded: dict[str, Encoded], ctx) -> dict[str, Encoded]:
        if not self.distill:
            return encoded
        from deltapack.calib.distill import distill_scales

        return distill_scales(self, encoded, ctx)


def sign_planes(enc: Encoded, shape: tuple[int, int], device) -> torch.Tensor:
    """(planes, m, n) ±1 tensor of a sign codec entry."""
    m, n = shape
    k = enc.params["planes"]
    bits = unpack_bits(enc.parts["signs"].to(device), 1, n)
    return bits.view(k, m, n).to(torch.float32) * 2 - 1
