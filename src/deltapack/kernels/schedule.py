"""Per-tenant choice between the compressed-delta kernels and a dense GEMM, from measured costs (issue 26).

The kernels read a tenant's packed codes once per block of its tokens (at most 16 tokens a block on the Triton
backend): cheap for the few tokens a tenant has in a mixed decode step, but a tenant that owns many tokens of a
forward (a prefill, or the whole batch when k = 1) has its codes re-read and re-decoded block after block. The
alternative is to dequantize the tenant's delta once into a scratch buffer (out x in, the model dtype) and run one
dense GEMM for all its tokens. Which is faster depends on the layout, the shape, the token count and the device, so
it is not a constant: `CostModel` holds, per (layout kind, out, in), a fit of seconds = a + b * tokens for each path,
measured at warm-up (`calibrate`); `scheduled_linear` sends a tenant's tokens to the dense path when the fitted
dense cost beats the kernel cost by `margin` at that token count.

Only where the host knows the batch's groups (prefill, eager decode steps): inside a captured CUDA graph the token
groups live on the device and every tenant stays on the kernels. Both paths compute x @ dW^T of the same delta:
outputs agree to rounding (tests/test_schedule.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from deltapack.errors import FormatError
from deltapack.kernels import DeltaKernels, LayerDeltas, PackedDelta, TokenSlots

log = logging.getLogger(__name__)

PATHS = ("kernel", "dense")
CALIBRATION_TOKENS = (1, 4, 16, 64, 256, 1024)


def cost_key(p: PackedDelta) -> tuple[str, int, int]:
    m, n = p.shape
    return (p.kind, int(m), int(n))


@dataclass
class Fit:
    a: float  # seconds per call
    b: float  # seconds per token

    def __call__(self, tokens: int) -> float:
        return self.a + self.b * tokens


def fit_line(points: list[tuple[int, float]]) -> Fit:
    """Least-squares a + b * n through (n, seconds), both clamped at >= 0 (a cost never falls with tokens)."""
    if not points:
        raise ValueError("no points to fit")
    if len(points) == 1:
        return Fit(points[0][1], 0.0)
    n = [float(p[0]) for p in points]
    y = [float(p[1]) for p in points]
    mn, my = sum(n) / len(n), sum(y) / len(y)
    var = sum((v - mn) ** 2 for v in n)
    b = max(0.0, sum((v - mn) * (w - my) for v, w in zip(n, y)) / var) if var > 0 else 0.0
    return Fit(max(0.0, my - b * mn), b)


@dataclass
class CostModel:
    """Measured costs per (kind, out, in) and the token count from which the dense path wins."""

    margin: float = 0.9  # dense only when it costs at most this share of the kernel path (timing noise)
    points: dict[tuple, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    fits: dict[tuple, dict[str, Fit]] = field(default_factory=dict)
    dense_from: dict[tuple, int | None] = field(default_factory=dict)  # None: the kernels at every count

    def record(self, key: tuple, path: str, tokens: int, seconds: float) -> None:
        self.points.setdefault(key, {p: [] for p in PATHS})[path].append((int(tokens), float(seconds)))

    def fit(self, max_tokens: int = 1 << 16) -> None:
        for key, pts in self.points.items():
            if not pts["kernel"] or not pts["dense"]:
                continue
            f = {p: fit_line(pts[p]) for p in PATHS}
            self.fits[key] = f
            self.dense_from[key] = self._crossover(f["kernel"], f["dense"], max_tokens)

    def _crossover(self, k: Fit, d: Fit, max_tokens: int) -> int | None:
        """Smallest n >= 1 with d(n) <= margin * k(n), or None (two lines: at most one crossing)."""
        slope = self.margin * k.b - d.b
        if d(1) <= self.margin * k(1):
            return 1
        if slope <= 0:
            return None
        n = math.ceil((d.a - self.margin * k.a) / slope)
        return n if 1 <= n <= max_tokens else None

    def use_dense(self, p: PackedDelta, tokens: int) -> bool:
        n = self.dense_from.get(cost_key(p))
        return n is not None and tokens >= n

    def summary(self) -> dict:
        """JSON-able: per key, the fits (microseconds) and the dense threshold."""
        out = {}
        for key, f in self.fits.items():
            out["%s %dx%d" % key] = {
                "kernel_us": [round(f["kernel"].a * 1e6, 2), round(f["kernel"].b * 1e6, 4)],
                "dense_us": [round(f["dense"].a * 1e6, 2), round(f["dense"].b * 1e6, 4)],
                "dense_from_tokens": self.dense_from.get(key),
            }
        return out


# ---- the dense path -------------------------------------------------------------------------------------------------
def dense_delta(p: PackedDelta, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tenant's dense delta (out x in, base rows) of any backend's layout, written into `out` when given (a
    scratch buffer of that shape) or a new tensor in the layout's float dtype."""
    m, n = p.shape
    t = p.tensors
    if p.kind == "dense":
        d = t["values"]
    elif p.kind == "factors":
        d = t["Bt"].T.float() @ t["A"].float()
    elif p.kind == "sign":
        from deltapack.kernels.reference import unpack_pm1

        d = torch.zeros(m, n, dtype=torch.float32, device=t["signs"].device)
        for j in range(p.meta["planes"]):
            s = t["scale"][j]
            d += unpack_pm1(t["signs"][j * m : (j + 1) * m], n, torch.float32) * (s if s.numel() == 1 else s[:, None])
    elif p.kind == "sparse":
        crow = t["crow"].long()
        rows = torch.repeat_interleave(torch.arange(m, device=crow.device), crow[1:] - crow[:-1])
        d = torch.zeros(m, n, dtype=torch.float32, device=crow.device)
        d.index_put_((rows, t["col"].long()), t["values"].float(), accumulate=True)
    elif p.kind in ("qfactors", "sign32", "ell"):
        from deltapack.kernels.triton.layouts import dequant_layout

        d = dequant_layout(p)
    else:
        raise FormatError(f"packed kind {p.kind!r} has no dense form")
    if out is None:
        return d
    out.copy_(d)
    return out


