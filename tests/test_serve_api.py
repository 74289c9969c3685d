"""The OpenAI-compatible surface through real HTTP, on a pico model with a word-level tokenizer and chat template:
text prompts, streaming (SSE, [DONE], include_usage), stop strings, chat, echo/logprobs (as lm-evaluation-harness
uses them), seeds, several prompts per request, /v1/models, /health, /metrics."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.serve.testing import greedy_reference, make_word_tokenizer, merged_model, running_server, sse_events, to_float32

VOCAB = 128
EOS = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_api")
    make_llama(d / "base", hidden=64, vocab=VOCAB, dtype=torch.float32)
    make_word_tokenizer(d / "base", VOCAB)
    make_finetune(d / "base", d / "ft", scale=0.6, seed=21)
    to_float32(d / "ft")
    delta = api.compress(d / "base", d / "ft", d / "delta", method="lowrank", ratio=2.0, progress=False)
    model = merged_model(d / "base", delta)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "base")
    with running_server(d / "base", [("tuned", delta), ("metered", delta)], max_batch=8) as (state, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"client": client, "state": state, "tok": tok, "model": model}


def _ref_tokens(env, ids, n, stop_at_eos=True):
    out = greedy_reference(env["model"], ids, n)
    if stop_at_eos and EOS in out:
        out = out[: out.index(EOS) + 1]
    return out


def _post(env, path, body):
    r = env["client"].post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


PROMPT = "hello world w5 w9 the w30"


def test_text_completion_matches_merged_model(env):
    tok = env["tok"]
    ids = tok(PROMPT)["input_ids"]
    want = _ref_tokens(env, ids, 10)
    out = _post(env, "/v1/completions", {"model": "tuned", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "return_token_ids": True})
    c = out["choices"][0]
    assert c["token_ids"] == want
    assert c["finish_reason"] == ("stop" if want[-1] == EOS else "length")
    assert (PROMPT + c["text"]).split() == tok.decode(ids + want, skip_special_tokens=True).split()
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want), "total_tokens": len(ids) + len(want)}
    assert out["object"] == "text_completion" and out["model"] == "tuned"


def test_streaming_equals_non_streaming(env):
    body = {"model": "tuned", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = _post(env, "/v1/completions", body)["choices"][0]["text"]
    with env["client"].stream("POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    chunks = events[:-2]
    assert all(e["object"] == "text_completion" for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    # without include_usage: no usage chunk
    with env["client"].stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


def test_stop_strings(env):
    body = {"model": "tuned", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = _post(env, "/v1/completions", body)["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 4
    stop = words[2]
    want = full[: full.find(stop)]
    out = _post(env, "/v1/completions", {**body, "stop": [stop, "zzz-never"]})["choices"][0]
    assert out["text"] == want and out["finish_reason"] == "stop"
    with env["client"].stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # a stop string spanning two tokens ("w.. w..") is found too
    two = " ".join(words[1:3])
    out = _post(env, "/v1/completions", {**body, "stop": two})["choices"][0]
    assert out["text"] == full[: full.find(two)] and out["finish_reason"] == "stop"


def test_chat_template(env):
    tok = env["tok"]
    messages = [{"role": "system", "content": "the w1"}, {"role": "user", "content": "hello w7 w8"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    want = _ref_tokens(env, ids, 8)
    out = _post(env, "/v1/chat/completions", {"model": "tuned", "messages": messages, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    c = out["choices"][0]
    assert out["object"] == "chat.completion" and c["message"]["role"] == "assistant"
    assert c["prompt_token_ids"] == ids and c["token_ids"] == want
    assert c["message"]["content"].split() == tok.decode(want, skip_special_tokens=True).split()
    with env["client"].stream(
        "POST", "/v1/chat/completions",
        json={"model": "tuned", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"])
    assert content == c["message"]["content"]
    assert events[-2]["usage"]["prompt_tokens"] == len(ids)
    # chat logprobs
    out = _post(env, "/v1/chat/completions", {"model": "tuned", "messages": messages, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    lp = out["choices"][0]["logprobs"]["content"]
    assert len(lp) == len(out["choices"][0].get("token_ids", lp)) and all(len(x["top_logprobs"]) == 2 for x in lp)
    assert all(x["logprob"] == pytest.approx(x["top_logprobs"][0]["logprob"]) for x in lp)  # greedy = top-1


def test_echo_prompt_logprobs(env):
    """echo + logprobs + max_tokens=0: the prompt's own token logprobs (what lm-eval's loglikelihood needs)."""
    tok = env["tok"]
    ids = tok(PROMPT)["input_ids"]
    out = _post(env, "/v1/completions", {"model": "tuned", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
    c = out["choices"][0]
    assert c["text"] == PROMPT
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(env["model"](torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert len(lp["top_logprobs"][i]) == 1
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert out["usage"]["completion_tokens"] == 0


def test_lm_eval_style_loglikelihood(env):
    """Token-id prompts in a batch, echo, max_tokens=1, logprobs=1, parsed the way lm-eval's local-completions does."""
    tok = env["tok"]
    ctx = tok("hello world the")["input_ids"]
    conts = [tok(" w3 w4")["input_ids"], tok(" a of")["input_ids"]]
    prompts = [ctx + c for c in conts]
    out = _post(env, "/v1/completions", {"model": "tuned", "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234})
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice, p, cont in zip(sorted(out["choices"], key=lambda c: c["index"]), prompts, conts):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(p) + 1
        got = sum(lps[len(ctx) : -1])
        with torch.no_grad():
            ref = torch.log_softmax(env["model"](torch.tensor([p])).logits[0].float(), -1)
        want = sum(float(ref[i - 1, p[i]]) for i in range(len(ctx), len(p)))
        assert got == pytest.approx(want, abs=1e-4)
        tops = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        greedy = all(lp == max(t.values()) for lp, t in zip(lps[len(ctx) : -1], tops))
        assert greedy == all(int(ref[i - 1].argmax()) == p[i] for i in range(len(ctx), len(p)))


def test_several_prompts_one_request(env):
    prompts = [PROMPT, "the w2 w3"]
    body = {"model": "tuned", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    both = _post(env, "/v1/completions", {**body, "prompt": prompts})
    singles = [_post(env, "/v1/completions", {**body, "prompt": p})["choices"][0]["text"] for p in prompts]
    assert [c["text"] for c in sorted(both["choices"], key=lambda c: c["index"])] == singles
    assert both["usage"]["completion_tokens"] == 10


def test_seeded_sampling_is_reproducible(env):
    body = {"model": "tuned", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "top_k": 30, "seed": 77, "ignore_eos": True}
    a = _post(env, "/v1/completions", body)["choices"][0]["text"]
    b = _post(env, "/v1/completions", body)["choices"][0]["text"]
    assert a == b and len(a.split()) == 10


def test_models_and_health(env):
    c = env["client"]
    assert c.get("/health").json()["status"] == "ok"
    data = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert set(data) == {"base", "tuned", "metered"}
    assert data["base"]["parent"] is None and data["tuned"]["parent"] == "base" and data["tuned"]["object"] == "model"
    assert data["tuned"]["max_model_len"] == 128


def _metrics(env) -> dict:
    r = env["client"].get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics(env):
    tok = env["tok"]
    prompts = [PROMPT, "the w2 w3", "hello"]
    n_prompt = n_gen = 0
    for i, p in enumerate(prompts):
        out = _post(env, "/v1/completions", {"model": "metered", "prompt": p, "max_tokens": 3 + i, "temperature": 0, "ignore_eos": True})
        n_prompt += len(tok(p)["input_ids"])
        n_gen += out["usage"]["completion_tokens"]
    m = _metrics(env)
    lab = (("model_name", "metered"),)
    assert m[("vllm:prompt_tokens_total", lab)] == n_prompt
    assert m[("vllm:generation_tokens_total", lab)] == n_gen == 3 + 4 + 5
    assert m[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "metered")))] == 3
    assert m[("vllm:time_to_first_token_seconds_count", lab)] == 3
    assert m[("vllm:inter_token_latency_seconds_count", lab)] == n_gen - 3
    assert m[("vllm:e2e_request_latency_seconds_count", lab)] == 3
    assert m[("vllm:num_requests_running", (("model_name", "base"),))] == 0
    assert m[("vllm:num_requests_waiting", (("model_name", "base"),))] == 0
    assert any(k[0] == "vllm:lora_requests_info" for k in m)
    assert m[("deltapack:resident_deltas", (("tier", "device"),))] == 2
    assert m[("deltapack:delta_bytes", (("tier", "device"),))] > 0
    assert m[("deltapack:delta_hits_total", (("tier", "device"),))] >= 3
    assert ("deltapack:delta_evictions_total", (("tier", "device"),)) in m
    assert m[("deltapack:registered_deltas", ())] == 2
    assert m[("process_resident_memory_bytes", ())] > 0
