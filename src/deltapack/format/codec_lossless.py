"""The `lossless` codec: the fine-tune's exact bits against the base's (spec: docs/format.md).

For a tensor of W-byte elements (bf16/fp16: 2, fp32: 4, any other dtype too): read both as unsigned W-byte
integers, take the difference `u = ft_bits - base_bits (mod 2^(8W))`, zigzag it (`z = (u << 1) ^ (u >> (8W-1))`
on the signed view: a change of k units in the last place becomes 2|k| or 2|k|-1, small for small changes whatever
their sign), and store the W byte planes of `z`, zstd-coded frame by frame (format/entropy.py). An unchanged element
is z = 0. Where most elements are unchanged a bitmap of the changed ones plus the planes of only those may be
smaller; the encoder stores whichever is smaller (`params.bitmap`).

Why the integer difference and not XOR: a fine-tune moves most weights by a few units in the last place; the
difference of the bit patterns is then that small count, while XOR turns every carry into a run of flipped bits
(bench/lossless/run.py measured the two on real deltas: docs/methods/lossless.md).

Decoding needs the base: `rebuild(params, parts, shape, base)` returns the fine-tune tensor bit for bit; `decode`
(a float delta without the base) is refused. Merge calls `rebuild`; serving computes the float delta from the base
it holds (serve/tiers.py).
"""

from __future__ import annotations

import numpy as np
import torch

from deltapack.errors import FormatError
from deltapack.format import entropy
from deltapack.format.codecs import U8, Codec, pint, register_codec

_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
BITMAP_MIN_UNCHANGED = 0.25  # below this share of unchanged elements the bitmap is not even tried
BITMAP_MIN_SAVING = 0.05  # the bitmap layout decodes slower (a scatter): kept only when it saves this much


def _words(t: torch.Tensor) -> np.ndarray:
    """Flat unsigned-integer view of a CPU tensor's bytes."""
    w = t.element_size()
    if w not in _UINT:
        raise FormatError(f"cannot store {t.dtype} elements losslessly")
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().view(_UINT[w])


def zigzag(u: np.ndarray) -> np.ndarray:
    w = u.dtype.itemsize
    s = u.view(_INT[w])
    return ((s << 1) ^ (s >> (8 * w - 1))).view(_UINT[w])


def unzigzag(z: np.ndarray) -> np.ndarray:
    one = z.dtype.type(1)
    return (z >> one) ^ (z.dtype.type(0) - (z & one))


