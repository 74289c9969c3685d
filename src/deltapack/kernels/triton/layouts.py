"""GPU-resident layouts of the Triton backend, and their pure-torch definitions (no triton import here).

Every layout keeps a tenant's delta compressed on the device; `PackedDelta.nbytes()` is exactly the bytes a kernel
reads for it (what the tier budgets count). Kinds:

  qfactors  the `factors` codec (delta-come's mixed precision, and lowrank = all groups 16-bit): delta = Bt^T A with
            A (r x in, the V side, read first: z = x A^T) and Bt (r x out, the U side: y = z Bt), kept per rank group
            (one bit width each) as
              "A.words": the group's A codes (rows = its rank rows, columns = in), "B.words": its Bt codes
                transposed (B = Bt^T: rows = out, columns = the group's rank rows), so that both sides reduce along
                the packed axis. Codes are split into power-of-two parts (1, 2, 4, 8 bits; 3 = 2+1, 5 = 4+1,
                6 = 4+2, 7 = 4+2+1, low bits first), each part a (rows, ceil(cols*w/32)) int32 array in which word
                j of a row holds the codes of columns [j*32/w, (j+1)*32/w), column c at bits (c mod 32/w)*w. A rows
                take exactly the stored bits when in is a multiple of 32 (4096, 11008 are); B rows round each group's
                rank up to whole words (a group of 968 2-bit pairs: 61 words for 60.5; 2 8-bit pairs: 1 word for
                half of one): about 0.5% of a 7B tensor at 16x.
              "A.scale"/"A.zero", "B.scale"/"B.zero": the stored fp16 scale / zero per (rank row, group of gs
                columns) of A and of Bt, as stored.
              16-bit groups: "A.float" (rows, in) and "B.float" (out, rows) in the compute dtype.
            value = code * scale + zero.
  sign32    the `sign` codec (bitdelta): "words" (planes*out, ceil(in/32)) int32, bit c mod 32 of word c/32 = bit
            of column c (the stored bytes, rows padded to whole words); "scale" (planes, 1|out) fp32.
            delta = sum_j scale_j * (2*bits_j - 1).
  ell       sparse codecs (dare, deltadq, and any codec decoded to at most half non-zeros): rows cut into tiles of
            16; tile t holds cap_t = its longest row's count of entries, stored entry-major [cap_t, 16] (entry j of
            the tile's 16 rows side by side); "col" int16 (int32 past 32767 columns), -1 = padding; "values" in the
            compute dtype; "tile_off" int32 (tiles+1) entry offsets. Bytes per non-zero: 2 (column) + 2 (bf16 value),
            plus the padding to each tile's longest row (about 5% for a Bernoulli mask of 4096 columns, 0 for
            deltadq's fixed counts per row block).
  dense     "values" (out, in) in the compute dtype.
  vector    "values" (n,) biases / norm weights (as the reference backend).

`dequant_layout(p)` is the definition of each layout (the dense delta it stands for); `layout_rows(p, ids)` the
embedding-row lookups (torch ops, no dense delta built).
"""

from __future__ import annotations

import logging

import torch

from deltapack.errors import FormatError
from deltapack.format.codecs import decode_entry, get_codec, lora_as_factors, parts_device
from deltapack.format.packing import packed_row_bytes, unpack_bits
from deltapack.kernels import PackedDelta, rows_with_growth, sign_parts

log = logging.getLogger(__name__)

ELL_ROWS = 16  # rows per ELL tile (the sparse kernel's row block)
# power-of-two parts of a b-bit code, low bits first
CODE_PARTS: dict[int, tuple[int, ...]] = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
_I32 = 1 << 32


def words_per_row(cols: int, width: int) -> int:
    """int32 words of one row of `cols` codes of a `width`-bit part (width a power of two <= 8)."""
    return (cols * width + 31) // 32


def group_words(rows: int, cols: int, bits: int) -> int:
    return rows * sum(words_per_row(cols, w) for w in CODE_PARTS[bits])


