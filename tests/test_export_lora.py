"""export-lora: a low-rank delta becomes a peft adapter whose model equals `deltapack merge`'s; what LoRA cannot carry
is reported."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from deltapack import api
from deltapack.errors import DeltapackError
from deltapack.export_lora import REPORT_NAME, export_lora

from conftest import make_finetune, make_llama

IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 60, 3, 44, 8, 21, 30], [7, 7, 0, 63, 12, 40, 41, 2, 5, 19, 26, 11]])


@pytest.fixture(scope="module")
def linear_only(tmp_path_factory):
    """Pico pair (hidden 64) whose fine-tune changes only linear layers, compressed with lowrank."""
    d = tmp_path_factory.mktemp("lora")
    make_llama(d / "base", hidden=64, layers=2, vocab=64)
    make_finetune(d / "base", d / "ft", skip=("embed", "norm", "lm_head"), scale=0.3)
    delta = api.compress(d / "base", d / "ft", d / "delta", method="lowrank", ratio=2, progress=False)
    return d, delta


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_peft_round_trip_matches_merge(linear_only):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, delta = linear_only
    rep = export_lora(delta, d / "adapter")
    assert rep["not_exported"] == []  # only linear layers changed: everything is LoRA
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == api.inspect(delta)["base"]["id"]
    ranks = set(rep["ranks"].values())
    assert len(ranks) > 1 and cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    base = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    ref_base = _logits(base)
    peft_model = PeftModel.from_pretrained(base, d / "adapter").eval()
    # peft built every module at its own rank, with scaling 1
    for mod, r in rep["ranks"].items():
        sub = peft_model.base_model.model.get_submodule(mod)
        assert sub.lora_A["default"].weight.shape == (r, sub.in_features)
        assert sub.scaling["default"] == 1.0
    got = _logits(peft_model)

    merged_dir = api.merge(d / "base", delta, d / "merged", progress=False)
    want = _logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    # the same merge without its final rounding to bf16: base (fp32) + decoded delta
    from deltapack.format.directory import DeltaDir

    dd = DeltaDir.open(delta)
    exact = {k: v + dd.decode(k) if k in dd.manifest.tensors else v for k, v in base_sd.items()}
    fp32 = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
    fp32.load_state_dict(exact)
    want_fp32 = _logits(fp32)
    assert torch.allclose(got, want_fp32, atol=1e-4, rtol=1e-4)
    # against the bf16 merged checkpoint: within what rounding the weights to bf16 moves, far below the delta's effect
    rounding = float((want - want_fp32).abs().max())
    assert float((got - want).abs().max()) <= 2 * rounding + 1e-5
    assert float((got - want).abs().max()) < 0.05 * float((want - ref_base).abs().max())


def test_cli_and_atomic_output(linear_only, tmp_path):
    from deltapack.cli import main

    d, delta = linear_only
    res = CliRunner().invoke(main, ["export-lora", str(delta), "-o", str(tmp_path / "a"), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "LoRA modules" in res.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", REPORT_NAME])
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert all(k.startswith("base_model.model.model.layers.") for k in w)
    # an existing output is not replaced without --overwrite
    res = CliRunner().invoke(main, ["export-lora", str(delta), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "already exists" in res.output


def test_embedding_and_norm_changes_are_reported(tmp_path):
    from deltapack.cli import main

    make_llama(tmp_path / "base", hidden=64, layers=2, vocab=64)
    make_finetune(tmp_path / "base", tmp_path / "ft", skip=("layers.1.mlp.up_proj",), scale=0.05)
    delta = api.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", method="lowrank", ratio=2,
                         progress=False)
    rep = export_lora(delta, tmp_path / "adapter")
    skipped = {s["tensor"]: s["reason"] for s in rep["not_exported"]}
    assert "model.embed_tokens.weight" in skipped and "lm_head.weight" in skipped
    assert "embedding" in skipped["model.embed_tokens.weight"]
    assert "model.norm.weight" in skipped and "model.layers.0.input_layernorm.weight" in skipped
    assert "model.layers.0.mlp.up_proj" in rep["exported"]
    # layer 1's up_proj did not change: full module names, so peft adds no LoRA there
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.up_proj" in cfg["target_modules"]
    assert "model.layers.1.mlp.up_proj" not in cfg["target_modules"]
    on_disk = json.loads((tmp_path / "adapter" / REPORT_NAME).read_text())
    assert on_disk["not_exported"] == rep["not_exported"]
    res = CliRunner().invoke(main, ["export-lora", str(delta), "-o", str(tmp_path / "a2")])
    assert res.exit_code == 0 and "NOT exported" in res.output and "model.embed_tokens.weight" in res.output
    assert "embedding/lm_head and norm/bias deltas" in res.output and rep["dropped_kinds"] == ["embedding/lm_head", "norm/bias"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                  tmp_path / "adapter")
    names = {n for n, _ in m.named_modules() if n.endswith("up_proj")}
    assert any("layers.0.mlp.up_proj" in n for n in names)
    assert not hasattr(m.base_model.model.model.layers[1].mlp.up_proj, "lora_A")


def test_no_low_rank_tensor_is_an_error(pico_pair, tmp_path):
    base, ft = pico_pair
    delta = api.compress(base, ft, tmp_path / "raw", method="raw", progress=False)
    with pytest.raises(DeltapackError, match="no low-rank tensor"):
        export_lora(delta, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_quantized_factor_groups_are_dequantized(linear_only, tmp_path, monkeypatch):
    """delta-come stores factor groups as k-bit QMatrix: the adapter carries the dequantized factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deltapack.format.codecs import build_factor_parts
    from deltapack.methods.base import Encoded
    from deltapack.methods.lowrank import LowRank, top_svd
    from deltapack.quant.rtn import quantize_rows

    def encode_q(self, job, ctx):  # 2 singular vectors at 16 bits, the next 6 at 4 bits (Delta-CoMe's layout)
        U, S, Vh = top_svd(job.delta, 8)
        A, Bt = S.sqrt()[:, None] * Vh, S.sqrt()[:, None] * U.T
        params, parts = build_factor_parts([
            {"bits": 16, "A": A[:2], "Bt": Bt[:2]},
            {"bits": 4, "A": quantize_rows(A[2:], 4, 32), "Bt": quantize_rows(Bt[2:], 4, 32)},
        ])
        return Encoded("factors", params, parts)

    d, _ = linear_only
    monkeypatch.setattr(LowRank, "encode", encode_q)
    monkeypatch.setattr(LowRank, "encode_coded", encode_q)  # what the driver calls (fits the coded size)
    delta = api.compress(d / "base", d / "ft", tmp_path / "dq", method="lowrank", ratio=2, progress=False)
    assert any(4 in r["detail"].get("bits", []) for r in api.inspect(delta)["tensors"])
    rep = export_lora(delta, tmp_path / "adapter")
    assert set(rep["ranks"].values()) == {8}
    base = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    got = _logits(PeftModel.from_pretrained(base, tmp_path / "adapter"))
    from deltapack.format.directory import DeltaDir

    dd = DeltaDir.open(delta)
    ref = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
    ref.load_state_dict({k: v + dd.decode(k) if k in dd.manifest.tensors else v for k, v in sd.items()})
    assert torch.allclose(got, _logits(ref), atol=1e-4, rtol=1e-4)


