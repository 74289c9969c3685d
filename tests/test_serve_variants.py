"""Model variants through real HTTP, each tenant equal to its merged model: a base with tied embeddings (the head
takes the embedding's delta), a fine-tune that unties its head (a tensor absent from the base replaces the base's
output), bias deltas on linears, and a fine-tune whose architecture differs (refused)."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.serve.testing import greedy_reference, merged_model, running_server, to_float32

PROMPTS = [[4, 8, 15, 16, 23, 42], [99]]


def _untied(base, out, seed):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone())
    with torch.no_grad():
        for p in (m.lm_head.weight, m.model.layers[0].mlp.up_proj.weight):
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=g))
    m.save_pretrained(out, safe_serialization=True)
    return out


def _with_bias(base, out, seed):
    """The fine-tune gains attention projection biases (attention_bias: the base has none)."""
    import json

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    out.mkdir()
    sd = load_file(str(base / "model.safetensors"))
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = sd[f"model.layers.{i}.self_attn.{proj}.weight"]
            sd[f"model.layers.{i}.self_attn.{proj}.bias"] = 0.5 * torch.randn(w.shape[0], generator=g)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["attention_bias"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _tied_base(path):
    """A tied pico Llama whose layers are not negligible next to the residual stream (at the default init a tied
    model just repeats its last input token, which would make tenants indistinguishable)."""
    from transformers import AutoModelForCausalLM

    make_llama(path, hidden=64, vocab=128, dtype=torch.float32, tie=True)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.mul_(12.0)
    m.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_var")
    _tied_base(d / "base")
    make_finetune(d / "base", d / "ft_tied", scale=0.6, seed=50)
    to_float32(d / "ft_tied")
    deltas = {
        "tied_lowrank": api.compress(d / "base", d / "ft_tied", d / "tied_lowrank", method="lowrank", ratio=2.0, progress=False),
        "tied_raw": api.compress(d / "base", d / "ft_tied", d / "tied_raw", method="raw", progress=False),
        "untied": api.compress(d / "base", _untied(d / "base", d / "ft_untied", 51), d / "untied", method="raw", progress=False),
    }
    refs = {n: [greedy_reference(merged_model(d / "base", p), q, 6) for q in PROMPTS] for n, p in deltas.items()}
    return d, deltas, refs


def merged_model_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokens(url, model, prompt):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_tied_and_untied_heads(env):
    d, deltas, refs = env
    man = {n: api.inspect(p) for n, p in deltas.items()}
    assert "lm_head.weight" not in {t["name"] for t in man["tied_raw"]["tensors"]}  # the head follows the embedding
    assert "lm_head.weight" in {t["name"] for t in man["untied"]["tensors"]}  # absent from the base: replaces it
    base = [greedy_reference(merged_model_base(d / "base"), q, 6) for q in PROMPTS]
    assert refs["tied_raw"] != base and refs["untied"] != base and refs["untied"] != refs["tied_raw"]
    assert any(len(set(r)) > 2 for r in base + refs["tied_raw"])  # not a degenerate repetition
    with running_server(d / "base", list(deltas.items()), max_batch=8) as (state, url):
        for n in deltas:
            for q, want in zip(PROMPTS, refs[n]):
                assert _tokens(url, n, q) == want, n


def test_bias_deltas_and_architecture_changes(env, tmp_path):
    """Linear biases changed by a fine-tune (a base with attention biases) are served as vector deltas; a fine-tune
    that adds biases the base lacks changes the architecture (attention_bias) and is refused with a clear 400."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    d, _, _ = env
    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128, max_position_embeddings=128, attention_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "bbase", safe_serialization=True)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "bbase", dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    m.save_pretrained(tmp_path / "bbase", safe_serialization=True)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g))
    m.save_pretrained(tmp_path / "bft", safe_serialization=True)
    delta = api.compress(tmp_path / "bbase", tmp_path / "bft", tmp_path / "root" / "biases", method="raw", progress=False)
    assert {t["name"].rsplit(".", 1)[1] for t in api.inspect(delta)["tensors"]} == {"bias"}
    want = [greedy_reference(merged_model(tmp_path / "bbase", delta), q, 6) for q in PROMPTS]
    base_out = [greedy_reference(merged_model_base(tmp_path / "bbase"), q, 6) for q in PROMPTS]
    assert want != base_out
    with running_server(tmp_path / "bbase", [("biases", delta)]) as (state, url):
        assert [_tokens(url, "biases", q) for q in PROMPTS] == want
    # biases added to a bias-free base: a different architecture
    ft = _with_bias(d / "base", tmp_path / "ft_bias", 52)
    delta2 = api.compress(d / "base", ft, tmp_path / "root" / "added", method="raw", progress=False)
    with running_server(d / "base", [], delta_root=tmp_path / "root") as (state, url):
        r = httpx.post(f"{url}/v1/deltas", json={"name": "added", "path": str(delta2)})
        assert r.status_code == 400 and "attention_bias" in r.json()["error"]["message"]
