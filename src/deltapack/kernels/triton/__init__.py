"""Triton backend ("triton"): batched compressed-delta kernels for a whole mixed-tenant batch, one launch per layer
(per layout family present in the layer), indexed by token, reading the packed codes directly.

    kernels = get_kernels("triton")        # or "auto" on CUDA
    p = kernels.pack(codec, params, parts, shape, dtype=torch.bfloat16, device="cuda")   # load time
    d = kernels.linear(x, tokens, layer)   # (T, out): every token's own tenant's delta, base tokens (-1) zero

Layouts: deltapack.kernels.triton.layouts (qfactors / sign32 / ell / dense / vector); kernels:
deltapack.kernels.triton.kernels; design and measurements: docs/kernels.md. Per layer (LayerDeltas), launch data is
built once per `version` and kept in `layer.cache`: per-slot pointer tables (int64 data pointers of each tenant's
packed tensors, so no tenant is ever copied into a pool), tile tables (row blocks) and segment tables (blocks of
packed codes of one bit width: a rank group, a sign plane, a dense matrix). Per forward, the batch's tokens are
grouped by tenant on the device (`token_blocks`, no host sync, capturable in a CUDA graph) and cached on the
TokenSlots object, so all layers of one forward share it.

What a linear does per layer: dense / sign slots -> one `_seg_kernel` launch; qfactors slots -> `_seg_kernel` for the
V side (z = x A^T into an fp32 (T, max rank) buffer), then `_seg_kernel` for the U side (y = z Bt); ell slots -> one
`_ell_kernel` launch; the results of several families add up. Embedding rows and vectors are gathers done with torch
ops (once per forward).

The module imports triton: where triton is missing the import fails with ImportError (get_kernels reports it). On
CPU tensors the kernels run only under TRITON_INTERPRET=1 (the tests); elsewhere a CPU call is an error.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from deltapack.errors import DeltapackError, FormatError
from deltapack.kernels import DeltaKernels, LayerDeltas, PackedDelta, TokenSlots, register_backend
from deltapack.kernels.reference import ReferenceKernels
from deltapack.kernels.compile import KernelCompiler, Variant, arg_class
from deltapack.kernels.triton.layouts import (
    ELL_ROWS,
    dequant_layout,
    layout_linear,
    layout_rows,
    pack_entry,
    words_per_row,
)

log = logging.getLogger(__name__)


def interpreting() -> bool:
    """Kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with int(1-element array), which numpy >= 2.4
    refuses (TypeError: only 0-dimensional arrays ...); loops with a runtime bound then fail. Take the element."""
    try:
        import numpy as np
        import triton.runtime.interpreter as interp
    except ImportError:  # pragma: no cover
        return
    orig = interp._patch_lang_tensor
    if getattr(orig, "_deltapack_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._deltapack_fixed = True
    interp._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter()

from deltapack.kernels.triton import kernels as _k  # noqa: E402  (after the interpreter fix)

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass
class LaunchConfig:
    """Block sizes and the path and split heuristics. Defaults suit an H100 at decode shapes; tests force `split`."""

    block_r: int = 64  # rows per tile (rank rows on the V side, output rows elsewhere)
    block_k: int = 256  # largest reduction step of the in-place decode path (few tokens per tenant)
    # words of a row's codes per step on that path (K step = words * 32 / bits, at most block_k): 8 words (2-bit:
    # 128 columns) took delta-come 4096x4096 at k=64 from 160 to 139 us against 16 (bench/results/serving_tune.json)
    words_per_step: int = 8
    block_k_dot: int = 64  # reduction step of the tensor-core path
    block_f: int = 32  # reduction step over 16-bit values
    bcast_max_tokens: int = 2  # tokens of one tenant per program on CUDA cores; more use the tensor cores
    max_block_t: int = 16  # tokens of one tenant per program on the tensor cores (more spill registers)
    max_block_t_ell: int = 16  # tokens per program of the sparse kernel (3-D gathers)
    default_tokens: int = 16  # tokens per tenant assumed when the batch composition is unknown on the host
    programs_per_sm: int = 4  # reduction splits aim at this many programs per SM
    split: int | None = None  # force every reduction split (tests)
    # warps of decode-path launches: 2 took delta-come 4096x4096 at k=64 from 152 to 136 us and bitdelta from 174 to
    # 140 us against 4 (bench/results/serving_tune.json)
    num_warps: int = 2
    # warps of tensor-core-path launches (None: num_warps); 4 with at most 128 registers (max_registers_dot):
    # delta-come 4096x4096 at k=8 69.5 us against 72.1 at 2 warps uncapped, bitdelta 69.7 against 72.7, lowrank 26.0
    # against 28.8 (bench/results/serving_tune_registers.json); uncapped, 4 warps were slower than 2
    num_warps_dot: int | None = 4
    # warps of decode-path launches holding only 16-bit values (lowrank factors, dense): at 2 warps the float tile
    # took 255 registers per thread (bench/serving/sass.py) and lowrank fell from 65-70% to 60-64% of the
    # copy rate at k=64 (bench/results/serving.json before and after the 2-warp default)
    num_warps_float: int | None = 4
    # software-pipelining depth of Triton's own pipeliner (it touches only the tensor-core path's loads; a hand-written
    # prefetch on the decode path measured slower and is not used). 1: the tensor-core path at 8 tokens/tenant took 106 us instead of 161 us with the
    # default 3 (bench/results/serving_tune.json, delta-come 4096x4096 k=8); None: Triton's default
    num_stages: int | None = 1
    post_scale: bool = True  # factors with per-rank B scales: the V side applies them (kernels.py docstring)
    # register cap per thread (ptxas maxnreg) of decode-path and tensor-core-path launches; None: the compiler's
    # choice. Uncapped, ptxas gives the tensor-core path 234-255 registers, i.e. 8 warps per SM
    # (bench/results/serving_ncu.json); a cap of 96 or 128 on the decode path changed its times by -8% to +4%
    # across cases (serving_tune_registers.json: faster for delta-come at k=64, slower at k=32 and for bitdelta),
    # so only the tensor-core path is capped
    max_registers: int | None = None
    max_registers_dot: int | None = 128
    # one kernel per layout family (issue 26, cold start): every launch of a family (direct = dense + sign, the V and
    # the U side of factors) compiles the union of the bit widths and scale modes seen in that family (seeded at pack
    # time from every loaded delta), not each layer's own subset. The widths are runtime branches on the segment
    # table (`bits`), so a wider mask adds dead branches, not work; the per-width K step keeps registers alike across
    # widths. False: each layer's own mask (the variants multiply with delta-come's per-tensor bit allocations)
    family_masks: bool = True

    def warps(self, dot: bool, widths: int) -> int:
        """Warps of one _seg_kernel launch: tensor-core path, 16-bit values only (widths == 1), or the decode path."""
        if dot and self.num_warps_dot:
            return self.num_warps_dot
        if widths == 1 and self.num_warps_float:
            return self.num_warps_float
        return self.num_warps


def token_blocks(slot_ids: torch.Tensor, num_slots: int, block_t: int, num_blocks: int):
    """Group a batch's tokens by tenant, on the device, without a host sync (CUDA-graph capturable).

    Returns (order, blk_slot, blk_start, blk_len), int32: `order` = token indices sorted by slot (stable), and for
    each of `num_blocks` blocks its slot (-1 = unused block), its first position in `order` and its token count
    (<= block_t, all of one slot). Slots < 0 or >= num_slots get no block. `num_blocks` must be at least the number
    of blocks needed (sum over slots of ceil(tokens / block_t)); T // block_t + min(T, num_slots) always is."""
    dev = slot_ids.device
    T = slot_ids.numel()
    s = slot_ids.reshape(-1).to(torch.int32)
    s = torch.where((s >= 0) & (s < num_slots), s, torch.full_like(s, -1))
    sorted_s, order = torch.sort(s, stable=True)
    idx = torch.arange(T, device=dev, dtype=torch.int32)
    new = torch.ones(T, dtype=torch.bool, device=dev)
    if T > 1:
        new[1:] = sorted_s[1:] != sorted_s[:-1]
    zero = torch.zeros_like(idx)
    seg_start = torch.cummax(torch.where(new, idx, zero), 0).values
    nxt = torch.where(new, idx, torch.full_like(idx, T))
    e = torch.full_like(idx, T)
    if T > 1:
        e[:-1] = nxt[1:]
    seg_end = torch.flip(torch.cummin(torch.flip(e, [0]), 0).values, [0])
    pos = idx - seg_start
    is_start = (pos % block_t == 0) & (sorted_s >= 0)
    bid = torch.cumsum(is_start.to(torch.int32), 0, dtype=torch.int32) - 1
    target = torch.where(is_start, bid, torch.full_like(bid, num_blocks)).to(torch.int64)
    target = torch.clamp(target, max=num_blocks)  # a too-small num_blocks drops blocks: callers give a bound
    blk_slot = torch.full((num_blocks + 1,), -1, dtype=torch.int32, device=dev).scatter_(0, target, sorted_s)
    blk_start = torch.zeros(num_blocks + 1, dtype=torch.int32, device=dev).scatter_(0, target, idx)
    length = torch.clamp(seg_end - idx, max=block_t)
    blk_len = torch.zeros(num_blocks + 1, dtype=torch.int32, device=dev).scatter_(0, target, length)
    return order.to(torch.int32), blk_slot[:num_blocks], blk_start[:num_blocks], blk_len[:num_blocks]


