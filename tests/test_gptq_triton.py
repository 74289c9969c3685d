"""GPTQ's Triton column kernel (deltapack.quant.gptq_triton) under Triton's CPU interpreter: bit-identical to the
torch column loop for every grid orientation, group layout and width mix, on column segments, inside delta-come's
encode; and a kernel that cannot compile falls back to the torch loop (auto) or raises (backend="triton").

Sizes stay small (blocksize 32, tens of rows): the interpreter runs each program's column loop in numpy.

"Identical" allows for one thing: torch's CPU addr_ uses an fma in its vectorised body but two roundings in the
scalar tail of a row, so the torch loop's error propagation itself is fma only most of the time (on CUDA it is fma
throughout, like the kernel). The updated W may then differ by an ulp, which can flip a rounding rarely: the checks
accept up to 0.2% differing codes (on this machine there are none)."""

from __future__ import annotations

import importlib
import os
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: the kernel runs on CPU tensors

import pytest
import torch

pytest.importorskip("triton")

import deltapack.methods  # noqa: E402,F401  (import order: format <-> quant)
from deltapack.quant import gptq as G  # noqa: E402

if "deltapack.quant.gptq_triton" in sys.modules:  # imported earlier without the interpreter: decorate again
    importlib.reload(sys.modules["deltapack.quant.gptq_triton"])
from deltapack.quant import gptq_triton as GT  # noqa: E402

from deltapack.methods import TensorJob, get_method  # noqa: E402


