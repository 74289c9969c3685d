"""Triton delta kernels (deltapack.kernels.triton), run by Triton's CPU interpreter: every layout and bit width,
mixed tenants with base tokens, decode (few tokens per tenant: broadcast-sum path) and prefill (>= 16 tokens per
tenant: tl.dot path), fp32 and bf16, forced reduction splits (atomic adds), against the exact delta (codec decode,
fp64) and against the pure-torch reference backend; and a pico model served end to end with kernels="triton".

On a GPU machine the same kernel checks run compiled: `DELTAPACK_TRITON_TEST_DEVICE=cuda pytest
tests/test_kernels_triton.py -k "linear or mixed or post_scaled or unknown"` (the interpreter-only tests skip)."""

from __future__ import annotations

import os

DEV = os.environ.get("DELTAPACK_TRITON_TEST_DEVICE", "cpu")
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: kernels run on CPU tensors

import pytest
import torch.utils._python_dispatch
import torch

triton = pytest.importorskip("triton")

from deltapack.format import codec_deltadq as dq  # noqa: E402
from deltapack.format.codecs import build_factor_parts, get_codec  # noqa: E402
from deltapack.kernels import LayerDeltas, TokenSlots, get_kernels  # noqa: E402
from deltapack.methods.base import TensorJob  # noqa: E402
from deltapack.methods.bitdelta import BitDelta  # noqa: E402
from deltapack.methods.dare import Dare  # noqa: E402
from deltapack.quant.rtn import quantize_rows  # noqa: E402

tk = pytest.importorskip("deltapack.kernels.triton")
from deltapack.kernels.triton.layouts import (  # noqa: E402
    CODE_PARTS,
    dequant_layout,
    pack_code_parts,
    unpack_code_parts,
)

M, N = 37, 40  # out x in: neither a multiple of 16 / 32 (partial tiles, padded code words)


def _job(delta: torch.Tensor) -> TensorJob:
    return TensorJob("model.layers.0.mlp.up_proj.weight", tuple(delta.shape), delta, 1 << 30, "linear")


def _factors(groups, gs_a, gs_bt, seed, m=M, n=N):
    g = torch.Generator().manual_seed(seed)
    spec = []
    for rank, bits in groups:
        A = torch.randn(rank, n, generator=g)
        Bt = torch.randn(rank, m, generator=g) * 0.1
        if bits >= 16:
            spec.append({"bits": 16, "A": A, "Bt": Bt})
        else:
            spec.append({"bits": bits, "A": quantize_rows(A, bits, gs_a), "Bt": quantize_rows(Bt, bits, gs_bt)})
    return ("factors",) + build_factor_parts(spec)


