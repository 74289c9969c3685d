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

Speed. The column loop inside a block is the hot spot: ~8 small kernels per column in torch, i.e. ~80k launches and
views per 4096-column factor, host-bound on a GPU. On CUDA it runs as one Triton kernel launch per block
(quant/gptq_triton.py, same arithmetic; `backend=` / DELTAPACK_GPTQ_BACKEND=torch choose the torch loop, which
stays the CPU path and the reference). What depends on H alone (dead inputs, column order, the inverse Hessian's
Cholesky factor) is a `PreparedHessian` that matrices reading one input share (`prepare_hessian`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from deltapack.format.packing import pack_bits
from deltapack.quant.rtn import QMatrix, quant_params

log = logging.getLogger(__name__)


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


def mixed_grid(x: torch.Tensor, bits: torch.Tensor | list[int], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_params for rows of x that may each have their own width. Returns fp16 (rows, n_groups) scale, zero.
    `bits` as a host list spares the device-to-host syncs of finding the rows of each width."""
    rows, cols = x.shape
    ng = (cols + group_size - 1) // group_size
    scale = torch.empty(rows, ng, dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    widths = bits.tolist() if isinstance(bits, torch.Tensor) else bits
    by_width: dict[int, list[int]] = {}
    for i, b in enumerate(widths):
        by_width.setdefault(int(b), []).append(i)
    for b in sorted(by_width):
        idx = torch.tensor(by_width[b], dtype=torch.long).to(x.device, non_blocking=True)
        s, z, _ = quant_params(x[idx], b, group_size)
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


@dataclass
class PreparedHessian:
    """What GPTQ derives from H alone: the column order, dead inputs and the inverse Hessian's Cholesky factor.
    Matrices that read the same input (q/k/v, gate/up) with the same settings share one: prepare it once with
    `prepare_hessian` and pass it to every `gptq_quantize` call (the results are identical to preparing each time)."""

    perm: torch.Tensor  # processing order of the columns
    dead: torch.Tensor  # bool (cols,): inputs that never fire
    Hinv: torch.Tensor  # upper Cholesky factor of (H[perm][:, perm] + damp)^-1
    percdamp: float
    act_order: bool
    order: torch.Tensor | None

    def matches(self, cols: int, percdamp: float, act_order: bool, order: torch.Tensor | None) -> bool:
        if self.perm.numel() != cols or self.percdamp != percdamp:
            return False
        if order is not None or self.order is not None:
            return order is not None and self.order is not None and torch.equal(order.cpu(), self.order.cpu())
        return self.act_order == act_order


def prepare_hessian(
    H: torch.Tensor, *, percdamp: float = 0.01, act_order: bool = False, order: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> PreparedHessian:
    """Dead inputs, column order (explicit `order`, else act-order by descending diag H, else natural) and the
    damped inverse Hessian's upper Cholesky factor, exactly as gptq_quantize computes them for these settings."""
    dev = torch.device(device) if device is not None else H.device
    H = H.detach().to(dev, torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that never fire: any value works, zero is cheapest
    H[dead, dead] = 1
    if order is not None:
        perm = order.to(dev).long()
    elif act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(H.shape[0], device=dev)
    H = H[perm][:, perm]
    Hinv = _inverse_hessian_chol(H, percdamp)
    return PreparedHessian(perm, dead, Hinv, percdamp, act_order, None if order is None else order.detach().cpu())


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | None,
    bits: int | torch.Tensor,
    *,
    group_size: int | None = 128,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    grid: str = "row",
    order: torch.Tensor | None = None,
    prepared: PreparedHessian | None = None,
    backend: str = "auto",
) -> GPTQResult:
    """GPTQ of W (rows x cols) under H (cols x cols). `order`: explicit column processing order (overrides
    act_order). `prepared`: prepare_hessian(H, ...) computed earlier for the same settings (H may then be None).
    `backend`: how the column loop inside a block runs: "torch" (a few small ops per column: the reference, and
    the CPU path), "triton" (one kernel launch per block, CUDA; see quant/gptq_triton.py), "auto" (triton on
    CUDA when available, unless DELTAPACK_GPTQ_BACKEND=torch). Returns codes/scales in the stored orientation and
    the dequantized W."""
    if grid not in ("row", "col"):
        raise ValueError("grid must be 'row' or 'col'")
    W = W.detach().float().clone()
    rows, cols = W.shape
    dev = W.device
    n_units = rows if grid == "row" else cols  # what `bits` is indexed by
    if isinstance(bits, int):
        bits_t = torch.full((n_units,), bits, dtype=torch.long, device=dev)
        bits_host = [bits] * n_units
    else:
        bits_host = [int(b) for b in bits.tolist()]
        bits_t = bits.to(dev).long()
    if bits_t.numel() != n_units:
        raise ValueError(f"bits has {bits_t.numel()} entries, expected {n_units}")
    qmax_t = (2.0 ** bits_t.float()) - 1
    use_triton = _use_triton(backend, dev)

    # grid groups run along W's columns (row mode) or along W's rows (col mode)
    span = cols if grid == "row" else rows
    gs = span if not group_size else min(group_size, span)
    ng = (span + gs - 1) // gs

    if prepared is None or not prepared.matches(cols, percdamp, act_order, order):
        if H is None:
            raise ValueError("gptq_quantize needs H or a matching PreparedHessian")
        prepared = prepare_hessian(H, percdamp=percdamp, act_order=act_order, order=order, device=dev)
    perm, Hinv = prepared.perm.to(dev), prepared.Hinv.to(dev)
    W[:, prepared.dead.to(dev)] = 0
    W = W[:, perm]

    Q = torch.zeros_like(W)
    if grid == "row":
        static = act_order or order is not None
        gscale = torch.empty(rows, ng, dtype=torch.float16, device=dev)
        gzero = torch.empty_like(gscale)
        if static:  # grids from the original W so groups stay contiguous in the natural column order
            Wn = torch.empty_like(W)
            Wn[:, perm] = W
            gscale, gzero = mixed_grid(Wn, bits_host, gs)
        group_of = perm // gs  # group of each processed column
        qm_row, qm_col = qmax_t, None  # every column has the rows' widths
    else:
        static = True  # each block's grids are computed before its column loop
        cscale = torch.empty(cols, ng, dtype=torch.float16, device=dev)  # per column (in processing order)
        czero = torch.empty_like(cscale)
        perm_host = perm.tolist()
        bits_p_host = [bits_host[j] for j in perm_host]
        qm_row, qm_col = None, qmax_t[perm]

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        nb = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        Hs1 = Hinv1 / d1[:, None]
        qm_col1 = None if qm_col is None else qm_col[i1:i2]
        if grid == "col":  # grids of this block's columns from their values after the previous blocks' updates
            s, z = mixed_grid(W1.T, bits_p_host[i1:i2], gs)
            cscale[i1:i2], czero[i1:i2] = s, z
            S1 = s.float().repeat_interleave(gs, dim=1)[:, :rows].T.contiguous()  # (rows, block) per element
            Z1 = z.float().repeat_interleave(gs, dim=1)[:, :rows].T.contiguous()
        elif static:
            S1 = gscale[:, group_of[i1:i2]].float()
            Z1 = gzero[:, group_of[i1:i2]].float()
        else:
            S1 = torch.empty_like(W1)
            Z1 = torch.empty_like(W1)
            if i1 % gs:  # the block starts inside a group whose grid an earlier block computed
                w0 = min(nb, gs - i1 % gs)
                S1[:, :w0] = gscale[:, i1 // gs : i1 // gs + 1].float()
                Z1[:, :w0] = gzero[:, i1 // gs : i1 // gs + 1].float()
        i = 0
        while i < nb:
            j = i1 + i
            if static:
                stop = nb
            else:  # dynamic group grids: a segment ends where the next group starts
                if j % gs == 0:  # grid from the group's current values
                    width = min(gs, cols - j)
                    cur = torch.cat([W1[:, i:], W[:, i2 : j + width]], 1)[:, :width]
                    s, z = mixed_grid(cur, bits_host, width)
                    gscale[:, j // gs], gzero[:, j // gs] = s[:, 0], z[:, 0]
                    S1[:, i : i + width] = s.float()
                    Z1[:, i : i + width] = z.float()
                stop = min(nb, i + gs - j % gs)
            strict = backend == "triton"
            if not (use_triton and _triton_columns(W1, Q1, S1, Z1, qm_row, qm_col1, Hs1, i, stop, strict)):
                _torch_columns(W1, Q1, S1, Z1, qm_row, qm_col1, Hs1, i, stop)
            i = stop
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


def _torch_columns(W1, Q1, S1, Z1, qm_row, qm_col, Hs1, c0: int, c1: int) -> None:
    """Columns c0..c1-1 of a block, one at a time: 8 small kernels per column, no host sync. The error is propagated
    with rows of Hinv pre-divided by their diagonal, and column i itself is left untouched so the block's scaled
    errors come out in one op at its end. This is the reference the Triton kernel is tested against."""
    zero_t = torch.zeros((), device=W1.device)
    for i in range(c0, c1):
        w, sc, zc = W1[:, i], S1[:, i], Z1[:, i]
        qm = qm_row if qm_col is None else qm_col[i]
        q = torch.clamp(torch.round((w - zc) / sc), min=zero_t, max=qm)
        deq = torch.addcmul(zc, q, sc)
        Q1[:, i] = deq
        W1[:, i + 1 :].addr_(w - deq, Hs1[i, i + 1 :], alpha=-1)


# ---- backend choice ---------------------------------------------------------------------------------------------------
_TRITON_BROKEN: list[str] = []  # set once a kernel failed to compile: the rest of the process uses torch


def _use_triton(backend: str, dev: torch.device) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError("backend must be 'auto', 'torch' or 'triton'")
    if backend == "torch":
        return False
    if backend == "auto":
        if os.environ.get("DELTAPACK_GPTQ_BACKEND", "").strip().lower() == "torch" or _TRITON_BROKEN:
            return False
        if dev.type != "cuda":
            return False
    from deltapack.quant import gptq_triton

    if not gptq_triton.available(dev):
        if backend == "triton":
            raise RuntimeError(f"GPTQ triton backend unavailable on {dev}: {gptq_triton.unavailable_reason(dev)}")
        return False
    return True


def _triton_columns(W1, Q1, S1, Z1, qm_row, qm_col, Hs1, c0: int, c1: int, strict: bool) -> bool:
    """The Triton kernel over columns c0..c1-1; False (nothing changed) when it cannot run, so the caller falls back
    (`strict`: raise instead)."""
    from deltapack.quant import gptq_triton

    rows, nb = W1.shape
    qmr = qm_row if qm_row is not None else _inf(rows, W1.device)
    qmc = qm_col if qm_col is not None else _inf(nb, W1.device)
    try:
        gptq_triton.block_columns(W1, Q1, S1, Z1, qmr, qmc, Hs1, c0, c1)
    except gptq_triton.KernelUnavailable as e:  # compile failure: W1 is untouched; use torch from now on
        if strict:
            raise
        log.warning("GPTQ triton kernel unavailable (%s); using the torch column loop", e)
        _TRITON_BROKEN.append(str(e))
        return False
    return True


def _inf(n: int, dev: torch.device) -> torch.Tensor:
    return torch.full((n,), float("inf"), device=dev)


def _codes(Q: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """Integer codes of values that lie on their grids (Q = code*S + Z up to fp32 rounding)."""
    return torch.minimum(torch.round((Q - Z) / S).clamp_(min=0), qmax).to(torch.uint8)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖_F² = tr(E H Eᵀ) for H = X Xᵀ: the quantity GPTQ minimises."""
    E = (W - W_hat).float()
    return float(((E @ H.float()) * E).sum())
