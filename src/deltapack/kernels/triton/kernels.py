"""Triton kernels of the batched delta backend (layouts: deltapack.kernels.triton.layouts).

Every kernel serves a whole mixed-tenant batch in one launch. The batch's tokens are grouped by tenant on the
device (`token_blocks`: a stable sort of the slot ids, then blocks of at most BLOCK_T tokens of one tenant), and
program (b, tile, split) applies block b's tenant's delta tile to all tokens of the block, so a tenant's bytes are
read once per step however many of its tokens the batch holds. Per-slot pointer, tile and segment tables (built
once per LayerDeltas.version) say where each tenant's packed tensors are; a slot with nothing in this launch (or a
base token, slot -1) costs one load and an early return.

_seg_kernel: out[t, orow + i] (+)= sum over the tile's K-segments of sum_k x[t, kbeg + k] * deq(seg)[row i, k]. A
segment is one block of packed codes with one bit width (a rank group, a sign plane, a dense matrix):
  V side of qfactors   rows = a rank group's rows of A, one segment (K = in), x = the hidden states, out = z
  U side of qfactors   rows = output rows, one segment per rank group of B = Bt^T (K = that group's rank range of
                       z), x = z, out = the delta output
  dense / sign         rows = output rows, one segment (dense) or one per plane (sign), x = the hidden states
Scales: MODE_ROW (one scale/zero per row: folded out, s * sum(x q) + z * sum(x), applied once per segment),
MODE_ROWTILE (per row and group of gs columns, gs a multiple of BLOCK_K: applied per K step), MODE_COL (B side:
per rank index, for the tile's group of output rows: folded into x, x' = x * s, plus sum(x * zero)), MODE_ELEM
(anything else: scale and zero gathered per element, slow but general), MODE_UNIT (no scale, no zero).

Post-scaled factors (POST launches): when every quantized B group of a layer has one scale/zero per rank index
(per-row grids on Bt, delta-come's usual choice), y = sum_r z_r (s_r q[o, r] + zero_r) = sum_r (z_r s_r) q[o, r] + c
with c = sum_r z_r zero_r. The V side then writes z' = z * s directly and adds c into an extra column of z (atomic:
every rank tile contributes); the U side runs MODE_UNIT and adds c once. The U side thus loads no scales at all
(the column scales cost a load per code column and, with 3-bit codes, twice the registers).

Dequantization, few tokens per tenant (decode): a b-bit code masked in place inside its int32 word is, read as an
fp32, the denormal q * 2^(pos - 149) exactly (no conversion instruction), so each code costs one AND and one FFMA
against x pre-scaled by 2^(85 - pos) (one multiply per x element, shared by all rows of the tile); partial sums stay
per (row, word) and are reduced once per segment. Codes wider than a power of two are stored as power-of-two parts
(3 = 2+1, ...; sum_c x q = sum over parts of 2^offset * sum_c x q_part). Denormals must not be flushed: Triton's
PTX uses no .ftz. Blocks of >= DOT_MIN tokens: the codes are decoded to exact integers (2^23 trick), reshaped, and
multiplied on the tensor cores (tl.dot, bf16/fp16 operands, fp32 accumulation; fp32 models: ieee).

_ell_kernel: out[t, r] (+)= sum_j values[r, j] * x[t, col[r, j]]: sparse deltas in ELL tiles of 16 rows.

Splits along the reduction axis (SPLIT_K) add partial sums atomically into an fp32 output. SPLIT_K / SPLIT_J are
runtime arguments, not constexprs: the split follows the batch (programs per launch), and as a constexpr every new
split meant a new compilation, seconds each, landing on whichever prefill first had that many token blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_FLOAT = tl.constexpr(0)
MODE_ROW = tl.constexpr(1)
MODE_ROWTILE = tl.constexpr(2)
MODE_COL = tl.constexpr(3)
MODE_ELEM_ROW = tl.constexpr(4)
MODE_ELEM_COL = tl.constexpr(5)
MODE_UNIT = tl.constexpr(6)
TILE_FIELDS = tl.constexpr(5)  # rows, out row, segment row, first segment, segments
SEG_FIELDS = tl.constexpr(10)  # bits, k begin, k length, rows, words (or float) base, mode, scale base, stride, gs,
#                                post-scale base (V side of POST launches, -1: none)
PTR_FIELDS = tl.constexpr(6)  # per slot: words, scale, zero, floats, post scale, post zero
POST_V = tl.constexpr(1)
POST_U = tl.constexpr(2)
TWO64 = tl.constexpr(18446744073709551616.0)  # undoes the 2^-64 of the denormal products


# ---- small helpers ----------------------------------------------------------------------------------------------------
@triton.jit
def _rne_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Only for the CPU interpreter, whose fp32 -> bf16
    cast truncates where the GPU rounds to nearest."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _to_out(v, DT: tl.constexpr, UPCAST: tl.constexpr):
    """Cast for a store, rounding to nearest in the interpreter too."""
    if UPCAST:
        if DT == tl.bfloat16:
            v = _rne_bf16(v)
    return v.to(DT)


@triton.jit
def _dot(a, b, XDT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with operands rounded to XDT, fp32 accumulation. UPCAST (interpreter, bf16): the exact product of the
    operands rounded to bf16, computed in fp32 (the CPU interpreter's bf16 dot is broken)."""
    if UPCAST:
        a = _rne_bf16(a.to(tl.float32))
        b = _rne_bf16(b.to(tl.float32))
    else:
        a = a.to(XDT)
        b = b.to(XDT)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _halves(v, s: tl.constexpr, BLOCK_R: tl.constexpr, N: tl.constexpr):
    """(BLOCK_R, N) words -> (BLOCK_R, 2N): each word, then the word shifted down by s bits, side by side."""
    return tl.reshape(tl.join(v, v >> s), (BLOCK_R, 2 * N))


