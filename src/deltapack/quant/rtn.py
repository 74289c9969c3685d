"""Round-to-nearest uniform quantization of matrix rows, asymmetric min-max per group of columns.

x ≈ code * scale + zero, code in [0, 2^b). `group_size=None` means one group per row. Scales and zeros are fp16 and
are counted by the caller as side bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltapack.format.packing import pack_bits, packed_row_bytes, unpack_bits


@dataclass
class QMatrix:
    codes: torch.Tensor  # (rows, packed_row_bytes) uint8
    scale: torch.Tensor  # (rows, n_groups) fp16
    zero: torch.Tensor  # (rows, n_groups) fp16
    bits: int
    cols: int
    group_size: int  # columns per group (== cols for one group per row)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scale, self.zero, self.bits, self.cols, self.group_size, dtype)


def qmatrix_bytes(rows: int, cols: int, bits: int, group_size: int | None) -> int:
    """Exact stored bytes of a QMatrix (codes + fp16 scale + fp16 zero)."""
    gs = cols if not group_size else min(group_size, cols)
    n_groups = (cols + gs - 1) // gs
    return rows * packed_row_bytes(cols, bits) + rows * n_groups * 4


def _group_view(x: torch.Tensor, gs: int) -> torch.Tensor:
    rows, cols = x.shape
    n_groups = (cols + gs - 1) // gs
    if n_groups * gs != cols:
        # pad with the row's last value so padding never widens the min-max range
        x = torch.cat([x, x[:, -1:].expand(rows, n_groups * gs - cols)], dim=1)
    return x.view(rows, n_groups, gs)


def quant_params(
    x: torch.Tensor, bits: int, group_size: int | None, clip_search: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scale/zero per group (fp16-rounded, so they equal what is stored).

    1 bit: the two levels mean ± mean|x - mean| (min-max would put them at the extremes, worse than zero for a
    bell-shaped group). 2-4 bits: the min-max range shrunk by the factor (grid 1.0 .. 0.5) with the lowest squared
    error per group, since low-bit codes lose more to outliers stretching the range than to clipping them.
    """
    rows, cols = x.shape
    gs = cols if not group_size else min(group_size, cols)
    g = _group_view(x.float(), gs)
    qmax = (1 << bits) - 1
    if bits == 1:
        c = g.mean(-1)
        a = (g - c.unsqueeze(-1)).abs().mean(-1)
        lo, hi = c - a, c + a
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        if clip_search and bits <= 4:
            best_err = None
            best_lo, best_hi = lo, hi
            for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5):
                l, h = lo * shrink, hi * shrink
                s_ = ((h - l) / qmax).clamp_min(1e-12)
                q = torch.round((g - l.unsqueeze(-1)) / s_.unsqueeze(-1)).clamp_(0, qmax)
                err = ((q * s_.unsqueeze(-1) + l.unsqueeze(-1) - g) ** 2).sum(-1)
                if best_err is None:
                    best_err = err
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_lo = torch.where(better, l, best_lo)
                    best_hi = torch.where(better, h, best_hi)
            lo, hi = best_lo, best_hi
    scale = ((hi - lo) / qmax).clamp_min(1e-12).to(torch.float16)
    scale = torch.where(scale == 0, torch.full_like(scale, 6e-8), scale)  # fp16 underflow guard
    zero = lo.to(torch.float16)
    return scale, zero, gs


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Integer codes (rows, cols) of x under given per-group scale/zero."""
    rows, cols = x.shape
    g = _group_view(x.float(), gs)
    q = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, (1 << bits) - 1)
    return q.view(rows, -1)[:, :cols].to(torch.uint8)


def quantize_rows(x: torch.Tensor, bits: int, group_size: int | None = None) -> QMatrix:
    if x.dim() != 2:
        raise ValueError("quantize_rows takes a 2-D tensor")
    scale, zero, gs = quant_params(x, bits, group_size)
    codes = quantize_with(x, scale, zero, bits, gs)
    return QMatrix(pack_bits(codes, bits), scale, zero, bits, x.shape[1], gs)


def dequantize_rows(codes, scale, zero, bits: int, cols: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_bits(codes, bits, cols).float()
    rows = q.shape[0]
    gs = group_size
    n_groups = scale.shape[1]
    if n_groups * gs != cols:
        q = torch.cat([q, q.new_zeros(rows, n_groups * gs - cols)], dim=1)
    x = q.view(rows, n_groups, gs) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.view(rows, -1)[:, :cols].to(dtype)


def expected_rows_bytes(rows: int, cols: int, bits: int) -> int:
    return rows * packed_row_bytes(cols, bits)
