"""peft LoRA adapters as deltas: made by peft here, served (--delta NAME=ADAPTER and POST /v1/load_lora_adapter) in
one batch with a compressed full fine-tune and the base, greedy tokens equal to peft's own merged model through
HTTP; import-lora's exact and quantized forms; adapters a fixed delta cannot express refused by name."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from click.testing import CliRunner

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.cli import main
from deltapack.serve.testing import admitted_together, api_error, greedy_reference, merged_model, running_server, to_float32

HIDDEN, VOCAB = 64, 128
PROMPTS = [[5, 17, 9, 33], [40, 2, 77, 8, 13, 61, 99, 4, 20]]
MAX_TOKENS = 8
# adapter -> peft LoraConfig arguments: ranks 8 and 64, a subset of modules vs all linears + the embedding LoRA,
# with and without modules_to_save, rsLoRA and per-module rank / alpha patterns
ADAPTERS = {
    "r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r64": dict(r=64, lora_alpha=32, use_rslora=True, modules_to_save=["lm_head"],
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
                rank_pattern={"down_proj": 16}, alpha_pattern={"layers.1.self_attn.o_proj": 8}),
}


def make_adapter(base, out, seed: int, **cfg):
    """A peft adapter with random (non-zero) A and B, and a changed copy of every modules_to_save module."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(0.5)
            if ".modules_to_save." in n:
                p.add_(0.3 * p.std() * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def peft_merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("peft")
    d = tmp_path_factory.mktemp("serve_lora")
    make_llama(d / "base", hidden=HIDDEN, vocab=VOCAB, dtype=torch.float32)
    refs, adapters = {}, {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        adapters[name] = make_adapter(d / "base", d / f"adapter_{name}", 20 + i, **cfg)
        model = peft_merged(d / "base", adapters[name])
        refs[name] = [greedy_reference(model, p, MAX_TOKENS) for p in PROMPTS]
    make_finetune(d / "base", d / "ft", scale=0.6, seed=12, rank=4)
    to_float32(d / "ft")
    delta = api.compress(d / "base", d / "ft", d / "delta_full", method="lowrank", ratio=2.0, progress=False)
    refs["full"] = [greedy_reference(merged_model(d / "base", delta), p, MAX_TOKENS) for p in PROMPTS]
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32).eval()
    refs["base"] = [greedy_reference(base_model, p, MAX_TOKENS) for p in PROMPTS]
    assert len({tuple(map(tuple, v)) for v in refs.values()}) == len(refs)  # every model generates its own tokens
    return d, adapters, delta, refs


def _complete(url, model, prompt):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                  "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _one_batch(state, url, models):
    """Every (model, prompt) admitted in one engine step; returns the generated token ids by (model, prompt index)."""
    jobs = [(m, i) for m in models for i in range(len(PROMPTS))]
    out = admitted_together(state, [lambda m=m, i=i: _complete(url, m, PROMPTS[i]) for m, i in jobs])
    return dict(zip(jobs, out))


def test_adapters_serve_beside_a_compressed_delta_and_the_base(setup):
    """--delta NAME=ADAPTER_DIR (build_server's list): peft adapters, a lowrank full fine-tune and the base in one
    batch; each generates its reference model's greedy tokens."""
    d, adapters, delta, refs = setup
    deltas = [("r8", adapters["r8"]), ("r64", adapters["r64"]), ("full", delta)]
    with running_server(d / "base", deltas, max_batch=16) as (state, url):
        got = _one_batch(state, url, list(refs))
        for (m, i), toks in got.items():
            assert toks == refs[m][i], (m, i)
        assert state.engine.max_tenants_in_step == len(refs)
        scratch = state.tiers._scratch
        assert scratch is not None and scratch.is_dir()
        assert {t.delta.entry(n).codec for t in state.tiers.tenants.values() if t.imported for n in t.placements} == {"lora", "dense"}
        listed = httpx.get(f"{url}/v1/models").json()["data"]
        assert {m["id"]: m["root"] for m in listed}["r8"] == str(adapters["r8"].resolve())
    assert not scratch.exists()  # imported copies go with the server


def test_load_lora_adapter_endpoint(setup):
    """vLLM's POST /v1/load_lora_adapter takes a real peft adapter directory; unloading removes its stored copy."""
    d, adapters, _, refs = setup
    with running_server(d / "base", [], delta_root=d) as (state, url):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": adapters["r64"].name})
        assert r.status_code == 200, r.text
        assert [_complete(url, "mine", p) for p in PROMPTS] == refs["r64"]
        copy = state.tiers.tenants["mine"].imported
        assert copy.is_dir()
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "mine"}).status_code == 200
        assert not copy.exists()


