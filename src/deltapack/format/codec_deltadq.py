"""`deltadq` codec: group-wise dropout positions (seeded, not stored) + k-bit values with per-tensor or per-row grids,
optionally split into 2^s value-range parts ("separate quantization").

Storage of one (m x n) delta, all positions regenerated from `seed` with `deltapack.format.masks.group_keep_indices`:
  * each row is cut into groups of `g` contiguous columns; rows [0, rows_hi) keep `keep + 1` elements per group,
    rows [rows_hi, m) keep `keep` (two blocks, so the total count can follow the byte budget one row at a time
    instead of jumping by a whole survivor per group). The second block hashes with a derived seed.
  * kept values (survivors already rescaled by g / keep_row) are listed row by row, ascending columns, and stored as
    one flat bit-packed stream of `bits`-bit codes (16 = bf16 floats), so no per-row packing padding is paid.
  * grids: "scale" part (R x 2) fp16 (scale, zero) pairs, R = 1 ("tensor") or m ("row"): value = zero + scale * u.
  * s > 0 (separate quantization): u = the k-bit code is split into its top s bits (the part, stored as an s-bit
    plane "part_ids") and its low k-s bits, stored part after part in "codes" (each part its own flat packed stream).
    Each part j has its own (k-s)-bit grid over the normalised code axis, "pgrid" (2^s x 2) fp32 (offset, step):
    u = offset_j + step_j * low. With offset_j = j * 2^(k-s) and step 1 this is exactly the k-bit grid; the encoder
    re-fits (offset, step) to the values that fell into the part (min-max), never coarser than step 1. Measured:
    value-range parts fill their range, so the re-fit grids coincide with the k-bit grid (docs/methods/deltadq.md).

params: {"g", "keep", "rows_hi", "seed", "bits", "s", "scale": "tensor" | "row"}.
"""

from __future__ import annotations

import torch

from deltapack.errors import FormatError
from deltapack.format.codecs import BITS, FLOAT, U8, Codec, _need, pchoice, pint, register_codec
from deltapack.format.masks import group_keep_indices, hash_rows
from deltapack.format.packing import pack_bits, packed_row_bytes, unpack_bits
from deltapack.quant.rtn import quant_params

_M32 = 0xFFFFFFFF
SCALE_MODES = ("tensor", "row")


def second_block_seed(seed: int) -> int:
    """Seed of the rows that keep `keep` per group: independent of the first block's hashes."""
    return (seed * 0x2545F491 + 0x9E3779B9) & _M32


def keep_layout(m: int, n: int, g: int, n_values: int) -> tuple[int, int]:
    """(keep, rows_hi) for at most `n_values` survivors in an (m x n) matrix cut into groups of g columns: every group of
    rows < rows_hi keeps keep+1, the others keep `keep`. Capped at keeping everything."""
    if n % g:
        raise ValueError(f"group size {g} does not divide {n} columns")
    units = n_values // (n // g)  # survivors per row-group slot, summed over rows
    units = min(units, m * g)
    keep, rows_hi = divmod(units, m)
    if keep >= g:
        return g, 0
    return keep, rows_hi


