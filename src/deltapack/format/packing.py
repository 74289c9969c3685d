"""Bit packing of integer codes of width 1..8 into uint8, row by row.

Layout (also in docs/format.md): each row of `cols` codes is cut into blocks of 8 codes; a block of b-bit codes
occupies exactly b bytes, code k of the block in bits [k*b, (k+1)*b) of the block's little-endian b-byte word. A row
therefore takes ceil(cols/8)*b bytes (8-bit codes: plain bytes, `cols` per row) and every block starts on a byte boundary, which lets a GPU kernel fetch the
b bytes of 8 codes with one aligned load, for 3-bit codes too. Padding codes are zero.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_CHUNK_ROWS_ELEMS = 1 << 22  # bound temporary int64 memory to ~32 MB per chunk (a few such arrays live at once)


def packed_row_bytes(cols: int, bits: int) -> int:
    if bits == 8:  # plain bytes, no block padding
        return cols
    return ((cols + 7) // 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: (rows, cols) integer tensor with values in [0, 2**bits). Returns (rows, packed_row_bytes) uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if codes.dim() == 1:
        codes = codes.unsqueeze(0)
    rows, cols = codes.shape
    if rows == 0 or cols == 0:
        return torch.zeros(rows, packed_row_bytes(cols, bits), dtype=torch.uint8, device=codes.device)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    blocks = (cols + 7) // 8
    out = torch.empty(rows, blocks * bits, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    step = max(1, _CHUNK_ROWS_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        c = codes[r0 : r0 + step].to(torch.int64)
        if int(c.min()) < 0 or int(c.max()) >= (1 << bits):
            raise ValueError(f"code out of range for {bits} bits")
        if cols % 8:
            c = torch.nn.functional.pad(c, (0, blocks * 8 - cols))
        word = (c.view(c.shape[0], blocks, 8) << shifts).sum(-1)  # (r, blocks) int64, <= 64 bits used
        by = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # (r, blocks, bits)
        out[r0 : r0 + step] = by.reshape(c.shape[0], blocks * bits).to(torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_bits. Returns (rows, cols) uint8 codes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes")
    if packed.dim() == 1:
        packed = packed.unsqueeze(0)
    rows = packed.shape[0]
    blocks = (cols + 7) // 8
    if packed.shape[1] != packed_row_bytes(cols, bits):
        raise ValueError(
            f"packed row has {packed.shape[1]} bytes, expected {packed_row_bytes(cols, bits)} for {cols}x{bits}-bit"
        )
    if bits == 8:
        return packed.contiguous()
    out = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    mask = (1 << bits) - 1
    step = max(1, _CHUNK_ROWS_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        p = packed[r0 : r0 + step].to(torch.int64).view(-1, blocks, bits)
        word = (p << byte_shifts).sum(-1)  # (r, blocks)
        c = (word.unsqueeze(-1) >> shifts) & mask  # (r, blocks, 8)
        out[r0 : r0 + step] = c.reshape(p.shape[0], blocks * 8)[:, :cols].to(torch.uint8)
    return out
