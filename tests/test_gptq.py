"""GPTQ core: beats RTN on its own calibration data, and its codes decode exactly through the stored formats."""

from __future__ import annotations

import pytest
import torch

from deltapack.format.codecs import FactorsCodec, build_factor_parts
from deltapack.quant.gptq import gptq_quantize, output_error
from deltapack.quant.rtn import quantize_rows


def _calib(cols: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few strong directions: where error feedback pays."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * (torch.rand(cols, generator=g) ** 3)[None, :]
    X = torch.randn(n, cols, generator=g) @ mix + 0.05 * torch.randn(n, cols, generator=g)
    return X.T @ X


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_its_calibration_data(bits, act_order):
    torch.manual_seed(bits)
    W = torch.randn(96, 256)
    H = _calib(256)
    res = gptq_quantize(W, H, bits, group_size=128, act_order=act_order)
    rtn = quantize_rows(W, bits, 128).dequantize()
    e_gptq, e_rtn = output_error(W, res.dequantized, H), output_error(W, rtn, H)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # the stored codes decode to exactly what GPTQ reports (act-order permutation undone, static groups)
    q = res.qmatrix(slice(None), bits)
    assert q.nbytes() == quantize_rows(W, bits, 128).nbytes()
    torch.testing.assert_close(q.dequantize(), res.dequantized, rtol=0, atol=0)


def test_gptq_mixed_row_widths_and_per_row_grid():
    torch.manual_seed(1)
    W = torch.randn(40, 200)
    H = _calib(200, seed=2)
    bits = torch.tensor([8] * 4 + [3] * 12 + [2] * 24)
    res = gptq_quantize(W, H, bits, group_size=None, act_order=True)
    assert res.scale.shape == (40, 1)
    rows = [(8, slice(0, 4)), (3, slice(4, 16)), (2, slice(16, 40))]
    dec = torch.cat([res.qmatrix(sl, b).dequantize() for b, sl in rows])
    torch.testing.assert_close(dec, res.dequantized, rtol=0, atol=0)
    for b, sl in rows:  # per width: better than RTN of the same rows
        rtn = quantize_rows(W[sl], b, None).dequantize()
        assert output_error(W[sl], res.dequantized[sl], H) < output_error(W[sl], rtn, H)


def test_gptq_column_grid_is_stored_transposed_and_beats_rtn():
    """grid="col": the output-side factor B (m x r) is GPTQ-ed over its r inputs and stored as Bt rows."""
    torch.manual_seed(2)
    m, r = 300, 48
    B = torch.randn(m, r)
    Hz = _calib(r, seed=3)
    bits = torch.tensor([8] * 2 + [3] * 14 + [2] * 32)
    res = gptq_quantize(B, Hz, bits, group_size=128, grid="col", order=torch.argsort(bits, stable=True))
    assert res.codes.shape == (r, m) and res.scale.shape == (r, 3)
    spans = [(8, slice(0, 2)), (3, slice(2, 16)), (2, slice(16, 48))]
    Bt_dec = torch.cat([res.qmatrix(sl, b).dequantize() for b, sl in spans])
    torch.testing.assert_close(Bt_dec.T, res.dequantized, rtol=0, atol=0)
    rtn = torch.cat([quantize_rows(B.T[sl].contiguous(), b, 128).dequantize() for b, sl in spans]).T
    assert output_error(B, res.dequantized, Hz) < 0.9 * output_error(B, rtn, Hz)


def test_gptq_factors_decode_through_codec():
    """A (row grid) and Bt (column grid) from GPTQ go through build_factor_parts and FactorsCodec unchanged."""
    torch.manual_seed(3)
    m, n, r = 64, 96, 10
    A, B = torch.randn(r, n), torch.randn(m, r)
    H = _calib(n, seed=4)
    ra = gptq_quantize(A, H, 3, group_size=32, act_order=True)
    Hz = ra.dequantized @ H @ ra.dequantized.T
    rb = gptq_quantize(B, Hz, 3, group_size=32, grid="col")
    params, parts = build_factor_parts([{"bits": 3, "A": ra.qmatrix(slice(None), 3), "Bt": rb.qmatrix(slice(None), 3)}])
    dense = FactorsCodec.decode(params, parts, (m, n))
    torch.testing.assert_close(dense, rb.dequantized @ ra.dequantized, rtol=1e-5, atol=1e-5)


def test_gptq_dead_inputs_and_singular_hessian():
    W = torch.randn(8, 16)
    X = torch.randn(64, 16)
    X[:, 5] = 0  # an input that never fires
    X[:, 7] = X[:, 6]  # and two identical ones: H is singular, damping must cope
    res = gptq_quantize(W, X.T @ X, 4, group_size=None)
    assert torch.isfinite(res.dequantized).all()
    # a dead input's weight is zeroed before quantization: it lands on the grid point nearest 0
    assert (res.dequantized[:, 5].abs() <= res.scale.float()[:, 0] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [100, None])
def test_dynamic_grids_across_block_edges_decode_exactly(group_size):
    """Without act-order the row grids are computed as the loop reaches each group; a group that starts in one block
    and continues into the next (group size not a multiple of the block, or one grid per row) must keep its grid
    there. (It used to read uninitialised memory in the later blocks: NaN or garbage.)"""
    torch.manual_seed(5)
    W = torch.randn(33, 260)
    H = _calib(260, seed=6)
    res = gptq_quantize(W, H, 3, group_size=group_size, blocksize=128, act_order=False)
    assert torch.isfinite(res.dequantized).all()
    torch.testing.assert_close(res.qmatrix(slice(None), 3).dequantize(), res.dequantized, rtol=0, atol=0)
    rtn = quantize_rows(W, 3, group_size).dequantize()
    assert output_error(W, res.dequantized, H) < 0.9 * output_error(W, rtn, H)


def test_prepared_hessian_is_shared_without_changing_results():
    """q/k/v (and gate/up) read one input: one prepare_hessian serves all, with the same bytes as preparing each."""
    from deltapack.quant.gptq import prepare_hessian

    torch.manual_seed(7)
    H = _calib(200, seed=8)
    H[:, 3] = H[3, :] = 0  # a dead input
    prep = prepare_hessian(H, percdamp=0.01, act_order=True)
    for rows, bits in ((24, 3), (40, torch.tensor([8] * 4 + [2] * 36))):
        W = torch.randn(rows, 200)
        fresh = gptq_quantize(W, H, bits, group_size=64, act_order=True)
        shared = gptq_quantize(W, None, bits, group_size=64, act_order=True, prepared=prep)
        for a, b in ((fresh.codes, shared.codes), (fresh.scale, shared.scale), (fresh.dequantized, shared.dequantized)):
            assert torch.equal(a, b)
    # settings that do not match the prepared Hessian are not silently reused: H is prepared again
    W = torch.randn(24, 200)
    torch.testing.assert_close(gptq_quantize(W, H, 3, act_order=False, prepared=prep).dequantized,
                               gptq_quantize(W, H, 3, act_order=False).dequantized, rtol=0, atol=0)
    with pytest.raises(ValueError):
        gptq_quantize(W, None, 3, act_order=False, prepared=prep)


def test_mixed_grid_host_widths_match_device_widths():
    from deltapack.quant.gptq import mixed_grid

    torch.manual_seed(9)
    x = torch.randn(30, 70)
    bits = torch.tensor([8, 4, 3, 2, 1] * 6)
    s1, z1 = mixed_grid(x, bits, 32)
    s2, z2 = mixed_grid(x, bits.tolist(), 32)
    assert torch.equal(s1, s2) and torch.equal(z1, z2)