# ---- per-layer plans ------------------------------------------------------------------------------------------------
MODE_FLOAT, MODE_ROW, MODE_ROWTILE, MODE_COL, MODE_ELEM_ROW, MODE_ELEM_COL, MODE_UNIT = range(7)
POST_NONE, POST_V, POST_U = range(3)  # post-scaled factors (kernels.py docstring): V side scales z, U side adds c


@dataclass
class _SegLaunch:
    """Launch data of one _seg_kernel launch for a layer: per-slot pointers, tiles (row blocks) and segments."""

    ptr: torch.Tensor  # (S, 6) int64: words, scale, zero, floats, post scale, post zero
    tiles: torch.Tensor  # (S, NT, 5) int32: rows, out row, segment row, first segment, segment count
    segs: torch.Tensor  # (S, NSEG, 10) int32: bits, k begin, k length, rows, base, mode, scale base, stride, gs, post
    nt: int
    nseg: int
    widths: int  # bit b: some segment holds b-bit codes; bit 0: 16-bit values
    modes: int  # bit m: some segment has scale mode m
    block_k: int  # K step of the in-place decode path (and of the scale modes' validity)
    block_k_dot: int  # K step of the tensor-core path
    kmax: int  # longest segment (bounds the reduction split)
    sign: bool
    sc_f32: bool
    fdt: object
    width: int  # output columns
    post: int = POST_NONE
    ccol: int = 0  # POST launches: the column of z holding c


