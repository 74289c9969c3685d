"""Ray Serve deployment of `deltapack serve` (deltapack.scale.ray_serve) on a local Ray cluster: OpenAI requests
routed by their `model` field to replicas that each run a deltapack server process."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from deltapack import api

from conftest import make_finetune, make_llama

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    make_llama(d / "base", hidden=64, layers=2, vocab=256, inter=128)
    out = {}
    for i, name in enumerate(("alpha", "beta")):
        make_finetune(d / "base", d / f"ft-{name}", seed=11 + i, scale=0.5)
        out[name] = api.compress(d / "base", d / f"ft-{name}", d / "deltas" / name, method="raw", progress=False)
    return d / "base", out


@pytest.fixture(scope="module")
def url(deltas):
    from deltapack.scale.ray_serve import build_app

    base, paths = deltas
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(base, paths, num_replicas=2, serve_args=("--device", "cpu"), startup_timeout=240)
        serve.run(app, route_prefix="/", name="deltapack")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(url, model, prompt, **kw):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, **kw},
                   timeout=120)
    return r


def test_routes_by_model_and_matches_the_fine_tune(url, deltas):
    from deltapack.scale.ray_serve import REPLICA_HEADER
    from deltapack.serve.testing import greedy_reference, merged_model

    base, paths = deltas
    ids = [r["id"] for r in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert ids == ["base", "alpha", "beta"]
    prompt = [1, 5, 9, 13]
    got = {}
    for model in ("alpha", "beta", "base"):
        r = complete(url, model, prompt)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model
        got[model] = body["choices"][0]["token_ids"]
    # the tokens are the fine-tune's own greedy continuation (raw deltas: exact fine-tune weights)
    for model in ("alpha", "beta"):
        assert got[model] == greedy_reference(merged_model(base, paths[model]), prompt, 5), model
    assert got["alpha"] != got["beta"] or got["alpha"] != got["base"]
    # a loaded model sticks to its replica: Ray Serve routes a multiplexed model id to the replica that holds it
    time.sleep(2.0)  # replicas report their loaded ids to the router asynchronously
    replicas = {complete(url, "alpha", prompt).headers[REPLICA_HEADER] for _ in range(4)}
    assert len(replicas) == 1, replicas


def test_streaming_and_errors(url):
    prompt = [2, 4, 6]
    plain = complete(url, "alpha", prompt).json()["choices"][0]["token_ids"]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "alpha", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    streamed = [t for ln in lines[:-1] for t in (json.loads(ln[6:])["choices"][0].get("token_ids") or [])]
    assert streamed == plain
    r = complete(url, "nope", prompt)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400  # the replica's server judges malformed bodies