def pack_code_parts(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (rows, cols) integers < 2**bits -> flat int32 words: each power-of-two part as a (rows, words_per_row)
    array, part after part."""
    rows, cols = codes.shape
    out = []
    shift = 0
    c64 = codes.to(torch.int64)
    for w in CODE_PARTS[bits]:
        per = 32 // w
        part = (c64 >> shift) & ((1 << w) - 1)
        pad = (-cols) % per
        if pad:
            part = torch.nn.functional.pad(part, (0, pad))
        part = part.view(rows, -1, per)
        word = (part << (torch.arange(per, dtype=torch.int64, device=codes.device) * w)).sum(-1)  # < 2**32 each
        word = torch.where(word >= (1 << 31), word - _I32, word).to(torch.int32)
        out.append(word.reshape(-1))
        shift += w
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int32, device=codes.device)


def unpack_code_parts(
    words: torch.Tensor, rows: int, cols: int, bits: int, col_ids: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of pack_code_parts: (rows, cols) int64 codes, or only the columns `col_ids` / rows `row_ids`."""
    out = None
    off = shift = 0
    for w in CODE_PARTS[bits]:
        per = 32 // w
        wpr = words_per_row(cols, w)
        part = words[off : off + rows * wpr].view(rows, wpr)
        if row_ids is not None:
            part = part[row_ids.long()]
        part = part.to(torch.int64) & (_I32 - 1)
        if col_ids is None:
            sh = torch.arange(per, dtype=torch.int64, device=words.device) * w
            vals = ((part.unsqueeze(-1) >> sh) & ((1 << w) - 1)).reshape(part.shape[0], -1)[:, :cols]
        else:
            c = col_ids.to(torch.int64)
            vals = (part[:, c // per] >> ((c % per) * w)) & ((1 << w) - 1)
        out = vals << shift if out is None else out | (vals << shift)
        off += rows * wpr
        shift += w
    return out


def _pad_rows_to_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 rows -> int32 words (little-endian), each row zero-padded to a whole number of words."""
    rows, nb = packed.shape
    pad = (-nb) % 4
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.contiguous().view(torch.int32).reshape(rows, -1)


# ---- packers --------------------------------------------------------------------------------------------------------
def pack_qfactors(params: dict, parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> PackedDelta:
    m, n = shape
    dev = parts_device(parts)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"groups": []}
    groups = [g for g in params.get("groups", []) if int(g["rank"]) > 0]
    z_off = 0
    for g in groups:
        meta["groups"].append({"rows": int(g["rank"]), "bits": 16 if int(g["bits"]) >= 16 else int(g["bits"]), "z": z_off})
        z_off += int(g["rank"])
    meta["rank"] = z_off
    # stored side -> resident side: A as stored (rows = rank, cols = in); Bt transposed into B (rows = out)
    for side, key, cols, gkey in (("A", "A", n, "group_size"), ("Bt", "B", m, "group_size_bt")):
        blob = parts.get(f"{side}.codes", torch.zeros(0, dtype=torch.uint8, device=dev)).reshape(-1).to(torch.uint8)
        scale = parts.get(f"{side}.scale", torch.zeros(0, dtype=torch.float16, device=dev)).reshape(-1)
        zero = parts.get(f"{side}.zero", torch.zeros(0, dtype=torch.float16, device=dev)).reshape(-1)
        floats = parts.get(f"{side}.float")
        words, info, fl = [], [], []
        w_off = c_off = s_off = f_row = 0
        for g, gm in zip(groups, meta["groups"]):
            r, b = gm["rows"], gm["bits"]
            if b >= 16:
                if floats is None or floats.numel() < (f_row + r) * cols:
                    raise FormatError(f"factor floats of side {side} hold fewer than {f_row + r} rows")
                fl.append(floats.reshape(-1)[f_row * cols : (f_row + r) * cols].reshape(r, cols))
                info.append({"f": f_row})
                f_row += r
                continue
            gs = int(g.get(gkey) or cols)
            ng = (cols + gs - 1) // gs
            nb = r * packed_row_bytes(cols, b)
            if c_off + nb > blob.numel() or s_off + r * ng > min(scale.numel(), zero.numel()):
                raise FormatError(f"factor codes of side {side} run past the stored parts (truncated or corrupt delta)")
            codes = unpack_bits(blob[c_off : c_off + nb].view(r, -1), b, cols)
            w = pack_code_parts(codes if side == "A" else codes.T.contiguous(), b)
            info.append({"words": w_off, "scale": s_off, "ng": ng, "gs": gs})
            words.append(w)
            w_off += w.numel()
            c_off += nb
            s_off += r * ng
        for gm, i in zip(meta["groups"], info):
            gm[key] = i
        tensors[f"{key}.words"] = torch.cat(words) if words else torch.zeros(0, dtype=torch.int32, device=dev)
        tensors[f"{key}.scale"] = scale[:s_off].to(torch.float16).contiguous()
        tensors[f"{key}.zero"] = zero[:s_off].to(torch.float16).contiguous()
        f = torch.cat(fl, 0) if fl else torch.zeros(0, cols, device=dev)
        tensors[f"{key}.float"] = (f if side == "A" else f.T).to(dtype).contiguous()  # A: (r16, in); B: (out, r16)
    return PackedDelta("qfactors", (m, n), tensors, meta)


def pack_sign32(params: dict, parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> PackedDelta:
    m, n = shape
    signs, scale, k = sign_parts(params, parts, shape)
    words = _pad_rows_to_words(signs)
    return PackedDelta(
        "sign32", (m, n), {"words": words.contiguous(), "scale": scale.contiguous()},
        {"planes": k, "row_scale": scale.shape[1] == m and m > 1},
    )


def ell_from_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype) -> PackedDelta:
    """CSR (row pointers, columns, values) -> the ELL tile layout (see the module docstring)."""
    m, n = shape
    dev = crow.device
    crow = crow.to(torch.int64)
    counts = crow[1:] - crow[:-1]
    tiles = (m + ELL_ROWS - 1) // ELL_ROWS
    padded = torch.zeros(tiles * ELL_ROWS, dtype=torch.int64, device=dev)
    padded[:m] = counts
    cap = padded.view(tiles, ELL_ROWS).amax(1)
    tile_off = torch.zeros(tiles + 1, dtype=torch.int64, device=dev)
    tile_off[1:] = torch.cumsum(cap * ELL_ROWS, 0)
    total = int(tile_off[-1])
    if total >= 2**31:
        raise FormatError(f"sparse delta of shape {list(shape)} has too many entries for the ELL layout")
    col_t = torch.int16 if n <= 32767 else torch.int32
    col_out = torch.full((total,), -1, dtype=col_t, device=dev)
    val_out = torch.zeros(total, dtype=dtype, device=dev)
    nnz = col.numel()
    if nnz:
        # entry i of row r (i counted from the matrix's first entry) goes to tile_off[r // ELL_ROWS] + r % ELL_ROWS
        # + (i - crow[r]) * ELL_ROWS: a per-row constant (m numbers) spread over the row's entries plus i * ELL_ROWS,
        # instead of gathers over every entry (4x faster on a CPU, where the deltas pack at every start)
        r = torch.arange(m, device=dev)
        row_const = tile_off[r // ELL_ROWS] + r % ELL_ROWS - crow[:-1] * ELL_ROWS
        pos = torch.repeat_interleave(row_const, counts, output_size=nnz)
        pos += torch.arange(0, nnz * ELL_ROWS, ELL_ROWS, device=dev)
        col_out[pos] = col.to(col_t)
        val_out[pos] = values.to(dtype)
    return PackedDelta(
        "ell", (m, n), {"col": col_out, "values": val_out, "tile_off": tile_off.to(torch.int32)},
        {"nnz": int(nnz), "entries": total},
    )


def pack_entry(codec: str, params: dict, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype) -> PackedDelta:
    """Stored codec entry -> this backend's resident layout (on the CPU)."""
    from deltapack.kernels import reference as ref

    get_codec(codec)  # unknown codec -> FormatError
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        v = decode_entry(codec, params, parts, shape).reshape(-1)
        return PackedDelta("vector", shape, {"values": v.to(dtype).contiguous()})
    if len(shape) != 2:
        raise FormatError(f"cannot serve a delta of shape {list(shape)} (only matrices and vectors)")
    try:
        if codec == "factors":
            return pack_qfactors(params, parts, shape, dtype)
        if codec == "lora":  # factors with a scale: folded into the B side, the layout is qfactors'
            return pack_qfactors(*lora_as_factors(params, parts), shape, dtype)
        if codec == "sign":
            return pack_sign32(params, parts, shape, dtype)
        if codec == "dense":
            v = decode_entry("dense", params, parts, shape)
            return PackedDelta("dense", shape, {"values": v.to(dtype).contiguous()})
        # sparse codecs (and codecs without a packer): the reference backend's CSR, re-laid out as ELL tiles
        fn = ref.PACKERS.get(codec)
        p = fn(params, parts, shape, dtype) if fn else ref._pack_generic(codec, params, parts, shape, dtype)
        if p.kind == "dense":
            return p
        t = p.tensors
        return ell_from_csr(t["crow"], t["col"], t["values"], shape, dtype)
    except FormatError:
        raise
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise FormatError(f"cannot pack a {codec} delta of shape {list(shape)}: {e}") from e


# ---- definitions (pure torch) ---------------------------------------------------------------------------------------
def qfactors_side(p: PackedDelta, side: str, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized A (r x in) or Bt (r x out) of a qfactors layout in fp32; with `ids`, only those columns
    (A: input features, Bt: output rows)."""
    m, n = p.shape
    t = p.tensors
    out = []
    for g in p.meta["groups"]:
        r, b = g["rows"], g["bits"]
        if side == "A":
            i = g["A"]
            if b >= 16:
                f = t["A.float"][i["f"] : i["f"] + r].float()
                out.append(f if ids is None else f[:, ids.long()])
                continue
            words = t["A.words"][i["words"] : i["words"] + group_words(r, n, b)]
            q = unpack_code_parts(words, r, n, b, col_ids=ids).float()
            c = torch.arange(n, device=q.device) if ids is None else ids.long()
            sidx = i["scale"] + torch.arange(r, device=q.device)[:, None] * i["ng"] + (c // i["gs"])[None, :]
        else:
            i = g["B"]
            if b >= 16:
                f = t["B.float"][:, i["f"] : i["f"] + r].float()  # (out, r)
                out.append((f if ids is None else f[ids.long()]).T)
                continue
            words = t["B.words"][i["words"] : i["words"] + group_words(m, r, b)]
            q = unpack_code_parts(words, m, r, b, row_ids=ids).float().T  # (r, out or len(ids))
            c = torch.arange(m, device=q.device) if ids is None else ids.long()
            sidx = i["scale"] + torch.arange(r, device=q.device)[:, None] * i["ng"] + (c // i["gs"])[None, :]
        out.append(q * t[f"{side[0]}.scale"].float()[sidx] + t[f"{side[0]}.zero"].float()[sidx])
    cols = (n if side == "A" else m) if ids is None else ids.numel()
    return torch.cat(out, 0) if out else torch.zeros(0, cols)


def sign_planes(p: PackedDelta, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(planes, len(rows) or out, in) fp32 scaled +-1 planes of a sign32 layout."""
    m, n = p.shape
    k = p.meta["planes"]
    words = p.tensors["words"]
    scale = p.tensors["scale"]
    r = torch.arange(m, device=words.device) if rows is None else rows.long()
    out = []
    for j in range(k):
        w = words[j * m + r].to(torch.int64) & (_I32 - 1)
        bits = ((w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1).reshape(r.numel(), -1)[:, :n]
        s = scale[j][r] if scale.shape[1] == m and m > 1 else scale[j].expand(r.numel())
        out.append((bits.float() * 2 - 1) * s.float()[:, None])
    return torch.stack(out)


def dequant_layout(p: PackedDelta) -> torch.Tensor:
    """The dense fp32 delta (base rows) a packed layout stands for: its definition."""
    m, n = p.shape if len(p.shape) == 2 else (1, p.shape[0])
    if p.kind in ("dense", "vector"):
        return p.tensors["values"].float().reshape(m, n)
    if p.kind == "qfactors":
        return qfactors_side(p, "Bt").T @ qfactors_side(p, "A")
    if p.kind == "sign32":
        return sign_planes(p).sum(0)
    if p.kind == "ell":
        rows, col, vals = ell_coo(p)
        out = torch.zeros(m, n, device=vals.device)
        out.index_put_((rows, col), vals.float(), accumulate=True)
        return out
    raise FormatError(f"unknown packed layout {p.kind!r}")


_BLOCK_ELEMS = 1 << 22  # transient elements of one dequantized block (sign planes) / gathered product (ell)


def ell_coo(p: PackedDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of an ell layout's entries, padding dropped (int64, int64, packed dtype)."""
    t = p.tensors
    dev = t["col"].device
    off = t["tile_off"].long()
    tile = torch.repeat_interleave(torch.arange(off.numel() - 1, device=dev), off[1:] - off[:-1])
    rows = tile * ELL_ROWS + (torch.arange(tile.numel(), device=dev) - off[tile]) % ELL_ROWS
    col = t["col"].long()
    keep = col >= 0
    return rows[keep], col[keep], t["values"][keep]


def layout_linear(p: PackedDelta, x: torch.Tensor) -> torch.Tensor:
    """x (k, in) @ dW^T for one tenant's packed layout, in pure torch: (k, out) in x's dtype, fp32 accumulation.
    The Triton backend's path while a launch's kernel variant is still compiling (deltapack.kernels.compile); no
    dense (out x in) delta is built (factors stay factored, sign planes and sparse products go a block at a time)."""
    m, n = p.shape
    xf = x.float()
    if p.kind == "dense":
        return x @ p.tensors["values"].to(x.dtype).T
    if p.kind == "qfactors":
        return ((xf @ qfactors_side(p, "A").T) @ qfactors_side(p, "Bt")).to(x.dtype)
    if p.kind == "sign32":
        out = torch.zeros(x.shape[0], m, dtype=torch.float32, device=x.device)
        step = max(1, _BLOCK_ELEMS // max(1, n * p.meta["planes"]))
        for r0 in range(0, m, step):
            rows = torch.arange(r0, min(m, r0 + step), device=x.device)
            out[:, r0 : r0 + rows.numel()] = xf @ sign_planes(p, rows).sum(0).T
        return out.to(x.dtype)
    if p.kind == "ell":
        rows, col, vals = ell_coo(p)
        out = torch.zeros(x.shape[0], m, dtype=torch.float32, device=x.device)
        v = vals.float()
        step = max(1, _BLOCK_ELEMS // max(1, col.numel()))
        for t0 in range(0, x.shape[0], step):
            out[t0 : t0 + step].index_add_(1, rows, xf[t0 : t0 + step].index_select(1, col) * v)
        return out.to(x.dtype)
    raise FormatError(f"packed kind {p.kind!r} cannot be applied as a linear delta")


def layout_rows(p: PackedDelta, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the tenant's delta (growth rows: the tenant's stored new rows), fp32 or the packed dtype."""
    return rows_with_growth(p, ids, _base_layout_rows)


def _base_layout_rows(p: PackedDelta, ids: torch.Tensor) -> torch.Tensor:
    n = p.shape[1]
    ids = ids.long()
    if p.kind == "dense":
        return p.tensors["values"][ids]
    if p.kind == "qfactors":
        # every row needs all of A: keep it dequantized (r x in, fp32) after the first lookup, or each decode step's
        # embedding lookup would unpack it again for every tenant in the batch
        a = p.cache.get("rows_A")
        if a is None:
            a = p.cache["rows_A"] = qfactors_side(p, "A")
        return qfactors_side(p, "Bt", ids).T @ a
    if p.kind == "sign32":
        return sign_planes(p, ids).sum(0)
    if p.kind == "ell":
        t = p.tensors
        off = t["tile_off"].long()
        out = torch.zeros(ids.numel(), n, dtype=torch.float32, device=ids.device)
        for i, r in enumerate(ids.tolist()):
            tile, lane = divmod(r, ELL_ROWS)
            e0, e1 = int(off[tile]), int(off[tile + 1])
            col = t["col"][e0 + lane : e1 : ELL_ROWS].long()
            val = t["values"][e0 + lane : e1 : ELL_ROWS].float()
            keep = col >= 0
            out[i].index_add_(0, col[keep], val[keep])
        return out
    raise FormatError(f"packed kind {p.kind!r} has no rows")


__all__ = [
    "ELL_ROWS", "CODE_PARTS", "words_per_row", "group_words", "pack_code_parts", "unpack_code_parts", "pack_qfactors",
    "pack_sign32", "ell_from_csr", "pack_entry", "qfactors_side", "sign_planes", "dequant_layout", "layout_rows",
    "layout_linear", "ell_coo",
]