@dataclass
class _EllLaunch:
    ptr: torch.Tensor  # (S, 3): col, values, tile_off
    col32: bool
    max_cap: int
    fdt: object
    width: int


@dataclass
class _Call:
    """One prepared kernel launch: its output (zeros until launched) and what a compiler needs to know of it."""

    fn: object | None  # the JITFunction; None: nothing to launch (no token block), `out` is the result
    grid: tuple
    args: tuple
    kwargs: dict
    out: torch.Tensor
    what: str


FAMILY_KINDS = {"direct": ("dense", "sign32"), "factors": ("qfactors",), "ell": ("ell",)}


@dataclass
class _Plan:
    S: int
    K: int
    M: int
    has: list[bool]  # slot has something this backend launches for
    direct: _SegLaunch | None = None
    v: _SegLaunch | None = None
    u: _SegLaunch | None = None
    ell: _EllLaunch | None = None
    rank: int = 0
    keep: list = field(default_factory=list)  # the packed deltas whose pointers the tables hold


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


class _SegBuilder:
    def __init__(self, S: int, block_r: int):
        self.S, self.block_r = S, block_r
        self.ptr = torch.zeros(S, 6, dtype=torch.int64)
        self.tiles: dict[int, list[list[int]]] = {}
        self.segs: dict[int, list[list[int]]] = {}
        self.widths = self.modes = self.kmax = 0

    def seg(self, s: int, bits: int, kbeg: int, klen: int, rows: int, base: int, mode: int, sbase: int, stride: int,
            gs: int, post: int = -1) -> int:
        segs = self.segs.setdefault(s, [])
        segs.append([bits, kbeg, klen, rows, base, mode, sbase, stride, max(1, gs), post])
        self.widths |= 1 if bits >= 16 else 1 << bits
        self.modes |= 1 << mode
        self.kmax = max(self.kmax, klen)
        return len(segs) - 1

    def row_tiles(self, s: int, nrows: int, orow0: int, first: int, count: int) -> None:
        for t0 in range(0, nrows, self.block_r):
            self.tiles.setdefault(s, []).append([min(self.block_r, nrows - t0), orow0 + t0, t0, first, count])

    def build(self, device, *, block_k: int, block_k_dot: int, sign: bool, sc_f32: bool, fdt, width: int,
              post: int = POST_NONE, ccol: int = 0) -> _SegLaunch:
        tiles, segs = _table(self.tiles, self.S, 5), _table(self.segs, self.S, 10)
        return _SegLaunch(self.ptr.to(device), tiles.to(device), segs.to(device), tiles.shape[1], segs.shape[1],
                          self.widths, self.modes, block_k, block_k_dot, self.kmax, sign, sc_f32, fdt, width, post, ccol)


