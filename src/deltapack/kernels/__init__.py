"""Batched delta kernels: the interface the serving engine calls once per layer for a whole mixed-tenant batch.

The engine runs the base model once for every token of the batch and, for each weight that some resident tenant
changes, asks a kernel backend for the delta contribution of every token's own tenant:

    y = base(x) + kernels.linear(x, tokens, layer)        # x: (T, in), result (T, out)

  * `tokens` (`TokenSlots`) holds the tenant slot of every token, shape (T,), -1 = the base model (no delta). A
    backend may index by token directly (the planned Triton kernel: one launch, no sort by tenant) or use the
    precomputed per-slot token groups (the pure-torch reference: one matmul chain per tenant present).
  * `layer` (`LayerDeltas`) holds, for one weight of the model, the resident `PackedDelta` of every device slot
    (None where that slot's tenant leaves the weight unchanged). Its `version` changes whenever a slot changes, so a
    backend can cache derived launch data (stacked pools, pointer tables) in `layer.cache`.
  * a `PackedDelta` is one tenant's delta of one weight in the backend's resident layout, built once at load time
    by `kernels.pack(...)` from the stored codec parts. Its `nbytes()` is what the tier budgets count.

Layouts of the reference backend (`deltapack.kernels.reference`), by `PackedDelta.kind`:
  dense    values (out x in)                          y += x @ values.T
  factors  A (r x in), Bt (r x out), dequantized      y += (x @ A.T) @ Bt
  sign     signs (planes*out x ceil(in/8)) uint8 packed 1-bit rows, scale (planes x out|1) fp32
                                                      y += sum_j scale_j * (x @ (2*bits_j - 1).T), bits
                                                      unpacked per call, a block of rows at a time
  sparse   CSR: crow (out+1) int32, col (nnz) int16 (int32 past 32768 columns), values (nnz)
                                                      y[:, r] += sum_k values[k] * x[:, col[k]]
  vector   values (n,)                                biases / norm weights: per-token row of values
Vocabulary growth rows (`extra_rows`, dense g x in) and tensors absent from the base (`replace`) are carried on the
PackedDelta and handled by the model wrappers (`deltapack.serve.model`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from deltapack.errors import DeltapackError, FormatError
from deltapack.format.packing import packed_row_bytes

KINDS = ("dense", "factors", "sign", "sparse", "vector")


@dataclass
class PackedDelta:
    """One tenant's delta of one weight tensor, resident on one device in a kernel-ready layout."""

    kind: str  # one of KINDS for the reference backend; other backends add their own (triton: qfactors, sign32, ell)
    shape: tuple[int, ...]  # (out, in) covered by the layout (base rows only under vocabulary growth); (n,) for vectors
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # small python facts (e.g. sign planes)
    extra_rows: torch.Tensor | None = None  # vocabulary growth: full rows [shape[0], shape[0]+g) of the tenant's tensor
    replace: bool = False  # tensor absent from the base: the tenant's tensor is the delta itself (base is dropped)
    source: str = ""  # stored codec it was packed from (for reports)
    # derived tensors a backend keeps for this device copy (e.g. the dequantized A side of factors for row lookups);
    # not part of the layout, not counted by nbytes
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if self.extra_rows is not None:
            n += self.extra_rows.numel() * self.extra_rows.element_size()
        return n

    @property
    def device(self) -> torch.device:
        for t in self.tensors.values():
            return t.device
        return torch.device("cpu")

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "PackedDelta":
        dev = torch.device(device)
        if self.device == dev:
            return self
        return PackedDelta(
            self.kind,
            self.shape,
            {k: v.to(dev, non_blocking=non_blocking) for k, v in self.tensors.items()},
            dict(self.meta),
            None if self.extra_rows is None else self.extra_rows.to(dev, non_blocking=non_blocking),
            self.replace,
            self.source,
        )


class LayerDeltas:
    """The resident deltas of one weight across device slots: `slots[s]` is slot s's PackedDelta or None."""

    def __init__(self, name: str):
        self.name = name
        self.slots: list[PackedDelta | None] = []
        self.version = 0
        self.cache: dict = {}  # backend-owned launch data, valid for `version`
        self.count = 0  # slots holding a delta
        self.max_extra_rows = 0  # widest vocabulary growth among resident slots
        self.replace_slots: set[int] = set()

    def get(self, slot: int) -> PackedDelta | None:
        return self.slots[slot] if 0 <= slot < len(self.slots) else None

    def set(self, slot: int, packed: PackedDelta | None) -> None:
        if slot >= len(self.slots):
            self.slots.extend([None] * (slot + 1 - len(self.slots)))
        self.slots[slot] = packed
        self.version += 1
        self.cache.clear()
        live = [p for p in self.slots if p is not None]
        self.count = len(live)
        self.max_extra_rows = max([0] + [p.extra_rows.shape[0] for p in live if p.extra_rows is not None])
        self.replace_slots = {i for i, p in enumerate(self.slots) if p is not None and p.replace}


