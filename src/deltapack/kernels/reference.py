"""Pure-torch reference backend: batched delta application per codec, on any device.

This is the implementation the GPU kernels are checked against, so it favours plain, obviously-right tensor code
over speed. Per layer it loops over the tenant slots present in the batch (`TokenSlots.groups`) and applies each
tenant's packed delta to its tokens only; no dense per-tenant weight is ever built (sign bits are unpacked a bounded
block of rows at a time and dropped; sparse deltas stay in CSR).

Packing (load time) turns a stored codec entry into a resident layout (see `deltapack.kernels` for the list):
  dense   -> dense values in the compute dtype
  factors -> dequantized A (r x in) and Bt (r x out) in the compute dtype (small: r x (in + out))
  lora    -> the same, its scale folded into Bt
  sign    -> the stored packed bits as they are, plus fp32 scales
  sparse  -> CSR (crow int32, col int16/int32, values in the compute dtype) from the seeded positions
  deltadq -> the same CSR layout from its two seeded row blocks
  other codecs (e.g. ones added later) -> decoded once, kept as CSR when at most half the entries are non-zero,
             else dense (a logged fallback: give such codecs a packer here)
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

from deltapack.errors import FormatError
from deltapack.format.codecs import FactorsCodec, LoraCodec, SparseCodec, decode_entry, get_codec, parts_device
from deltapack.kernels import (DeltaKernels, LayerDeltas, PackedDelta, TokenSlots, register_backend,
                               rows_with_growth, sign_parts)

log = logging.getLogger(__name__)

# transient elements a reference op may allocate at once (bounds the unpacked sign block / sparse products)
_BLOCK_ELEMS = 1 << 22

Packer = Callable[[dict, dict, tuple[int, int], torch.dtype], PackedDelta]
PACKERS: dict[str, Packer] = {}


def packer(codec: str):
    def deco(fn: Packer) -> Packer:
        PACKERS[codec] = fn
        return fn

    return deco


# ---- packing ------------------------------------------------------------------------------------------------------
@packer("dense")
def _pack_dense(params, parts, shape, dtype) -> PackedDelta:
    v = decode_entry("dense", params, parts, shape)
    return PackedDelta("dense", shape, {"values": v.to(dtype).contiguous()})


@packer("factors")
def _pack_factors(params, parts, shape, dtype) -> PackedDelta:
    A, Bt = FactorsCodec.factors(params, parts, shape)
    if A.shape[1] != shape[1] or Bt.shape[1] != shape[0]:
        raise FormatError(f"factor shapes {list(A.shape)} / {list(Bt.shape)} do not fit a {list(shape)} delta")
    return PackedDelta("factors", shape, {"A": A.to(dtype).contiguous(), "Bt": Bt.to(dtype).contiguous()}, {"rank": A.shape[0]})


@packer("lora")
def _pack_lora(params, parts, shape, dtype) -> PackedDelta:
    """lora: the same resident layout as factors, the scale folded into Bt (in fp32, before the cast)."""
    A, Bt = LoraCodec.factors(params, parts, shape)
    return _pack_factors({"groups": [{"rank": A.shape[0], "bits": 16}]}, {"A.float": A, "Bt.float": Bt}, shape, dtype)


@packer("sign")
def _pack_sign(params, parts, shape, dtype) -> PackedDelta:
    signs, scale, k = sign_parts(params, parts, shape)
    return PackedDelta("sign", shape, {"signs": signs.contiguous(), "scale": scale.contiguous()}, {"planes": k})


def csr_from_positions(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, m: int, dtype, n: int | None = None
) -> dict[str, torch.Tensor]:
    """CSR parts from (row, col, value) triples sorted row-major. Column indices are int16 when the matrix is at most
    32768 columns wide (index bytes are most of a sparse delta's resident size), row pointers int32."""
    counts = torch.bincount(rows, minlength=m)
    crow = torch.zeros(m + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    ptr_t = torch.int32 if cols.numel() < 2**31 else torch.int64
    n = int(cols.max()) + 1 if n is None and cols.numel() else (n or 0)
    col_t = torch.int16 if n <= 32768 else torch.int32
    return {"crow": crow.to(ptr_t), "col": cols.to(col_t).contiguous(), "values": vals.to(dtype).contiguous()}


@packer("sparse")
def _pack_sparse(params, parts, shape, dtype) -> PackedDelta:
    m, n = shape
    dev = parts_device(parts)
    pos = SparseCodec.positions(params, shape, dev)
    if params["mask"] == "bernoulli":
        rc = torch.nonzero(pos)  # row-major: the order the values are stored in
        nnz = rc.shape[0]
        vals = SparseCodec.values(params, parts, 1, nnz).view(-1) if nnz else torch.zeros(0, device=dev)
        csr = csr_from_positions(rc[:, 0], rc[:, 1], vals, m, dtype, n)
    else:
        k = pos.shape[1]
        vals = SparseCodec.values(params, parts, m, k)
        rows = torch.arange(m, device=dev).repeat_interleave(k)
        csr = csr_from_positions(rows, pos.reshape(-1), vals.reshape(-1), m, dtype, n)
    return PackedDelta("sparse", shape, csr, {"nnz": int(csr["col"].numel())})


@packer("deltadq")
def _pack_deltadq(params, parts, shape, dtype) -> PackedDelta:
    """deltadq: seeded group-wise positions in two row blocks, values listed row by row: CSR directly."""
    try:
        from deltapack.format import codec_deltadq as dq

        dev = parts_device(parts)
        hi, lo = dq.positions(params, shape, dev)
        vals = dq.decode_values(params, parts, shape).float().reshape(-1)
    except (ImportError, AttributeError, TypeError) as e:  # codec module changed shape: stay correct, lose layout
        log.warning("deltadq packer unavailable (%s): decoding instead", e)
        return _pack_generic("deltadq", params, parts, shape, dtype)
    m = shape[0]
    rows_hi = hi.shape[0]
    rows = torch.cat(
        [torch.arange(rows_hi, device=dev).repeat_interleave(hi.shape[1]),
         torch.arange(rows_hi, m, device=dev).repeat_interleave(lo.shape[1])]
    )
    cols = torch.cat([hi.reshape(-1), lo.reshape(-1)])
    if vals.numel() != cols.numel():
        raise FormatError(f"deltadq holds {vals.numel()} values for {cols.numel()} positions")
    csr = csr_from_positions(rows, cols, vals, m, dtype, shape[1])
    return PackedDelta("sparse", shape, csr, {"nnz": int(cols.numel())})


def _pack_generic(codec, params, parts, shape, dtype) -> PackedDelta:
    """Any other codec: decode once at load time; keep the non-zeros as CSR when sparse enough, else dense."""
    d = decode_entry(codec, params, parts, shape).float()
    nz = torch.nonzero(d)
    if nz.shape[0] <= d.numel() // 2:
        log.debug("codec %s has no packer: decoded once and kept as CSR (%d non-zeros)", codec, nz.shape[0])
        csr = csr_from_positions(nz[:, 0], nz[:, 1], d[nz[:, 0], nz[:, 1]], shape[0], dtype, shape[1])
        return PackedDelta("sparse", shape, csr, {"nnz": int(nz.shape[0])})
    log.warning("codec %s has no packer and is dense: kept as a dense delta", codec)
    return PackedDelta("dense", shape, {"values": d.to(dtype).contiguous()})


# ---- applying -----------------------------------------------------------------------------------------------------
def csr_matmul_gather(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, m: int) -> torch.Tensor:
    """x (T, n) @ S^T for a CSR matrix S (m x n) by definition: gather, multiply, segment-sum (fp32 accumulation).
    Plain indexing ops on any device and dtype: the semantics the fast paths and GPU kernels must reproduce."""
    T = x.shape[0]
    out = torch.zeros(T, m, dtype=torch.float32, device=x.device)
    nnz = col.numel()
    if nnz == 0 or T == 0:
        return out.to(x.dtype)
    rows = torch.repeat_interleave(torch.arange(m, device=x.device), (crow[1:] - crow[:-1]).long())
    col = col.long()
    v = vals.float()
    step = max(1, _BLOCK_ELEMS // nnz)
    for t0 in range(0, T, step):
        prod = x[t0 : t0 + step].float().index_select(1, col) * v
        out[t0 : t0 + step].index_add_(1, rows, prod)
    return out.to(x.dtype)


_SPARSE_MM_OK: dict[tuple, bool] = {}


def csr_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, m: int) -> torch.Tensor:
    """x (T, n) @ S^T: through torch's sparse CSR matmul (MKL / cuSPARSE, far faster than the gather path) where it
    supports the device and dtype, else `csr_matmul_gather`. The CSR tensor is a view of the packed parts (only
    the int16 column indices are widened, per call)."""
    if col.numel() == 0 or x.shape[0] == 0:
        return torch.zeros(x.shape[0], m, dtype=x.dtype, device=x.device)
    dt = x.dtype if x.device.type == "cuda" else torch.float32
    key = (x.device.type, dt)
    if _SPARSE_MM_OK.get(key, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                S = torch.sparse_csr_tensor(
                    crow.to(torch.int32), col.to(torch.int32), vals.to(dt), size=(m, x.shape[1]), check_invariants=False
                )
                y = (S @ x.to(dt).T).T
            _SPARSE_MM_OK[key] = True
            return y.to(x.dtype)
        except (RuntimeError, NotImplementedError) as e:
            log.debug("sparse CSR matmul unavailable for %s (%s): gather path", key, e)
            _SPARSE_MM_OK[key] = False
    return csr_matmul_gather(x, crow, col, vals, m)


def csr_rows(ids: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """Dense rows `ids` (k,) of a CSR matrix: (k, n)."""
    k = ids.shape[0]
    out = torch.zeros(k, n, dtype=vals.dtype, device=vals.device)
    if k == 0 or col.numel() == 0:
        return out
    ids = ids.long()
    start = crow.long()[ids]
    counts = crow.long()[ids + 1] - start
    total = int(counts.sum())
    if total == 0:
        return out
    owner = torch.repeat_interleave(torch.arange(k, device=ids.device), counts)
    first = torch.cumsum(counts, 0) - counts
    flat = torch.repeat_interleave(start, counts) + (torch.arange(total, device=ids.device) - torch.repeat_interleave(first, counts))
    out[owner, col.long()[flat]] = vals[flat]
    return out


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}
_SIGN_LUT: dict[tuple, torch.Tensor] = {}


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """1-bit codes (rows, ceil(n/8)) uint8 -> (rows, n) uint8 0/1. Bit k of byte j is column 8j+k (the 1-bit case
    of deltapack.format.packing), unpacked with uint8 shifts (several times faster than the generic unpacker)."""
    sh = _BIT_SHIFTS.get(packed.device)
    if sh is None:
        sh = _BIT_SHIFTS[packed.device] = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> sh) & 1).reshape(packed.shape[0], -1)[:, :n]


def unpack_pm1(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """1-bit codes -> (rows, n) of -1/+1 in `dtype`, one table lookup per byte (a 256 x 8 table of +-1)."""
    key = (packed.device, dtype)
    lut = _SIGN_LUT.get(key)
    if lut is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        lut = _SIGN_LUT[key] = (bits * 2 - 1).to(dtype=dtype, device=packed.device)
    return lut.index_select(0, packed.reshape(-1).to(torch.int32)).reshape(packed.shape[0], -1)[:, :n]


def _sign_matmul(x: torch.Tensor, p: PackedDelta) -> torch.Tensor:
    m, n = p.shape
    signs, scale = p.tensors["signs"], p.tensors["scale"]
    out = torch.zeros(x.shape[0], m, dtype=torch.float32, device=x.device)
    step = max(1, _BLOCK_ELEMS // max(n, 1))
    cdt = x.dtype if x.dtype in (torch.float32, torch.float64) or x.device.type == "cuda" else torch.float32
    xs = x.to(cdt)
    for j in range(p.meta["planes"]):
        s = scale[j]
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            # transient (rows x n) block of +-1 (exact in any float dtype), dropped after its matmul
            pm = unpack_pm1(signs[j * m + r0 : j * m + r1], n, cdt)
            out[:, r0:r1] += (xs @ pm.T).float() * (s if s.numel() == 1 else s[r0:r1])
    return out.to(x.dtype)


def _sign_rows(ids: torch.Tensor, p: PackedDelta) -> torch.Tensor:
    m, n = p.shape
    signs, scale = p.tensors["signs"], p.tensors["scale"]
    out = torch.zeros(ids.shape[0], n, dtype=torch.float32, device=ids.device)
    for j in range(p.meta["planes"]):
        pm = unpack_pm1(signs.index_select(0, ids.long() + j * m), n, torch.float32)
        s = scale[j]
        s = s.view(1, 1) if s.numel() == 1 else s[ids.long()].view(-1, 1)
        out += pm * s
    return out


def apply_packed(p: PackedDelta, x: torch.Tensor) -> torch.Tensor:
    """x (k, in) @ dW^T for one tenant's packed delta: (k, out) over the codec's rows (growth rows excluded)."""
    if p.kind == "dense":
        return x @ p.tensors["values"].to(x.dtype).T
    if p.kind == "factors":
        return (x @ p.tensors["A"].to(x.dtype).T) @ p.tensors["Bt"].to(x.dtype)
    if p.kind == "sign":
        return _sign_matmul(x, p)
    if p.kind == "sparse":
        t = p.tensors
        return csr_matmul(x, t["crow"], t["col"], t["values"], p.shape[0])
    raise FormatError(f"packed kind {p.kind!r} cannot be applied as a linear delta")


def packed_rows(p: PackedDelta, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the tenant's delta (growth rows: the tenant's full rows), fp32 or the packed dtype."""
    return rows_with_growth(p, ids, _base_rows)


def _base_rows(p: PackedDelta, ids: torch.Tensor) -> torch.Tensor:
    n = p.shape[1]
    if p.kind == "dense":
        return p.tensors["values"][ids]
    if p.kind == "factors":
        return p.tensors["Bt"][:, ids].T @ p.tensors["A"]
    if p.kind == "sign":
        return _sign_rows(ids, p)
    if p.kind == "sparse":
        t = p.tensors
        return csr_rows(ids, t["crow"], t["col"], t["values"], n)
    raise FormatError(f"packed kind {p.kind!r} has no rows")


@register_backend
class ReferenceKernels(DeltaKernels):
    name = "reference"

    def pack(self, codec, params, parts, shape, *, dtype, device="cpu") -> PackedDelta:
        get_codec(codec)  # unknown codec -> FormatError
        shape = tuple(int(s) for s in shape)
        if len(shape) == 1:
            v = decode_entry(codec, params, parts, shape).reshape(-1)
            packed = PackedDelta("vector", shape, {"values": v.to(dtype).contiguous()})
        elif len(shape) != 2:
            raise FormatError(f"cannot serve a delta of shape {list(shape)} (only matrices and vectors)")
        else:
            fn = PACKERS.get(codec)
            try:
                packed = fn(params, parts, shape, dtype) if fn else _pack_generic(codec, params, parts, shape, dtype)
            except FormatError:
                raise
            except (RuntimeError, ValueError, KeyError, IndexError) as e:
                raise FormatError(f"cannot pack a {codec} delta of shape {list(shape)}: {e}") from e
        packed.source = codec
        return packed.to(device)

    @staticmethod
    def _per_tenant(n: int, tokens: TokenSlots, layer: LayerDeltas, compute, out_dtype) -> torch.Tensor | None:
        """Run `compute(packed, token index)` for each tenant's token group and scatter the results into an
        (n, width) output; None when no token of the batch has a delta in this layer."""
        if layer.count == 0:
            return None
        out = None
        for slot, idx in tokens.groups():
            p = layer.get(slot)
            if p is None:
                continue
            r = compute(p, idx)
            if out is None:
                out = torch.zeros(n, r.shape[-1], dtype=out_dtype(r), device=idx.device)
            out.index_copy_(0, idx, r.to(out.dtype))
        return out

    def linear(self, x: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        return self._per_tenant(
            x.shape[0], tokens, layer, lambda p, idx: apply_packed(p, x.index_select(0, idx)), lambda r: x.dtype
        )

    def rows(self, ids: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        return self._per_tenant(
            ids.shape[0], tokens, layer, lambda p, idx: packed_rows(p, ids.index_select(0, idx)),
            lambda r: r.dtype if r.is_floating_point() else torch.float32,
        )

    def vector(self, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        if layer.count == 0:
            return None
        table = layer.cache.get("vector_table")
        if table is None:
            # slot table with a zero row in front: row s+1 = slot s's vector, row 0 = no delta (slot -1)
            live = [p for p in layer.slots if p is not None]
            n = live[0].shape[0]
            table = torch.zeros(len(layer.slots) + 1, n, dtype=live[0].tensors["values"].dtype, device=live[0].device)
            for s, p in enumerate(layer.slots):
                if p is not None:
                    table[s + 1] = p.tensors["values"]
            layer.cache["vector_table"] = table
        # slots past this layer's table (tenants that leave this vector unchanged) read the zero row
        idx = torch.where(tokens.slot_ids < len(layer.slots), tokens.slot_ids + 1, 0)
        return table.index_select(0, idx)