def _entries() -> dict[str, tuple[str, dict, dict]]:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(M, N, generator=g) * 0.05
    out = {"dense": ("dense", {}, {"values": delta.clone()})}
    out["lowrank"] = _factors([(5, 16)], None, None, 1)
    # delta-come shape: a few wide pairs, more narrow ones; per-row grids (scale constant over a tile)
    out["deltacome_rows"] = _factors([(2, 8), (3, 3), (6, 2), (1, 16)], None, None, 2)
    # every width 1..8 with 32-column groups on A (a tile of 32 columns inside one group) and 16-column groups on Bt
    # (per-element scales)
    out["all_widths_g32"] = _factors([(2, b) for b in range(1, 9)], 32, 16, 3)
    out["all_widths_g16"] = _factors([(1, b) for b in (8, 7, 6, 5, 4, 3, 2, 1)] + [(2, 16)], 16, None, 4)
    # 32-column groups on both sides: row-tile scales on A, per-column scales of two output groups on Bt
    out["g32_both"] = _factors([(2, 8), (3, 3), (6, 2)], 32, 32, 5)
    for planes, scale in ((1, "matrix"), (3, "row")):
        enc = BitDelta(planes=planes, scale=scale).encode(_job(delta.clone()), None)
        out[f"sign_{planes}_{scale}"] = (enc.codec, enc.params, enc.parts)
    for bits in (16, 4):
        enc = Dare(keep_prob=0.3, bits=bits, group_size=32).encode(_job(delta.clone()), None)
        out[f"dare_{bits}"] = (enc.codec, enc.params, enc.parts)
    params = {"mask": "group", "group_size": 8, "keep": 3, "seed": 11, "bits": 16}
    pos = get_codec("sparse").positions(params, (M, N))
    out["sparse_group"] = ("sparse", params, {"values": torch.gather(delta, 1, pos).to(torch.bfloat16)})
    p, parts, _ = dq.encode(delta.clone(), g=8, n_values=M * N // 3, seed=5, bits=4, s=1, scale="row")
    out["deltadq"] = ("deltadq", p, parts)
    return out


ENTRIES = _entries()


def _exact(codec, params, parts) -> torch.Tensor:
    return get_codec(codec).decode(params, parts, (M, N)).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu(), b.cpu()
    assert torch.isfinite(a).all()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _layer(kernels, keys, dtype, slots=None):
    lay = LayerDeltas("w")
    exact = {}
    for i, key in enumerate(keys):
        s = slots[i] if slots else i
        lay.set(s, kernels.pack(*ENTRIES[key], (M, N), dtype=dtype, device=DEV))
        exact[s] = _exact(*ENTRIES[key])
    return lay, exact


def _want(x, slots, exact):
    x = x.cpu()
    out = torch.zeros(x.shape[0], M, dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s in exact:
            out[t] = x[t].double() @ exact[s].T
    return out


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ---- layouts ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", sorted(CODE_PARTS))
def test_code_parts_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (5, 45))
    words = pack_code_parts(codes, bits)
    assert words.dtype == torch.int32
    assert torch.equal(unpack_code_parts(words, 5, 45, bits), codes)
    cols = torch.tensor([0, 44, 17, 31, 32])
    assert torch.equal(unpack_code_parts(words, 5, 45, bits, cols), codes[:, cols])
    assert pack_code_parts(torch.zeros(3, 64, dtype=torch.long), bits).numel() * 4 == 3 * 64 * bits // 8


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_layout_definitions_match_codec(key):
    p = get_kernels("triton").pack(*ENTRIES[key], (M, N), dtype=torch.float32)
    torch.testing.assert_close(dequant_layout(p).double(), _exact(*ENTRIES[key]), rtol=1e-6, atol=1e-7)
    assert p.nbytes() > 0


def test_qfactors_bytes_are_the_stored_codes():
    """With whole words per row (in and out multiples of 32, each group's rank x bits a multiple of 32), the resident
    layout takes exactly the stored bytes."""
    codec, params, parts = _factors([(4, 8), (32, 3), (16, 2), (2, 16)], 32, None, 9, m=64, n=96)
    p = get_kernels("triton").pack(codec, params, parts, (64, 96), dtype=torch.bfloat16)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert p.nbytes() == stored


def test_token_blocks():
    g = torch.Generator().manual_seed(3)
    for T, S, bt in ((1, 4, 1), (13, 5, 2), (40, 6, 4), (64, 64, 1), (33, 3, 16)):
        slots = torch.randint(-1, S + 2, (T,), generator=g)
        nb = min(T, T // bt + min(T, S))
        order, bslot, bstart, blen = tk.token_blocks(slots, S, bt, nb)
        seen = []
        for b in range(nb):
            s = int(bslot[b])
            if s < 0:
                continue
            n = int(blen[b])
            assert 1 <= n <= bt
            toks = order[int(bstart[b]) : int(bstart[b]) + n].tolist()
            assert all(int(slots[t]) == s for t in toks)
            seen += toks
        want = [t for t in range(T) if 0 <= int(slots[t]) < S]
        assert sorted(seen) == want  # every token of a resident slot exactly once, no other


# ---- linear -------------------------------------------------------------------------------------------------------------
def _tokens(mode: str):
    if mode == "decode":  # a few tokens per tenant, base tokens, a slot past the layer's table
        slots = [0, -1, 0, 2, 9, 0, 1]
        return TokenSlots.from_rows(slots, 1, DEV), torch.tensor(slots)
    if mode == "prefill":  # rows of 9 tokens: tenant 0 has 18 tokens (a block of 32: tl.dot)
        ts = TokenSlots.from_rows([0, -1, 0, 1], 9, DEV)
        return ts, ts.slot_ids.cpu()
    ts = TokenSlots(torch.tensor([1, 1, 0, -1, 0, 1], device=DEV))  # no host groups: default block, device-side bound
    return ts, ts.slot_ids.cpu()


MODES = [("decode", torch.float32), ("decode", torch.bfloat16), ("prefill", torch.float32), ("prefill", torch.bfloat16)]


# every kernel path; dare_16 and sparse_group differ from dare_4 only before the ELL layout (test_layout_definitions)
LINEAR_KEYS = sorted(k for k in ENTRIES if k not in ("dare_16", "sparse_group"))


@pytest.mark.parametrize("mode,dtype", MODES, ids=[f"{m}-{str(d)[6:]}" for m, d in MODES])
@pytest.mark.parametrize("key", LINEAR_KEYS)
def test_linear_matches_exact_and_reference(key, mode, dtype):
    k = get_kernels("triton")
    ref = get_kernels("reference")
    lay, exact = _layer(k, [key], dtype, slots=[0])
    other = "deltacome_rows" if key != "deltacome_rows" else "dense"
    lay.set(1, k.pack(*ENTRIES[other], (M, N), dtype=dtype, device=DEV))
    exact[1] = _exact(*ENTRIES[other])
    ref_lay = LayerDeltas("w")
    ref_lay.set(0, ref.pack(*ENTRIES[key], (M, N), dtype=dtype))
    ref_lay.set(1, ref.pack(*ENTRIES[other], (M, N), dtype=dtype))
    tokens, slots = _tokens(mode)
    x = torch.randn(slots.numel(), N, generator=torch.Generator().manual_seed(hash((key, mode)) % 1000)).to(dtype)
    y = k.linear(x.to(DEV), tokens, lay).cpu()
    want = _want(x, slots, exact)
    assert _rel(y, want) < TOL[dtype], (key, mode)
    assert torch.all(y[(slots < 0) | (slots > 1)] == 0)  # base tokens and tenants without this delta: untouched
    r = ref.linear(x, TokenSlots(slots), ref_lay)
    assert _rel(y, r.double()) < 2 * TOL[dtype]


@pytest.mark.parametrize("mode,dtype", [("decode", torch.bfloat16), ("prefill", torch.float32)], ids=["decode-bf16", "prefill-fp32"])
def test_mixed_tenants_forced_split(mode, dtype):
    """Eight tenants of every layout in one layer (one launch per family), sparse slot numbers with gaps; every
    reduction split 3 ways (atomic adds)."""
    k = tk.TritonKernels(tk.LaunchConfig(split=2))
    keys = ["deltacome_rows", "all_widths_g32", "sign_3_row", "dare_4", "dense", "lowrank", "deltadq", "all_widths_g16"]
    slot_ids = [0, 2, 3, 5, 6, 8, 9, 11]
    lay, exact = _layer(k, keys, dtype, slots=slot_ids)
    if mode == "decode":
        rows = [0, 11, -1, 2, 3, 5, 6, 8, 9, 0, 7, 11, 3]
        tokens = TokenSlots.from_rows(rows, 1, DEV)
    else:
        tokens = TokenSlots.from_rows([2, 0, -1, 2, 11], 8, DEV)
    slots = tokens.slot_ids.cpu()
    x = torch.randn(slots.numel(), N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y = k.linear(x.to(DEV), tokens, lay).cpu()
    assert _rel(y, _want(x, slots, exact)) < TOL[dtype]
    for t, s in enumerate(slots.tolist()):  # each token individually right, not only the batch in norm
        if s in exact:
            w = x[t].double() @ exact[s].T
            assert _rel(y[t], w) < 3 * TOL[dtype], (t, s)
        else:
            assert torch.all(y[t] == 0)


@pytest.mark.parametrize("split", [None, 2], ids=["nosplit", "split2"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_post_scaled_factors(mode, split):
    """Per-rank B scales (delta-come's per-row grids): the V side writes z * s and the constant column, the U side
    loads no scales; same result as the column-scale path, with and without reduction splits, next to a 16-bit
    group (lowrank: no post-scale) in the same launch."""
    dtype = torch.bfloat16
    fast = tk.TritonKernels(tk.LaunchConfig(split=split))
    plain = tk.TritonKernels(tk.LaunchConfig(split=split, post_scale=False))
    lay, exact = _layer(fast, ["deltacome_rows", "lowrank", "deltacome_rows"], dtype, slots=[0, 2, 5])
    tokens, slots = _tokens(mode)
    slots = torch.where(slots == 1, torch.full_like(slots, 5), slots)  # slot 5 holds the second delta-come tenant
    tokens = TokenSlots(slots.to(DEV), [(s, torch.nonzero(slots == s).flatten().to(DEV))
                                        for s in sorted(set(slots.tolist()))])
    x = torch.randn(slots.numel(), N, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    y = fast.linear(x, tokens, lay)
    plan = lay.cache["triton"][(x.device, x.dtype)]
    assert plan.v.post == tk.POST_V and plan.u.post == tk.POST_U and plan.v.width == plan.rank + 1
    assert _rel(y, _want(x, slots, exact)) < TOL[dtype]
    lay.cache.clear()
    y_plain = plain.linear(x, tokens, lay)
    assert lay.cache["triton"][(x.device, x.dtype)].u.post == tk.POST_NONE
    assert _rel(y, y_plain) < TOL[dtype]


def test_unknown_composition():
    """TokenSlots without host-side groups (slot ids only): blocks are sized by the device-side bound."""
    k = get_kernels("triton")
    lay, exact = _layer(k, ["deltacome_rows", "sign_3_row", "dare_4", "g32_both"], torch.float32)
    tokens, slots = _tokens("nogroups")
    x = torch.randn(slots.numel(), N)
    assert _rel(k.linear(x.to(DEV), tokens, lay), _want(x, slots, exact)) < 1e-5


def test_layer_cache_follows_versions():
    """Launch tables are rebuilt when a slot changes; a layer with no token of the batch returns None."""
    k = get_kernels("triton")
    lay, exact = _layer(k, ["lowrank"], torch.float32)
    x = torch.randn(3, N)
    ts = TokenSlots.from_rows([0, 0, -1], 1, "cpu")
    y1 = k.linear(x, ts, lay)
    assert "triton" in lay.cache
    lay.set(0, k.pack(*ENTRIES["sign_1_matrix"], (M, N), dtype=torch.float32))
    assert "triton" not in lay.cache
    y2 = k.linear(x, TokenSlots.from_rows([0, 0, -1], 1, "cpu"), lay)
    assert _rel(y2, _want(x, torch.tensor([0, 0, -1]), {0: _exact(*ENTRIES["sign_1_matrix"])})) < 1e-5
    assert not torch.allclose(y1, y2)
    assert k.linear(x, TokenSlots.from_rows([-1, 4, -1], 1, "cpu"), lay) is None


def test_rows_and_vectors_match_reference():
    k = get_kernels("triton")
    ref = get_kernels("reference")
    ids = torch.tensor([0, 5, M - 1, 5, 7, 36, 1])
    slots = torch.tensor([0, 1, 2, 3, -1, 4, 0])
    keys = ["deltacome_rows", "sign_3_row", "dare_16", "dense", "all_widths_g16"]
    lay, _ = _layer(k, keys, torch.float32)
    rlay, _ = _layer(ref, keys, torch.float32)
    r = k.rows(ids, TokenSlots(slots), lay)
    want = ref.rows(ids, TokenSlots(slots), rlay)
    torch.testing.assert_close(r.float(), want.float(), rtol=1e-5, atol=1e-6)
    vl, rl = LayerDeltas("b"), LayerDeltas("b")
    vl.set(1, k.pack("dense", {}, {"values": torch.arange(4.0)}, (4,), dtype=torch.float32))
    rl.set(1, ref.pack("dense", {}, {"values": torch.arange(4.0)}, (4,), dtype=torch.float32))
    ts = TokenSlots(torch.tensor([1, -1, 0, 1]))
    torch.testing.assert_close(k.vector(ts, vl), ref.vector(ts, rl))


def test_cpu_without_interpreter_is_an_error(monkeypatch):
    from deltapack.errors import DeltapackError

    k = get_kernels("triton")
    lay, _ = _layer(k, ["lowrank"], torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DeltapackError, match="CUDA"):
        k.linear(torch.randn(2, N), TokenSlots.from_rows([0, 0], 1, "cpu"), lay)


# ---- end to end -----------------------------------------------------------------------------------------------------
def test_pico_server_triton_equals_reference(tmp_path):
    """A pico model served with kernels="triton" (interpreted) generates the reference backend's greedy tokens, for
    tenants of every codec family decoded together in one batch."""
    import httpx

    from conftest import make_finetune, make_llama
    from deltapack import api
    from deltapack.serve.testing import running_server, to_float32

    make_llama(tmp_path / "base", hidden=64, layers=1, vocab=96, dtype=torch.float32)
    tenants = {  # name: (method, ratio, params); delta-come and bitdelta: the fast-path test below
        "lowrank": ("lowrank", 4.0, {}),
        "dare": ("dare", 4.0, {}),
        "deltadq": ("deltadq", 4.0, {"calibrate": False}),
    }
    deltas = []
    for i, (name, (method, ratio, params)) in enumerate(tenants.items()):
        make_finetune(tmp_path / "base", tmp_path / f"ft_{name}", scale=0.6, seed=20 + i)
        to_float32(tmp_path / f"ft_{name}")
        deltas.append((name, api.compress(tmp_path / "base", tmp_path / f"ft_{name}", tmp_path / f"d_{name}", method=method,
                                          ratio=ratio, params=params, progress=False)))
    prompts = {"lowrank": [5, 17, 9], "dare": [11, 12, 13, 40], "deltadq": [1, 50], "base": [9, 9]}

    def run(kernels: str) -> dict[str, list[int]]:
        out = {}
        with running_server(tmp_path / "base", deltas, kernels=kernels, max_batch=8) as (state, url):
            assert state.runner.state.kernels.name == kernels
            if kernels == "triton":  # tensor-core path: the interpreter runs it fastest (the unit tests cover both)
                state.runner.state.kernels.config.bcast_max_tokens = 0
            from concurrent.futures import ThreadPoolExecutor

            def go(m):
                r = httpx.post(f"{url}/v1/completions", json={"model": m, "prompt": prompts[m], "max_tokens": 3,
                                                                "temperature": 0, "ignore_eos": True}, timeout=120)
                assert r.status_code == 200, r.text
                return m, r.json()["choices"][0]["token_ids"]

            with ThreadPoolExecutor(len(prompts)) as pool:
                out = dict(pool.map(go, list(prompts)))
        return out

    got, want = run("triton"), run("reference")
    assert got == want
    assert len({tuple(v) for v in want.values()}) > 1


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on ops that read device data on the host (they break CUDA-graph capture): .item()/bool(), nonzero."""

    BAD = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::masked_select", "aten::_unique2")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.BAD:
            raise AssertionError(f"host sync in the decode step: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_static_decoder_matches_merged_models(tmp_path, kernels):
    """The fast path (static cache, static slot ids, the graph-capturable step run eagerly on the CPU) generates the
    merged models' greedy tokens for a ragged batch of tenants and base rows; its step makes no host sync."""
    from conftest import make_finetune, make_llama
    from deltapack import api
    from deltapack.serve.fastpath import StaticDecoder
    from deltapack.serve.model import ModelRunner
    from deltapack.serve.testing import greedy_reference, merged_model, to_float32
    from deltapack.serve.tiers import DeltaTiers

    make_llama(tmp_path / "base", hidden=64, layers=1, vocab=96, dtype=torch.float32)
    runner = ModelRunner(tmp_path / "base", device="cpu", kernels=kernels)
    if kernels == "triton":
        runner.state.kernels.config.bcast_max_tokens = 0  # tensor-core path: the fastest in the interpreter
    tiers = DeltaTiers(runner, device_bytes=1 << 30, host_bytes=1 << 30)
    slots, refs = {}, {}
    prompts = [[5, 17, 9], [40, 2, 77, 8, 13], [7]]
    for i, (method, params) in enumerate([("delta-come", {"quantizer": "rtn"}), ("bitdelta", {})]):
        make_finetune(tmp_path / "base", tmp_path / f"ft{i}", scale=0.6, seed=40 + i)
        to_float32(tmp_path / f"ft{i}")
        d = api.compress(tmp_path / "base", tmp_path / f"ft{i}", tmp_path / f"d{i}", method=method, ratio=4.0,
                         params=params, progress=False)
        t = tiers.register(f"t{i}", d)
        assert tiers.acquire(t)
        slots[i] = t.slot
        refs[i] = merged_model(tmp_path / "base", d)
    from transformers import AutoModelForCausalLM

    refs[-1] = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    tenant_of_row = [0, -1, 1]
    row_slots = [slots[t] if t >= 0 else -1 for t in tenant_of_row]
    dec = StaticDecoder(runner.model, runner.state, batch=3, max_len=12, graph=False)
    got = dec.generate(prompts, row_slots, 3)
    for b, t in enumerate(tenant_of_row):
        assert got[b] == greedy_reference(refs[t], prompts[b], 3), b
    with _NoHostSync(), torch.inference_mode():
        dec._step_body()


def test_launch_options_cap_registers_only_when_compiled(monkeypatch):
    """The register cap (ptxas maxnreg) goes to compiled tensor-core launches only; the interpreter gets none."""
    k = tk.TritonKernels(tk.LaunchConfig())
    monkeypatch.setattr(tk, "interpreting", lambda: True)
    assert "maxnreg" not in k._options(True) and k._options(True)["num_stages"] == 1
    monkeypatch.setattr(tk, "interpreting", lambda: False)
    assert k._options(True)["maxnreg"] == 128 and "maxnreg" not in k._options(False)
    k = tk.TritonKernels(tk.LaunchConfig(max_registers=96, max_registers_dot=None, num_stages=None))
    assert k._options(False) == {"maxnreg": 96} and k._options(True) == {}
