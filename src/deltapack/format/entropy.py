"""Lossless entropy coding of stored bytes: zstd frames over byte planes (spec: docs/format.md, "Entropy coding").

Two users:
  * the `lossless` codec (format/codec_lossless.py): the fine-tune's bits minus the base's, zigzagged, one byte plane
    per byte of the word, each plane zstd-coded;
  * the entropy stage for every other codec: a stored part (codes, values, scales...) is written zstd-coded, as
    one stream or as byte planes, when that saves at least `MIN_SAVING` of its bytes, and decoded when it is read
    (`DeltaDir.parts`), so everything downstream (merge, serving layouts) sees the same tensors as before.

Byte planes: plane k holds byte k (little-endian) of every element. The bytes of one position in a float or integer
word have very different statistics (bf16: the high byte is sign + exponent, nearly constant; the low byte mantissa
noise); coding them as separate streams lets zstd's Huffman stage fit one table to each.

Streams are cut into frames of at most `FRAME_ELEMENTS` elements, so encoding and decoding hold one frame's
temporaries at a time whatever the tensor's size (a 70B model's embedding is 1G elements).

Why zstd (the `zstandard` package), level 1: measured on real SmolLM2-135M deltas (bench/lossless/run.py, see
docs/methods/lossless.md) it came within a few percent of the planes' order-0 entropy and decodes at about 1 GB/s
per core; higher levels spend their time looking for repeated strings that weight noise does not have (level 3 came
out *larger* than level 1 on these planes, level 19 a few percent smaller at ~100x the encode time).
"""

from __future__ import annotations

import threading

import numpy as np

from deltapack.errors import DeltapackError, FormatError

FRAME_ELEMENTS = 1 << 20  # elements per zstd frame: bounds temporaries whatever the tensor, keeps decode passes in cache
LEVEL = 1
MIN_SAVING = 0.05  # the entropy stage keeps a part zstd-coded only when that saves at least 5% of its bytes
MIN_PART_BYTES = 256  # below this a zstd frame's header eats any saving

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _zstd():
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise DeltapackError("the zstandard package is needed for entropy-coded deltas: pip install zstandard") from e
    return zstandard


# zstd contexts are not thread-safe (one used from two threads corrupts frames: seen with deltas loaded in parallel
# by the server), so each thread keeps its own; creating one is cheap, reusing it saves its buffers
_CONTEXTS = threading.local()


def compressor(level: int = LEVEL):
    cctx = getattr(_CONTEXTS, "cctx", None)
    if cctx is None:
        cctx = _CONTEXTS.cctx = {}
    c = cctx.get(level)
    if c is None:
        c = cctx[level] = _zstd().ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return c


def decompressor():
    d = getattr(_CONTEXTS, "dctx", None)
    if d is None:
        d = _CONTEXTS.dctx = _zstd().ZstdDecompressor()
    return d