def kept_count(m: int, n: int, g: int, keep: int, rows_hi: int) -> int:
    return (n // g) * (m * keep + rows_hi)


def _check_layout(params: dict, shape: tuple[int, int]) -> tuple[int, int, int]:
    m, n = shape
    g, keep, rows_hi = int(params["g"]), int(params["keep"]), int(params["rows_hi"])
    if g <= 0 or n % g or not 0 <= keep <= g or not 0 <= rows_hi <= m or (keep == g and rows_hi):
        raise FormatError(f"bad deltadq layout g={g} keep={keep} rows_hi={rows_hi} for shape {list(shape)}")
    return g, keep, rows_hi


class MaskHashes:
    """One tensor's mask hashes (both row blocks), computed once. A search over group sizes and keep counts then costs
    a top-k per trial instead of a rehash of the whole matrix. Same hash, same top-k as group_keep_indices, so the
    same positions as the decoder regenerates."""

    def __init__(self, shape: tuple[int, int], seed: int, device="cpu"):
        self.shape, self.seed, self.device = shape, seed, device
        self._h: dict[int, torch.Tensor] = {}

    def _hash(self, block: int, rows: int) -> torch.Tensor:
        """Hashes of the block's first `rows` rows (a block's row r always hashes index r*n + col)."""
        m, n = self.shape
        have = self._h.get(block)
        done = 0 if have is None else have.shape[0]
        if done < rows:
            new = hash_rows(self.shape, done, rows, self.seed if block == 0 else second_block_seed(self.seed),
                            self.device)
            self._h[block] = new if have is None else torch.cat([have, new])
        return self._h[block][:rows]

    def _select(self, block: int, rows: int, g: int, keep: int) -> torch.Tensor:
        n = self.shape[1]
        groups = n // g
        h = self._hash(block, rows).view(rows, groups, g)
        sel = torch.topk(h, keep, dim=-1, largest=False, sorted=False).indices.sort(-1).values
        offs = (torch.arange(groups, device=self.device, dtype=torch.int64) * g).view(1, groups, 1)
        return (sel + offs).view(rows, groups * keep)

    def positions(self, g: int, keep: int, rows_hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = self.shape
        hi = self._select(0, rows_hi, g, keep + 1) if rows_hi else torch.zeros(0, (n // g) * (keep + 1), dtype=torch.int64, device=self.device)
        lo = self._select(1, m - rows_hi, g, keep) if keep and rows_hi < m else torch.zeros(m - rows_hi, 0, dtype=torch.int64, device=self.device)
        return hi, lo


def positions(params: dict, shape: tuple[int, int], device="cpu", hashes: MaskHashes | None = None):
    """Column indices of the survivors: (rows_hi x n/g*(keep+1)) and ((m-rows_hi) x n/g*keep), int64."""
    m, n = shape
    g, keep, rows_hi = _check_layout(params, shape)
    seed = int(params["seed"])
    if hashes is not None:
        if hashes.shape != tuple(shape) or hashes.seed != seed:
            raise ValueError("mask hashes of another tensor")
        return hashes.positions(g, keep, rows_hi)
    if rows_hi:
        hi = group_keep_indices((rows_hi, n), g, keep + 1, seed, device)
    else:
        hi = torch.zeros(0, (n // g) * (keep + 1), dtype=torch.int64, device=device)
    if keep and rows_hi < m:
        lo = group_keep_indices((m - rows_hi, n), g, keep, second_block_seed(seed), device)
    else:
        lo = torch.zeros(m - rows_hi, 0, dtype=torch.int64, device=device)
    return hi, lo


def row_counts(params: dict, shape: tuple[int, int], device="cpu") -> torch.Tensor:
    m, n = shape
    g, keep, rows_hi = int(params["g"]), int(params["keep"]), int(params["rows_hi"])
    c = torch.full((m,), (n // g) * keep, dtype=torch.int64, device=device)
    c[:rows_hi] += n // g
    return c


def payload_bytes(n_values: int, bits: int, s: int = 0) -> int:
    """Bytes of the codes (and the part plane) of `n_values` kept values; parts' padding bounded by 2^s bytes*bits."""
    if bits >= 16:
        return 2 * n_values
    if s == 0:
        return packed_row_bytes(n_values, bits)
    return packed_row_bytes(n_values, s) + packed_row_bytes(n_values, bits - s) + (1 << s) * (bits - s)


def side_bytes(m: int, bits: int, s: int, scale: str) -> int:
    if bits >= 16:
        return 0
    rows = m if scale == "row" else 1
    return rows * 4 + ((1 << s) * 8 if s else 0)


def values_for_budget(m: int, budget: int, bits: int, s: int, scale: str) -> int:
    """Most kept values whose stored bytes (codes + grids) fit `budget`."""
    avail = budget - side_bytes(m, bits, s, scale) - ((1 << s) * (bits - s) if s else 0)
    if avail <= 0:
        return 0
    if bits >= 16:
        return avail // 2
    return (avail // bits) * 8  # packed_row_bytes(8j, b) = j*b


def stored_bytes(m: int, n_values: int, bits: int, s: int, scale: str) -> int:
    return payload_bytes(n_values, bits, s) + side_bytes(m, bits, s, scale)


# ---- encoding ------------------------------------------------------------------------------------------------------
def gather_rescaled(delta: torch.Tensor, params: dict, pos=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivors of the seeded group mask, rescaled by g / keep_row: (flat values, per-value row index)."""
    m, n = delta.shape
    g, keep, rows_hi = int(params["g"]), int(params["keep"]), int(params["rows_hi"])
    hi, lo = pos if pos is not None else positions(params, (m, n), delta.device)
    parts = []
    if rows_hi:
        parts.append(torch.gather(delta[:rows_hi], 1, hi) * (g / (keep + 1)))
    if keep and rows_hi < m:
        parts.append(torch.gather(delta[rows_hi:], 1, lo) * (g / keep))
    vals = torch.cat([p.reshape(-1) for p in parts]) if parts else delta.new_zeros(0)
    rows = torch.repeat_interleave(torch.arange(m, device=delta.device), row_counts(params, (m, n), delta.device))
    return vals, rows


def blocks(params: dict, shape: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(first row, end row, values per row) of the (at most two) row blocks."""
    m, n = shape
    g, keep, rows_hi = int(params["g"]), int(params["keep"]), int(params["rows_hi"])
    out = []
    if rows_hi:
        out.append((0, rows_hi, (n // g) * (keep + 1)))
    if rows_hi < m:
        out.append((rows_hi, m, (n // g) * keep))
    return out


def _grid(vals: torch.Tensor, rows: torch.Tensor, blks: list[tuple[int, int, int]], m: int, bits: int, scale: str):
    """fp16 (scale, zero) pairs (R x 2) and each value's scale and zero as fp32."""
    if scale == "tensor":
        sc, zr, _ = quant_params(vals.view(1, -1), bits, None)
        n = vals.numel()
        return torch.stack([sc.view(1), zr.view(1)], 1), sc.float().view(1).expand(n), zr.float().view(1).expand(n)
    sc = torch.ones(m, dtype=torch.float16, device=vals.device)
    zr = torch.zeros(m, dtype=torch.float16, device=vals.device)
    start = 0
    for r0, r1, c in blks:  # rows of one block have equal lengths: fit the block as a matrix
        if c:
            s_, z_, _ = quant_params(vals[start : start + (r1 - r0) * c].view(r1 - r0, c), bits, None)
            sc[r0:r1], zr[r0:r1] = s_.view(-1), z_.view(-1)
        start += (r1 - r0) * c
    return torch.stack([sc, zr], 1), sc.float()[rows], zr.float()[rows]


def encode_values(vals: torch.Tensor, rows: torch.Tensor, blks, m: int, bits: int, s: int, scale: str):
    """Quantize the flat kept values. Returns parts."""
    if bits >= 16:
        return {"values": vals.to(torch.bfloat16)}
    if vals.numel() == 0:
        raise ValueError("no value to quantize")
    grid, sc, zr = _grid(vals, rows, blks, m, bits, scale)
    qmax = (1 << bits) - 1
    u = ((vals - zr) / sc).clamp_(0, qmax)  # normalised position on the k-bit axis
    code = torch.round(u)
    if s == 0:
        return {"codes": pack_bits(code.to(torch.uint8).view(1, -1), bits).view(-1), "scale": grid}
    if not 0 < s < bits:
        raise ValueError(f"split bits s={s} must be in [1, bits-1] for {bits}-bit codes")
    low_bits = bits - s
    part = (code.to(torch.int64) >> low_bits)
    pgrid = torch.zeros(1 << s, 2, dtype=torch.float32, device=vals.device)
    blobs = []
    lmax = (1 << low_bits) - 1
    for j in range(1 << s):
        sel = part == j
        uj = u[sel]
        if uj.numel() == 0:
            pgrid[j, 0], pgrid[j, 1] = float(j << low_bits), 1.0
            blobs.append(torch.zeros(0, dtype=torch.uint8, device=vals.device))
            continue
        lo_, hi_ = float(uj.min()), float(uj.max())
        step = (hi_ - lo_) / lmax if hi_ > lo_ else 1.0
        # never coarser than the plain k-bit grid (step 1) over this part
        if step > 1.0:
            lo_, step = float(j << low_bits), 1.0
        pgrid[j, 0], pgrid[j, 1] = lo_, step
        low = torch.round((uj - lo_) / step).clamp_(0, lmax).to(torch.uint8)
        blobs.append(pack_bits(low.view(1, -1), low_bits).view(-1))
    return {
        "part_ids": pack_bits(part.to(torch.uint8).view(1, -1), s).view(-1),
        "codes": torch.cat(blobs),
        "scale": grid,
        "pgrid": pgrid,
    }


def encode(delta: torch.Tensor, *, g: int, n_values: int, seed: int, bits: int, s: int = 0, scale: str = "tensor",
           hashes: MaskHashes | None = None):
    """Codec params and parts (on delta's device) for at most `n_values` survivors of group size g, and the survivors'
    positions (hi block, lo block)."""
    m, n = delta.shape
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}")
    keep, rows_hi = keep_layout(m, n, g, n_values)
    params = {"g": g, "keep": keep, "rows_hi": rows_hi, "seed": seed, "bits": bits, "s": s, "scale": scale}
    pos = positions(params, (m, n), delta.device, hashes)
    vals, rows = gather_rescaled(delta.float(), params, pos)
    parts = encode_values(vals, rows, blocks(params, (m, n)), m, bits, s, scale)
    return params, parts, pos


# ---- decoding ------------------------------------------------------------------------------------------------------
def decode_values(params: dict, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    m, n = shape
    dev = next(iter(parts.values())).device if parts else torch.device("cpu")
    counts = row_counts(params, shape, dev)
    total = int(counts.sum())
    bits, s = int(params["bits"]), int(params.get("s", 0))
    if bits >= 16:
        _need(parts, "values")
        v = parts["values"].float().reshape(-1)
        if v.numel() != total:
            raise FormatError(f"deltadq holds {v.numel()} values, layout needs {total}")
        return v
    _need(parts, "codes", "scale")
    grid = parts["scale"].float().reshape(-1, 2)
    if grid.shape[0] not in (1, m):
        raise FormatError(f"deltadq grid has {grid.shape[0]} rows, expected 1 or {m}")
    codes = parts["codes"].reshape(-1)
    if s == 0:
        if codes.numel() != packed_row_bytes(total, bits):
            raise FormatError(f"deltadq codes hold {codes.numel()} bytes, expected {packed_row_bytes(total, bits)}")
        u = unpack_bits(codes.view(1, -1), bits, total).view(-1).float()
    else:
        _need(parts, "part_ids", "pgrid")
        low_bits = bits - s
        part = unpack_bits(parts["part_ids"].reshape(1, -1), s, total).view(-1).long()
        pgrid = parts["pgrid"].float().reshape(-1, 2)
        u = torch.empty(total, device=dev)
        off = 0
        for j in range(1 << s):
            sel = part == j
            cnt = int(sel.sum())
            nb = packed_row_bytes(cnt, low_bits)
            if off + nb > codes.numel():
                raise FormatError("deltadq part codes run past the stored bytes (truncated or corrupt)")
            low = unpack_bits(codes[off : off + nb].view(1, -1), low_bits, cnt).view(-1).float() if cnt else u.new_zeros(0)
            u[sel] = pgrid[j, 0] + pgrid[j, 1] * low
            off += nb
        if off != codes.numel():
            raise FormatError(f"deltadq part codes hold {codes.numel()} bytes, the parts use {off} (corrupt or edited)")
    if grid.shape[0] == 1:
        return grid[0, 1] + grid[0, 0] * u
    rows = torch.repeat_interleave(torch.arange(m, device=dev), counts)
    return grid[rows, 1] + grid[rows, 0] * u


def scatter_values(vals: torch.Tensor, params: dict, shape: tuple[int, int], pos=None) -> torch.Tensor:
    m, n = shape
    hi, lo = pos if pos is not None else positions(params, shape, vals.device)
    rows_hi = int(params["rows_hi"])
    out = torch.zeros(m, n, device=vals.device)
    k_hi = hi.shape[1]
    n_hi = rows_hi * k_hi
    if rows_hi:
        out[:rows_hi].scatter_(1, hi, vals[:n_hi].view(rows_hi, k_hi))
    if lo.numel():
        out[rows_hi:].scatter_(1, lo, vals[n_hi:].view(m - rows_hi, lo.shape[1]))
    return out


@register_codec
class DeltaDQCodec(Codec):
    name = "deltadq"
    payload_parts = ("codes", "values", "part_ids")

    @classmethod
    def layout(cls, params, shape):
        m, n = shape
        g = pint(params, "g", 1, max(n, 1))
        keep = pint(params, "keep", 0, g)
        rows_hi = pint(params, "rows_hi", 0, m)
        pint(params, "seed", 0, _M32)
        bits = pint(params, "bits", 1, choices=BITS)
        s = pint(params, "s", 0, 7, 0) if bits == 16 else pint(params, "s", 0, bits - 1, 0)
        rows = m if pchoice(params, "scale", SCALE_MODES, "tensor") == "row" else 1
        _check_layout({"g": g, "keep": keep, "rows_hi": rows_hi}, shape)
        total = kept_count(m, n, g, keep, rows_hi)
        if bits == 16:
            return {"values": (FLOAT, total)}
        if s == 0:
            return {"codes": (U8, packed_row_bytes(total, bits)), "scale": (FLOAT, 2 * rows)}
        return {"part_ids": (U8, packed_row_bytes(total, s)), "codes": (U8, None), "scale": (FLOAT, 2 * rows),
                "pgrid": (FLOAT, 2 << s)}

    @classmethod
    def decode(cls, params, parts, shape):
        return scatter_values(decode_values(params, parts, shape), params, shape)