def encode_bits(ft: torch.Tensor, base: torch.Tensor | None, *, level: int = entropy.LEVEL,
                bitmap: bool | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(params, parts) storing `ft` exactly against `base` (None: against zeros, i.e. the bits themselves).
    `bitmap`: None tries both layouts where enough elements are unchanged and keeps the smaller."""
    ft = ft.detach().cpu()
    if base is not None:
        base = base.detach().cpu()
        if base.dtype != ft.dtype:  # the rebuild casts the base the same way first
            base = base.to(ft.dtype)
        if base.numel() != ft.numel():
            raise FormatError(f"lossless: base has {base.numel()} elements, fine-tune {ft.numel()}")
    fw = _words(ft)
    z = zigzag(fw - _words(base)) if base is not None else zigzag(fw.copy())
    blob, frames = entropy.encode_planes(z, True, level)
    params: dict = {"dtype": str(ft.dtype).replace("torch.", ""), "bitmap": False, "frames": frames}
    parts = {"planes": blob}
    changed = None
    if bitmap is not False and z.size:
        changed = z != 0
        n_changed = int(changed.sum())
        if bitmap or (z.size - n_changed) >= BITMAP_MIN_UNCHANGED * z.size:
            mblob, mframes = entropy.encode_planes(np.packbits(changed, bitorder="little"), False, level)
            vblob, vframes = entropy.encode_planes(z[changed], True, level)
            if bitmap or len(mblob) + len(vblob) < (1 - BITMAP_MIN_SAVING) * len(blob):
                params = {"dtype": params["dtype"], "bitmap": True, "changed": n_changed, "frames": vframes,
                          "mask_frames": mframes}
                parts = {"planes": vblob, "mask": mblob}
    del z, changed
    out = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.zeros(0, dtype=torch.uint8)
           for k, v in parts.items()}
    return params, out


def rebuild_bits(params: dict, parts: dict[str, torch.Tensor], shape, base: torch.Tensor | None) -> torch.Tensor:
    """The fine-tune tensor, bit for bit, from the stored difference and `base` (None: zeros)."""
    try:
        dtype = getattr(torch, params["dtype"])
        frames = list(params["frames"])
    except (AttributeError, KeyError, TypeError) as e:
        raise FormatError(f"lossless entry has bad params: {e}") from e
    if "planes" not in parts:
        raise FormatError("codec parts missing: ['planes']")
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.empty(n, dtype=dtype)
    width = out.element_size()
    ow = out.view(torch.uint8).numpy().view(_UINT[width]) if n else np.zeros(0, _UINT[width])
    blob = parts["planes"].contiguous().numpy()
    bw = None
    if base is not None:
        base = base.detach().cpu()
        if base.dtype != dtype:
            base = base.to(dtype)
        if base.numel() != n:
            raise FormatError(f"lossless: the base has {base.numel()} elements, the delta {n}")
        bw = _words(base)
    if params.get("bitmap"):
        if "mask" not in parts:
            raise FormatError("codec parts missing: ['mask']")
        mask_bits = entropy.decode_planes(parts["mask"].contiguous().numpy(), list(params["mask_frames"]),
                                          (n + 7) // 8, 1, False)
        changed = np.unpackbits(mask_bits, count=n, bitorder="little").view(bool)
        k = int(params.get("changed", -1))
        if k != int(changed.sum()):
            raise FormatError("lossless bitmap disagrees with its changed count (corrupt delta)")
        z = np.zeros(n, dtype=_UINT[width])
        z[changed] = entropy.decode_planes(blob, frames, k, width, True)
        _unzigzag_add(z, bw)
        ow[:] = z
    else:
        # frame by frame: the planes are joined, unzigzagged and added to the base while in cache
        for s, m, z in entropy.iter_frames(blob, frames, n, width, True, out=ow):
            _unzigzag_add(z, bw[s : s + m] if bw is not None else None)
    return out.reshape(tuple(int(s) for s in shape))


def _unzigzag_add(z: np.ndarray, base_words: np.ndarray | None) -> None:
    """In place: z <- unzigzag(z) + base (mod 2^(8W), the difference was taken the same way)."""
    one = z.dtype.type(1)
    sign = z & one
    z >>= one
    np.negative(sign, out=sign)  # 0 or all ones
    z ^= sign
    if base_words is not None:
        z += base_words


_DTYPE_WIDTH = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
                "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1}


def _frames(params: dict, key: str) -> int:
    """Bytes of the zstd frames a params list records (each frame's size a non-negative int)."""
    f = params.get(key)
    if not isinstance(f, list) or not all(type(x) is int and x >= 0 for x in f):
        raise FormatError(f"codec parameter {key} must be a list of frame sizes")
    return sum(f)


@register_codec
class LosslessCodec(Codec):
    """params: {"dtype", "bitmap", "frames"[, "changed", "mask_frames"]}; parts: planes (uint8 zstd frames)
    [, mask (uint8 zstd frames of the packed changed-element bitmap)]."""

    name = "lossless"
    payload_parts = ("planes", "mask")
    needs_base = True
    entropy_coded = True  # its parts are already zstd: the entropy stage leaves them alone

    @classmethod
    def layout(cls, params, shape):
        dt = params.get("dtype")
        if not isinstance(dt, str) or dt not in _DTYPE_WIDTH:
            raise FormatError(f"codec parameter dtype={dt!r} must be one of {sorted(_DTYPE_WIDTH)}")
        bitmap = params.get("bitmap")
        if type(bitmap) is not bool:
            raise FormatError(f"codec parameter bitmap={bitmap!r} must be true or false")
        out = {"planes": (U8, _frames(params, "frames"))}
        if bitmap:
            pint(params, "changed", 0, shape[0] * shape[1])
            out["mask"] = (U8, _frames(params, "mask_frames"))
        return out

    @classmethod
    def rebuild(cls, params, parts, shape, base):
        return rebuild_bits(params, parts, shape, base)

    @classmethod
    def decode(cls, params, parts, shape):
        raise FormatError("a lossless delta stores bits against the base: decode it with the base (DeltaDir.decode(name, base=...))")
