"""DeltaDQ: true ratios on small_pair, seeded group masks, the group-size search, value decoding."""

from __future__ import annotations

import json

import pytest
import torch

from deltapack import api

from conftest import ratio_before_entropy
from deltapack.format import codec_deltadq as dq
from deltapack.format.masks import group_keep_indices, seed_for
from deltapack.methods import get_method
from deltapack.methods.base import TensorJob
from deltapack.methods.deltadq import CHOICES_KEY, HESSIAN_KEY, DeltaDQ, output_error, search_group_size


class _Ctx:
    """The part of CompressContext that DeltaDQ.encode reads."""

    def __init__(self, hessians=None):
        self.cache = {HESSIAN_KEY: hessians} if hessians else {}


class _Hess:
    def __init__(self, H):
        self.H = H

    def mean(self):
        return self.H


@pytest.mark.parametrize("ratio", [16, 32, 64, 128])
def test_round_trip_true_ratio(small_pair, tmp_path, ratio):
    base, ft = small_pair
    out = api.compress(base, ft, tmp_path / "d", method="deltadq", ratio=ratio, progress=False)
    info = api.inspect(out)
    tr, planned = ratio_before_entropy(out)
    # the budget counts bytes after the entropy stage: the true ratio is the target, the stored codes use the saving
    assert 0.99 * ratio <= tr and planned <= tr, (tr, planned)
    if ratio <= 32:
        assert tr <= 1.045 * ratio, (tr, planned)
    else:
        # at 1-2 kept values per group of 32 the coded size jumps from keep=1 to keep=2 (keep-1 rows, rescaled by
        # twice as much, stretch the tensor-wide grid and make the codes peaky): the fit cannot fill the budget
        # across that step, so only the stored bytes are held to the target here
        assert planned <= 1.05 * ratio, (tr, planned)
    assert {r["codec"] for r in info["tensors"] if len(r["shape"]) == 2} == {"deltadq"}
    # every matrix, embedding and lm_head included, is compressed; only the 1-D norms stay dense
    assert all(r["codec"] == "dense" for r in info["tensors"] if len(r["shape"]) == 1)
    for r in (r for r in info["tensors"] if r["codec"] == "deltadq"):  # inspect's detail: kept share x bits = payload
        d = r["detail"]
        assert set(d) == {"group", "kept", "bits", "scale"} and 0 < d["kept"] <= 1
        # the entropy stage may store the codes in fewer bytes than kept x bits, never in more
        assert r["payload_bytes"] * 8 <= d["kept"] * d["bits"] * r["shape"][0] * r["shape"][1] * 1.01 + 512

    merged = api.merge(base, out, tmp_path / "m", progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = torch.arange(0, 64).view(2, 32)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # the merged tensor equals base + the decoded delta
    from deltapack.format.directory import DeltaDir
    from safetensors.torch import load_file

    d = DeltaDir.open(out)
    name = "model.layers.0.mlp.up_proj.weight"
    b = load_file(str(base / "model.safetensors"))[name].float()
    m = load_file(str(merged / "model.safetensors"))[name].float()
    assert torch.allclose(m, (b + d.decode(name)).to(torch.bfloat16).float())
    # survivors: the stored layout keeps the budget's share of elements, at most one group size apart per row
    p = d.entry(name).params
    dec = d.decode(name)
    assert int((dec != 0).sum()) <= dq.kept_count(1536, 512, p["g"], p["keep"], p["rows_hi"])


def test_mask_is_seeded_not_stored():
    shape = (64, 96)
    params = {"g": 16, "keep": 3, "rows_hi": 10, "seed": seed_for("a.weight")}
    hi1, lo1 = dq.positions(params, shape)
    hi2, lo2 = dq.positions(dict(params), shape)
    assert torch.equal(hi1, hi2) and torch.equal(lo1, lo2)
    # the block with keep+1 per group is exactly what group_keep_indices gives for the same seed
    assert torch.equal(hi1, group_keep_indices((10, 96), 16, 4, params["seed"]))
    # exactly keep (+1) survivors in every group of every row, none outside their group
    for pos, k in ((hi1, 4), (lo1, 3)):
        grp = pos.view(pos.shape[0], -1, k) // 16
        assert torch.equal(grp, torch.arange(6).view(1, 6, 1).expand_as(grp))
        assert (pos.view(pos.shape[0], 6, k).diff(dim=-1) > 0).all()
    # another tensor name: another mask
    other = dict(params, seed=seed_for("b.weight"))
    hi3, _ = dq.positions(other, shape)
    assert not torch.equal(hi1, hi3)
    # the search's cached hashes give the decoder's positions
    cache = dq.MaskHashes(shape, params["seed"])
    for g, keep, rows_hi in ((16, 3, 10), (32, 5, 0), (8, 1, 63), (96, 20, 7)):
        a = dq.positions(dict(params, g=g, keep=keep, rows_hi=rows_hi), shape)
        b = dq.positions(dict(params, g=g, keep=keep, rows_hi=rows_hi), shape, hashes=cache)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_delta_mask_depends_on_name_in_compressed_dir(pico_pair, tmp_path):
    base, ft = pico_pair
    out = api.compress(base, ft, tmp_path / "d", method="deltadq", ratio=2, params={"calibrate": False},
                       progress=False)
    man = json.loads((out / "delta_config.json").read_text())
    seeds = [t["params"]["seed"] for t in man["tensors"].values() if t["codec"] == "deltadq"]
    assert len(seeds) == len(set(seeds)) > 5
    # compressing again reproduces the same masks and bytes
    out2 = api.compress(base, ft, tmp_path / "d2", method="deltadq", ratio=2, params={"calibrate": False},
                        progress=False)
    assert (out / "delta.safetensors").read_bytes() == (out2 / "delta.safetensors").read_bytes()


def test_group_size_search_matches_brute_force():
    torch.manual_seed(0)
    m, n, t = 48, 128, 256
    # structured inputs (a few loud channels, correlated neighbours) and a delta with smooth rows
    X = torch.randn(t, n) @ (torch.eye(n) + 0.3 * torch.randn(n, n) / n**0.5)
    X[:, :4] *= 8
    H = X.T @ X / t
    delta = torch.randn(m, 8).repeat_interleave(16, 1) * 0.01 + 0.003 * torch.randn(m, n)
    seed = seed_for("layer.weight")
    cands = [4, 8, 16, 32, 64, 128]
    n_values = m * n // 4
    best, errors = search_group_size(delta, H, cands, n_values=n_values, seed=seed, bits=4, s=0, scale="tensor")
    brute = {}
    for g in cands:
        params, parts, _ = dq.encode(delta, g=g, n_values=n_values, seed=seed, bits=4, s=0, scale="tensor")
        approx = dq.DeltaDQCodec.decode(params, parts, (m, n))
        E = delta - approx
        brute[g] = float(((X @ E.T) ** 2).sum()) / t  # ‖X(Δ − Δ̂)ᵀ‖² per token, straight from the definition
    for g in cands:
        assert errors[g] == pytest.approx(brute[g], rel=1e-4)
    assert best.g == min(brute, key=brute.get)
    assert len({round(v, 6) for v in brute.values()}) > 1  # the candidates really differ

    # the method runs the same search when it has calibration statistics, and stores the winner
    meth = DeltaDQ(bits=4, scale="tensor", group_sizes=cands)
    ctx = _Ctx({"layer.weight": _Hess(H)})
    budget = dq.stored_bytes(m, n_values, 4, 0, "tensor")
    enc = meth.encode(TensorJob("layer.weight", (m, n), delta, budget, "linear"), ctx)
    assert enc.params["g"] == best.g
    assert ctx.cache[CHOICES_KEY]["layer.weight"]["calibrated"]
    assert enc.nbytes() <= budget


def test_data_free_default_group_size():
    torch.manual_seed(1)
    delta = torch.randn(40, 96)
    meth = DeltaDQ(bits=2, scale="tensor", default_group_size=32)
    enc = meth.encode(TensorJob("w.weight", (40, 96), delta, 400, "linear"), _Ctx())
    assert enc.params["g"] == 32  # nearest divisor of 96 to the default
    enc = DeltaDQ(bits=2, scale="tensor", default_group_size=40).encode(
        TensorJob("w.weight", (40, 96), delta, 400, "linear"), _Ctx())
    assert enc.params["g"] == 48  # 40 does not divide 96: nearest divisor on a log scale


@pytest.mark.parametrize("bits,s,scale", [(1, 0, "tensor"), (2, 0, "row"), (4, 0, "tensor"), (4, 2, "row"),
                                          (3, 1, "tensor"), (8, 0, "row"), (16, 0, "tensor")])
def test_quantized_values_decode_within_expected_error(bits, s, scale):
    torch.manual_seed(2)
    m, n = 32, 64
    delta = torch.randn(m, n) * torch.linspace(0.5, 2, m).view(m, 1)
    params, parts, pos = dq.encode(delta, g=16, n_values=700, seed=7, bits=bits, s=s, scale=scale)
    vals, rows = dq.gather_rescaled(delta, params, pos)  # the exact survivors, rescaled
    got = dq.decode_values(params, parts, (m, n))
    assert got.shape == vals.shape
    err = (got - vals).abs()
    if bits >= 16:
        assert torch.allclose(got, vals.to(torch.bfloat16).float())
        return
    grid = parts["scale"].float()
    step = grid[:, 0] if grid.shape[0] == 1 else grid[rows, 0]
    lo = grid[:, 1] if grid.shape[0] == 1 else grid[rows, 1]
    hi = lo + step * ((1 << bits) - 1)
    tol = 1e-3 * float(vals.abs().max())
    if bits == 1:
        # two levels: each value decodes to the nearer one
        nearer = torch.where((vals - lo).abs() <= (vals - hi).abs(), lo, hi)
        assert (got - nearer).abs().max() <= tol
    else:
        # a value is off by at most half a grid step from the grid's range (clipped values: their distance to it)
        outside = (vals - vals.clamp(min=lo, max=hi)).abs()
        assert (err <= outside + 0.5 * step * 1.01 + tol).all()
    if s == 0 and bits > 1:
        # ... and plain codes are exactly round-to-nearest on that grid
        q = ((vals - lo) / step).round().clamp(0, (1 << bits) - 1)
        assert torch.allclose(got, lo + q * step, atol=tol)
    rel = float((got - vals).norm() / vals.norm())
    assert rel < {1: 0.8, 2: 0.5, 3: 0.3, 4: 0.2, 8: 0.02}[bits]
    # the decoded matrix is the values scattered at the seeded positions, zero elsewhere
    dense = dq.DeltaDQCodec.decode(params, parts, (m, n))
    assert int((dense != 0).sum()) <= dq.kept_count(m, n, 16, params["keep"], params["rows_hi"])
    assert torch.allclose(dense, dq.scatter_values(got, params, (m, n)))


def test_split_quantization_costs_the_same_bits():
    torch.manual_seed(3)
    delta = torch.randn(64, 128)
    sizes, errs = {}, {}
    for s in (0, 1, 2):
        params, parts, pos = dq.encode(delta, g=32, n_values=2048, seed=1, bits=4, s=s, scale="tensor")
        vals, _ = dq.gather_rescaled(delta, params, pos)
        payload = sum(parts[k].numel() for k in ("codes", "part_ids") if k in parts)
        sizes[s] = payload
        errs[s] = float((dq.decode_values(params, parts, (64, 128)) - vals).norm())
    # s bits of part id + (4 - s) bits of code per value: the same 4 bits (up to per-part byte padding)
    assert all(abs(sizes[s] - sizes[0]) <= 4 * (1 << s) for s in sizes)
    # re-fitting each part's grid never makes it worse than the plain 4-bit grid
    assert errs[1] <= errs[0] * 1.001 and errs[2] <= errs[0] * 1.001


def test_knob_validation_and_metadata():
    from deltapack.errors import MethodError

    with pytest.raises(MethodError):
        get_method("deltadq", {"bits": 9})
    with pytest.raises(MethodError):
        get_method("deltadq", {"bits": 2, "split_bits": 2})
    with pytest.raises(MethodError):
        get_method("deltadq", {"drop_rate": 0.9, "bits": "auto"})
    assert get_method("deltadq", {"bits": "auto"}).bits == "auto"
    m = get_method("deltadq", {})
    assert m.bits == 4 and m.split_bits == 0
    assert m.uses_calibration and not m.needs_calibration and "DeltaDQ" in m.paper


def test_output_error_definition():
    torch.manual_seed(4)
    d, a, X = torch.randn(5, 7), torch.randn(5, 7), torch.randn(11, 7)
    assert output_error(d, a, X.T @ X) == pytest.approx(float(((X @ (d - a).T) ** 2).sum()), rel=1e-5)
    assert output_error(d, a, None) == pytest.approx(float(((d - a) ** 2).sum()), rel=1e-6)


def test_calibrated_compress_on_random_tokens(pico_pair, tmp_path):
    """The calibrated path end to end (pico has no tokenizer: seeded random token ids)."""
    base, ft = pico_pair
    out = api.compress(base, ft, tmp_path / "d", method="deltadq", ratio=2,
                       params={"calib_source": "random", "calib_seqs": 4, "calib_seq_len": 32}, progress=False)
    man = json.loads((out / "delta_config.json").read_text())
    assert man["calibration"]["source"] == "random-token-ids"
    assert man["calibration"]["method"] == "deltadq"
    info = api.inspect(out)
    assert info["true_ratio"] >= 0.97 * 2


def test_energy_allocation_gives_more_to_larger_deltas():
    from deltapack.methods.base import TensorStat

    stats = [TensorStat("a", (256, 256), "linear", 256 * 256 * 2, sq_norm=256 * 256 * 4.0),  # rms 2
             TensorStat("b", (256, 256), "linear", 256 * 256 * 2, sq_norm=256 * 256 * 1.0)]  # rms 1
    uni = DeltaDQ().allocate(stats, 20000)
    en = DeltaDQ(allocation="energy").allocate(stats, 20000)
    assert uni["a"] == uni["b"]
    assert en["a"] == pytest.approx(2 * en["b"], rel=0.01)  # bytes ∝ sqrt(numel·‖Δ‖²)
    assert sum(en.values()) <= 20000