def _calib(cols: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * (torch.rand(cols, generator=g) ** 3)[None, :]
    X = torch.randn(n, cols, generator=g) @ mix + 0.05 * torch.randn(n, cols, generator=g)
    return X.T @ X


CODE_SLACK = 0.002  # share of codes allowed to differ (see the module docstring)


def _assert_identical(a: G.GPTQResult, b: G.GPTQResult, exact: bool = False) -> None:
    """Codes, grids and dequantized values agree (bit for bit where `exact`; else up to rare ulp-driven flips)."""
    differ = float((a.codes != b.codes).float().mean())
    if exact:
        assert torch.equal(a.codes, b.codes) and torch.equal(a.dequantized, b.dequantized), differ
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        return
    assert differ <= CODE_SLACK, differ
    torch.testing.assert_close(a.scale.float(), b.scale.float(), rtol=1e-3, atol=0)
    torch.testing.assert_close(a.zero.float(), b.zero.float(), rtol=1e-3, atol=1e-6)
    same = (a.codes == b.codes) if a.codes.shape == a.dequantized.shape else (a.codes == b.codes).T
    torch.testing.assert_close(a.dequantized[same], b.dequantized[same], rtol=1e-6, atol=1e-7)


CASES = [
    # rows, cols, grid, group size, act_order, mixed widths
    (24, 100, "row", 32, True, True),  # static grids (act-order), partial last block
    (24, 100, "row", None, True, False),  # one grid per row, one width
    (20, 90, "row", 32, False, True),  # dynamic grids aligned with the blocks
    (20, 90, "row", 24, False, True),  # dynamic grids across block edges: segmented kernel launches
    (20, 90, "row", None, False, True),  # one dynamic grid per row spanning all blocks
    (70, 40, "col", 16, False, True),  # output side: one grid per column, narrowest widths first
    (70, 40, "col", None, False, True),
]


@pytest.mark.parametrize("rows,cols,grid,gs,act,mixed", CASES)
def test_kernel_matches_torch_loop_bit_for_bit(rows, cols, grid, gs, act, mixed):
    g = torch.Generator().manual_seed(rows * cols)
    W = torch.randn(rows, cols, generator=g)
    H = _calib(cols, seed=cols)
    units = rows if grid == "row" else cols
    bits = torch.tensor([8, 4, 3, 2, 1])[torch.randint(0, 5, (units,), generator=g)] if mixed else 3
    order = torch.argsort(bits, stable=True) if grid == "col" else None
    kw = dict(group_size=gs, blocksize=32, act_order=act, grid=grid, order=order)
    ref = G.gptq_quantize(W, H, bits, backend="torch", **kw)
    tri = G.gptq_quantize(W, H, bits, backend="triton", **kw)
    _assert_identical(ref, tri)
    assert torch.isfinite(tri.dequantized).all()


def test_block_segments_touch_only_their_columns():
    """block_columns over [c0, c1) equals the torch loop over the same columns (W up to the CPU loop's ulps),
    leaving the others alone; two segments in a row equal one over both."""
    g = torch.Generator().manual_seed(0)
    rows, nb = 19, 24
    W = torch.randn(rows, nb, generator=g)
    S = torch.rand(rows, nb, generator=g) * 0.5 + 0.05
    Z = -torch.rand(rows, nb, generator=g) * 2
    qm_row = torch.tensor([255.0, 15.0, 7.0, 3.0, 1.0])[torch.randint(0, 5, (rows,), generator=g)]
    qm_col = torch.full((nb,), float("inf"))
    Hinv = torch.linalg.cholesky(_calib(nb, seed=1) + torch.eye(nb), upper=True)
    Hs = Hinv / torch.diag(Hinv)[:, None]
    inf_row = torch.full((rows,), float("inf"))

    def run(fn, segments, qmr, qmc):
        w, q = W.clone(), torch.full_like(W, -7.0)
        for c0, c1 in segments:
            fn(w, q, S, Z, qmr, qmc, Hs, c0, c1)
        return w, q

    def torch_loop(w, q, s, z, qmr, qmc, hs, c0, c1):
        G._torch_columns(w, q, s, z, qmr, None if torch.isinf(qmc).all() else qmc, hs, c0, c1)

    def same(ref, tri):
        (w_ref, q_ref), (w_tri, q_tri) = ref, tri
        torch.testing.assert_close(w_tri, w_ref, rtol=1e-5, atol=1e-6)
        assert float((q_ref != q_tri).float().mean()) <= CODE_SLACK
        torch.testing.assert_close(q_tri, q_ref, rtol=0, atol=float(S.max()) * 1.01)  # at most one grid step

    whole = run(GT.block_columns, [(0, nb)], qm_row, qm_col)
    for segments in ([(5, 17)], [(0, 9), (9, nb)]):
        same(run(torch_loop, segments, qm_row, qm_col), run(GT.block_columns, segments, qm_row, qm_col))
    assert all(torch.equal(x, y) for x, y in zip(whole, run(GT.block_columns, [(0, 9), (9, nb)], qm_row, qm_col)))
    # columns outside the segment: W unchanged before c0, Q untouched (-7) outside
    w_tri, q_tri = run(GT.block_columns, [(5, 17)], qm_row, qm_col)
    assert torch.equal(w_tri[:, :6], W[:, :6]) and (q_tri[:, :5] == -7).all() and (q_tri[:, 17:] == -7).all()
    # per-column widths (the output side's layout): qmax from qm_col, rows unbounded
    qmc = torch.tensor([255.0, 7.0, 3.0, 1.0])[torch.randint(0, 4, (nb,), generator=g)]
    same(run(lambda *a: G._torch_columns(*a[:4], None, *a[5:]), [(0, nb)], inf_row, qmc),
         run(GT.block_columns, [(0, nb)], inf_row, qmc))


def test_delta_come_encode_with_the_kernel_is_identical(monkeypatch):
    """delta-come's A (row grid, act-order, shared prepared Hessian) and B (column grid) through the kernel."""
    g = torch.Generator().manual_seed(3)
    m, n = 48, 80
    delta = torch.randn(m, 12, generator=g) @ torch.randn(12, n, generator=g) * 0.01 + 1e-3 * torch.randn(m, n, generator=g)
    H = _calib(n, seed=5)

    def encode():
        ctx = types.SimpleNamespace(device=torch.device("cpu"), cache={})
        method = get_method("delta-come", {"blocksize": 32})
        job = TensorJob("w", (m, n), delta.clone(), m * n * 2 // 4, "linear", extras={"hessian": H})
        return method.encode(job, ctx)

    ref = encode()
    monkeypatch.setattr(G, "_use_triton", lambda backend, dev: True)
    calls = []
    real = GT.block_columns
    monkeypatch.setattr(GT, "block_columns", lambda *a: (calls.append(1), real(*a))[1])
    tri = encode()
    assert calls, "the kernel was not used"
    assert ref.params == tri.params and ref.parts.keys() == tri.parts.keys()
    for k in ref.parts:
        a, b = ref.parts[k], tri.parts[k]
        if a.dtype == torch.uint8:  # packed codes: compare bytes
            assert float((a != b).float().mean()) <= 4 * CODE_SLACK, k
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-6, msg=k)


def test_kernel_failure_falls_back_or_raises(monkeypatch):
    g = torch.Generator().manual_seed(4)
    W, H = torch.randn(16, 40, generator=g), _calib(40, seed=6)
    ref = G.gptq_quantize(W, H, 3, group_size=None, blocksize=16, act_order=True, backend="torch")

    def broken(*a):
        raise GT.KernelUnavailable("simulated compile failure")

    monkeypatch.setattr(GT, "block_columns", broken)
    monkeypatch.setattr(G, "_TRITON_BROKEN", [])
    with pytest.raises(GT.KernelUnavailable):
        G.gptq_quantize(W, H, 3, group_size=None, blocksize=16, act_order=True, backend="triton")
    # auto on a (pretend) CUDA device: falls back to the torch loop, same result, and stops trying
    monkeypatch.setattr(G, "_use_triton", lambda backend, dev: not G._TRITON_BROKEN)
    res = G.gptq_quantize(W, H, 3, group_size=None, blocksize=16, act_order=True)
    _assert_identical(ref, res, exact=True)  # the torch loop both times
    assert G._TRITON_BROKEN


def test_availability():
    assert GT.available(torch.device("cpu"))  # interpreter on
    assert GT.unavailable_reason(torch.device("meta")) is not None
    with pytest.raises(ValueError):
        G.gptq_quantize(torch.randn(4, 8), torch.eye(8), 3, backend="cuda-graphs")


def test_wider_tile_than_block(monkeypatch):
    """On CUDA the tile is at least 128 columns so one compiled kernel serves every block; the columns past the
    block's end are masked off. The same here, forced."""
    g = torch.Generator().manual_seed(8)
    W, H = torch.randn(20, 70, generator=g), _calib(70, seed=9)
    bits = torch.tensor([8, 4, 3, 2, 1])[torch.randint(0, 5, (20,), generator=g)]
    kw = dict(group_size=16, blocksize=32, act_order=True)
    exact = G.gptq_quantize(W, H, bits, backend="triton", **kw)
    monkeypatch.setattr(GT, "_tile_cols", lambda nb, cuda: 64)
    _assert_identical(exact, G.gptq_quantize(W, H, bits, backend="triton", **kw), exact=True)


def _reference_columns(W, S, Z, qm, Hs, fused_deq: bool, fused_update: bool):
    """The column loop written out with explicit roundings: a*b+c once (float64, then float32) or twice."""
    W = W.clone()
    Q = torch.zeros_like(W)

    def madd(a, b, c, fused):
        return (a.double() * b.double() + c.double()).float() if fused else a * b + c

    for i in range(W.shape[1]):
        w, sc, zc = W[:, i].clone(), S[:, i], Z[:, i]
        q = torch.minimum(torch.round((w - zc) / sc).clamp(min=0), qm)
        deq = madd(q, sc, zc, fused_deq)
        Q[:, i] = deq
        W[:, i + 1 :] = madd(-(w - deq)[:, None], Hs[i, i + 1 :][None, :], W[:, i + 1 :], fused_update)
    return W, Q


@pytest.mark.parametrize("fused_deq,fused_update", [(True, True), (False, False), (True, False)])
def test_kernel_rounds_like_the_device_torch(monkeypatch, fused_deq, fused_update):
    """Each multiply-add rounds once or twice as `torch_rounding` says torch does on the device: bit-identical to
    an explicit reference in all three combinations."""
    g = torch.Generator().manual_seed(11)
    rows, nb = 21, 32
    W = torch.randn(rows, nb, generator=g)
    S = torch.rand(rows, nb, generator=g) * 0.3 + 0.02
    Z = -torch.rand(rows, nb, generator=g) * 2
    qm = torch.tensor([255.0, 15.0, 7.0, 3.0, 1.0])[torch.randint(0, 5, (rows,), generator=g)]
    Hinv = torch.linalg.cholesky(_calib(nb, seed=12) + torch.eye(nb), upper=True)
    Hs = Hinv / torch.diag(Hinv)[:, None]
    monkeypatch.setattr(GT, "torch_rounding", lambda device: (fused_deq, fused_update))
    w, q = W.clone(), torch.zeros_like(W)
    GT.block_columns(w, q, S, Z, qm, torch.full((nb,), float("inf")), Hs, 0, nb)
    w_ref, q_ref = _reference_columns(W, S, Z, qm, Hs, fused_deq, fused_update)
    assert torch.equal(q, q_ref) and torch.equal(w, w_ref)


def test_torch_rounding_probe_on_cpu():
    """The probe's answer for addcmul describes torch on fresh data (on an AVX2/AVX-512 CPU build: fused)."""
    fused_deq, fused_update = GT.torch_rounding("cpu")
    assert isinstance(fused_deq, bool) and isinstance(fused_update, bool)
    g = torch.Generator().manual_seed(13)
    z, q, s = torch.randn(10000, generator=g), torch.randint(0, 256, (10000,), generator=g).float(), torch.rand(10000, generator=g)
    claimed = (z.double() + q.double() * s.double()).float() if fused_deq else z + q * s
    assert float((torch.addcmul(z, q, s) == claimed).float().mean()) > 0.99
