"""lossless: exact bit-difference deltas (codec, method, merge, serving view) and the entropy stage of lossy codecs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.errors import FormatError
from deltapack.format import entropy
from deltapack.format.codec_lossless import encode_bits, rebuild_bits
from deltapack.format.directory import DeltaDir
from deltapack.io.sources import open_model


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _finetune_like(base: torch.Tensor, unchanged: float, seed: int = 0) -> torch.Tensor:
    """base moved by a small relative amount (a few ulps in bf16), `unchanged` share of elements left as is."""
    g = torch.Generator().manual_seed(seed)
    f = (base.double() * (1 + 0.01 * torch.randn(base.shape, generator=g, dtype=torch.float64))).to(base.dtype)
    keep = torch.rand(base.shape, generator=g) < unchanged
    return torch.where(keep, base, f)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("unchanged", [0.0, 0.9])
def test_codec_roundtrip_every_float_dtype(dtype, unchanged):
    base = (torch.randn(96, 130) * 0.05).to(dtype)
    ft = _finetune_like(base, unchanged)
    ft[0, :3] = torch.tensor([float("inf"), float("nan"), -0.0]).to(dtype)  # special values too
    params, parts = encode_bits(ft, base)
    out = rebuild_bits(params, parts, ft.shape, base)
    assert _bits_equal(out, ft)
    stored = sum(p.numel() for p in parts.values())
    assert stored < ft.numel() * ft.element_size()  # small changes compress
    if unchanged == 0.9:
        assert params["bitmap"] is True  # where most elements are unchanged the bitmap pays here


@pytest.mark.parametrize("bitmap", [False, True])
def test_codec_no_base_other_dtypes_and_frames(monkeypatch, bitmap):
    monkeypatch.setattr(entropy, "FRAME_ELEMENTS", 1000)  # several frames per plane
    for t in (torch.randint(-5, 5, (77, 50), dtype=torch.int64), torch.rand(3001) < 0.2,
              (torch.randn(5000) * 0.1).to(torch.bfloat16)):
        params, parts = encode_bits(t, None, bitmap=bitmap)
        assert _bits_equal(rebuild_bits(params, parts, t.shape, None), t)


def test_codec_base_of_another_dtype_and_empty():
    base = torch.randn(40, 40)  # fp32 base, bf16 fine-tune: the base is cast first, both ways
    ft = _finetune_like(base.to(torch.bfloat16), 0.3)
    params, parts = encode_bits(ft, base)
    assert _bits_equal(rebuild_bits(params, parts, ft.shape, base), ft)
    e = torch.zeros(0, 8, dtype=torch.bfloat16)
    params, parts = encode_bits(e, e)
    assert rebuild_bits(params, parts, e.shape, e).shape == e.shape


def test_codec_corruption_is_a_format_error():
    base = (torch.randn(64, 64) * 0.05).to(torch.bfloat16)
    params, parts = encode_bits(_finetune_like(base, 0.0), base)
    bad = parts["planes"].clone()
    bad[len(bad) // 2 :] = 7
    with pytest.raises(FormatError):
        rebuild_bits(params, {"planes": bad}, base.shape, base)
    with pytest.raises(FormatError):
        rebuild_bits(params, {"planes": parts["planes"][:-5]}, base.shape, base)
    with pytest.raises(FormatError):
        rebuild_bits(params, {}, base.shape, base)


def _pair(tmp_path, dtype, **kw):
    from transformers import AutoModelForCausalLM

    make_llama(tmp_path / "base", dtype=dtype, **kw)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layers.1.mlp" in n:
                continue  # unchanged tensors: not stored
            p.copy_(_finetune_like(p.data, 0.3, seed=len(n)))
    model.save_pretrained(tmp_path / "ft", safe_serialization=True)
    return tmp_path / "base", tmp_path / "ft"


def _merged_equals_finetune(base, ft, delta, out) -> bool:
    api.merge(base, delta, out, progress=False)
    a, b = open_model(ft), open_model(out)
    return set(a.keys()) == set(b.keys()) and all(_bits_equal(a.get(n), b.get(n)) for n in a.keys())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compress_merge_bit_for_bit(tmp_path, dtype):
    base, ft = _pair(tmp_path, dtype)
    d = api.compress(base, ft, tmp_path / "delta", method="lossless", progress=False, device="cpu")
    info = api.inspect(d)
    assert {t["codec"] for t in info["tensors"]} == {"lossless"}
    assert info["format_version"] == 3  # every writer now adds the manifest digest (issue 25)
    # the true ratio's numerator is the bf16 size: an fp32 pair's exact delta is measured against its own size
    width = torch.empty(0, dtype=dtype).element_size()
    assert info["true_ratio"] * width / 2 > 1.0
    assert _merged_equals_finetune(base, ft, d, tmp_path / "merged")
    # in memory too, and the float view of the delta is fine-tune - base
    sd = api.merged_state_dict(base, d)
    bsrc, fsrc = open_model(base), open_model(ft)
    assert all(_bits_equal(sd[n], fsrc.get(n)) for n in fsrc.keys())
    dd = DeltaDir.open(d)
    n = next(iter(dd.manifest.tensors))
    delta = dd.decode(n, base=bsrc.get(n))
    assert torch.equal(delta, fsrc.get(n).double() - bsrc.get(n).double()) if dtype == torch.float32 else \
        torch.equal(delta, fsrc.get(n).float() - bsrc.get(n).float())
    with pytest.raises(FormatError):
        dd.decode(n)  # bits against the base: no delta without it


def test_raw_is_lossless_and_vocab_growth_is_exact(tmp_path):
    make_llama(tmp_path / "base")
    make_finetune(tmp_path / "base", tmp_path / "ft", grow_vocab=8)
    d = api.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", method="raw", progress=False, device="cpu")
    man = json.loads((d / "delta_config.json").read_text())
    assert man["method"] == "raw"
    assert {t["codec"] for t in man["tensors"].values()} == {"lossless"}
    assert any(t.get("base_rows") for t in man["tensors"].values())
    assert _merged_equals_finetune(tmp_path / "base", tmp_path / "ft", d, tmp_path / "merged")


def test_dense_exact_is_the_old_raw(pico_pair, tmp_path):
    base, ft = pico_pair
    d = api.compress(base, ft, tmp_path / "delta", method="dense-exact", progress=False, device="cpu")
    man = json.loads((d / "delta_config.json").read_text())
    assert man["format_version"] == 3  # the manifest digest (issue 25): older readers refuse it by version
    assert {t["codec"] for t in man["tensors"].values()} == {"dense"}
    assert _merged_equals_finetune(base, ft, d, tmp_path / "merged")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.int32, torch.uint8])
def test_entropy_part_roundtrip(dtype):
    if dtype.is_floating_point:
        t = (torch.randn(300, 40) * 0.01).to(dtype)
    else:
        t = torch.randint(0, 4, (300, 40)).to(dtype)
    r = entropy.encode_part(t)
    assert r is not None  # low-entropy bytes: saves more than 5%
    blob, rec = r
    assert _bits_equal(entropy.decode_part(torch.from_numpy(blob.copy()), rec), t)
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    assert entropy.encode_part(noise) is None  # random bytes do not shrink: stored as is


def test_entropy_stage_lossy_same_delta_smaller(small_pair, tmp_path, monkeypatch):
    base, ft = small_pair
    d1 = api.compress(base, ft, tmp_path / "with", method="dare", ratio=8, progress=False, device="cpu")
    monkeypatch.setattr(entropy, "MIN_SAVING", 2.0)  # nothing ever qualifies: the stage is off
    d0 = api.compress(base, ft, tmp_path / "without", method="dare", ratio=8, progress=False, device="cpu")
    a, b = DeltaDir.open(d1), DeltaDir.open(d0)
    assert any(te.entropy for te in a.manifest.tensors.values())
    assert not any(te.entropy for te in b.manifest.tensors.values())
    # the budget counts bytes after the stage: its saving is spent on more kept values, not on a smaller file
    assert abs(a.true_ratio() / b.true_ratio() - 1) < 0.05
    kept = [sum(te.params["keep_prob"] for te in d.manifest.tensors.values() if te.codec == "sparse") for d in (a, b)]
    assert kept[0] > 1.05 * kept[1]
    assert a.manifest.format_version == b.manifest.format_version == 3
    for n, te in a.manifest.tensors.items():  # what is stored decodes back bit for bit
        if te.entropy:
            assert api.verify(base, d1)["ok"]
            break


def test_bench_finetune_dirs_mode(pico_pair, tmp_path):
    """The mode the GPU machine runs: --finetune-dirs DIR... --base PATH writes the records the results file holds."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "lossless" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_lossless_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base, ft = pico_pair
    out = tmp_path / "res.json"
    assert mod.main(["--base", str(base), "--finetune-dirs", str(ft), "--methods", "lossless,dense-exact,dare",
                     "--ratio", "1.5", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] and doc["device"] and doc["date"]
    recs = {r["method"]: r for r in doc["records"]}
    assert set(recs) == {"codec-study", "lossless", "dense-exact", "dare"}
    for m in ("lossless", "dense-exact", "dare"):
        assert {"model", "pair", "method", "true_ratio", "encode_s", "decode_s", "exact"} <= set(recs[m])
    assert recs["lossless"]["exact"] and recs["dense-exact"]["exact"] and not recs["dare"]["exact"]
    assert recs["lossless"]["true_ratio"] > recs["dense-exact"]["true_ratio"]
    assert "entropy_stage" in recs["dare"]
    with pytest.raises(SystemExit):
        mod.main(["--finetune-dirs", str(ft)])  # no --base


def test_entropy_coding_from_many_threads_at_once():
    """zstd contexts are per thread: parts coded and decoded from eight threads at once come back exact (one shared
    context corrupted frames when the server prepared deltas in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    from deltapack.format.entropy import decode_part, encode_part

    def round_trip(seed: int) -> bool:
        g = torch.Generator().manual_seed(seed)
        t = (torch.randn(64, 512, generator=g) * 1e-3).to(torch.bfloat16)  # low-entropy exponents: it compresses
        ok = True
        for _ in range(10):
            coded = encode_part(t)
            assert coded is not None
            blob, rec = coded
            ok &= torch.equal(decode_part(blob, rec), t)
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(16)))
