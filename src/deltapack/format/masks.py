"""Seeded sparsity masks that cost no storage: positions are regenerated from (seed, element index).

A counter-based 32-bit integer hash (no RNG state), so CPU, CUDA and a Triton kernel all produce the same mask for
the same seed, and any block of a tensor can be regenerated on its own. The seed of a tensor is derived from its
name, so two tensors never share a mask.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_M32 = 0xFFFFFFFF


class MaskMemo:
    """Masks kept while a loop decodes the same deltas over and over (healing decodes every tensor at every step):
    a mask is a pure function of its arguments, so a kept one is the regenerated one. Kept until `max_bytes` are
    used, never evicted (the loop visits every tensor in turn, where a least-recently-used policy smaller than the
    whole set would keep nothing useful). Returned tensors are shared: callers only read them."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._kept: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            t = self._kept.get(key)
            if t is not None:
                self.hits += 1
                return t
            self.misses += 1
        t = make()
        size = t.numel() * t.element_size()
        with self._lock:
            if key not in self._kept and self.nbytes + size <= self.max_bytes:
                self._kept[key] = t
                self.nbytes += size
        return t


# process-wide, not per thread or context: backward passes (the recompute of checkpointed layers) run on autograd's
# own threads, and they decode the same masks
_MEMO: MaskMemo | None = None
_MEMO_LOCK = threading.Lock()


@contextmanager
def memoized_masks(max_bytes: int) -> Iterator[MaskMemo]:
    """Within the block, bernoulli_mask and group_keep_indices keep what they make (MaskMemo), up to `max_bytes`,
    in every thread of the process (pure functions: whoever else calls them meanwhile gets the same tensors)."""
    global _MEMO
    memo = MaskMemo(max_bytes)
    with _MEMO_LOCK:
        outer, _MEMO = _MEMO, memo
    try:
        yield memo
    finally:
        with _MEMO_LOCK:
            _MEMO = outer


def _memoized(kind: str, args: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    memo = _MEMO
    return make() if memo is None else memo.get((kind, *args), make)


def seed_for(name: str, salt: int = 0) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:4], "little")


def hash32(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """lowbias32-style mix of (seed, idx) -> uint32 values held in int64. `idx` is left as it is."""
    # one new tensor, then in place: each out-of-place step allocated and wrote a fresh int64 tensor (7x the traffic)
    x = idx.to(torch.int64) * 0x9E3779B1
    x.add_(seed).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    return x


def default_block_elems(device) -> int:
    """Elements hashed per block. On a CPU, blocks that stay in its caches: an int64 temporary of 2^24 elements is
    128 MB and the hash's dozen passes over it were memory-bound (a Bernoulli mask cost 26 ns an element on one
    thread, 2^18-element blocks 4.4 ns; more threads share a larger block); on a GPU, large blocks (few launches)."""
    if torch.device(device).type == "cpu":
        return min(1 << 21, (1 << 18) * max(1, torch.get_num_threads() // 2))
    return 1 << 24


def row_block_hashes(shape: tuple[int, int], seed: int, device="cpu", block_elems: int | None = None,
                     row_range: tuple[int, int] | None = None):
    """(r0, r1, hashes of rows r0:r1) over the matrix (or over its rows `row_range`), about `block_elems` elements a
    block (default: by device, default_block_elems): the int64 temporaries stay bounded whatever the tensor (a 70B
    model's embedding is 1G elements)."""
    rows, cols = shape
    first, last = row_range or (0, rows)
    step = max(1, (block_elems or default_block_elems(device)) // max(cols, 1))
    base = torch.arange(cols, device=device, dtype=torch.int64)
    for r0 in range(first, last, step):
        r1 = min(last, r0 + step)
        idx = torch.arange(r0 * cols, r1 * cols, cols, device=device, dtype=torch.int64).unsqueeze(1) + base
        yield r0, r1, hash32(idx, seed)


def hash_rows(shape: tuple[int, int], r0: int, r1: int, seed: int, device="cpu") -> torch.Tensor:
    """Hashes of rows r0:r1 of the matrix as one (r1 - r0, cols) int64 tensor, made block by block
    (row_block_hashes' sizes): the same values as hash32 of those rows' flat indices."""
    out = torch.empty(r1 - r0, shape[1], dtype=torch.int64, device=device)
    for a, b, h in row_block_hashes(shape, seed, device, row_range=(r0, r1)):
        out[a - r0 : b - r0] = h
    return out


def bernoulli_mask(shape: tuple[int, int], keep_prob: float, seed: int, device="cpu") -> torch.Tensor:
    """Each element kept independently with probability keep_prob."""
    return _memoized("bernoulli", (tuple(shape), float(keep_prob), int(seed), str(torch.device(device))),
                     lambda: _bernoulli_mask(shape, keep_prob, seed, device))


def _bernoulli_mask(shape: tuple[int, int], keep_prob: float, seed: int, device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=torch.bool, device=device)
    thresh = int(keep_prob * 2**32)
    for r0, r1, h in row_block_hashes(shape, seed, device):
        out[r0:r1] = h < thresh
    return out


class BernoulliHashes:
    """One tensor's element hashes, computed once and kept as int32 (hash - 2^31: 4 bytes an element, the order kept
    exactly), so that masks at several keep rates cost a comparison each instead of a rehash of the whole matrix:
    dare's budget fit tries a few rates per tensor, and hashing was most of its encode time. `mask(p)` is
    bit-identical to `bernoulli_mask(shape, p, seed)`, what the decoder regenerates."""

    def __init__(self, shape: tuple[int, int], seed: int, device="cpu"):
        self.shape = shape
        self._h = torch.empty(*shape, dtype=torch.int32, device=device)
        for r0, r1, h in row_block_hashes(shape, seed, device):
            self._h[r0:r1] = h - (1 << 31)

    def mask(self, keep_prob: float) -> torch.Tensor:
        thresh = int(keep_prob * 2**32)  # as bernoulli_mask: kept where hash < thresh
        if thresh > _M32:
            return torch.ones(self.shape, dtype=torch.bool, device=self._h.device)
        return self._h < thresh - (1 << 31)


def group_keep_indices(shape: tuple[int, int], group_size: int, keep: int, seed: int, device="cpu") -> torch.Tensor:
    """Group-wise dropout positions: each row is cut into groups of `group_size` contiguous columns and exactly
    `keep` positions of each group survive (those with the smallest hashes). Returns (rows, n_groups*keep) int64
    column indices, ascending within each group. cols must be a multiple of group_size."""
    rows, cols = shape
    if cols % group_size:
        raise ValueError(f"cols {cols} not a multiple of group size {group_size}")
    return _memoized("group", (tuple(shape), int(group_size), int(keep), int(seed), str(torch.device(device))),
                     lambda: _group_keep_indices(shape, group_size, keep, seed, device))


def _group_keep_indices(shape: tuple[int, int], group_size: int, keep: int, seed: int, device) -> torch.Tensor:
    rows, cols = shape
    groups = cols // group_size
    out = torch.empty(rows, groups * keep, dtype=torch.int64, device=device)
    offs = (torch.arange(groups, device=device, dtype=torch.int64) * group_size).view(1, groups, 1)
    for r0, r1, h in row_block_hashes(shape, seed, device, block_elems=min(1 << 23, default_block_elems(device))):
        h = h.view(r1 - r0, groups, group_size)
        sel = torch.topk(h, keep, dim=-1, largest=False, sorted=False).indices.sort(-1).values
        out[r0:r1] = (sel + offs).view(r1 - r0, groups * keep)
    return out
