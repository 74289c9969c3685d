"""`--ratio R` gives a file of true ratio R: the budget counts bytes after the entropy stage, so a delta whose codes
zstd shrinks is not left smaller (and worse) than asked. Before this, the entropy stage ran after the budget was met
and dare / deltadq files landed 10-30% above the target (bench/results/ratio_exact_cpu.json)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from deltapack import api

LOSSY = ["dare", "deltadq", "delta-come", "lowrank"]
# never more than 1% below the target; above it by at most 4.5% on these 8M-parameter models, where one step of a
# method (a rank of a 512-wide matrix) is 3-5% of a tensor's budget (SmolLM2: bench/results/ratio_exact_cpu.json)
LOW, HIGH = 0.99, 1.045


@pytest.fixture(scope="module")
def structured_pair(tmp_path_factory):
    """~8M parameters, like conftest.small_pair, but the delta of a real short fine-tune's shape: most rows of every
    matrix barely moved (an embedding's unseen tokens, an untouched output channel), the rest heavy-tailed. Its codes
    have low entropy: zstd saves a quarter or more, the case where the old budget left files far above the target.
    (Exactly-zero rows are tests/test_linalg.py's case.)"""
    d = tmp_path_factory.mktemp("structured")
    make_llama(d / "base", hidden=512, layers=2, vocab=2048, inter=1536)
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.bfloat16)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() != 2:
                p.add_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
                continue
            rows = torch.rand(p.shape[0], generator=g) < 0.3
            noise = torch.distributions.StudentT(3.0).sample(p.shape) * 0.02 * p.float().abs().mean()
            p.add_((noise * (0.1 + rows[:, None])).to(p.dtype))
    model.save_pretrained(d / "ft", safe_serialization=True)
    return d / "base", d / "ft"


def _check(base, ft, out, method, ratio, high=HIGH):
    d = api.compress(base, ft, out, method=method, ratio=ratio, progress=False)
    true = api.inspect(d)["true_ratio"]
    assert LOW * ratio <= true <= high * ratio, f"{method} at {ratio}x: true ratio {true:.3f}"
    return d


@pytest.mark.parametrize("method", LOSSY)
def test_true_ratio_on_target_gaussian_delta(small_pair, tmp_path, method):
    """A dense Gaussian delta: dare's and deltadq's 4-bit codes of it still lose ~10-15% to zstd."""
    _check(*small_pair, tmp_path / "d", method, 16)


# Loosest where the coded size is least smooth in the budget: dare's coded fraction jumps with the keep rate on this
# delta (0.67 -> 0.70 and up): up to ~6% above (the old budget: ~50% above); deltadq's barely-moved rows code to a
# quarter at 4 bits and keep 30 of 32, and keeping all at 5 bits overshoots: 17.2x, 7.6% above (was 17.9x on the
# demo pair, now 16.4x: bench/results/ratio_exact_cpu.json)
STRUCTURED_HIGH = {"dare": 1.06, "deltadq": 1.08}


@pytest.mark.parametrize("method", LOSSY)
def test_true_ratio_on_target_structured_delta(structured_pair, tmp_path, method):
    d = _check(*structured_pair, tmp_path / "d", method, 16, high=STRUCTURED_HIGH.get(method, HIGH))
    assert api.verify(structured_pair[0], d)["ok"]


def test_auto_true_ratio_on_target(structured_pair, tmp_path):
    """auto fits every candidate to the tensor's budget after entropy coding, so whichever it picks per group, the
    file lands on the target."""
    _check(*structured_pair, tmp_path / "d", "auto", 16)


def test_fit_never_passes_the_budget():
    """fit_coded_budget: the coded size ends at most at the budget, and close to it when codes compress well."""
    from deltapack.methods.base import Encoded, coded_nbytes, fit_coded_budget

    def encode(b: int) -> Encoded:  # b stored bytes of very compressible codes (a few distinct values)
        g = torch.Generator().manual_seed(b)
        return Encoded("x", {}, {"codes": torch.randint(0, 3, (b,), generator=g, dtype=torch.uint8)})

    budget = 50_000
    enc = fit_coded_budget(encode, budget, 10 * budget, rounds=3)
    assert enc.coded_bytes == coded_nbytes(enc.parts)
    assert 0.97 * budget <= enc.coded_bytes <= budget
    assert enc.nbytes() > 2 * budget  # the saving was spent


def test_deltadq_spends_a_keep_everything_budget_on_bits():
    """A budget that keeps every value at deltadq's 4 bits, with codes zstd shrinks (a few distinct values): the
    saving buys more bits per value instead of staying unspent, the coded size still fits, the error drops."""
    from deltapack.format import codec_deltadq as dq
    from deltapack.format.codecs import get_codec
    from deltapack.methods.base import TensorJob, get_method

    g = torch.Generator().manual_seed(0)
    m, n = 64, 512
    delta = torch.randint(-2, 3, (m, n), generator=g).float() * 1e-3 + 1e-5 * torch.randn(m, n, generator=g)
    budget = dq.stored_bytes(m, m * n, 4, 0, "tensor") + 64
    method = get_method("deltadq", {"calibrate": False, "scale": "tensor"})
    job = TensorJob("model.layers.0.mlp.down_proj.weight", (m, n), delta, budget, "linear")
    first, spent = method.encode(job, None), method.encode_coded(job, None)
    assert first.params["bits"] == 4 and spent.params["bits"] > 4, spent.params
    assert spent.coded_bytes <= budget
    codec = get_codec("deltadq")
    err = lambda e: float((codec.decode(e.params, e.parts, (m, n)).float() - delta).norm())  # noqa: E731
    assert err(spent) < err(first)
