"""Numerical behaviour of the core methods (lowrank, bitdelta, dare) on controlled deltas."""

import json

import pytest
import torch

from deltapack import api
from deltapack.format.codecs import decode_entry
from deltapack.methods import get_method
from deltapack.methods.base import TensorJob, TensorStat, proportional_allocation

from conftest import make_finetune, make_llama


def _job(delta, budget, name="layer.weight"):
    return TensorJob(name, tuple(delta.shape), delta, budget, "linear")


def _err(method, delta, budget, **params):
    enc = get_method(method, params).encode(_job(delta, budget), None)
    assert enc.nbytes() <= budget * 1.02 + 64
    return float((decode_entry(enc.codec, enc.params, enc.parts, delta.shape) - delta).norm() / delta.norm())


def test_lowrank_exact_on_low_rank_delta():
    torch.manual_seed(0)
    d = torch.randn(64, 4) @ torch.randn(4, 96)
    assert _err("lowrank", d, 2 * (64 + 96) * 4) < 1e-2  # bf16 factors


def test_bitdelta_more_planes_less_error():
    torch.manual_seed(0)
    d = torch.randn(64, 128)
    plane = 64 * 16 + 4
    errs = [_err("bitdelta", d, plane * k) for k in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] == pytest.approx((1 - 2 / torch.pi) ** 0.5, abs=0.03)  # sign x mean|x| on a Gaussian


def test_dare_keep_rate_follows_budget_and_mask_from_seed():
    torch.manual_seed(0)
    d = torch.randn(128, 256)
    m = get_method("dare", {"bits": 16})
    enc = m.encode(_job(d, 128 * 256 * 2 // 8), None)
    assert enc.params["keep_prob"] == pytest.approx(1 / 8, rel=0.05)
    again = m.encode(_job(d, 128 * 256 * 2 // 8), None)
    assert enc.params["seed"] == again.params["seed"] and torch.equal(enc.parts["values"], again.parts["values"])
    other = m.encode(_job(d, 128 * 256 * 2 // 8, name="other.weight"), None)
    assert other.params["seed"] != enc.params["seed"]
    # unbiased: the rebuilt delta's mean matches (rescaled survivors)
    rebuilt = decode_entry(enc.codec, enc.params, enc.parts, d.shape)
    assert float(rebuilt.sum()) == pytest.approx(float(d.sum()), abs=0.05 * float(d.abs().sum()))


def test_proportional_allocation_respects_bounds():
    stats = [TensorStat("a", (10, 10), "linear", 200, 1.0), TensorStat("b", (100, 100), "linear", 20000, 1.0)]
    alloc = proportional_allocation(stats, 1000, lambda s: 50, lambda s: 60)
    assert alloc == {"a": 60, "b": 60}
    alloc = proportional_allocation(stats, 1010, lambda s: 50, lambda s: 10**9)
    assert alloc["a"] == 50 and alloc["b"] == 960


def test_bitdelta_scale_distillation_lowers_kl(tmp_path):
    make_llama(tmp_path / "b", hidden=64, vocab=128)
    make_finetune(tmp_path / "b", tmp_path / "f", scale=1.0, seed=4)
    d = api.compress(
        tmp_path / "b", tmp_path / "f", tmp_path / "d", method="bitdelta", ratio=4, progress=False,
        params={"planes": 1, "scale": "row", "distill": True, "distill_steps": 30},
    )
    rec = json.loads((d / "delta_config.json").read_text())["calibration"]
    assert rec["source"] == "random-token-ids" and rec["distill"]["steps"] == 30
    assert rec["distill"]["kl_after"] < 0.9 * rec["distill"]["kl_before"]


def test_bitdelta_scale_distillation_with_a_grown_vocabulary(tmp_path):
    """The fine-tune added tokens: the student grows to its vocabulary (new rows = the fine-tune's, as the merge
    makes them), the grown embedding's code still trains on its base rows, and the KL falls."""
    make_llama(tmp_path / "b", hidden=64, vocab=128)
    make_finetune(tmp_path / "b", tmp_path / "f", scale=1.0, seed=4, grow_vocab=8)
    d = api.compress(
        tmp_path / "b", tmp_path / "f", tmp_path / "d", method="bitdelta", ratio=2, progress=False,
        params={"planes": 1, "scale": "row", "distill": True, "distill_steps": 30},
    )
    cfg = json.loads((d / "delta_config.json").read_text())
    assert cfg["tensors"]["model.embed_tokens.weight"]["base_rows"] == 128
    rec = cfg["calibration"]["distill"]
    assert rec["kl_after"] < 0.9 * rec["kl_before"]
    merged = api.merged_state_dict(tmp_path / "b", d)
    assert merged["model.embed_tokens.weight"].shape[0] == 136
