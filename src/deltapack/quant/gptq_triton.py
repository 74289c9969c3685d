"""GPTQ's column loop inside one block as a single Triton kernel.

Why: the torch loop (quant/gptq.py `_torch_columns`) launches ~8 small kernels per column. A 7B-shaped delta-come run
quantizes ~1.4M columns (every input column of every A factor, every rank column of every B factor), so ~11M kernel
launches and ~10M view ops: about two minutes of host time on an H100 machine, with the GPU idle. Rows are
independent inside a block (the error of column i only moves the later columns of the same row), so one program
owns a tile of rows, keeps its (rows x block) slice of W in registers and walks the block's columns in order.

Same arithmetic as the torch loop, operation for operation:
  x   = (w - z) / s              IEEE division (div_rn; Triton's `/` would be approximate)
  q   = rint(clamp(x, 0, qmax))   = clamp(round(x), 0, qmax): the bounds are integers and rounding is monotone
  deq = q * s + z                torch's addcmul
  W[:, j>i] = W[:, j] - (w - deq) * Hs[i, j]        torch's addr_(alpha=-1)
The two multiply-adds round once (fma) or twice exactly as torch's kernels do on the device: compilers may contract
them or not, so `torch_rounding` measures it once per device and the kernel is compiled with fp fusion off, using
an explicit fma only where torch has one. On CUDA the result is then expected to equal the torch loop bit for bit;
bench/quality/timing_7b.py --gptq-check measures that on the GPU. Under TRITON_INTERPRET=1 (CPU tests) rint is the
1.5·2^23 trick (exact for |x| < 2^22, and x is clamped to [0, 255]) and an fma is emulated in float64 (exact
product, then one double rounding: equal to a true fma except in cases of probability ~2^-29 per operation).

Layout: W (rows, nb) row-major, updated in place; S, Z and the output Q are passed transposed, (nb, rows), so that
reading or writing column i is one contiguous access per tile.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


DEFAULT_TILE_COLS = 128


class KernelUnavailable(RuntimeError):
    """The kernel could not be compiled or launched (nothing was modified)."""


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _IMPORT_ERROR: str | None = None
except Exception as _e:  # not installed, or broken against this torch: the torch loop runs instead
    triton = tl = libdevice = None
    _IMPORT_ERROR = f"{_e.__class__.__name__}: {_e}"


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernel can run on `device`, else why not."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpret():
        return None
    return f"no Triton backend for {device.type} (set TRITON_INTERPRET=1 to run it on the CPU, slowly)"


def available(device: torch.device) -> bool:
    return unavailable_reason(device) is None


if triton is not None:

    @triton.jit
    def _madd(a, b, c, FUSED: tl.constexpr, EMULATE: tl.constexpr):
        """a * b + c rounded once (FUSED) or twice, as torch's kernel for the same op does on this device (the kernel
        is compiled with fp fusion off, so the unfused form stays two roundings)."""
        if FUSED:
            if EMULATE:  # the interpreter's fma rounds twice; float64 keeps the product exact
                return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
            else:
                return tl.fma(a, b, c)
        else:
            return a * b + c

    @triton.jit
    def _rint(x, EMULATE: tl.constexpr):
        if EMULATE:  # round half to even for |x| < 2^22 (x is clamped to [0, 255] here)
            return (x + 12582912.0) - 12582912.0
        else:
            return libdevice.rint(x)

    # sizes are runtime values (no recompilation per matrix shape or block remainder); only the tile is compile-time
    @triton.jit(do_not_specialize=["rows", "nb", "c0", "c1"])
    def _gptq_block_kernel(
        w_ptr, qt_ptr, st_ptr, zt_ptr, qmr_ptr, qmc_ptr, hs_ptr,
        rows, nb, c0, c1,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FUSED_DEQ: tl.constexpr, FUSED_UPDATE: tl.constexpr,
        EMULATE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        cmask = c < nb
        tile = rmask[:, None] & cmask[None, :]
        w_offs = r[:, None] * nb + c[None, :]
        W = tl.load(w_ptr + w_offs, mask=tile, other=0.0)
        qm_row = tl.load(qmr_ptr + r, mask=rmask, other=1.0)
        # a compile-time trip count, columns outside [c0, c1) masked off: the interpreter cannot loop over runtime
        # bounds, and one code path is what the CPU tests check
        for i in range(0, BLOCK_C):
            active = (i >= c0) & (i < c1)
            # column i of the register tile; max with -inf fill returns the value exactly (sign of zero included)
            w = tl.max(tl.where(c[None, :] == i, W, float("-inf")), axis=1)
            cm = rmask & active
            sc = tl.load(st_ptr + i * rows + r, mask=cm, other=1.0)
            zc = tl.load(zt_ptr + i * rows + r, mask=cm, other=0.0)
            qm = tl.minimum(qm_row, tl.load(qmc_ptr + i, mask=active, other=1.0))
            x = tl.math.div_rn(w - zc, sc)
            q = _rint(tl.minimum(tl.maximum(x, 0.0), qm), EMULATE)
            deq = _madd(q, sc, zc, FUSED_DEQ, EMULATE)
            tl.store(qt_ptr + i * rows + r, deq, mask=cm)
            err = w - deq
            later = (c > i) & cmask & active
            h = tl.load(hs_ptr + i * nb + c, mask=later, other=0.0)
            W = tl.where(later[None, :], _madd(-err[:, None], h[None, :], W, FUSED_UPDATE, EMULATE), W)
        tl.store(w_ptr + w_offs, W, mask=tile)


@functools.lru_cache(maxsize=8)
def torch_rounding(device: str) -> tuple[bool, bool]:
    """Whether torch's addcmul (the dequantisation) and addr_ (the error update) round a*b+c once (an fma) on this
    device, measured on random data: nvcc may contract either to an fma or not, so the kernel asks instead of
    assuming. Where torch is not consistent (its CPU addr_ uses an fma in the vectorised body only) the majority
    wins."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    W, e, h = torch.randn(64, 256, generator=g), torch.randn(64, generator=g), torch.randn(256, generator=g)
    z, q, s = torch.randn(4096, generator=g), torch.randint(0, 16, (4096,), generator=g).float(), torch.rand(4096, generator=g)

    def fused_wins(out, fused, split) -> bool:
        return int((out == fused).sum()) >= int((out == split).sum())

    upd = W.to(dev).addr_(e.to(dev), h.to(dev), alpha=-1).cpu()
    upd_fused = (W.double() - e.double()[:, None] * h.double()[None, :]).float()
    upd_split = W + (-e)[:, None] * h[None, :]  # two torch ops: two roundings
    deq = torch.addcmul(z.to(dev), q.to(dev), s.to(dev)).cpu()
    deq_fused = (z.double() + q.double() * s.double()).float()
    deq_split = z + q * s
    return fused_wins(deq, deq_fused, deq_split), fused_wins(upd, upd_fused, upd_split)


