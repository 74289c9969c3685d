"""Codecs: how a compressed delta tensor is stored, and how to turn it back into numbers.

A codec is pure storage logic, apart from the methods that choose its contents (llm-compressor's split between
algorithms and compressed-tensors). Each codec declares its parts ("payload" = the numbers papers count, "side" =
scales, zeros and the like) and implements:

  decode(params, parts, shape) -> dense fp32 delta
  apply(params, parts, x) -> x @ delta.T  (without building the dense delta where the codec allows; the reference
                                            implementation for the serving kernels)

Parts are stored in safetensors as `<tensor name>::<part>`. All codecs operate on 2-D tensors (out x in); 1-D tensors
(norms, biases) are viewed as one row.

Codecs:
  dense    values (bf16/fp32/fp64) = delta, exactly
  factors  delta = sum over rank groups g of Bt_g^T @ A_g; each group float16/bf16 or b-bit row-quantized.
           A (r x in) and Bt (r x out) are stored as concatenated row blocks: one code blob per side.
  lora     a `factors` layout plus params.scale: delta = scale * sum_g Bt_g^T @ A_g (a peft LoRA adapter kept exactly:
           its 16-bit A and B as trained, the alpha/r or rsLoRA alpha/sqrt(r) scaling beside them)
  sign     delta = scale * (2*bit - 1); scale per matrix or per row
  sparse   kept values at positions regenerated from a seed (bernoulli or fixed count per group), values
           bf16 or b-bit quantized with per-row or per-group scales
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from deltapack.errors import FormatError
from deltapack.format.masks import bernoulli_mask, group_keep_indices
from deltapack.format.packing import packed_row_bytes, unpack_bits
from deltapack.quant.rtn import dequantize_rows


# what a part may be stored as: codes are bytes, everything else a float tensor
U8, FLOAT, ANY = "u8", "float", "any"
Layout = dict[str, tuple[str, "int | None"]]  # part -> (kind, element count; None: depends on the data, decode checks)


def parts_device(parts: dict[str, torch.Tensor]) -> torch.device:
    """Where a stored entry's parts are: decoding and packing make their tensors there (on a GPU, the masks' hashing
    and the layout's scatters are the device's work instead of the host's)."""
    for t in parts.values():
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def pint(params: dict, key: str, lo: int, hi: int | None = None, default=None, *, choices=None) -> int:
    """A codec parameter that must be an int in [lo, hi] (or one of `choices`); bools and strings are refused."""
    v = params.get(key, default)
    if type(v) is not int or v < lo or (hi is not None and v > hi) or (choices is not None and v not in choices):
        rng = f"one of {sorted(choices)}" if choices is not None else f"an integer in [{lo}, {hi if hi is not None else 'inf'})"
        raise FormatError(f"codec parameter {key}={v!r} must be {rng}")
    return v


def pchoice(params: dict, key: str, choices: tuple, default=None):
    v = params.get(key, default)
    if not isinstance(v, str) or v not in choices:
        raise FormatError(f"codec parameter {key}={v!r} must be one of {list(choices)}")
    return v


BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


class Codec:
    name: str = ""
    payload_parts: tuple[str, ...] = ()
    needs_base: bool = False  # stores bits against the base: `rebuild(params, parts, shape, base)`, no `decode`
    entropy_coded: bool = False  # parts already entropy-coded: the entropy stage skips them

    @classmethod
    def layout(cls, params: dict, shape: tuple[int, int]) -> Layout:
        """Check `params` (types and ranges, against the 2-D shape) and return the parts they imply with their
        element counts: what a reader checks against the stored tensors before decoding anything."""
        raise NotImplementedError

    @classmethod
    def decode(cls, params: dict, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def apply(cls, params: dict, parts: dict[str, torch.Tensor], x: torch.Tensor, shape: tuple[int, int]):
        """x: (..., in). Default: through the dense delta (codecs override where a cheaper path exists)."""
        return x @ cls.decode(params, parts, shape).to(x.dtype).T

    @classmethod
    def rows(cls, params: dict, parts: dict[str, torch.Tensor], ids: torch.Tensor, shape: tuple[int, int]):
        """Rows `ids` of the delta (embedding lookups)."""
        return cls.decode(params, parts, shape)[ids]


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str) -> type[Codec]:
    if name not in CODECS:
        raise FormatError(f"unknown codec {name!r} (this deltapack knows {sorted(CODECS)})")
    return CODECS[name]