class TokenSlots:
    """Tenant slot of every token of one forward, flattened to (T,). -1 = base model.

    `groups` (slot -> token indices) is precomputed from per-row slots on the host by the engine, so the reference
    backend needs no device sync to find them; a token-indexed kernel reads `slot_ids` only.
    """

    def __init__(self, slot_ids: torch.Tensor, groups: list[tuple[int, torch.Tensor]] | None = None):
        self.slot_ids = slot_ids
        self._groups = groups

    @property
    def num_tokens(self) -> int:
        return self.slot_ids.shape[0]

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, token indices) for every slot >= 0 present, token indices ascending."""
        if self._groups is None:
            out = []
            for s in torch.unique(self.slot_ids).tolist():
                if s >= 0:
                    out.append((int(s), torch.nonzero(self.slot_ids == s).view(-1)))
            self._groups = out
        return self._groups

    @classmethod
    def from_rows(cls, row_slots: list[int], tokens_per_row: int, device) -> "TokenSlots":
        """Every row b of a (B, L) block of tokens belongs to tenant slot row_slots[b]."""
        L = tokens_per_row
        ids = torch.tensor(row_slots, dtype=torch.int64, device=device).repeat_interleave(L)
        by_slot: dict[int, list[int]] = {}
        for b, s in enumerate(row_slots):
            if s >= 0:
                by_slot.setdefault(s, []).append(b)
        groups = []
        for s, rows in sorted(by_slot.items()):
            r = torch.tensor(rows, dtype=torch.int64, device=device)
            idx = (r[:, None] * L + torch.arange(L, device=device)[None, :]).reshape(-1)
            groups.append((s, idx))
        return cls(ids, groups)


class DeltaKernels(ABC):
    """A backend that packs stored deltas into its resident layout and applies them to mixed-tenant batches."""

    name: ClassVar[str] = ""
    # linear() and vector() need no host view of the batch (no TokenSlots.groups): a forward through them can be
    # captured once in a CUDA graph and replayed for any mix of tenants
    capturable: ClassVar[bool] = False

    @abstractmethod
    def pack(
        self,
        codec: str,
        params: dict,
        parts: dict[str, torch.Tensor],
        shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> PackedDelta:
        """Convert one stored tensor (codec, params, parts; `shape` = the codec's shape, base rows only) into the
        resident layout. Runs at load time, never per token."""

    @abstractmethod
    def linear(self, x: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        """x: (T, in) hidden states of the whole batch. Returns (T, out): x_t @ dW_{slot(t)}^T for every token whose
        slot has a delta in `layer` (zero rows elsewhere), or None when no token of the batch has one."""

    @abstractmethod
    def rows(self, ids: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        """Embedding lookups: ids (T,) token ids (< the tenant's vocabulary). Returns (T, dim): row ids[t] of
        dW_{slot(t)} (vocabulary growth rows included), or None when no token has a delta."""

    @abstractmethod
    def vector(self, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        """1-D deltas (biases, norm weights): (T, n) = dv_{slot(t)}, or None when no token has one."""


def sign_parts(params: dict, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The sign codec's stored parts, checked: (packed sign rows (planes*m, ceil(n/8)) uint8, scales (planes, 1 or m)
    fp32, planes). Shared by every backend's sign layout."""
    m, n = shape
    if "signs" not in parts or "scale" not in parts:
        raise FormatError("sign codec parts missing (signs, scale)")
    k = int(params.get("planes", 1))
    signs = parts["signs"].to(torch.uint8)
    if signs.dim() == 1:
        signs = signs.view(k * m, -1)
    if tuple(signs.shape) != (k * m, packed_row_bytes(n, 1)):
        raise FormatError(f"sign codes have shape {list(signs.shape)}, expected {[k * m, packed_row_bytes(n, 1)]}")
    scale = parts["scale"].float().reshape(k, -1)
    if scale.shape[1] not in (1, m):
        raise FormatError(f"sign scales have {scale.shape[1]} entries per plane, expected 1 or {m}")
    return signs, scale, k


def rows_with_growth(p: PackedDelta, ids: torch.Tensor, base_rows_of) -> torch.Tensor:
    """Rows `ids` of one tenant's delta, for any layout: ids past the base vocabulary take the tenant's own added
    rows (`extra_rows`), the others come from `base_rows_of(p, ids)` (ids clamped below the base row count)."""
    base_rows, n = p.shape
    grown = ids >= base_rows
    if p.extra_rows is not None and bool(grown.any()):
        out = torch.zeros(ids.shape[0], n, dtype=p.extra_rows.dtype, device=ids.device)
        keep = torch.nonzero(~grown).view(-1)
        new = torch.nonzero(grown).view(-1)
        if keep.numel():
            out[keep] = base_rows_of(p, ids[keep].clamp(max=base_rows - 1)).to(out.dtype)
        out[new] = p.extra_rows[ids[new] - base_rows]
        return out
    return base_rows_of(p, ids.clamp(max=base_rows - 1))


BACKENDS: dict[str, type[DeltaKernels]] = {}


def register_backend(cls: type[DeltaKernels]) -> type[DeltaKernels]:
    BACKENDS[cls.name] = cls
    return cls


def _load_triton() -> str | None:
    """Import the optional Triton backend (it registers itself); the reason it is unavailable, or None."""
    import importlib

    try:
        importlib.import_module("deltapack.kernels.triton")
    except ImportError as e:
        return str(e)
    return None if "triton" in BACKENDS else "deltapack.kernels.triton registered no backend"


def get_kernels(name: str = "auto", device: str | torch.device = "cpu") -> DeltaKernels:
    """A kernel backend by name. "auto": a "triton" backend (`deltapack.kernels.triton`) on CUDA when present,
    else the pure-torch reference."""
    import deltapack.kernels.reference  # noqa: F401  (registers "reference")

    if name == "auto":
        if torch.device(device).type == "cuda" and _load_triton() is None:
            return BACKENDS["triton"]()
        return BACKENDS["reference"]()
    if name == "triton" and name not in BACKENDS:
        why = _load_triton()
        if why:
            raise DeltapackError(f"kernel backend 'triton' is not available: {why}")
    if name not in BACKENDS:
        raise DeltapackError(f"unknown kernel backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()


__all__ = ["KINDS", "rows_with_growth", "sign_parts", "PackedDelta", "LayerDeltas", "TokenSlots", "DeltaKernels", "BACKENDS", "register_backend", "get_kernels"]