def test_import_lora_round_trip(setup, tmp_path):
    """import-lora stores the adapter exactly (codec lora: its own factors and scale); merge rebuilds peft's merged
    weights; export-lora gives back an adapter peft loads to the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, adapters, _, _ = setup
    res = CliRunner().invoke(main, ["import-lora", str(adapters["r64"]), "--base", str(d / "base"), "-o", str(tmp_path / "dl"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["exact"] and rep["codec"] == "lora" and rep["dense_tensors"] == ["lm_head.weight"]
    assert rep["ranks"] == [16, 64]
    assert api.verify(d / "base", tmp_path / "dl", progress=False)["ok"]
    ref = peft_merged(d / "base", adapters["r64"]).state_dict()
    api.merge(d / "base", tmp_path / "dl", tmp_path / "merged", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)
    # export-lora drops what LoRA cannot carry (the embedding LoRA, the lm_head copy) and says so
    res = CliRunner().invoke(main, ["export-lora", str(tmp_path / "dl"), "-o", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    assert "embed_tokens" in res.output and "lm_head" in res.output and "--max-lora-rank 64" in res.output
    base = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
    back = PeftModel.from_pretrained(base, tmp_path / "back").merge_and_unload().state_dict()
    for k, v in ref.items():
        if "embed_tokens" not in k and "lm_head" not in k:
            torch.testing.assert_close(back[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_import_lora_quantized(setup, tmp_path):
    """--ratio beyond the exact form's: factors quantized (balanced SVD form), ratio met, weights close."""
    from deltapack.format.directory import DeltaDir

    d, adapters, _, _ = setup
    exact = api.inspect(api_import(adapters["r8"], d / "base", tmp_path / "exact"))["true_ratio"]
    res = CliRunner().invoke(main, ["import-lora", str(adapters["r8"]), "--base", str(d / "base"), "-o", str(tmp_path / "q"),
                                    "--ratio", f"{exact * 1.5:.3f}", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert not rep["exact"] and rep["bits"] < 16 and rep["true_ratio"] >= exact * 1.5 * 0.97
    q, e = DeltaDir.open(tmp_path / "q"), DeltaDir.open(tmp_path / "exact")
    for n in e.manifest.tensors:
        assert q.entry(n).codec == "factors"
        ref = e.decode(n)
        assert (q.decode(n) - ref).norm() / ref.norm() < 0.05, n


def api_import(adapter, base, out):
    from deltapack.import_lora import import_lora

    return import_lora(adapter, base, out)["path"]


@pytest.mark.parametrize("cfg", [dict(target_modules=["q_proj", "embed_tokens"]),
                                 dict(target_modules=["q_proj", "lm_head"]),
                                 dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])],
                         ids=["lora-embed", "lora-head", "saved-embed"])
def test_tied_base_follows_peft(tmp_path, cfg):
    """A tied base: a LoRA on either side changes the one shared parameter (still tied); a saved copy unties the
    two (peft's merged model keeps the head). merge and serve rebuild peft's merged model in each case."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    make_llama(tmp_path / "base", hidden=32, vocab=64, tie=True, dtype=torch.float32)
    ad = make_adapter(tmp_path / "base", tmp_path / "ad", 5, r=4, lora_alpha=8, **cfg)
    rep = api_import(ad, tmp_path / "base", tmp_path / "dl")
    api.merge(tmp_path / "base", rep, tmp_path / "merged", progress=False)
    ref = peft_merged(tmp_path / "base", ad)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    untied = "modules_to_save" in cfg
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == (ref.lm_head.weight is ref.model.embed_tokens.weight) == (not untied)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)
    with running_server(tmp_path / "base", [("t", ad)]) as (state, url):
        assert _complete(url, "t", PROMPTS[0]) == greedy_reference(ref, PROMPTS[0], MAX_TOKENS)


def test_unsupported_adapters_are_refused(setup, tmp_path):
    """DoRA (and other variants that are no fixed delta): a clear error from the CLI and a 400 from the server."""
    d, adapters, _, _ = setup
    dora = make_adapter(d / "base", tmp_path / "dora", 3, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    res = CliRunner().invoke(main, ["import-lora", str(dora), "--base", str(d / "base"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "DoRA adapters are not supported" in res.output and "merge_and_unload" in res.output
    assert not (tmp_path / "x").exists()
    cfg = json.loads((adapters["r8"] / "adapter_config.json").read_text())
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="IA3")))
    res = CliRunner().invoke(main, ["import-lora", str(tmp_path / "ia3"), "--base", str(d / "base"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "only LoRA adapters" in res.output
    with running_server(d / "base", [], delta_root=tmp_path) as (state, url):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": "dora"})
        assert "DoRA" in api_error(r, 400)["message"]
        assert state.tiers._scratch is None or not any(state.tiers._scratch.iterdir())


def test_lora_codec_packs_alike_in_both_backends():
    """The `lora` codec (factors + scale): the reference packer and the Triton layout (built on the CPU here) hold the
    same delta as the codec decodes, the scale folded in once."""
    from deltapack.format.codecs import decode_entry
    from deltapack.kernels import get_kernels
    from deltapack.kernels.triton import layouts

    torch.manual_seed(0)
    params = {"groups": [{"rank": 4, "bits": 16}], "scale": 0.37}
    parts = {"A.float": torch.randn(4, 16).bfloat16(), "Bt.float": torch.randn(4, 8).bfloat16()}
    dense = decode_entry("lora", params, parts, (8, 16))
    ref = get_kernels("reference").pack("lora", params, dict(parts), (8, 16), dtype=torch.float32)
    torch.testing.assert_close(ref.tensors["Bt"].T @ ref.tensors["A"], dense)
    tri = layouts.pack_entry("lora", params, dict(parts), (8, 16), torch.float32)
    torch.testing.assert_close(tri.tensors["B.float"] @ tri.tensors["A.float"], dense)