def _tile_cols(nb: int, cuda: bool) -> int:
    """Compile-time tile width: on CUDA at least 128 (GPTQ's usual block), so every block of every matrix, the short
    last ones included, runs one compiled kernel; the interpreter takes the exact power of two (it is slow)."""
    width = triton.next_power_of_2(nb)
    return max(width, DEFAULT_TILE_COLS) if cuda else width


def _tile_rows(block_c: int) -> int:
    """Rows per program: a (rows x block) fp32 tile of ~2K values stays in registers with 4 warps."""
    return max(1, min(32, 2048 // block_c))


def block_columns(
    W1: torch.Tensor, Q1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, qm_row: torch.Tensor,
    qm_col: torch.Tensor, Hs1: torch.Tensor, c0: int, c1: int,
) -> None:
    """Quantize columns c0..c1-1 of the block W1 (rows x nb, fp32, updated in place like the torch loop) into Q1,
    with per-element grids S1/Z1 (rows x nb), widths' qmax per row (qm_row) and per column (qm_col, +inf where
    unused) and Hs1 = Hinv1 / diag(Hinv1)[:, None] (nb x nb)."""
    if c1 <= c0:
        return
    rows, nb = W1.shape
    if not W1.is_contiguous():
        raise ValueError("block_columns needs a contiguous W1")
    dev = W1.device
    st = S1.T.contiguous()
    zt = Z1.T.contiguous()
    qt = torch.empty(nb, rows, dtype=torch.float32, device=dev)
    hs = Hs1.contiguous().float()
    block_c = _tile_cols(nb, dev.type == "cuda" and not _interpret())
    block_r = _tile_rows(block_c)
    grid = (triton.cdiv(rows, block_r),)
    fused_deq, fused_update = torch_rounding(str(dev))
    try:
        _gptq_block_kernel[grid](
            W1, qt, st, zt, qm_row.float().contiguous(), qm_col.float().contiguous(), hs, rows, nb, c0, c1,
            BLOCK_R=block_r, BLOCK_C=block_c, FUSED_DEQ=fused_deq, FUSED_UPDATE=fused_update,
            EMULATE=_interpret() or dev.type != "cuda", num_warps=4, enable_fp_fusion=False,
        )
    except Exception as e:  # compilation errors come in many types; raised before the launch touched W1
        if dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(dev)  # a launch that did start re-raises here (an illegal access is fatal anyway)
        raise KernelUnavailable(f"{e.__class__.__name__}: {e}"[:300]) from e
    Q1[:, c0:c1] = qt[c0:c1].T