@triton.jit
def _load_part(wp, base, wpr, rows, rmask, c0, W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Codes of one power-of-two part (rows of wpr words) for rows x [c0, c0 + BLOCK_C): int32 (BLOCK_R, BLOCK_C).
    Unpacked by halving (16, 8, ... W bits): join keeps a word's codes in the thread that loaded it, so the
    compiler reaches the MMA operand layout with far fewer shared-memory stores than a 3-D shift and reshape
    (bench/serving/sass.py). Column order: a word's halving tree enumerates its codes low bits first, the packing
    order."""
    NPW: tl.constexpr = 32 // W
    CW: tl.constexpr = BLOCK_C // NPW
    cw = c0 // NPW + tl.arange(0, CW)
    w = tl.load(wp + base + rows[:, None] * wpr + cw[None, :], mask=rmask[:, None] & (cw < wpr)[None, :], other=0)
    q = _halves(w, 16, BLOCK_R, CW)
    if W <= 8:
        q = _halves(q, 8, BLOCK_R, 2 * CW)
    if W <= 4:
        q = _halves(q, 4, BLOCK_R, 4 * CW)
    if W <= 2:
        q = _halves(q, 2, BLOCK_R, 8 * CW)
    if W == 1:
        q = _halves(q, 1, BLOCK_R, 16 * CW)
    return q & ((1 << W) - 1)


@triton.jit
def _codes(wp, base, seg_rows, rows, rmask, c0, ncols, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """b-bit codes (b = W0 + W1 + W2) of rows x [c0, c0 + BLOCK_C) as exact fp32 integers (tensor-core and general
    paths)."""
    wpr0 = (ncols * W0 + 31) // 32
    code = _load_part(wp, base, wpr0, rows, rmask, c0, W0, BLOCK_R, BLOCK_C)
    if W1 > 0:
        wpr1 = (ncols * W1 + 31) // 32
        base1 = base + seg_rows * wpr0
        code = code | (_load_part(wp, base1, wpr1, rows, rmask, c0, W1, BLOCK_R, BLOCK_C) << W0)
        if W2 > 0:
            wpr2 = (ncols * W2 + 31) // 32
            base2 = base1 + seg_rows * wpr1
            code = code | (_load_part(wp, base2, wpr2, rows, rmask, c0, W2, BLOCK_R, BLOCK_C) << (W0 + W1))
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_bf16(wp, base, seg_rows, rows, rmask, c0, ncols, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Codes of at most 7 bits as bf16 values 128 + q, exact (bf16 0x4300 = 128, the code in the low mantissa
    bits): one OR per code instead of an int-to-float conversion and a rounding."""
    wpr0 = (ncols * W0 + 31) // 32
    code = _load_part(wp, base, wpr0, rows, rmask, c0, W0, BLOCK_R, BLOCK_C)
    if W1 > 0:
        wpr1 = (ncols * W1 + 31) // 32
        base1 = base + seg_rows * wpr0
        code = code | (_load_part(wp, base1, wpr1, rows, rmask, c0, W1, BLOCK_R, BLOCK_C) << W0)
        if W2 > 0:
            wpr2 = (ncols * W2 + 31) // 32
            base2 = base1 + seg_rows * wpr1
            code = code | (_load_part(wp, base2, wpr2, rows, rmask, c0, W2, BLOCK_R, BLOCK_C) << (W0 + W1))
    return (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _mac_part(a0, a1, wp, base, wpr, seg_rows, rows, rmask, x0, x1, kbeg, klen, k0, sp, sbase, sstride, ogrp,
              W: tl.constexpr, OFF: tl.constexpr, COL: tl.constexpr, TWO: tl.constexpr, BLOCK_K: tl.constexpr):
    """a0 / a1 (BLOCK_R, BLOCK_K*W/32) += codes of one power-of-two part of width W (bit offset OFF in the code) times
    token 0's / token 1's x over columns [k0, k0 + BLOCK_K) of the segment; x0 / x1 point at the tokens' rows.

    Each code is masked in place and read as the denormal q * 2^(jW - 149); x is scaled by 2^(85 - jW + OFF), so
    each product is x * q * 2^(OFF - 64) (undone once per segment). One AND and one FFMA per code and token; the x
    loads and scalings are per word column, shared by the rows of the tile. COL: x times the per-column scale of the
    tile's output group."""
    NPW: tl.constexpr = 32 // W
    J: tl.constexpr = 16 // W
    KW: tl.constexpr = BLOCK_K // NPW
    MASK: tl.constexpr = (1 << W) - 1
    kw = tl.arange(0, KW)
    wcol = k0 // NPW + kw
    w = tl.load(wp + base + rows[:, None] * wpr + wcol[None, :], mask=rmask[:, None] & (wcol < wpr)[None, :],
                other=0)
    w = w.to(tl.uint32, bitcast=True)
    for h in tl.static_range(2):
        v = w >> (16 * h)
        for j in tl.static_range(J):
            c = k0 + kw * NPW + (h * J + j)
            cm = c < klen
            f = (v & (MASK << (j * W))).to(tl.float32, bitcast=True)
            cs = 2.0 ** (85 - j * W + OFF)
            if COL:
                sc = tl.load(sp + sbase + c * sstride + ogrp, mask=cm, other=0.0).to(tl.float32) * cs
            else:
                sc = cs
            xv0 = tl.load(x0 + kbeg + c, mask=cm, other=0.0).to(tl.float32) * sc
            a0 += f * xv0[None, :]
            if TWO:
                xv1 = tl.load(x1 + kbeg + c, mask=cm, other=0.0).to(tl.float32) * sc
                a1 += f * xv1[None, :]
    return a0, a1


# ---- segment bodies -----------------------------------------------------------------------------------------------
@triton.jit
def _pair(r0, r1, BLOCK_T: tl.constexpr):
    """Two per-token rows (BLOCK_R,) -> (BLOCK_T, BLOCK_R) (BLOCK_T = 1 or 2)."""
    if BLOCK_T == 1:
        return r0[None, :]
    tt = tl.arange(0, BLOCK_T)
    return tl.where(tt[:, None] == 0, r0[None, :], r1[None, :])


@triton.jit
def _seg_bcast(acc, x_ptr, stride_x, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen, seg_rows, wbase,
               sbase, sstride, gs, pid_k, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, MODE: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
               SIGN: tl.constexpr):
    """One quantized segment for one or two tokens of a tenant (decode): in-place masked codes, per-(row, word)
    partial sums in 2-D registers, reduced once per segment."""
    TWO: tl.constexpr = BLOCK_T == 2
    KW0: tl.constexpr = BLOCK_K * W0 // 32
    KW1: tl.constexpr = BLOCK_K * W1 // 32 if W1 > 0 else 1
    KW2: tl.constexpr = BLOCK_K * W2 // 32 if W2 > 0 else 1
    COL: tl.constexpr = MODE == MODE_COL
    x0 = x_ptr + tok0 * stride_x
    x1 = x_ptr + tok1 * stride_x
    wpr0 = (klen * W0 + 31) // 32
    wpr1 = (klen * W1 + 31) // 32
    wpr2 = (klen * W2 + 31) // 32
    base1 = wbase + seg_rows * wpr0
    base2 = base1 + seg_rows * wpr1
    p0 = tl.zeros([BLOCK_R, KW0], dtype=tl.float32)
    q0 = tl.zeros([BLOCK_R, KW0], dtype=tl.float32)
    p1 = tl.zeros([BLOCK_R, KW1], dtype=tl.float32)
    q1 = tl.zeros([BLOCK_R, KW1], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_R, KW2], dtype=tl.float32)
    q2 = tl.zeros([BLOCK_R, KW2], dtype=tl.float32)
    zr0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    zr1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    sx0 = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum of x (times the zero for MODE_COL), reduced at the end
    sx1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    cc = tl.arange(0, BLOCK_K)
    for k0 in range(pid_k * BLOCK_K, klen, SPLIT_K * BLOCK_K):
        cols = k0 + cc
        cm = cols < klen
        xt0 = tl.load(x0 + kbeg + cols, mask=cm, other=0.0).to(tl.float32)
        if TWO:
            xt1 = tl.load(x1 + kbeg + cols, mask=cm, other=0.0).to(tl.float32)
        else:
            xt1 = xt0
        if MODE == MODE_ROWTILE:
            sidx = sbase + rows * sstride + k0 // gs
            s = tl.load(sp + sidx, mask=rmask, other=0.0).to(tl.float32)
            z = tl.load(zp + sidx, mask=rmask, other=0.0).to(tl.float32)
            t0, u0 = _mac_part(tl.zeros([BLOCK_R, KW0], dtype=tl.float32), tl.zeros([BLOCK_R, KW0], dtype=tl.float32),
                               wp, wbase, wpr0, seg_rows, rows, rmask, x0, x1, kbeg, klen, k0, sp, sbase, sstride,
                               ogrp, W0, 0, False, TWO, BLOCK_K)
            p0 += t0 * s[:, None]
            q0 += u0 * s[:, None]
            if W1 > 0:
                t1, u1 = _mac_part(tl.zeros([BLOCK_R, KW1], dtype=tl.float32),
                                   tl.zeros([BLOCK_R, KW1], dtype=tl.float32), wp, base1, wpr1, seg_rows, rows, rmask,
                                   x0, x1, kbeg, klen, k0, sp, sbase, sstride, ogrp, W1, W0, False, TWO, BLOCK_K)
                p1 += t1 * s[:, None]
                q1 += u1 * s[:, None]
            if W2 > 0:
                t2, u2 = _mac_part(tl.zeros([BLOCK_R, KW2], dtype=tl.float32),
                                   tl.zeros([BLOCK_R, KW2], dtype=tl.float32), wp, base2, wpr2, seg_rows, rows, rmask,
                                   x0, x1, kbeg, klen, k0, sp, sbase, sstride, ogrp, W2, W0 + W1, False, TWO, BLOCK_K)
                p2 += t2 * s[:, None]
                q2 += u2 * s[:, None]
            zr0 += tl.sum(xt0, axis=0) * z
            zr1 += tl.sum(xt1, axis=0) * z
        else:
            p0, q0 = _mac_part(p0, q0, wp, wbase, wpr0, seg_rows, rows, rmask, x0, x1, kbeg, klen, k0, sp, sbase,
                               sstride, ogrp, W0, 0, COL, TWO, BLOCK_K)
            if W1 > 0:
                p1, q1 = _mac_part(p1, q1, wp, base1, wpr1, seg_rows, rows, rmask, x0, x1, kbeg, klen, k0, sp, sbase,
                                   sstride, ogrp, W1, W0, COL, TWO, BLOCK_K)
            if W2 > 0:
                p2, q2 = _mac_part(p2, q2, wp, base2, wpr2, seg_rows, rows, rmask, x0, x1, kbeg, klen, k0, sp, sbase,
                                   sstride, ogrp, W2, W0 + W1, COL, TWO, BLOCK_K)
            if COL:
                zz = tl.load(zp + sbase + cols * sstride + ogrp, mask=cm, other=0.0).to(tl.float32)
                sx0 += xt0 * zz
                sx1 += xt1 * zz
            elif MODE != MODE_UNIT:
                sx0 += xt0
                sx1 += xt1
    r0 = tl.sum(p0, axis=1)
    r1 = tl.sum(q0, axis=1)
    if W1 > 0:
        r0 += tl.sum(p1, axis=1)
        r1 += tl.sum(q1, axis=1)
    if W2 > 0:
        r0 += tl.sum(p2, axis=1)
        r1 += tl.sum(q2, axis=1)
    r0 = r0 * TWO64
    r1 = r1 * TWO64
    if MODE == MODE_ROW:
        sidx = sbase + rows * sstride
        s = tl.load(sp + sidx, mask=rmask, other=0.0).to(tl.float32)
        if SIGN:
            z = -s
            s = 2.0 * s
        else:
            z = tl.load(zp + sidx, mask=rmask, other=0.0).to(tl.float32)
        r0 = r0 * s + tl.sum(sx0, axis=0) * z
        r1 = r1 * s + tl.sum(sx1, axis=0) * z
    elif MODE == MODE_ROWTILE:
        r0 += zr0
        r1 += zr1
    elif MODE != MODE_UNIT:
        r0 += tl.sum(sx0, axis=0)
        r1 += tl.sum(sx1, axis=0)
    return acc + _pair(r0, r1, BLOCK_T)


@triton.jit
def _seg_dot(acc, x_ptr, stride_x, tok, tmask, wp, sp, zp, rows, rmask, ogrp, kbeg, klen, seg_rows, wbase, sbase,
             sstride, gs, pid_k, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, MODE: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
             SIGN: tl.constexpr, XDT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One quantized segment for a block of >= 16 tokens on the tensor cores. Codes are decoded to exact values:
    bf16 128 + q for codes of <= 7 bits with a bf16 model (the 128 folds into the zero term), else exact integers
    in fp32 (bf16 and fp16 hold integers up to 256 exactly). Scales are folded: MODE_ROW once per segment,
    MODE_ROWTILE per K step, MODE_COL into x (x' = x * s) with sum(x * zero) added. The product is taken
    transposed, codes (BLOCK_R rows) as the left operand: with 64 rows and 4 warps that is Hopper's warpgroup MMA,
    whose left operand can come from registers, and the decoded tile skips most of the shared-memory round trip
    (bench/serving/sass.py: instructions per code)."""
    B16: tl.constexpr = (XDT == tl.bfloat16) and (W0 + W1 + W2 <= 7)
    OFFSET: tl.constexpr = 128.0 if B16 else 0.0
    cc = tl.arange(0, BLOCK_K)
    dt = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)  # the segment's products, transposed
    sxe = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # x (MODE_ROW) or x * zero (MODE_COL), reduced at the end
    soe = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # x * s (MODE_COL with the 128 offset)
    for k0 in range(pid_k * BLOCK_K, klen, SPLIT_K * BLOCK_K):
        cols = k0 + cc
        cm = cols < klen
        if B16:
            q = _codes_bf16(wp, wbase, seg_rows, rows, rmask, k0, klen, W0, W1, W2, BLOCK_R, BLOCK_K)
        else:
            q = _codes(wp, wbase, seg_rows, rows, rmask, k0, klen, W0, W1, W2, BLOCK_R, BLOCK_K)
        xt = tl.load(x_ptr + tok[:, None] * stride_x + (kbeg + cols)[None, :], mask=tmask[:, None] & cm[None, :],
                     other=0.0)
        if MODE == MODE_UNIT:
            xs = xt.to(tl.float32)
            if B16:
                xs = xs.to(tl.bfloat16)  # the operand as the dot sees it, so the offset cancels exactly
                if UPCAST:
                    xs = _rne_bf16(xt.to(tl.float32)).to(tl.bfloat16)
                soe += xs.to(tl.float32)
            dt += _dot(q, tl.trans(xs), XDT, UPCAST, IEEE)
        elif MODE == MODE_COL:
            xf = xt.to(tl.float32)
            sc = tl.load(sp + sbase + cols * sstride + ogrp, mask=cm, other=0.0).to(tl.float32)
            zc = tl.load(zp + sbase + cols * sstride + ogrp, mask=cm, other=0.0).to(tl.float32)
            xs = xf * sc[None, :]
            if B16:
                xs = xs.to(tl.bfloat16)  # the operand as the dot sees it, so the offset cancels exactly
                if UPCAST:
                    xs = _rne_bf16(xf * sc[None, :]).to(tl.bfloat16)
                soe += xs.to(tl.float32)
            dt += _dot(q, tl.trans(xs), XDT, UPCAST, IEEE)
            sxe += xf * zc[None, :]
        elif MODE == MODE_ROWTILE:
            ridx = sbase + rows * sstride + k0 // gs
            sr = tl.load(sp + ridx, mask=rmask, other=0.0).to(tl.float32)
            zr = tl.load(zp + ridx, mask=rmask, other=0.0).to(tl.float32)
            xsum = tl.sum(xt.to(tl.float32), axis=1)
            dt += (_dot(q, tl.trans(xt), XDT, UPCAST, IEEE) - OFFSET * xsum[None, :]) * sr[:, None] \
                + zr[:, None] * xsum[None, :]
        else:
            dt += _dot(q, tl.trans(xt), XDT, UPCAST, IEEE)
            sxe += xt.to(tl.float32)
    d = tl.trans(dt)
    sx = tl.sum(sxe, axis=1)
    if MODE == MODE_ROW:
        ridx = sbase + rows * sstride
        sr = tl.load(sp + ridx, mask=rmask, other=0.0).to(tl.float32)
        if SIGN:
            zr = -sr
            sr = 2.0 * sr
        else:
            zr = tl.load(zp + ridx, mask=rmask, other=0.0).to(tl.float32)
        acc += (d - OFFSET * sx[:, None]) * sr[None, :] + sx[:, None] * zr[None, :]
    elif MODE == MODE_COL:
        acc += d - OFFSET * tl.sum(soe, axis=1)[:, None] + sx[:, None]
    elif MODE == MODE_UNIT:
        acc += d - OFFSET * tl.sum(soe, axis=1)[:, None]
    else:
        acc += d
    return acc


@triton.jit
def _apply_full(acc, a, x_ptr, stride_x, tok, tmask, kcols, cm, BLOCK_T: tl.constexpr, DOT: tl.constexpr,
                XDT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc (BLOCK_T, BLOCK_R) += x[tokens, kcols] @ a^T for a dequantized tile a (BLOCK_R, BLOCK_C)."""
    xt = tl.load(x_ptr + tok[:, None] * stride_x + kcols[None, :], mask=tmask[:, None] & cm[None, :], other=0.0)
    if DOT:
        acc += _dot(xt, tl.trans(a), XDT, UPCAST, IEEE)
    else:
        tt = tl.arange(0, BLOCK_T)
        xf = xt.to(tl.float32)
        for i in tl.static_range(BLOCK_T):
            xr = tl.sum(tl.where(tt[:, None] == i, xf, 0.0), axis=0)
            c = tl.sum(a * xr[None, :], axis=1)
            acc += tl.where(tt[:, None] == i, c[None, :], 0.0)
    return acc


@triton.jit
def _seg_general(acc, x_ptr, stride_x, tok, tmask, wp, sp, zp, rows, rmask, kbeg, klen, seg_rows, wbase, mode,
                 sbase, sstride, gs, pid_k, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                 SIGN: tl.constexpr, DOT: tl.constexpr, XDT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """MODE_ELEM_ROW / MODE_ELEM_COL: scale and zero gathered per element (any group size); slow, general. Steps of
    at most 64 columns (a whole dequantized tile lives in registers)."""
    BKE: tl.constexpr = BLOCK_K if BLOCK_K < 64 else 64
    cc = tl.arange(0, BKE)
    for k0 in range(pid_k * BKE, klen, SPLIT_K * BKE):
        cols = k0 + cc
        cm = cols < klen
        q = _codes(wp, wbase, seg_rows, rows, rmask, k0, klen, W0, W1, W2, BLOCK_R, BKE)
        if mode == MODE_ELEM_ROW:
            eidx = sbase + rows[:, None] * sstride + cols[None, :] // gs
        else:
            eidx = sbase + cols[None, :] * sstride + rows[:, None] // gs
        emask = rmask[:, None] & cm[None, :]
        s2 = tl.load(sp + eidx, mask=emask, other=0.0).to(tl.float32)
        if SIGN:
            a = (2.0 * q - 1.0) * s2
        else:
            a = q * s2 + tl.load(zp + eidx, mask=emask, other=0.0).to(tl.float32)
        acc = _apply_full(acc, a, x_ptr, stride_x, tok, tmask, kbeg + cols, cm, BLOCK_T, DOT, XDT, UPCAST, IEEE)
    return acc


@triton.jit
def _seg_float(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, fp, rows, rmask, kbeg, klen, fbase, fstride, pid_k,
               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, SPLIT_K,
               DOT: tl.constexpr, XDT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One 16-bit segment: element (row, k) at fbase + row * fstride + k."""
    cc = tl.arange(0, BLOCK_F)
    frows = rows.to(tl.int64) * fstride + fbase
    p0 = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    p1 = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    x0 = x_ptr + tok0 * stride_x + kbeg
    x1 = x_ptr + tok1 * stride_x + kbeg
    for k0 in range(pid_k * BLOCK_F, klen, SPLIT_K * BLOCK_F):
        cols = k0 + cc
        cm = cols < klen
        a = tl.load(fp + frows[:, None] + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        if DOT:
            xt = tl.load(x_ptr + tok[:, None] * stride_x + (kbeg + cols)[None, :], mask=tmask[:, None] & cm[None, :],
                         other=0.0)
            acc += _dot(xt, tl.trans(a), XDT, UPCAST, IEEE)
        else:
            af = a.to(tl.float32)
            p0 += af * tl.load(x0 + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
            if BLOCK_T == 2:
                p1 += af * tl.load(x1 + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    if not DOT:
        acc += _pair(tl.sum(p0, axis=1), tl.sum(p1, axis=1), BLOCK_T)
    return acc


@triton.jit
def _seg_scaled(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen, seg_rows,
                wbase, sbase, sstride, gs, pid_k, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                BKW: tl.constexpr, SPLIT_K, SIGN: tl.constexpr, DOT: tl.constexpr, XDT: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One segment of a fast scale mode (ROW, ROWTILE, UNIT, COL): the tensor-core path (K step BLOCK_K) or the
    decode path (K step BKW, per width)."""
    if DOT:
        return _seg_dot(acc, x_ptr, stride_x, tok, tmask, wp, sp, zp, rows, rmask, ogrp, kbeg, klen, seg_rows, wbase,
                        sbase, sstride, gs, pid_k, W0, W1, W2, MODE, BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, XDT,
                        UPCAST, IEEE)
    return _seg_bcast(acc, x_ptr, stride_x, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen, seg_rows, wbase,
                      sbase, sstride, gs, pid_k, W0, W1, W2, MODE, BLOCK_T, BLOCK_R, BKW, SPLIT_K, SIGN)


@triton.jit
def _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen, seg_rows,
               wbase, mode, sbase, sstride, gs, pid_k, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
               MODES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
               SPLIT_K, SIGN: tl.constexpr, DOT: tl.constexpr, XDT: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr, WORDS: tl.constexpr):
    """Dispatch one quantized segment on its scale mode (uniform per program) to the paths the launch compiled
    (MODES: bit m set when some segment of the launch has mode m).

    On the CUDA-core path each width gets its own K step, WORDS int32 words of a row's widest part per step (at most
    BLOCK_K columns): the register tiles scale with the words per step, and one launch compiles every width it holds,
    so a fixed K step let the widest codes (8-bit: 4x the words of 2-bit) set the registers, and hence the occupancy,
    of all."""
    BKW: tl.constexpr = BLOCK_K if BLOCK_K * W0 <= WORDS * 32 else WORDS * 32 // W0
    if MODES & 48:
        if mode >= MODE_ELEM_ROW:
            acc = _seg_general(acc, x_ptr, stride_x, tok, tmask, wp, sp, zp, rows, rmask, kbeg, klen, seg_rows, wbase,
                               mode, sbase, sstride, gs, pid_k, W0, W1, W2, BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN,
                               DOT, XDT, UPCAST, IEEE)
    if MODES & 2:
        if mode == MODE_ROW:
            acc = _seg_scaled(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen,
                              seg_rows, wbase, sbase, sstride, gs, pid_k, W0, W1, W2, MODE_ROW, BLOCK_T, BLOCK_R,
                              BLOCK_K, BKW, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE)
    if MODES & 4:
        if mode == MODE_ROWTILE:
            acc = _seg_scaled(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen,
                              seg_rows, wbase, sbase, sstride, gs, pid_k, W0, W1, W2, MODE_ROWTILE, BLOCK_T, BLOCK_R,
                              BLOCK_K, BKW, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE)
    if MODES & 64:
        if mode == MODE_UNIT:
            acc = _seg_scaled(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen,
                              seg_rows, wbase, sbase, sstride, gs, pid_k, W0, W1, W2, MODE_UNIT, BLOCK_T, BLOCK_R,
                              BLOCK_K, BKW, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE)
    if MODES & 8:
        if mode == MODE_COL:
            acc = _seg_scaled(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg, klen,
                              seg_rows, wbase, sbase, sstride, gs, pid_k, W0, W1, W2, MODE_COL, BLOCK_T, BLOCK_R,
                              BLOCK_K, BKW, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE)
    return acc


# ---- the segment kernel -----------------------------------------------------------------------------------------------
# NT, NSEG and ccol only offset table and column addresses: specialising on their value (== 1, multiple of 16) only
# multiplied the variants to compile (issue 26: cold start), it speeds nothing up
@triton.jit(do_not_specialize=["NT", "NSEG", "ccol"])
def _seg_kernel(
    x_ptr, stride_x, out_ptr, stride_o, order_ptr, blk_slot_ptr, blk_start_ptr, blk_len_ptr,
    ptr_tab, tile_tab, seg_tab, NT, NSEG, ccol,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    SPLIT_K, WIDTHS: tl.constexpr, MODES: tl.constexpr, SIGN: tl.constexpr, SC_F32: tl.constexpr,
    FDT: tl.constexpr, XDT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC: tl.constexpr, POST: tl.constexpr, WORDS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(blk_slot_ptr + pid_b)
    if slot < 0:
        return
    tile = tile_tab + (slot * NT + pid_t) * TILE_FIELDS
    nrows = tl.load(tile)
    if nrows == 0:
        return
    orow = tl.load(tile + 1)
    srow = tl.load(tile + 2)
    sfirst = tl.load(tile + 3)
    scount = tl.load(tile + 4)
    start = tl.load(blk_start_ptr + pid_b)
    ntok = tl.load(blk_len_ptr + pid_b)
    tt = tl.arange(0, BLOCK_T)
    tmask = tt < ntok
    tok = tl.load(order_ptr + start + tt, mask=tmask, other=0).to(tl.int64)
    tok0 = tl.load(order_ptr + start).to(tl.int64)  # decode path: the block's (at most two) tokens as scalars
    tok1 = tl.load(order_ptr + start + tl.minimum(ntok - 1, 1)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < nrows
    rows = srow + rr
    prow = ptr_tab + slot * PTR_FIELDS
    wp = tl.load(prow).to(tl.pointer_type(tl.int32))
    if SC_F32:
        sp = tl.load(prow + 1).to(tl.pointer_type(tl.float32))
        zp = tl.load(prow + 2).to(tl.pointer_type(tl.float32))
    else:
        sp = tl.load(prow + 1).to(tl.pointer_type(tl.float16))
        zp = tl.load(prow + 2).to(tl.pointer_type(tl.float16))
    fp = tl.load(prow + 3).to(tl.pointer_type(FDT))
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for si in range(sfirst, sfirst + scount):
        seg = seg_tab + (slot * NSEG + si) * SEG_FIELDS
        bits = tl.load(seg)
        kbeg = tl.load(seg + 1)
        klen = tl.load(seg + 2)
        seg_rows = tl.load(seg + 3)
        wbase = tl.load(seg + 4)
        mode = tl.load(seg + 5)
        sbase = tl.load(seg + 6)
        sstride = tl.load(seg + 7)
        gs = tl.load(seg + 8)
        ogrp = srow // gs  # MODE_COL: the tile's rows lie in one group of output rows
        if WIDTHS & 1:
            if bits == 16:
                acc = _seg_float(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, fp, rows, rmask, kbeg, klen, wbase,
                                 sstride, pid_k, BLOCK_T, BLOCK_R, BLOCK_F, SPLIT_K, DOT, XDT, UPCAST, IEEE)
        if WIDTHS & 2:
            if bits == 1:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 1, 0, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 4:
            if bits == 2:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 2, 0, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 8:
            if bits == 3:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 2, 1, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 16:
            if bits == 4:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 4, 0, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 32:
            if bits == 5:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 4, 1, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 64:
            if bits == 6:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 4, 2, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 128:
            if bits == 7:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 4, 2, 1, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
        if WIDTHS & 256:
            if bits == 8:
                acc = _seg_quant(acc, x_ptr, stride_x, tok, tmask, tok0, tok1, wp, sp, zp, rows, rmask, ogrp, kbeg,
                                 klen, seg_rows, wbase, mode, sbase, sstride, gs, pid_k, 8, 0, 0, MODES,
                                 BLOCK_T, BLOCK_R, BLOCK_K, SPLIT_K, SIGN, DOT, XDT, UPCAST, IEEE, WORDS)
    if POST == POST_V:  # z' = z * s of B's rank rows, and c += sum_r z_r zero_r (module docstring)
        post = tl.load(seg_tab + (slot * NSEG + sfirst) * SEG_FIELDS + 9)
        if post >= 0:
            psp = tl.load(prow + 4).to(tl.pointer_type(tl.float16))
            pzp = tl.load(prow + 5).to(tl.pointer_type(tl.float16))
            ps = tl.load(psp + post + rows, mask=rmask, other=0.0).to(tl.float32)
            pz = tl.load(pzp + post + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + tok * stride_o + ccol, tl.sum(acc * pz[None, :], axis=1), mask=tmask)
            acc = acc * ps[None, :]
    if POST == POST_U:  # + c, once per output (split programs: the first)
        if pid_k == 0:
            acc += tl.load(x_ptr + tok * stride_x + ccol, mask=tmask, other=0.0).to(tl.float32)[:, None]
    optrs = out_ptr + tok[:, None] * stride_o + (orow + rr)[None, :]
    omask = tmask[:, None] & rmask[None, :]
    if ATOMIC:
        tl.atomic_add(optrs, acc, mask=omask)
    else:
        tl.store(optrs, _to_out(acc, out_ptr.dtype.element_ty, UPCAST), mask=omask)


# ---- ELL kernel: sparse deltas ----------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])
def _ell_kernel(
    x_ptr, stride_x, out_ptr, stride_o, order_ptr, blk_slot_ptr, blk_start_ptr, blk_len_ptr, ptr_tab, M,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_J, ROWS: tl.constexpr,
    COL32: tl.constexpr, FDT: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_j = tl.program_id(2)
    slot = tl.load(blk_slot_ptr + pid_b)
    if slot < 0:
        return
    prow = ptr_tab + slot * 3
    col_int = tl.load(prow)
    if col_int == 0:
        return
    if COL32:
        colp = col_int.to(tl.pointer_type(tl.int32))
    else:
        colp = col_int.to(tl.pointer_type(tl.int16))
    valp = tl.load(prow + 1).to(tl.pointer_type(FDT))
    offp = tl.load(prow + 2).to(tl.pointer_type(tl.int32))
    e0 = tl.load(offp + pid_m)
    cap = (tl.load(offp + pid_m + 1) - e0) // ROWS
    start = tl.load(blk_start_ptr + pid_b)
    ntok = tl.load(blk_len_ptr + pid_b)
    tt = tl.arange(0, BLOCK_T)
    tmask = tt < ntok
    tok = tl.load(order_ptr + start + tt, mask=tmask, other=0).to(tl.int64)
    rr = tl.arange(0, ROWS)
    jj = tl.arange(0, BLOCK_J)
    acc = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
    for j0 in range(pid_j * BLOCK_J, cap, SPLIT_J * BLOCK_J):
        j = j0 + jj
        jm = j < cap
        e = e0 + j[:, None] * ROWS + rr[None, :]
        col = tl.load(colp + e, mask=jm[:, None], other=-1).to(tl.int32)
        v = tl.load(valp + e, mask=jm[:, None], other=0.0).to(tl.float32)
        valid = col >= 0
        xg = tl.load(x_ptr + tok[:, None, None] * stride_x + col[None, :, :],
                     mask=tmask[:, None, None] & valid[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * v[None, :, :], axis=1)
    rows = pid_m * ROWS + rr
    optrs = out_ptr + tok[:, None] * stride_o + rows[None, :]
    mask = tmask[:, None] & (rows < M)[None, :]
    if ATOMIC:
        tl.atomic_add(optrs, acc, mask=mask)
    else:
        tl.store(optrs, _to_out(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)
