"""Bad requests through real HTTP: OpenAI's error shape and status codes, clients that disconnect (their slot is
freed), and a few hundred malformed requests after which the server still answers correctly."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.serve.testing import ERROR_KEYS, api_error, make_word_tokenizer, running_server, sse_events, to_float32



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_err")
    make_llama(d / "base", hidden=32, vocab=128, dtype=torch.float32)
    make_word_tokenizer(d / "base", 128)
    make_finetune(d / "base", d / "ft", scale=0.5, seed=3)
    to_float32(d / "ft")
    root = d / "root"
    root.mkdir()
    delta = api.compress(d / "base", d / "ft", root / "t", method="raw", progress=False)
    with running_server(d / "base", [("t", delta)], delta_root=root, max_batch=4) as (state, url):
        with httpx.Client(base_url=url, timeout=30) as c:
            yield {"state": state, "url": url, "c": c, "d": d}


_err = api_error


def _metric(env, name, labels) -> float:
    for fam in text_string_to_metric_families(env["c"].get("/metrics").text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_unknown_model_is_404(env):
    c = env["c"]
    e = _err(c.post("/v1/completions", json={"model": "nope", "prompt": "hello"}), 404)
    assert e["type"] == "not_found_error" and e["code"] == "model_not_found" and e["param"] == "model"
    _err(c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404)
    _err(c.delete("/v1/deltas/nope"), 404)
    _err(c.get("/v1/nothing-here"), 404)
    _err(c.get("/v1/completions"), 405)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'"just a string"',
        b"null",
        json.dumps({"prompt": "hello"}).encode(),  # no model
        json.dumps({"model": "t"}).encode(),  # no prompt
        json.dumps({"model": "t", "prompt": "hi", "max_tokens": "5"}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "max_tokens": 2.5}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "max_tokens": -1}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "temperature": "hot"}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "temperature": -0.5}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "top_p": 0}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "stream": "yes"}).encode(),
        json.dumps({"model": "t", "prompt": 5}).encode(),
        json.dumps({"model": "t", "prompt": [1, "a"]}).encode(),
        json.dumps({"model": "t", "prompt": []}).encode(),
        json.dumps({"model": "t", "prompt": [[]]}).encode(),
        json.dumps({"model": "t", "prompt": [1, 999999]}).encode(),  # outside the vocabulary
        json.dumps({"model": "t", "prompt": [-3]}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "n": 99}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "logprobs": 50}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "stop": 7}).encode(),
        json.dumps({"model": 7, "prompt": "hi"}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "presence_penalty": 5.0}).encode(),
        json.dumps({"model": "t", "prompt": "hi", "stream_options": {"include_usage": "y"}}).encode(),
    ],
)
def test_malformed_completions_are_400(env, body):
    _err(env["c"].post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "t"},
        {"model": "t", "messages": []},
        {"model": "t", "messages": "hello"},
        {"model": "t", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "t", "messages": [{"role": "user", "content": 5}]},
        {"model": "t", "messages": [{"content": "no role"}]},
        {"model": "t", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"model": "t", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    ],
)
def test_malformed_chat_is_400(env, body):
    _err(env["c"].post("/v1/chat/completions", json=body), 400)


def test_context_overflow_is_400(env):
    c = env["c"]
    e = _err(c.post("/v1/completions", json={"model": "t", "prompt": [5] * 100, "max_tokens": 29}), 400)
    assert e["code"] == "context_length_exceeded" and "128" in e["message"]
    assert c.post("/v1/completions", json={"model": "t", "prompt": [5] * 100, "max_tokens": 28, "ignore_eos": True}).status_code == 200
    _err(c.post("/v1/completions", json={"model": "t", "prompt": [5] * 129, "max_tokens": 0}), 400)
    long_chat = [{"role": "user", "content": " ".join(["hello"] * 130)}]
    _err(c.post("/v1/chat/completions", json={"model": "t", "messages": long_chat}), 400)


def test_load_outside_root_is_403(env):
    c = env["c"]
    e = _err(c.post("/v1/deltas", json={"name": "x", "path": str(env["d"] / "ft")}), 403)
    assert e["type"] == "permission_error"
    _err(c.post("/v1/deltas", json={"name": "x", "path": "../ft"}), 403)
    _err(c.post("/v1/deltas", json={"name": "x", "path": "/etc"}), 403)


def _wait(cond, timeout=30.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)


def test_stream_disconnect_frees_slot(env):
    state = env["state"]
    aborted = _metric(env, "vllm:request_success_total", {"model_name": "t", "finished_reason": "abort"})
    body = {"model": "t", "prompt": [5, 6, 7], "max_tokens": 120, "stream": True, "ignore_eos": True, "temperature": 0}
    got = 0
    with httpx.Client(base_url=env["url"], timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 2:
                    state.tiers.lock.acquire()  # stall the engine so the request is surely still generating
                    break  # leaving the iterator closes the connection mid-stream
    try:
        assert state.engine.snapshot()["running"] == 1
        _wait(lambda: bool(state.engine._aborts))  # the server noticed the closed connection
    finally:
        state.tiers.lock.release()
    _wait(lambda: state.engine.snapshot()["running"] == 0)
    assert _metric(env, "vllm:request_success_total", {"model_name": "t", "finished_reason": "abort"}) == aborted + 1
    assert _metric(env, "vllm:num_requests_running", {"model_name": "base"}) == 0
    assert state.tiers.tenants["t"].pins == 0


def test_nonstream_disconnect_frees_slot(env):
    state = env["state"]
    aborted = _metric(env, "vllm:request_success_total", {"model_name": "t", "finished_reason": "abort"})
    body = {"model": "t", "prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    errors = []

    def client():
        try:
            httpx.post(f"{env['url']}/v1/completions", json=body, timeout=1.5)
        except httpx.TimeoutException as e:
            errors.append(e)

    th = threading.Thread(target=client)
    th.start()
    _wait(lambda: state.engine.snapshot()["running"] == 1)
    state.tiers.lock.acquire()
    try:
        th.join(10)
        assert errors  # the client gave up
        _wait(lambda: bool(state.engine._aborts))
    finally:
        state.tiers.lock.release()
    _wait(lambda: state.engine.snapshot()["running"] == 0)
    assert _metric(env, "vllm:request_success_total", {"model_name": "t", "finished_reason": "abort"}) == aborted + 1


BAD_VALUES = ["", "x", -1, 0, 1, 2.5, -1e30, 1e30, 2**70, True, None, [], {}, [[["deep"]]], {"a": {"b": []}}, "\u0000\ud7ff", [1, -5], ["a", 3], "t", "base"]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "logprobs", "echo",
          "messages", "stream_options", "max_completion_tokens", "name", "path", "ignore_eos", "stop_token_ids"]
ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/deltas"), ("DELETE", "/v1/deltas/zz"),
          ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("GET", "/v1/models"), ("PUT", "/v1/completions")]


def _random_request(rng: random.Random):
    method, path = rng.choice(ROUTES)
    kind = rng.random()
    if kind < 0.2:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    elif kind < 0.3:
        body = json.dumps(rng.choice(BAD_VALUES)).encode()
    else:
        obj = {"model": rng.choice(["t", "base", "nope"]), "max_tokens": rng.choice([0, 1, 2, 3])}
        for f in rng.sample(FIELDS, rng.randrange(1, 6)):
            obj[f] = rng.choice(BAD_VALUES)
        if rng.random() < 0.3:  # sometimes a nearly valid body
            obj.setdefault("prompt", "hello w3")
            obj["max_tokens"] = rng.choice([0, 1, 2])
        body = json.dumps(obj).encode()
    return method, path, body


def test_fuzz_malformed_requests(env):
    rng = random.Random(1234)
    c = env["c"]
    statuses = {}
    for _ in range(300):
        method, path, body = _random_request(rng)
        r = c.request(method, path, content=body, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == ERROR_KEYS
        elif path.endswith("completions") and r.headers["content-type"].startswith("text/event-stream"):
            assert sse_events(r.text.splitlines())[-1] == "[DONE]"
    assert statuses.get(400, 0) > 100
    # still healthy and correct
    assert c.get("/health").json()["status"] == "ok"
    r = c.post("/v1/completions", json={"model": "t", "prompt": "hello w3", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    _wait(lambda: env["state"].engine.snapshot()["running"] == 0)
    assert all(t.pins == 0 for t in env["state"].tiers.tenants.values())


def test_engine_failure_reaches_the_client_and_the_server_goes_on(env, monkeypatch):
    """A step that raises fails only the requests in it: a plain request gets a 500 in OpenAI's error shape, a
    stream (whose 200 status is already sent) gets the error as its last event before [DONE]."""
    engine = env["state"].engine
    real = engine._prefill_chunk
    failures = []

    def failing(rows, *args, **kw):  # (rows, merged weights or None)
        if len(failures) < 2:
            failures.append(len(rows))
            raise RuntimeError("injected prefill failure")
        return real(rows, *args, **kw)

    monkeypatch.setattr(engine, "_prefill_chunk", failing)
    c = env["c"]
    e = _err(c.post("/v1/completions", json={"model": "t", "prompt": [5, 6], "max_tokens": 4}), 500)
    assert "injected prefill failure" in e["message"] and e["type"] == "server_error"
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}
    assert "injected prefill failure" in events[-2]["error"]["message"]
    assert len(failures) == 2
    ok = c.post("/v1/completions", json={"model": "t", "prompt": [5, 6], "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    _wait(lambda: engine.snapshot()["running"] == 0)  # the finished request leaves the batch after its last event