def _need(parts: dict, *names: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise FormatError(f"codec parts missing: {missing}")


@register_codec
class DenseCodec(Codec):
    name = "dense"
    payload_parts = ("values",)

    @classmethod
    def layout(cls, params, shape):
        return {"values": (ANY, shape[0] * shape[1])}

    @classmethod
    def decode(cls, params, parts, shape):
        _need(parts, "values")
        v = parts["values"]
        if v.numel() != shape[0] * shape[1]:
            raise FormatError(f"dense values hold {v.numel()} elements, expected {shape}")
        # fp64 stays fp64 so raw can rebuild fp32 checkpoints exactly
        return v.reshape(shape).to(torch.float64 if v.dtype == torch.float64 else torch.float32)


# ---- quantized row blocks, shared by factors and sparse ---------------------------------------------------------
def qblock_layout(rows_per_block: list[int], bits: list[int], cols: int, group_size: list[int]):
    """Byte offsets of each block inside the concatenated code blob, and scale offsets in the scale blob."""
    code_off, scale_off = [0], [0]
    for r, b, gs in zip(rows_per_block, bits, group_size):
        code_off.append(code_off[-1] + (r * packed_row_bytes(cols, b) if b < 16 else 0))
        n_groups = (cols + gs - 1) // gs if b < 16 else 0
        scale_off.append(scale_off[-1] + r * n_groups)
    return code_off, scale_off


def decode_qblocks(blocks: list[dict], cols: int, codes, scale, zero, floats) -> torch.Tensor:
    """Rebuild a (sum rows x cols) fp32 matrix from row blocks; 16-bit blocks live in `floats`."""
    out = []
    c_off = s_off = f_off = 0
    for blk in blocks:
        r, b = blk["rows"], blk["bits"]
        if r == 0:
            continue
        if b >= 16:
            out.append(floats[f_off : f_off + r].float())
            f_off += r
            continue
        gs = blk["group_size"]
        nb = r * packed_row_bytes(cols, b)
        ng = (cols + gs - 1) // gs
        if c_off + nb > codes.numel() or s_off + r * ng > scale.numel():
            raise FormatError("quantized block runs past the stored codes (truncated or corrupt delta)")
        out.append(
            dequantize_rows(
                codes[c_off : c_off + nb].view(r, -1),
                scale[s_off : s_off + r * ng].view(r, ng),
                zero[s_off : s_off + r * ng].view(r, ng),
                b,
                cols,
                gs,
            )
        )
        c_off += nb
        s_off += r * ng
    # every stored byte must be used: a params edit that shrinks the layout is corruption, not a smaller tensor
    n_float = 0 if floats is None else (floats.shape[0] if floats.dim() > 1 else (floats.numel() // max(cols, 1)))
    if c_off != codes.numel() or s_off != scale.numel() or s_off != zero.numel() or (floats is not None and f_off != n_float):
        raise FormatError("stored codes, scales or factors do not match the codec parameters (corrupt or edited delta)")
    if not out:
        return torch.zeros(0, cols, device=codes.device)
    return torch.cat(out, 0)


@register_codec
class FactorsCodec(Codec):
    """params: {"groups": [{"rank", "bits", "group_size"}...], "float_dtype"}; parts A.codes/A.scale/A.zero/A.float
    and the same for Bt. Group order = descending singular value."""

    name = "factors"
    payload_parts = ("A.codes", "A.float", "Bt.codes", "Bt.float")

    @classmethod
    def layout(cls, params, shape):
        m, n = shape
        groups = params.get("groups")
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise FormatError("codec parameter groups must be a list of rank groups")
        counts = dict.fromkeys(("A.float", "Bt.float", "A.codes", "Bt.codes", "A.scale", "A.zero", "Bt.scale", "Bt.zero"), 0)
        for g in groups:
            r = pint(g, "rank", 1, 1 << 20)  # a LoRA's rank may exceed min(out, in); the stored sizes bound it
            b = pint(g, "bits", 1, choices=BITS)
            if b == 16:
                counts["A.float"] += r * n
                counts["Bt.float"] += r * m
                continue
            for side, cols, key in (("A", n, "group_size"), ("Bt", m, "group_size_bt")):
                gs = pint(g, key, 1, None, cols) if g.get(key) is not None else cols
                counts[f"{side}.codes"] += r * packed_row_bytes(cols, b)
                counts[f"{side}.scale"] += r * ((cols + gs - 1) // gs)
                counts[f"{side}.zero"] += r * ((cols + gs - 1) // gs)
        return {k: (U8 if k.endswith("codes") else FLOAT, v) for k, v in counts.items() if v}

    @classmethod
    def _side(cls, params, parts, side: str, cols: int) -> torch.Tensor:
        key = "group_size" if side == "A" else "group_size_bt"
        blocks = [{"rows": g["rank"], "bits": g["bits"], "group_size": g.get(key) or cols} for g in params["groups"]]
        dev = parts_device(parts)
        empty8 = torch.zeros(0, dtype=torch.uint8, device=dev)
        empty16 = torch.zeros(0, dtype=torch.float16, device=dev)
        return decode_qblocks(
            blocks,
            cols,
            parts.get(f"{side}.codes", empty8),
            parts.get(f"{side}.scale", empty16),
            parts.get(f"{side}.zero", empty16),
            parts.get(f"{side}.float", empty16.view(0, cols) if cols else empty16),
        )

    @classmethod
    def factors(cls, params, parts, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x in, Bt: r x out) in fp32."""
        m, n = shape
        A = cls._side(params, parts, "A", n)
        Bt = cls._side(params, parts, "Bt", m)
        if A.shape[0] != Bt.shape[0]:
            raise FormatError(f"factor ranks disagree: A has {A.shape[0]} rows, Bt {Bt.shape[0]}")
        return A, Bt

    @classmethod
    def decode(cls, params, parts, shape):
        A, Bt = cls.factors(params, parts, shape)
        return Bt.T @ A

    @classmethod
    def apply(cls, params, parts, x, shape):
        A, Bt = cls.factors(params, parts, shape)
        return (x @ A.to(x.dtype).T) @ Bt.to(x.dtype)

    @classmethod
    def rows(cls, params, parts, ids, shape):
        A, Bt = cls.factors(params, parts, shape)
        return Bt.T[ids] @ A


@register_codec
class LoraCodec(FactorsCodec):
    """`factors` with a scalar `params.scale` multiplying the whole delta. A separate codec name so that a reader
    that knows only `factors` fails ("unknown codec") instead of serving the delta unscaled."""

    name = "lora"

    @classmethod
    def layout(cls, params, shape):
        sc = params.get("scale", 1.0)
        if type(sc) not in (float, int) or not math.isfinite(sc):
            raise FormatError(f"codec parameter scale={sc!r} must be a finite number")
        return super().layout(params, shape)

    @classmethod
    def factors(cls, params, parts, shape) -> tuple[torch.Tensor, torch.Tensor]:
        A, Bt = super().factors(params, parts, shape)
        return A, Bt * float(params.get("scale", 1.0))


def lora_as_factors(params: dict, parts: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A `lora` entry rewritten as the equivalent `factors` entry, for packers that read the factor parts directly:
    the scale folded into the Bt side in fp32 (left fp32: the packer rounds once, to its own dtype)."""
    s = float(params.get("scale", 1.0))
    out = dict(parts)
    for k in ("Bt.float", "Bt.scale", "Bt.zero"):  # code * scale + zero: scaling both scales the dequantized row
        if k in out:
            out[k] = out[k].float() * s
    return {k: v for k, v in params.items() if k != "scale"}, out


@register_codec
class SignCodec(Codec):
    """params: {"planes": k, "scale": "matrix"|"row"}; parts: signs (k*rows x packed 1-bit), scale (fp32, k x 1 or
    k x rows). delta = sum_j scale_j * (2*bit_j - 1): plane j codes the sign of the residual left by planes < j."""

    name = "sign"
    payload_parts = ("signs",)

    @classmethod
    def layout(cls, params, shape):
        m, n = shape
        k = pint(params, "planes", 1, 64, 1)
        rows = m if pchoice(params, "scale", ("matrix", "row"), "matrix") == "row" else 1
        return {"signs": (U8, k * m * packed_row_bytes(n, 1)), "scale": (FLOAT, k * rows)}

    @classmethod
    def decode(cls, params, parts, shape):
        _need(parts, "signs", "scale")
        m, n = shape
        k = int(params.get("planes", 1))
        bits = unpack_bits(parts["signs"], 1, n).float()
        if bits.shape[0] != k * m:
            raise FormatError(f"sign codes have {bits.shape[0]} rows, expected {k}x{m}")
        scale = parts["scale"].float().reshape(k, -1, 1)
        planes = bits.view(k, m, n).mul_(2).sub_(1).mul_(scale)  # in place: a 7B embedding's plane is 0.5 GB in fp32
        return planes[0] if k == 1 else planes.sum(0)


@register_codec
class SparseCodec(Codec):
    """params: {"mask": "bernoulli", "keep_prob", "seed"} or {"mask": "group", "group_size", "keep", "seed"};
    "bits" (16 = float values), "group_size_q" (values per quantization group along a row), "rescale" folded.
    parts: values (float) or codes/scale/zero. Bernoulli values are one flat row; group values one row per matrix row.
    """

    name = "sparse"
    payload_parts = ("values", "codes")

    @classmethod
    def layout(cls, params, shape):
        m, n = shape
        mask = pchoice(params, "mask", ("bernoulli", "group"))
        pint(params, "seed", 0, (1 << 32) - 1)
        bits = pint(params, "bits", 1, choices=BITS)
        if mask == "bernoulli":
            p = params.get("keep_prob")
            if type(p) is not float or not (math.isfinite(p) and 0 < p <= 1):
                raise FormatError(f"codec parameter keep_prob={p!r} must be a number in (0, 1]")
            rows, cols = 1, None  # the kept count follows from the mask: decode checks it
        else:
            gs = pint(params, "group_size", 1, max(n, 1))
            if n % gs:
                raise FormatError(f"codec parameter group_size={gs} does not divide {n} columns")
            rows, cols = m, n // gs * pint(params, "keep", 0, gs)
        if bits == 16:
            return {"values": (FLOAT, None if cols is None else rows * cols)}
        if cols is None:
            return {"codes": (U8, None), "scale": (FLOAT, None), "zero": (FLOAT, None)}
        gq = pint(params, "group_size_q", 1, None, cols) if params.get("group_size_q") is not None else cols
        ng = rows * ((cols + gq - 1) // gq) if cols else 0
        return {"codes": (U8, rows * packed_row_bytes(cols, bits)), "scale": (FLOAT, ng), "zero": (FLOAT, ng)}

    @classmethod
    def positions(cls, params, shape, device="cpu"):
        if params["mask"] == "bernoulli":
            return bernoulli_mask(shape, params["keep_prob"], params["seed"], device)
        if params["mask"] == "group":
            return group_keep_indices(shape, params["group_size"], params["keep"], params["seed"], device)
        raise FormatError(f"unknown sparse mask {params['mask']!r}")

    @classmethod
    def values(cls, params, parts, rows: int, cols: int) -> torch.Tensor:
        if params["bits"] >= 16:
            _need(parts, "values")
            return parts["values"].float().reshape(rows, cols)
        _need(parts, "codes", "scale", "zero")
        gs = params.get("group_size_q") or cols
        blocks = [{"rows": rows, "bits": params["bits"], "group_size": gs}]
        return decode_qblocks(blocks, cols, parts["codes"], parts["scale"], parts["zero"], None)

    @classmethod
    def decode(cls, params, parts, shape):
        m, n = shape
        # decode where the parts are: masks are hashes of (seed, index), the same on every device
        dev = next(iter(parts.values())).device if parts else torch.device("cpu")
        pos = cls.positions(params, shape, dev)
        out = torch.zeros(m, n, device=dev)
        if params["mask"] == "bernoulli":
            nnz = int(pos.sum())
            vals = cls.values(params, parts, 1, nnz).view(-1) if nnz else torch.zeros(0, device=dev)
            out[pos] = vals
        else:
            k = pos.shape[1]
            vals = cls.values(params, parts, m, k)
            out.scatter_(1, pos, vals)
        return out


def decode_entry(codec: str, params: dict, parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    shape2 = as_2d(shape)
    try:
        return get_codec(codec).decode(params, parts, shape2).reshape(shape)
    except FormatError:
        raise
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise FormatError(f"cannot decode a {codec} tensor of shape {list(shape)}: {e}") from e


def as_2d(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) == 2:
        return shape  # type: ignore[return-value]
    if len(shape) == 1:
        return (1, shape[0])
    if len(shape) == 0:
        return (1, 1)
    n = 1
    for s in shape[1:]:
        n *= s
    return (shape[0], n)


ApplyFn = Callable[[dict, dict, torch.Tensor, tuple[int, int]], torch.Tensor]


def build_factor_parts(groups: list[dict], float_dtype=torch.bfloat16) -> tuple[dict, dict[str, torch.Tensor]]:
    """Assemble `factors` codec params and parts from rank groups.

    Each group: {"bits": b, "A": fp32 (r x in) or QMatrix, "Bt": fp32 (r x out) or QMatrix}. 16-bit groups store
    floats; quantized groups come as QMatrix (from RTN or GPTQ), whose group sizes are recorded per side.
    """
    from deltapack.quant.rtn import QMatrix

    params: dict = {"groups": []}
    blobs: dict[str, list[torch.Tensor]] = {}
    for g in groups:
        bits = g["bits"]
        r = g["A"].rows if isinstance(g["A"], QMatrix) else g["A"].shape[0]
        if r == 0:
            continue
        entry: dict = {"rank": r, "bits": bits}
        for side in ("A", "Bt"):
            v = g[side]
            if bits >= 16:
                blobs.setdefault(f"{side}.float", []).append(v.to(float_dtype))
                continue
            if not isinstance(v, QMatrix) or v.bits != bits:
                raise ValueError("quantized factor groups must be QMatrix of the group's bit width")
            entry["group_size" if side == "A" else "group_size_bt"] = v.group_size
            blobs.setdefault(f"{side}.codes", []).append(v.codes.reshape(-1))
            blobs.setdefault(f"{side}.scale", []).append(v.scale.reshape(-1))
            blobs.setdefault(f"{side}.zero", []).append(v.zero.reshape(-1))
        params["groups"].append(entry)
    parts = {k: torch.cat(v, 0).contiguous() for k, v in blobs.items()}
    return params, parts
