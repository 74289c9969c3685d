"""The real-tokenizer path on the embedded SmolLM2-135M-Instruct: chat template, text in/out, a compressed
fine-tune (attention/MLP, the tied embedding/head and the final norm changed; low-rank factors, dense norm) served
with the base in one server, each equal to its reference model token for token (fp32)."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from deltapack import api
from deltapack.serve.testing import merged_model, running_server, sse_events

pytestmark = pytest.mark.smollm

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
N = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltapack.io.embedded import embedded_model_dir

    base = embedded_model_dir()
    d = tmp_path_factory.mktemp("serve_smol")
    tok = AutoTokenizer.from_pretrained(base)
    g = torch.Generator().manual_seed(0)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        p = dict(m.named_parameters())
        with torch.no_grad():
            for i in range(8):
                for key in (f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
                    w = p[key]
                    lr = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g) / 8**0.5
                    w.add_(w.abs().mean() * lr)
            e = p["model.embed_tokens.weight"]  # tied: the head changes with it
            e.add_(0.3 * e.abs().mean() * torch.randn(e.shape, generator=g))
            p["model.norm.weight"].mul_(1 + 0.2 * torch.randn(p["model.norm.weight"].shape, generator=g))
        m.save_pretrained(d / "ft", safe_serialization=True)
        del m, p
        for f in base.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copyfile(f, d / "ft" / f.name)
        delta = api.compress(base, d / "ft", d / "lr", method="lowrank", ratio=4.0, progress=False)
        ids = tok(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        refs = {
            "lr": _generate(merged_model(base, delta), ids),
            "base": _generate(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), ids),
        }
    finally:
        torch.set_num_threads(n)
    return base, {"lr": delta}, refs, ids, tok


def _generate(model, ids):
    """Reference: transformers' own cached greedy generate (stops after EOS, like the server)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=N, do_sample=False)
    return out[0, len(ids) :].tolist()


def _cut_eos(toks, eos):
    return toks[: toks.index(eos) + 1] if eos in toks else toks


def test_chat_with_real_tokenizer(env):
    base, deltas, refs, ids, tok = env
    assert refs["lr"] != refs["base"]
    eos = tok.eos_token_id
    with running_server(base, list(deltas.items()), max_batch=4) as (state, url):
        c = httpx.Client(base_url=url, timeout=120)
        for model in ("lr", "base"):
            r = c.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": N, "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            assert ch["prompt_token_ids"] == ids
            want = _cut_eos(refs[model], eos)
            assert ch["token_ids"] == want, model
            assert ch["message"]["content"] == tok.decode(want, skip_special_tokens=True)
        # streamed text equals the whole text; usage at the end
        with c.stream("POST", "/v1/chat/completions", json={"model": "lr", "messages": MESSAGES, "max_tokens": N, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
            ev = sse_events(r.iter_lines())
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1] if e["choices"])
        assert text == tok.decode(_cut_eos(refs["lr"], eos), skip_special_tokens=True)
        assert ev[-1] == "[DONE]" and ev[-2]["usage"]["prompt_tokens"] == len(ids)
        # completions with a text prompt: prompt + completion reads as the decoded sequence
        prompt = tok.decode(ids)
        r = c.post("/v1/completions", json={"model": "lr", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == tok.decode(_cut_eos(refs["lr"], eos)[:5], skip_special_tokens=True)
