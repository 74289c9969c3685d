"""Dense path for tenants owning many tokens (deltapack.kernels.schedule): dequantize once + GEMM gives the kernels'
outputs (pure torch: the reference backend, and the Triton backend's layouts in the CPU interpreter), and the
decision comes from the measured cost model."""

from __future__ import annotations

import os

if os.environ.get("DELTAPACK_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from deltapack.kernels import LayerDeltas, TokenSlots, get_kernels
from deltapack.kernels.schedule import (
    CostModel,
    Scratch,
    calibrate,
    cost_key,
    dense_delta,
    fit_line,
    scheduled_linear,
)

pytest.importorskip("triton")
from test_kernels_triton import ENTRIES, M, N, _exact  # noqa: E402

KEYS = ["deltacome_rows", "all_widths_g16", "sign_3_row", "dare_4", "deltadq", "lowrank", "dense", "g32_both"]


def _layer(k):
    lay = LayerDeltas("w")
    for s, key in enumerate(KEYS):
        lay.set(s, k.pack(*ENTRIES[key], (M, N), dtype=torch.float32, device="cpu"))
    return lay


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_delta_is_the_layout(backend):
    k = get_kernels(backend)
    lay = _layer(k)
    for s, key in enumerate(KEYS):
        d = dense_delta(lay.get(s)).double()
        e = _exact(*ENTRIES[key])
        assert float((d - e).norm() / e.norm()) < 1e-5, key


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scheduled_dense_path_equals_kernels(backend):
    k = get_kernels(backend)
    lay = _layer(k)
    # a prefill-like block: rows of 6 tokens; slots 0..7, the base, repeated tenants (12 or 18 tokens each)
    rows = [0, 1, 2, 3, -1, 4, 5, 6, 7, 0, 2, 0]
    tokens = TokenSlots.from_rows(rows, 6, "cpu")
    x = torch.randn(tokens.num_tokens, N, generator=torch.Generator().manual_seed(1))
    want = k.linear(x, tokens, lay)
    costs = CostModel()
    for s in range(len(KEYS)):
        costs.dense_from[cost_key(lay.get(s))] = 12  # tenants 0 and 2 (18 / 12 tokens) dense, the rest kernels
    scratch = Scratch()
    got = scheduled_linear(k, costs, scratch, x, TokenSlots.from_rows(rows, 6, "cpu"), lay)
    assert scratch.nbytes == M * N * 4  # the dense path ran, in one reused buffer
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert torch.all(got[tokens.slot_ids < 0] == 0)
    # everything dense
    for key in list(costs.dense_from):
        costs.dense_from[key] = 1
    got = scheduled_linear(k, costs, scratch, x, TokenSlots.from_rows(rows, 6, "cpu"), lay)
    assert float((got - want).norm() / want.norm()) < 1e-5
    # no host groups (a CUDA graph's view): the kernels alone
    bare = TokenSlots(tokens.slot_ids)
    assert torch.equal(scheduled_linear(k, costs, scratch, x, bare, lay), k.linear(x, TokenSlots(tokens.slot_ids), lay))


def test_cost_model_from_measurements():
    k = get_kernels("reference")
    lay = _layer(k)
    calls = []

    def measure(path, key, n, fn):  # kernel: 2 us + 10 us/token; dense: 50 us + 0.1 us/token
        calls.append((path, key, n))
        return 2e-6 + 1e-5 * n if path == "kernel" else 5e-5 + 1e-7 * n

    costs = calibrate(k, {"w": lay}, dtype=torch.float32, device="cpu", max_tokens=256, measure=measure)
    kinds = {cost_key(p) for p in lay.slots}
    assert set(costs.dense_from) == kinds
    assert {n for _, _, n in calls} == {1, 4, 16, 64, 256}
    # 50 + 0.1 n <= 0.9 (2 + 10 n)  ->  n >= 48.2 / 8.9 = 5.4
    assert set(costs.dense_from.values()) == {6}
    p = lay.get(0)
    assert not costs.use_dense(p, 5) and costs.use_dense(p, 6)
    s = costs.summary()
    assert all(v["dense_from_tokens"] == 6 for v in s.values())


def test_cost_model_never_dense_when_kernels_win():
    costs = CostModel()
    for n in (1, 16, 256):
        costs.record(("x", 1, 1), "kernel", n, 1e-6 * n)
        costs.record(("x", 1, 1), "dense", n, 1e-4 + 2e-6 * n)
    costs.fit()
    assert costs.dense_from[("x", 1, 1)] is None
    assert fit_line([(1, 3.0), (3, 7.0)]).a == pytest.approx(1.0)


def test_real_calibration_runs_on_cpu():
    k = get_kernels("reference")
    lay = _layer(k)
    costs = calibrate(k, {"w": lay}, dtype=torch.float32, device="cpu", max_tokens=16)
    assert len(costs.fits) == len({cost_key(p) for p in lay.slots})
