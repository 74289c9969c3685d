"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Quantize W (rows x cols) column by column; after each column, spread its rounding error over the columns not yet
quantized through the inverse Hessian H = Σ x xᵀ of the layer input (x has `cols` entries), so that the *output*
error ‖(W − Ŵ) X‖ stays small rather than ‖W − Ŵ‖. Knobs as in the paper's code: blocksize (lazy batch updates),
percdamp (damping, fraction of mean diag H), act_order (process columns by descending diag H), group_size.

Grids are asymmetric per group (code * scale + zero, fp16 scale/zero, exactly quant/rtn.py's layout and its
min-max-with-clip-search `quant_params`), so the result decodes through `decode_qblocks` / `dequantize_rows`.

Two grid orientations, because deltapack stores factors as rows:
  grid="row"  the usual GPTQ: one grid per (row, group of `group_size` columns). Stored as W itself.
              act_order uses static groups (every grid computed up front from W), so the stored column order stays
              the natural one and no permutation is stored.
  grid="col"  one grid per (column, group of `group_size` rows): each column is quantized as a unit, on its own grid,
              computed from the column's values just before it is quantized (per block of `blocksize` columns).
              Stored transposed: row j of the result is column j of W. This is how the output-side factor B (m x r)
              of a low-rank delta is GPTQ-ed over its r input columns while being stored as Bt (r x m) rows.

`bits` is one width or a width per row (grid="row") / per column (grid="col"): mixed-precision factors run as one
GPTQ problem, so the error of every rank group is compensated jointly with its true cross-group Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltapack.format.packing import pack_bits
from deltapack.quant.rtn import QMatrix, quant_params


@dataclass
class GPTQResult:
    """Unpacked result in the *stored* orientation (grid="col": transposed)."""

    codes: torch.Tensor  # (stored rows, stored cols) uint8, unpacked
    scale: torch.Tensor  # (stored rows, n_groups) fp16
    zero: torch.Tensor  # (stored rows, n_groups) fp16
    group_size: int
    dequantized: torch.Tensor  # fp32, in W's orientation (rows x cols), equal to decoding the stored codes

    def qmatrix(self, rows: slice | torch.Tensor, bits: int) -> QMatrix:
        """QMatrix of a subset of stored rows that share one bit width."""
        codes = self.codes[rows]
        return QMatrix(pack_bits(codes, bits), self.scale[rows].contiguous(), self.zero[rows].contiguous(), bits,
                       codes.shape[1], self.group_size)