def uint_view(a: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers of the element's width (1, 2, 4 or 8 bytes)."""
    w = a.dtype.itemsize
    if w not in _UINT:
        raise FormatError(f"cannot entropy-code elements of {w} bytes")
    return a.view(_UINT[w])


def encode_planes(words: np.ndarray, planes: bool, level: int = LEVEL) -> tuple[bytes, list[int]]:
    """zstd frames of a flat unsigned array: frame by frame, within a frame plane by plane (byte 0 first) when
    `planes`, else the raw bytes. Returns (blob, frame sizes in order)."""
    w = words.dtype.itemsize
    c = compressor(level)
    out, sizes = [], []
    for s in range(0, max(1, words.size), FRAME_ELEMENTS):
        chunk = np.ascontiguousarray(words[s : s + FRAME_ELEMENTS])
        if planes and w > 1:
            b = chunk.view(np.uint8).reshape(-1, w)
            streams = [np.ascontiguousarray(b[:, k]) for k in range(w)]
        else:
            streams = [chunk.view(np.uint8)]
        for st in streams:
            f = c.compress(st.data)
            out.append(f)
            sizes.append(len(f))
    return b"".join(out), sizes


def iter_frames(blob, sizes: list[int], n: int, width: int, planes: bool, out: np.ndarray | None = None):
    """Decode `encode_planes` output frame by frame: yields (start, count, words) with `words` the frame's `count`
    unsigned words of `width` bytes, ours to modify (a fresh array, or the frame's slice of `out` when given, already
    written). Frames are small (FRAME_ELEMENTS), so a caller's elementwise passes over one stay in cache."""
    d = decompressor()
    per = width if (planes and width > 1) else 1
    n_frames = max(1, -(-n // FRAME_ELEMENTS))
    if len(sizes) != n_frames * per or sum(sizes) != len(blob):
        raise FormatError(f"entropy-coded data: {len(sizes)} frames of {sum(sizes)} bytes recorded, "
                          f"{n_frames * per} frames of {len(blob)} bytes expected (truncated or corrupt)")
    mv = memoryview(blob)
    pos = k = 0
    zerr = _zstd().ZstdError
    utype = _UINT[width]
    for s in range(0, max(1, n), FRAME_ELEMENTS):
        m = min(FRAME_ELEMENTS, n - s)
        words = None
        for p in range(per):
            expect = m if per > 1 else m * width
            try:
                # the frame header's content size decides the allocation: check it first (a forged frame could
                # claim terabytes)
                if _zstd().frame_content_size(mv[pos : pos + sizes[k]]) != expect:
                    raise FormatError(f"entropy-coded data: a frame declares another size than the {expect} bytes expected")
                raw = d.decompress(mv[pos : pos + sizes[k]])
            except zerr as e:
                raise FormatError(f"entropy-coded data: corrupt zstd frame: {e}") from e
            if len(raw) != expect:
                raise FormatError(f"entropy-coded data: a frame holds {len(raw)} bytes, expected {expect}")
            src = np.frombuffer(raw, dtype=np.uint8)
            if per == 1:
                src = src.view(utype) if width > 1 else src
                if out is not None:
                    words = out[s : s + m]
                    words[:] = src
                else:
                    words = src.copy()
            elif p == 0:
                if out is not None:
                    words = out[s : s + m]
                    np.copyto(words, src, casting="unsafe")  # widening copy straight into place
                else:
                    words = src.astype(utype)
            else:  # byte p of every word: shifts of whole vectors beat strided byte copies
                hi = src.astype(utype)
                hi <<= utype(8 * p)
                words |= hi
            pos += sizes[k]
            k += 1
        yield s, m, words


def decode_planes(blob, sizes: list[int], n: int, width: int, planes: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `encode_planes`: `n` unsigned words of `width` bytes (written into `out` when given)."""
    words = out if out is not None else np.empty(n, dtype=_UINT[width])
    if words.size != n or words.dtype.itemsize != width:
        raise FormatError("entropy-coded data: output buffer does not fit")
    for _ in iter_frames(blob, sizes, n, width, planes, out=words):
        pass
    return words


# ---- the entropy stage for stored parts ---------------------------------------------------------------------------
def encode_part(t, level: int = LEVEL) -> tuple[np.ndarray, dict] | None:
    """zstd-code one stored part (a CPU torch tensor) when that saves >= MIN_SAVING: (uint8 blob, record) or None.
    Tries the raw bytes and, for multi-byte elements, the byte planes; keeps the smaller."""
    import torch

    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_PART_BYTES or t.element_size() not in _UINT:
        return None
    flat = t.detach().contiguous().reshape(-1)
    words = flat.view(torch.uint8).numpy().view(_UINT[t.element_size()])
    best = None
    for planes in ((False, True) if t.element_size() > 1 else (False,)):
        blob, sizes = encode_planes(words, planes, level)
        if best is None or len(blob) < len(best[0]):
            best = (blob, sizes, planes)
    blob, sizes, planes = best
    if len(blob) > nbytes * (1 - MIN_SAVING):
        return None
    rec = {"coder": "zstd", "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "planes": planes,
           "frames": sizes}
    return np.frombuffer(blob, dtype=np.uint8), rec


def encode_parts(parts: dict) -> tuple[dict, dict[str, dict]]:
    """The entropy stage over one tensor's parts: each part zstd-coded (whole or by byte planes) where that saves >=
    MIN_SAVING of its bytes. Returns (parts as stored: a uint8 tensor per coded part, the others unchanged;
    {part: record} for the coded ones). The writer (compress/assemble.py) and the budget fit that sizes encodings by
    their coded bytes (methods/base.py coded_nbytes) both call this, so they cannot disagree."""
    import torch

    out, coded = {}, {}
    for k, t in parts.items():
        r = encode_part(t.detach().cpu())
        if r is None:
            out[k] = t
        else:
            out[k], coded[k] = torch.from_numpy(r[0].copy()), r[1]
    return out, coded


def decode_part(blob, rec: dict):
    """Inverse of `encode_part`: the original torch tensor (CPU)."""
    import torch

    if rec.get("coder") != "zstd":
        raise FormatError(f"unknown entropy coder {rec.get('coder')!r}")
    try:
        dtype = getattr(torch, rec["dtype"])
        shape = [int(s) for s in rec["shape"]]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise FormatError(f"bad entropy-coding record {rec}: {e}") from e
    width = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = blob.contiguous().view(torch.uint8).numpy() if isinstance(blob, torch.Tensor) else blob
    words = decode_planes(memoryview(raw), list(rec["frames"]), n, width, bool(rec["planes"]))
    return torch.from_numpy(words.view(np.uint8)).view(dtype).reshape(shape)
