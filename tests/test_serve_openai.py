"""The server through the official `openai` client, on a pico model with a byte-level tokenizer (any text, JSON
included, can be spelled): structured output (json_schema, json_object, guided_regex / guided_choice, forced tool
calls) per request in one mixed batch; the sampling fields (min_tokens, logit_bias, allowed_token_ids, penalties,
n); every unsupported field refused with a 400 naming it; /v1/models/{id}, /tokenize, /detokenize, /version."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from conftest import make_finetune, make_llama

from deltapack import api
from deltapack.serve.testing import (
    admitted_together,
    make_byte_tokenizer,
    running_server,
    to_float32,
)

VOCAB = 288  # 260 tokenizer tokens + padding columns, as real models have
EOS = 2

SCHEMA_A = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
SCHEMA_B = {
    "type": "object",
    "properties": {"size": {"enum": ["S", "M", "L"]}, "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
    "required": ["size", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_openai")
    make_llama(d / "base", hidden=64, vocab=VOCAB, dtype=torch.float32)
    make_byte_tokenizer(d / "base")
    make_finetune(d / "base", d / "ft", scale=0.5, seed=4)
    to_float32(d / "ft")
    delta = api.compress(d / "base", d / "ft", d / "delta", method="raw", progress=False)
    with running_server(d / "base", [("tuned", delta)], max_batch=8) as (state, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield {"state": state, "url": url, "client": client, "http": http}


def _chat(env, content="hello", **kw):
    kw.setdefault("max_tokens", 60)
    kw.setdefault("temperature", 0)
    return env["client"].chat.completions.create(model=kw.pop("model", "tuned"), messages=[{"role": "user", "content": content}], **kw)


def _pins_zero(env):
    state = env["state"]
    t0 = time.monotonic()
    while state.engine.snapshot()["running"]:
        assert time.monotonic() - t0 < 30
        time.sleep(0.01)
    assert all(t.pins == 0 for t in state.tiers.tenants.values())


def test_structured_output_in_a_mixed_batch(env):
    """Rows with different schemas, regex, choice, json_object and unconstrained rows, admitted together: every
    constrained output is valid and ends with finish_reason "stop"; the unconstrained row is what it is alone."""
    schema_fmt = lambda name, s: {"type": "json_schema", "json_schema": {"name": name, "schema": s}}
    free = dict(content="tell me", max_tokens=12, model="tuned")
    alone = _chat(env, **free).choices[0].message.content
    calls = [
        lambda: _chat(env, "pick a color", response_format=schema_fmt("a", SCHEMA_A)),
        lambda: _chat(env, "sizes", response_format=schema_fmt("b", SCHEMA_B)),
        lambda: _chat(env, **free),
        lambda: _chat(env, "again a color", response_format=schema_fmt("a", SCHEMA_A), model="base"),
        lambda: _chat(env, "json", extra_body={"guided_json": SCHEMA_B}, temperature=0.8, seed=3),
        lambda: _chat(env, "code", extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"}),
        lambda: _chat(env, "yes or no", extra_body={"guided_choice": ["yes", "no", "maybe \"so\""]}),
        lambda: _chat(env, "an object", response_format={"type": "json_object"}, max_tokens=80, frequency_penalty=1.0),
    ]
    res = admitted_together(env["state"], calls)
    for r in res:
        assert not isinstance(r, Exception), r
    assert env["state"].engine.max_tenants_in_step >= 2
    checks = [SCHEMA_A, SCHEMA_B, None, SCHEMA_A, SCHEMA_B]
    for r, schema in zip(res[:5], checks):
        c = r.choices[0]
        if schema is None:
            assert c.message.content == alone  # its neighbours' constraints did not touch it
            continue
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), schema)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", res[5].choices[0].message.content)
    assert res[6].choices[0].message.content in ("yes", "no", 'maybe "so"')
    obj = res[7].choices[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict)
    _pins_zero(env)


def test_structured_output_on_completions_and_streams(env):
    c = env["client"]
    r = c.completions.create(model="tuned", prompt="color:", max_tokens=60, temperature=0,
                             extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA_A}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA_A)
    stream = c.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "hi"}], max_tokens=60, temperature=0,
                                       stream=True, response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": SCHEMA_B}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA_B)


def test_forced_tool_calls(env):
    named = _chat(env, "weather?", tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = named.choices[0].message
    assert msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    required = _chat(env, "anything", tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    ch = required.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    fn = ch.message.tool_calls[0].function
    tool = {"get_weather": WEATHER, "get_time": TIME}[fn.name]
    jsonschema.validate(json.loads(fn.arguments), tool["function"]["parameters"])
    # the answer goes back into the conversation as the client returns it, tool result included
    follow = env["client"].chat.completions.create(
        model="tuned", max_tokens=4, temperature=0, tools=[WEATHER], tool_choice="none",
        messages=[{"role": "user", "content": "weather?"}, msg.model_dump(exclude_none=False),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content is not None
    # streamed: the call arrives whole in one delta
    chunks = list(_chat(env, "weather?", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def _completion(env, **kw):
    kw.setdefault("model", "tuned")
    kw.setdefault("prompt", "abc")
    kw.setdefault("temperature", 0)
    return env["client"].completions.create(**kw)


def test_min_tokens_logit_bias_allowed_ids(env):
    eos_now = _completion(env, max_tokens=20, logit_bias={str(EOS): 100})
    assert eos_now.usage.completion_tokens == 1 and eos_now.choices[0].finish_reason == "stop"
    held = _completion(env, max_tokens=20, logit_bias={str(EOS): 100}, extra_body={"min_tokens": 5, "return_token_ids": True})
    ids = held.model_extra["choices"][0]["token_ids"] if "choices" in (held.model_extra or {}) else held.choices[0].model_extra["token_ids"]
    assert len(ids) == 6 and EOS not in ids[:5] and ids[5] == EOS
    allowed = [100, 101, 102]  # "a" "b" "c" bytes (specials take 0..3, byte b is token 4 + b)
    r = _completion(env, max_tokens=8, temperature=1.0, seed=5, extra_body={"allowed_token_ids": allowed, "return_token_ids": True, "ignore_eos": True})
    assert set(r.choices[0].model_extra["token_ids"]) <= set(allowed)


def test_penalties_change_greedy_output(env):
    plain = _completion(env, max_tokens=24, extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].model_extra["token_ids"]
    rep = _completion(env, max_tokens=24, extra_body={"ignore_eos": True, "return_token_ids": True, "repetition_penalty": 100.0}).choices[0].model_extra["token_ids"]
    assert len(set(rep)) == len(rep), "a huge repetition penalty repeats no token"
    assert len(set(plain)) < len(plain) or plain != rep
    pres = _completion(env, max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0,
                       extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].model_extra["token_ids"]
    assert pres != plain or len(set(plain)) == len(plain)
    # min_p 1.0 keeps only the most likely token: sampling becomes greedy
    greedy_like = _completion(env, max_tokens=12, temperature=1.5, seed=9, extra_body={"min_p": 1.0, "ignore_eos": True, "return_token_ids": True})
    assert greedy_like.choices[0].model_extra["token_ids"] == plain[:12]


def test_n_choices(env):
    r = _completion(env, prompt=["ab", "cd"], n=3, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == list(range(6))
    again = _completion(env, prompt=["ab", "cd"], n=3, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices[:3]}) > 1  # choice j samples with seed + j
    assert r.usage.completion_tokens == 36 and r.usage.prompt_tokens == 4
    chat = _chat(env, n=2, max_tokens=5)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [WEATHER]}, "tool_choice"),  # tool_choice auto
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"logits_processors": ["x.y"]}, "logits_processors"),
        ({"bad_words": ["w"]}, "bad_words"),
        ({"prompt_logprobs": 2}, "prompt_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"chat_template": "{{ 1 }}"}, "chat_template"),
        ({"echo": True}, "echo"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"presence_penalty": -3.0}, "presence_penalty"),
        ({"best_of": 3}, "best_of"),
        ({"seed": 2**64}, "seed"),
        ({"top_p": 1e-300}, "top_p"),
        ({"min_tokens": 500}, "min_tokens"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"allowed_token_ids": [99999]}, "allowed_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"guided_json": SCHEMA_A, "guided_regex": "a"}, "guided_regex"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"stream_options": {"include_usage": True, "bogus": 1}}, "stream_options.bogus"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_unsupported_or_invalid_fields_name_the_field(env, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(env, max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body


@pytest.mark.parametrize(("extra", "param"), [({"suffix": "x"}, "suffix"), ({"prompt_embeds": "AAAA"}, "prompt_embeds"),
                                               ({"messages": []}, "messages"), ({"echo": True, "n": 99}, "n")])
def test_completion_fields_name_the_field(env, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        _completion(env, max_tokens=2, extra_body=extra)
    assert e.value.param == param, e.value.body


def test_neutral_values_of_unsupported_fields_pass(env):
    r = _chat(env, max_tokens=2, extra_body={"use_beam_search": False, "length_penalty": 1.0, "priority": 0, "bad_words": [],
                                              "store": False, "spaces_between_special_tokens": True, "modalities": ["text"],
                                              "guided_decoding_backend": "xgrammar", "user": "u1", "cache_salt": "s" * 43})
    assert r.usage.completion_tokens >= 1


def test_model_tokenize_version_embeddings(env):
    h = env["http"]
    m = env["client"].models.retrieve("tuned")
    assert m.id == "tuned" and m.model_extra["parent"] == "base"
    assert h.get("/v1/models/base").json()["parent"] is None
    nf = h.get("/v1/models/nope")
    assert nf.status_code == 404 and nf.json()["error"]["code"] == "model_not_found"
    tok = h.post("/tokenize", json={"model": "tuned", "prompt": "héllo"})
    assert tok.status_code == 200, tok.text
    tok = tok.json()
    assert tok["count"] == len(tok["tokens"]) == 6 and tok["max_model_len"] == 128
    assert h.post("/detokenize", json={"model": "tuned", "tokens": tok["tokens"]}).json() == {"prompt": "héllo"}
    chat = h.post("/tokenize", json={"model": "tuned", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    assert h.post("/detokenize", json={"model": "tuned", "tokens": [VOCAB + 5]}).status_code == 400
    assert h.get("/version").json()["version"]
    for method in ("GET", "POST"):
        e = h.request(method, "/v1/embeddings", json={"model": "tuned", "input": "x"})
        assert e.status_code == 404 and "embeddings are not served" in e.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        env["client"].embeddings.create(model="tuned", input="x")