def _block_k(gss: list[int], cap: int) -> tuple[int, dict[int, int]]:
    """K step of a launch whose row-scaled quantized segments have per-row groups of `gss` columns (0: one group
    per row): the largest step (<= cap) that every group size is a multiple of, and each size's scale mode."""
    tiled = sorted({g for g in gss if g})
    for bk in (cap, 128, 64, 32):
        if bk <= cap and all(g % bk == 0 for g in tiled):
            return bk, {g: MODE_ROWTILE for g in tiled}
    return min(cap, 128), {g: MODE_ELEM_ROW for g in tiled}


def _fdt(tensors: list[torch.Tensor], default: torch.dtype):
    dts = {t.dtype for t in tensors if t is not None and t.numel()}
    if len(dts) > 1:
        raise DeltapackError(f"packed deltas of one layer mix float dtypes {sorted(map(str, dts))}")
    return _TL[dts.pop() if dts else default]


def _build_plan(layer: LayerDeltas, device: torch.device, dtype: torch.dtype, cfg: LaunchConfig) -> _Plan:
    slots = layer.slots
    S = len(slots)
    live = [p for p in slots if p is not None]
    M, K = live[0].shape if len(live[0].shape) == 2 else (1, live[0].shape[0])
    plan = _Plan(S=S, K=K, M=M, has=[False] * S, keep=list(live))
    for p in live:
        if p.device != device:
            raise DeltapackError(f"layer {layer.name}: a packed delta is on {p.device}, the batch on {device}")
        if p.kind not in ("qfactors", "sign32", "dense", "ell"):
            raise FormatError(f"layer {layer.name}: the triton backend cannot apply a {p.kind!r} layout as a linear delta")
    BR = cfg.block_r

    # ---- dense + sign: one launch writing the output; rows = output rows ----
    direct = {s: p for s, p in enumerate(slots) if p is not None and p.kind in ("dense", "sign32")}
    if direct:
        b = _SegBuilder(S, BR)
        for s, p in direct.items():
            if p.kind == "dense":
                b.ptr[s, 3] = _ptr(p.tensors["values"])
                first = b.seg(s, 16, 0, K, M, 0, MODE_FLOAT, 0, K, 1)
                b.row_tiles(s, M, 0, first, 1)
            else:
                k = p.meta["planes"]
                b.ptr[s, 0] = _ptr(p.tensors["words"])
                b.ptr[s, 1] = _ptr(p.tensors["scale"])
                wpr = words_per_row(K, 1)
                row_scale = bool(p.meta.get("row_scale"))
                first = None
                for j in range(k):  # one segment per plane, each with its own scale: y = sum_j s_j (2 x.b_j - sum x)
                    i = b.seg(s, 1, 0, K, M, j * M * wpr, MODE_ROW, j * (M if row_scale else 1), 1 if row_scale else 0, K)
                    first = i if first is None else first
                b.row_tiles(s, M, 0, first, k)
            plan.has[s] = True
        bk = cfg.block_k
        plan.direct = b.build(device, block_k=bk, block_k_dot=min(bk, cfg.block_k_dot), sign=True, sc_f32=True,
                              fdt=_fdt([p.tensors.get("values") for p in direct.values()], dtype), width=M)

    # ---- qfactors: V side (rows = rank rows of a group, K = in) into z, then U side (rows = out, K-segments =
    # the groups' rank ranges of z) ----
    qf = {s: p for s, p in enumerate(slots) if p is not None and p.kind == "qfactors" and p.meta["rank"] > 0}
    if qf:
        a_gs = [g["A"]["gs"] if g["A"]["ng"] > 1 else 0 for p in qf.values() for g in p.meta["groups"] if g["bits"] < 16]
        bk, a_mode = _block_k(a_gs, cfg.block_k)
        # post-scaled factors when every quantized B group has one scale per rank index (kernels.py docstring)
        post = cfg.post_scale and all(g["B"]["ng"] == 1 for p in qf.values() for g in p.meta["groups"] if g["bits"] < 16)
        vb, ub = _SegBuilder(S, BR), _SegBuilder(S, BR)
        r16 = {}
        for s, p in qf.items():
            t = p.tensors
            vb.ptr[s] = torch.tensor([_ptr(t["A.words"]), _ptr(t["A.scale"]), _ptr(t["A.zero"]), _ptr(t["A.float"]),
                                      _ptr(t["B.scale"]) if post else 0, _ptr(t["B.zero"]) if post else 0])
            ub.ptr[s, :4] = torch.tensor([_ptr(t["B.words"]), _ptr(t["B.scale"]), _ptr(t["B.zero"]), _ptr(t["B.float"])])
            r16[s] = t["B.float"].shape[1]
            ufirst = None
            for g in p.meta["groups"]:
                r, bits, z0, A, B = g["rows"], g["bits"], g["z"], g["A"], g["B"]
                if bits >= 16:
                    vi = vb.seg(s, 16, 0, K, r, A["f"] * K, MODE_FLOAT, 0, K, 1)
                    ui = ub.seg(s, 16, z0, r, M, B["f"], MODE_FLOAT, 0, r16[s], 1)
                else:
                    mode = MODE_ROW if A["ng"] == 1 else a_mode[A["gs"]]
                    vi = vb.seg(s, bits, 0, K, r, A["words"], mode, A["scale"], A["ng"], A["gs"] if A["ng"] > 1 else K,
                                post=B["scale"] if post else -1)
                    col_ok = B["ng"] == 1 or B["gs"] % BR == 0
                    umode = MODE_UNIT if post else MODE_COL if col_ok else MODE_ELEM_COL
                    ui = ub.seg(s, bits, z0, r, M, B["words"], umode, B["scale"], B["ng"], B["gs"] if B["ng"] > 1 else M)
                vb.row_tiles(s, r, z0, vi, 1)
                ufirst = ui if ufirst is None else ufirst
            ub.row_tiles(s, M, 0, ufirst, len(p.meta["groups"]))
            plan.has[s] = True
        plan.rank = max(p.meta["rank"] for p in qf.values())
        fdt = _fdt([p.tensors["A.float"] for p in qf.values()] + [p.tensors["B.float"] for p in qf.values()], dtype)
        bkd = min(bk, cfg.block_k_dot)
        plan.v = vb.build(device, block_k=bk, block_k_dot=bkd, sign=False, sc_f32=False, fdt=fdt,
                          width=plan.rank + (1 if post else 0), post=POST_V if post else POST_NONE, ccol=plan.rank)
        plan.u = ub.build(device, block_k=cfg.block_k, block_k_dot=cfg.block_k_dot, sign=False, sc_f32=False, fdt=fdt,
                          width=M, post=POST_U if post else POST_NONE, ccol=plan.rank)

    # ---- sparse: ELL ----
    ell = {s: p for s, p in enumerate(slots) if p is not None and p.kind == "ell"}
    if ell:
        ptr = torch.zeros(S, 3, dtype=torch.int64)
        col32 = {p.tensors["col"].dtype == torch.int32 for p in ell.values()}
        if len(col32) > 1:
            raise DeltapackError(f"layer {layer.name}: sparse deltas with int16 and int32 columns")
        max_cap = 0
        for s, p in ell.items():
            t = p.tensors
            if not t["col"].numel():  # no entry at all: nothing to launch for this slot
                continue
            ptr[s] = torch.tensor([_ptr(t["col"]), _ptr(t["values"]), _ptr(t["tile_off"])])
            off = t["tile_off"].long().cpu()
            max_cap = max(max_cap, int(((off[1:] - off[:-1]) // ELL_ROWS).max()))
            plan.has[s] = True
        plan.ell = _EllLaunch(ptr.to(device), col32.pop(), max_cap, _fdt([p.tensors["values"] for p in ell.values()], dtype), M)
    return plan


def _table(per_slot: dict[int, list[list[int]]], S: int, fields: int) -> torch.Tensor:
    width = max(1, max((len(r) for r in per_slot.values()), default=1))
    tab = torch.zeros(S, width, fields, dtype=torch.int64)
    for s, rows in per_slot.items():
        if rows:
            tab[s, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
    if int(tab.abs().max()) >= 2**31:
        raise DeltapackError("a packed delta is too large for the kernels' int32 offsets")
    return tab.to(torch.int32)


# ---- the backend ----------------------------------------------------------------------------------------------------
@register_backend
class TritonKernels(DeltaKernels):
    name = "triton"
    capturable = True  # token blocks are built on the device, launch grids from a bound when groups are unknown

    def __init__(self, config: LaunchConfig | None = None, compiler: KernelCompiler | None = None):
        self.config = config or LaunchConfig()
        self._ref = ReferenceKernels()
        self._sms: dict[torch.device, int] = {}
        # background compilation (deltapack.kernels.compile): None = compile on first launch, as Triton does
        self.compiler = compiler
        self._masks: dict[str, list[int]] = {}  # family -> [widths, modes] union (LaunchConfig.family_masks)
        # the masks are the only state pack() shares: deltas packed in parallel threads (the server's start) and the
        # engine's launches update them under this lock, and the packing itself runs unlocked
        self._masks_lock = threading.Lock()
        self.launches = {"triton": 0, "torch": 0}  # family launches by path (tests, /health)

    @property
    def capturable_now(self) -> bool:
        """A forward may be captured in a CUDA graph now: no launch is waiting for its variant to compile (while
        one is, that launch runs on the torch path, which needs the host's view of the batch)."""
        return self.compiler is None or self.compiler.settled

    # -- load time --
    def pack(self, codec, params, parts, shape, *, dtype, device="cpu") -> PackedDelta:
        packed = pack_entry(codec, params, parts, shape, dtype)
        packed.source = codec
        self._seed_masks(packed)
        return packed.to(device)

    def _seed_masks(self, p: PackedDelta) -> None:
        """Bit widths and scale modes a loaded delta brings to its family's kernels (LaunchConfig.family_masks),
        known at pack time (as _build_plan will choose them) so that the first forward already launches every layer
        with the family's full mask."""
        def add(fam: str, bits: int, mode: int) -> None:
            with self._masks_lock:
                m = self._masks.setdefault(fam, [0, 0])
                m[0] |= 1 if bits >= 16 else 1 << bits
                m[1] |= 1 << mode

        if p.kind == "qfactors":
            for g in p.meta["groups"]:
                if g["bits"] >= 16:
                    add("v", 16, MODE_FLOAT)
                    add("u", 16, MODE_FLOAT)
                    continue
                A, B = g["A"], g["B"]
                add("v", g["bits"], MODE_ROW if A["ng"] == 1 else MODE_ROWTILE if A["gs"] % 32 == 0 else MODE_ELEM_ROW)
                if B["ng"] == 1 and self.config.post_scale:
                    add("u", g["bits"], MODE_UNIT)
                else:
                    add("u", g["bits"], MODE_COL if B["ng"] == 1 or B["gs"] % self.config.block_r == 0 else MODE_ELEM_COL)
        elif p.kind == "sign32":
            add("direct", 1, MODE_ROW)
        elif p.kind == "dense":
            add("direct", 16, MODE_FLOAT)

    def _family_mask(self, fam: str, widths: int, modes: int) -> tuple[int, int]:
        if not self.config.family_masks:
            return widths, modes
        with self._masks_lock:
            m = self._masks.setdefault(fam, [0, 0])
            m[0] |= widths
            m[1] |= modes
            return m[0], m[1]

    # -- helpers --
    def _check_device(self, x: torch.Tensor) -> None:
        if x.device.type != "cuda" and not interpreting():
            raise DeltapackError("the triton kernel backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")

    def _plan(self, layer: LayerDeltas, x: torch.Tensor) -> _Plan:
        plans = layer.cache.setdefault("triton", {})
        key = (x.device, x.dtype)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _build_plan(layer, x.device, x.dtype, self.config)
        return plan

    def _num_sms(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 0
        n = self._sms.get(device)
        if n is None:
            n = self._sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return n

    def _split(self, device, programs: int, most: int) -> int:
        cfg = self.config
        most = max(1, most)
        if cfg.split:
            return max(1, min(cfg.split, most))
        target = self._num_sms(device) * cfg.programs_per_sm
        return max(1, min(most, target // max(1, programs)))

    @staticmethod
    def _host_groups(tokens: TokenSlots):
        return getattr(tokens, "_groups", None)

    def _tokens_per_slot(self, tokens: TokenSlots) -> int:
        """Most tokens any one tenant has in this batch, as far as the host knows (no device sync)."""
        hint = getattr(tokens, "triton_block_t", None)  # set by callers that know the composition (fast path)
        if hint is not None:
            return int(hint)
        groups = self._host_groups(tokens)
        if groups is None:
            return self.config.default_tokens
        return max((int(i.numel()) for _, i in groups), default=1)

    def _block_t(self, tokens: TokenSlots, cap: int) -> int:
        return min(cap, _pow2_at_least(self._tokens_per_slot(tokens)))

    def _blocks(self, tokens: TokenSlots, S: int, block_t: int):
        """Token blocks of this forward (cached on the TokenSlots: every layer of the forward shares them)."""
        cache = tokens.__dict__.setdefault("_triton_blocks", {})
        key = (S, block_t)
        hit = cache.get(key)
        if hit is not None:
            return hit
        T = tokens.num_tokens
        groups = self._host_groups(tokens)
        if groups is not None:  # the exact count (a CUDA graph captured with it must be recaptured for a new batch)
            nb = sum(-(-int(i.numel()) // block_t) for s, i in groups if 0 <= s < S)
        else:  # a bound: surplus programs exit at once
            nb = min(T, T // block_t + min(T, S))
        out = (*token_blocks(tokens.slot_ids, S, block_t, max(nb, 1)), nb)
        cache[key] = out
        return out

    def _present(self, tokens: TokenSlots, plan: _Plan) -> bool:
        """False when the host knows no token of the batch has a delta this backend applies in this layer."""
        groups = self._host_groups(tokens)
        if groups is None:
            return True
        return any(0 <= s < plan.S and plan.has[s] for s, _ in groups)

    # -- launches --
    def _seg_call(self, L: _SegLaunch, x: torch.Tensor, tokens: TokenSlots, S: int, xdt: torch.dtype,
                  out_dtype: torch.dtype, fam: str) -> _Call:
        """One _seg_kernel launch, prepared: (T, L.width) output; fp32 when the reduction is split (atomic adds)."""
        cfg = self.config
        T = x.shape[0]
        per = self._tokens_per_slot(tokens)
        dot = per > cfg.bcast_max_tokens
        bt = min(cfg.max_block_t, max(16, _pow2_at_least(per))) if dot else _pow2_at_least(per)
        order, bslot, bstart, blen, nb = self._blocks(tokens, S, bt)
        bk = L.block_k_dot if dot else L.block_k
        if dot and xdt == torch.float32:
            bk = min(bk, 32)  # fp32 tiles take twice the registers: a 64-column step spills
        split = self._split(x.device, nb * L.nt, triton.cdiv(max(1, L.kmax), bk))
        atomic = split > 1
        out = torch.zeros(T, L.width, dtype=torch.float32 if atomic else out_dtype, device=x.device)
        if nb == 0:
            return _Call(None, (), (), {}, out, "")
        tdt = _TL[xdt]
        widths, modes = self._family_mask(fam, L.widths, L.modes)
        args = (x, x.stride(0), out, out.stride(0), order, bslot, bstart, blen, L.ptr, L.tiles, L.segs, L.nt, L.nseg,
                L.ccol)
        kw = dict(
            BLOCK_T=bt, BLOCK_R=cfg.block_r, BLOCK_K=bk, BLOCK_F=cfg.block_f, SPLIT_K=split, WIDTHS=widths,
            MODES=modes, SIGN=L.sign, SC_F32=L.sc_f32, FDT=L.fdt, XDT=tdt, DOT=dot,
            UPCAST=interpreting() and tdt == tl.bfloat16, IEEE=xdt == torch.float32, ATOMIC=atomic, POST=L.post,
            WORDS=cfg.words_per_step,
            num_warps=cfg.warps(dot, L.widths), **self._options(dot),
        )
        what = f"seg/{fam} {'dot' if dot else 'bcast'} T{bt} K{bk} w{widths:#x} m{modes:#x} {tdt}{' atomic' if atomic else ''}"
        return _Call(_k._seg_kernel, (nb, L.nt, split), args, kw, out, what)

    def _ready(self, call: _Call) -> bool:
        """Whether `call`'s kernel variant may launch now (always, without a compiler); else it is queued."""
        comp = self.compiler
        if comp is None or call.fn is None:
            return True
        fn, kw = call.fn, call.kwargs
        # SPLIT_K / SPLIT_J are runtime ints: their class (1 or not) is part of the key through arg_class
        key = (call.what.split(" ")[0], tuple(arg_class(a) for a in call.args),
               tuple(sorted((k, arg_class(v)) if k.startswith("SPLIT") else (k, str(v)) for k, v in kw.items())))
        mock = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in call.args)
        dev = call.out.device

        def compile_variant():
            if dev.type == "cuda":
                with torch.cuda.device(dev):
                    fn.warmup(*mock, grid=call.grid, **kw)  # compiles (or loads from the disk cache), no launch

        return comp.ready(Variant(key, call.what, compile_variant))

    @staticmethod
    def _go(call: _Call) -> torch.Tensor:
        if call.fn is not None:
            call.fn[call.grid](*call.args, **call.kwargs)
        return call.out

    def _torch_family(self, x: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas, fam: str) -> torch.Tensor:
        """A family's contribution on the pure-torch path (its kernel variant is still compiling)."""
        kinds = FAMILY_KINDS[fam]
        out = None
        for s, idx in tokens.groups():
            p = layer.get(s)
            if p is None or p.kind not in kinds or (p.kind == "qfactors" and p.meta["rank"] == 0):
                continue
            y = layout_linear(p, x.index_select(0, idx))
            if out is None:
                out = torch.zeros(x.shape[0], y.shape[1], dtype=x.dtype, device=x.device)
            out.index_copy_(0, idx, y.to(x.dtype))
        self.launches["torch"] += 1
        return out

    def _options(self, dot: bool) -> dict:
        """Compiler options of a launch beyond its warps."""
        cfg = self.config
        opts = {} if cfg.num_stages is None else {"num_stages": cfg.num_stages}
        cap = cfg.max_registers_dot if dot else cfg.max_registers
        if cap is not None and not interpreting():
            opts["maxnreg"] = cap
        return opts

    def _ell_call(self, L: _EllLaunch, x: torch.Tensor, tokens: TokenSlots, S: int) -> _Call:
        cfg = self.config
        T = x.shape[0]
        bt = self._block_t(tokens, cfg.max_block_t_ell)
        order, bslot, bstart, blen, nb = self._blocks(tokens, S, bt)
        block_j = min(64, max(8, 4096 // (ELL_ROWS * bt)))
        n_m = triton.cdiv(L.width, ELL_ROWS)
        split = self._split(x.device, nb * n_m, triton.cdiv(max(1, L.max_cap), block_j))
        atomic = split > 1
        out = torch.zeros(T, L.width, dtype=torch.float32 if atomic else x.dtype, device=x.device)
        if nb == 0 or L.max_cap == 0:
            return _Call(None, (), (), {}, out, "")
        args = (x, x.stride(0), out, out.stride(0), order, bslot, bstart, blen, L.ptr, L.width)
        kw = dict(BLOCK_T=bt, BLOCK_J=block_j, SPLIT_J=split, ROWS=ELL_ROWS, COL32=L.col32, FDT=L.fdt,
                  UPCAST=interpreting() and x.dtype == torch.bfloat16, ATOMIC=atomic,
                  num_warps=cfg.num_warps, **self._options(False))
        what = f"ell T{bt} J{block_j} {L.fdt}{' col32' if L.col32 else ''}{' atomic' if atomic else ''}"
        return _Call(_k._ell_kernel, (nb, n_m, split), args, kw, out, what)

    # -- the interface --
    def linear(self, x: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        if layer.count == 0 or x.shape[0] == 0:
            return None
        self._check_device(x)
        plan = self._plan(layer, x)
        if not any(plan.has) or not self._present(tokens, plan):
            return None
        x = x.contiguous()
        out = None

        def add(y):
            nonlocal out
            if y is not None:
                out = y if out is None else out + y

        if plan.direct is not None:
            c = self._seg_call(plan.direct, x, tokens, plan.S, x.dtype, x.dtype, "direct")
            add(self._launched(c) if self._ready(c) else self._torch_family(x, tokens, layer, "direct"))
        if plan.v is not None:
            v = self._seg_call(plan.v, x, tokens, plan.S, x.dtype, torch.float32, "v")  # V side: z = x A^T, fp32
            u = self._seg_call(plan.u, v.out, tokens, plan.S, x.dtype, x.dtype, "u")  # U side: y = z B^T
            if self._ready(v) & self._ready(u):  # both asked (and queued), not short-circuited
                self._go(v)
                add(self._launched(u))
            else:
                add(self._torch_family(x, tokens, layer, "factors"))
        if plan.ell is not None:
            c = self._ell_call(plan.ell, x, tokens, plan.S)
            add(self._launched(c) if self._ready(c) else self._torch_family(x, tokens, layer, "ell"))
        return out

    def _launched(self, call: _Call) -> torch.Tensor:
        self.launches["triton"] += 1
        return self._go(call)

    def rows(self, ids: torch.Tensor, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        return ReferenceKernels._per_tenant(
            ids.shape[0], tokens, layer, lambda p, idx: layout_rows(p, ids.index_select(0, idx)),
            lambda r: r.dtype if r.is_floating_point() else torch.float32,
        )

    def vector(self, tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
        return self._ref.vector(tokens, layer)


__all__ = ["TritonKernels", "LaunchConfig", "token_blocks", "interpreting", "dequant_layout", "layout_rows", "pack_entry"]