def mixed_grid(x: torch.Tensor, bits: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_params for rows of x that may each have their own width. Returns fp16 (rows, n_groups) scale, zero."""
    rows, cols = x.shape
    ng = (cols + group_size - 1) // group_size
    scale = torch.empty(rows, ng, dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    for b in torch.unique(bits).tolist():
        idx = (bits == b).nonzero().view(-1)
        s, z, _ = quant_params(x[idx], int(b), group_size)
        scale[idx], zero[idx] = s, z
    return scale, zero


def _inverse_hessian_chol(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)^-1; damping grows until H is numerically positive definite."""
    damp = percdamp * float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = max(damp * 10, 1e-8)
    raise torch.linalg.LinAlgError("GPTQ: Hessian is not positive definite even after damping")


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int | torch.Tensor,
    *,
    group_size: int | None = 128,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    grid: str = "row",
    order: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ of W (rows x cols) under H (cols x cols). `order`: explicit column processing order (overrides
    act_order). Returns codes/scales in the stored orientation and the dequantized W."""
    if grid not in ("row", "col"):
        raise ValueError("grid must be 'row' or 'col'")
    W = W.detach().float().clone()
    rows, cols = W.shape
    dev = W.device
    H = H.detach().to(dev, torch.float32).clone()
    n_units = rows if grid == "row" else cols  # what `bits` is indexed by
    if isinstance(bits, int):
        bits_t = torch.full((n_units,), bits, dtype=torch.long, device=dev)
    else:
        bits_t = bits.to(dev).long()
    if bits_t.numel() != n_units:
        raise ValueError(f"bits has {bits_t.numel()} entries, expected {n_units}")
    qmax_t = (2.0 ** bits_t.float()) - 1

    # grid groups run along W's columns (row mode) or along W's rows (col mode)
    span = cols if grid == "row" else rows
    gs = span if not group_size else min(group_size, span)
    ng = (span + gs - 1) // gs

    dead = torch.diag(H) == 0  # inputs that never fire: any value works, zero is cheapest
    H[dead, dead] = 1
    W[:, dead] = 0

    if order is not None:
        perm = order.to(dev).long()
    elif act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols, device=dev)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = _inverse_hessian_chol(H, percdamp)

    Q = torch.zeros_like(W)
    zero_t = torch.zeros((), device=dev)
    if grid == "row":
        static = act_order or order is not None
        gscale = torch.empty(rows, ng, dtype=torch.float16, device=dev)
        gzero = torch.empty_like(gscale)
        if static:  # grids from the original W so groups stay contiguous in the natural column order
            Wn = torch.empty_like(W)
            Wn[:, perm] = W
            gscale, gzero = mixed_grid(Wn, bits_t, gs)
        group_of = perm // gs  # group of each processed column
        qmax_col = qmax_t  # (rows,): every column has the rows' widths
    else:
        cscale = torch.empty(cols, ng, dtype=torch.float16, device=dev)  # per column (in processing order)
        czero = torch.empty_like(cscale)
        bits_p = bits_t[perm]

    # Per column: 8 small kernels, no host sync. The error is propagated with rows of Hinv pre-divided by their
    # diagonal, and column i itself is left untouched so the block's scaled errors come out in one op at its end.
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        Hs1 = Hinv1 / d1[:, None]
        if grid == "col":  # grids of this block's columns from their values after the previous blocks' updates
            s, z = mixed_grid(W1.T, bits_p[i1:i2], gs)
            cscale[i1:i2], czero[i1:i2] = s, z
            S1 = s.float().repeat_interleave(gs, dim=1)[:, :rows].T.contiguous()  # (rows, block) per element
            Z1 = z.float().repeat_interleave(gs, dim=1)[:, :rows].T.contiguous()
            QM1 = qmax_t[perm[i1:i2]]
        elif static:
            S1 = gscale[:, group_of[i1:i2]].float()
            Z1 = gzero[:, group_of[i1:i2]].float()
        else:
            S1 = torch.empty_like(W1)
            Z1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if grid == "row" and not static and j % gs == 0:  # dynamic group grid from its current values
                width = min(gs, cols - j)
                cur = torch.cat([W1[:, i:], W[:, i2 : j + width]], 1)[:, :width]
                s, z = mixed_grid(cur, bits_t, width)
                gscale[:, j // gs], gzero[:, j // gs] = s[:, 0], z[:, 0]
                S1[:, i : i + width] = s.float()
                Z1[:, i : i + width] = z.float()
            w, sc, zc = W1[:, i], S1[:, i], Z1[:, i]
            qm = qmax_col if grid == "row" else QM1[i]
            q = torch.clamp(torch.round((w - zc) / sc), min=zero_t, max=qm)
            deq = torch.addcmul(zc, q, sc)
            Q1[:, i] = deq
            W1[:, i + 1 :].addr_(w - deq, Hs1[i, i + 1 :], alpha=-1)
        Err1 = (W1 - Q1) / d1  # each column's scaled error, as it was when quantized
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(cols, device=dev)
    Q = Q[:, inv]
    if grid == "row":
        S = gscale.float().repeat_interleave(gs, dim=1)[:, :cols]
        Z = gzero.float().repeat_interleave(gs, dim=1)[:, :cols]
        codes = _codes(Q, S, Z, qmax_t[:, None])
        return GPTQResult(codes, gscale, gzero, gs, Q)
    cscale, czero = cscale[inv].contiguous(), czero[inv].contiguous()
    S = cscale.float().repeat_interleave(gs, dim=1)[:, :rows]
    Z = czero.float().repeat_interleave(gs, dim=1)[:, :rows]
    codes = _codes(Q.T, S, Z, qmax_t[:, None])
    return GPTQResult(codes, cscale, czero, gs, Q)


def _codes(Q: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """Integer codes of values that lie on their grids (Q = code*S + Z up to fp32 rounding)."""
    return torch.minimum(torch.round((Q - Z) / S).clamp_(min=0), qmax).to(torch.uint8)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖_F² = tr(E H Eᵀ) for H = X Xᵀ: the quantity GPTQ minimises."""
    E = (W - W_hat).float()
    return float(((E @ H.float()) * E).sum())