def test_max_rank_and_vllm_rank(linear_only, tmp_path):
    """The output names vLLM's --max-lora-rank for the adapter; --max-rank caps every module at the best rank-N
    approximation of its delta (the SVD truncation of Btᵀ A)."""
    from deltapack.cli import main
    from deltapack.format.directory import DeltaDir

    d, delta = linear_only
    full = export_lora(delta, tmp_path / "full")
    assert full["vllm_max_lora_rank"] >= full["r"] and full["vllm_max_lora_rank"] in (8, 16, 32, 64, 128, 256, 320, 512)
    cap = max(1, full["r"] // 2)
    res = CliRunner().invoke(main, ["export-lora", str(delta), "-o", str(tmp_path / "cut"), "--max-rank", str(cap), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["r"] == cap and max(rep["ranks"].values()) == cap and rep["truncated"]
    res = CliRunner().invoke(main, ["export-lora", str(delta), "-o", str(tmp_path / "cut2"), "--max-rank", str(cap)])
    assert f"--max-lora-rank {rep['vllm_max_lora_rank']}" in res.output and "truncated" in res.output
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    dd = DeltaDir.open(delta)
    mod = rep["truncated"][0]
    got = w[f"base_model.model.{mod}.lora_B.weight"] @ w[f"base_model.model.{mod}.lora_A.weight"]
    U, S, Vh = torch.linalg.svd(dd.decode(mod + ".weight").double())
    best = (U[:, :cap] * S[:cap]) @ Vh[:cap]
    torch.testing.assert_close(got.double(), best, rtol=1e-4, atol=1e-5)