class Scratch:
    """One reusable buffer per (device, dtype), grown to the largest delta asked for: the dense path of one layer
    is used and dropped before the next layer's, so one buffer serves the whole forward."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (torch.device(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < m * n:
            buf = self._bufs[key] = torch.empty(m * n, dtype=dtype, device=device)
        return buf[: m * n].view(m, n)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def dense_linear(p: PackedDelta, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """x (k, in) @ dW^T through the tenant's dequantized delta: (k, out) in x's dtype."""
    m, n = p.shape
    w = dense_delta(p, scratch.get(m, n, x.dtype, x.device) if scratch is not None else None)
    return x @ w.to(x.dtype).T


def scheduled_linear(kernels: DeltaKernels, costs: CostModel | None, scratch: Scratch | None, x: torch.Tensor,
                     tokens: TokenSlots, layer: LayerDeltas) -> torch.Tensor | None:
    """kernels.linear(x, tokens, layer), except that tenants the cost model sends to the dense path get
    dequantize-once + GEMM. Without host groups (CUDA graphs) or a cost model: the kernels alone."""
    groups = getattr(tokens, "_groups", None)
    if costs is None or not costs.dense_from or groups is None:
        return kernels.linear(x, tokens, layer)
    dense, rest = [], []
    for s, idx in groups:
        p = layer.get(s)
        (dense if p is not None and p.kind != "vector" and costs.use_dense(p, idx.numel()) else rest).append((s, idx))
    if not dense:
        return kernels.linear(x, tokens, layer)
    out = None
    if rest:
        # the other tenants' tokens, as a TokenSlots shared by every layer of this forward that splits alike (a
        # backend caches per-forward data, e.g. token blocks, on it)
        subs = tokens.__dict__.setdefault("_schedule_subs", {})
        key = tuple(s for s, _ in dense)
        sub = subs.get(key)
        if sub is None:
            ids = tokens.slot_ids.clone()
            for _, idx in dense:
                ids[idx] = -1  # the kernels skip base tokens
            sub = subs[key] = TokenSlots(ids, rest)
        out = kernels.linear(x, sub, layer)
    for s, idx in dense:
        y = dense_linear(layer.get(s), x.index_select(0, idx), scratch)
        if out is None:
            out = torch.zeros(x.shape[0], y.shape[1], dtype=x.dtype, device=x.device)
        out.index_copy_(0, idx, y.to(out.dtype))
    return out


# ---- calibration ----------------------------------------------------------------------------------------------------
def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of fn() (after one untimed call), synchronising a CUDA device around each."""
    cuda = torch.device(device).type == "cuda"

    def once() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    return sorted(once() for _ in range(max(1, repeats)))[max(1, repeats) // 2]


Measure = Callable[[str, tuple, int, Callable[[], object]], float]


@torch.inference_mode()
def calibrate(kernels: DeltaKernels, layers: dict[str, LayerDeltas], *, dtype: torch.dtype, device,
              max_tokens: int = 1024, counts: tuple[int, ...] = CALIBRATION_TOKENS, measure: Measure | None = None,
              costs: CostModel | None = None, scratch: Scratch | None = None) -> CostModel:
    """Measure both paths for one resident tenant of every (kind, out, in) in `layers` at `counts` tokens (up to
    max_tokens) and fit the cost model. `measure(path, key, tokens, fn)` returns seconds (default: time_call)."""
    costs = costs or CostModel()
    scratch = scratch or Scratch()
    dev = torch.device(device)
    measure = measure or (lambda path, key, n, fn: time_call(fn, dev))
    seen: dict[tuple, tuple[LayerDeltas, int]] = {}
    for lay in layers.values():
        for s, p in enumerate(lay.slots):
            if p is not None and p.kind != "vector" and len(p.shape) == 2 and not p.replace:
                seen.setdefault(cost_key(p), (lay, s))
    gen = torch.Generator(device="cpu").manual_seed(0)
    for key, (lay, s) in seen.items():
        p = lay.get(s)
        for n in counts:
            if n > max_tokens:
                continue
            x = (torch.randn(n, p.shape[1], generator=gen) * 0.1).to(device=dev, dtype=dtype)
            tokens = TokenSlots(torch.full((n,), s, dtype=torch.int64, device=dev),
                                [(s, torch.arange(n, device=dev))])
            costs.record(key, "kernel", n, measure("kernel", key, n, lambda: kernels.linear(x, tokens, lay)))
            costs.record(key, "dense", n, measure("dense", key, n, lambda: dense_linear(p, x, scratch)))
    costs.fit(max_tokens=1 << 16)
    for key, n in costs.dense_from.items():
        log.info("cost model %s: dense path from %s tokens", key, n if n is not None else "never")
    return costs


__all__ = ["CostModel", "Fit", "fit_line", "cost_key", "dense_delta", "dense_linear", "Scratch", "scheduled_linear",
           "calibrate", "time_call", "CALIBRATION_TOKENS"]
