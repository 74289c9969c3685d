"""Gram eigendecompositions on deltas with many exactly-zero rows: fp32 LAPACK eigh fails to converge there (e.g.
512 x 1536 with 90% zero rows, every seed tried), which made lowrank, delta-come and `share` crash on a fine-tune
that left most rows of a matrix untouched."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from deltapack import api
from deltapack.linalg import gram_eigh, gram_eigvalsh


def _sparse_rows_delta(m: int, n: int, frac_zero: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(m, n, generator=g) * 1e-3
    d[torch.rand(m, generator=g) < frac_zero] = 0
    return d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_eigh_converges_and_is_exact_with_zero_rows(seed):
    d = _sparse_rows_delta(512, 1536, 0.9, seed)
    G = d @ d.T
    evals, evecs = gram_eigh(G)
    assert evals.shape == (512,) and evecs.shape == (512, 512)
    assert bool((evals[1:] >= evals[:-1]).all()), "ascending, like torch.linalg.eigh"
    # exact: reconstructs G, orthonormal vectors, spectrum equal to the fp64 SVD's
    assert torch.allclose(evecs @ torch.diag(evals) @ evecs.T, G, atol=1e-9)
    assert torch.allclose(evecs.T @ evecs, torch.eye(512), atol=1e-5)
    ref = torch.linalg.svdvals(d.double()).pow(2).flip(0).float()
    assert torch.allclose(evals, ref, atol=1e-9, rtol=1e-4)
    assert torch.allclose(gram_eigvalsh(G), ref, atol=1e-9, rtol=1e-4)


def test_gram_eigh_matches_torch_when_torch_converges():
    d = _sparse_rows_delta(96, 200, 0.0, 3)
    G = d @ d.T
    ev, V = gram_eigh(G)
    ev_t, V_t = torch.linalg.eigh(G)
    assert torch.equal(ev, ev_t) and torch.equal(V, V_t)


def test_gram_eigh_all_zero():
    evals, evecs = gram_eigh(torch.zeros(8, 8))
    assert torch.equal(evals, torch.zeros(8)) and torch.equal(evecs, torch.eye(8))


@pytest.fixture(scope="module")
def untouched_rows_pair(tmp_path_factory):
    """A fine-tune that moved only 10% of the rows of every matrix (the rest exactly equal to the base)."""
    d = tmp_path_factory.mktemp("zero_rows")
    make_llama(d / "base", hidden=512, layers=1, vocab=512, inter=1536)
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.bfloat16)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                moved = torch.rand(p.shape[0], generator=g) < 0.1
                p[moved] += (0.02 * torch.randn(int(moved.sum()), p.shape[1], generator=g)).to(p.dtype)
    model.save_pretrained(d / "ft", safe_serialization=True)
    return d / "base", d / "ft"


@pytest.mark.parametrize("method", ["lowrank", "delta-come"])
def test_compress_fine_tune_with_untouched_rows(untouched_rows_pair, tmp_path, method):
    base, ft = untouched_rows_pair
    out = api.compress(base, ft, tmp_path / "d", method=method, ratio=16, progress=False)
    assert api.verify(base, out)["ok"]
