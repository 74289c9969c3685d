"""Runtime delta management and tiers through real HTTP: load / unload under --delta-root (403 outside it),
and device/host budgets small enough that serving three tenants forces evictions, reloads from disk, and waiting
for room, with outputs still equal to the merged models."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.serve.testing import greedy_reference, merged_model, running_server, to_float32

PROMPT = [9, 8, 7, 6, 5]
N = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_rt")
    make_llama(d / "base", hidden=64, vocab=128, dtype=torch.float32)
    root = d / "root"
    root.mkdir()
    deltas, refs = {}, {}
    for i, (name, method, ratio) in enumerate((("a", "lowrank", 2.0), ("b", "dare", 2.0), ("c", "bitdelta", 2.0))):
        make_finetune(d / "base", d / f"ft_{name}", scale=0.6, seed=40 + i)
        to_float32(d / f"ft_{name}")
        deltas[name] = api.compress(d / "base", d / f"ft_{name}", root / name, method=method, ratio=ratio, progress=False)
        refs[name] = greedy_reference(merged_model(d / "base", deltas[name]), PROMPT, N)
    return d, root, deltas, refs


def _gen(url, model, max_tokens=N):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, timeout=60)
    return r


def _metrics(url) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_load_unload(env, tmp_path):
    d, root, deltas, refs = env
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(deltas["a"].resolve().parent.parent / "ft_a")  # a link out of the root
    with running_server(d / "base", [], delta_root=root) as (state, url):
        c = httpx.Client(base_url=url, timeout=60)
        assert _gen(url, "a").status_code == 404
        r = c.post("/v1/deltas", json={"name": "a", "path": "a"})  # relative to the root
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "a" and r.json()["packed_bytes"] > 0
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {"base", "a"}
        assert _gen(url, "a").json()["choices"][0]["token_ids"] == refs["a"]
        r = c.post("/v1/deltas", json={"name": "b2", "path": str(root / "b")})  # absolute, inside
        assert r.status_code == 200, r.text
        assert _gen(url, "b2").json()["choices"][0]["token_ids"] == refs["b"]
        assert c.post("/v1/deltas", json={"name": "a", "path": "c"}).status_code == 409  # name taken
        # outside the root: parent traversal, absolute path, symlink escaping
        for path in ("../ft_a", str(outside), str(d / "ft_c"), "escape"):
            r = c.post("/v1/deltas", json={"name": "x", "path": path})
            assert r.status_code == 403, path
            assert r.json()["error"]["type"] == "permission_error"
        assert c.post("/v1/deltas", json={"name": "x", "path": "missing"}).status_code == 400
        assert c.post("/v1/deltas", json={"name": "x", "path": 5}).status_code == 400
        assert c.post("/v1/deltas", json={"name": "bad name!", "path": "a"}).status_code == 400
        assert c.post("/v1/deltas", json={"name": "base", "path": "a"}).status_code == 409
        # unload
        r = c.delete("/v1/deltas/a")
        assert r.status_code == 200 and r.json()["deleted"] is True
        r = _gen(url, "a")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.delete("/v1/deltas/a").status_code == 404
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {"base", "b2"}
        # vLLM-style endpoints
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"}).status_code == 200
        assert _gen(url, "c").json()["choices"][0]["token_ids"] == refs["c"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
        m = _metrics(url)
        assert m[("deltapack:registered_deltas", ())] == 1
        assert m[("deltapack:resident_deltas", (("tier", "device"),))] == 1  # a and c freed, b2 left


def test_loading_disabled_without_root(env):
    d, root, deltas, _ = env
    with running_server(d / "base", [("a", deltas["a"])]) as (state, url):
        r = httpx.post(f"{url}/v1/deltas", json={"name": "b", "path": str(root / "b")})
        assert r.status_code == 403


def test_unload_while_running(env):
    """DELETE during generation: the running request finishes, new ones get 404, the slot is freed after."""
    d, root, deltas, refs = env
    with running_server(d / "base", [("a", deltas["a"])], delta_root=root) as (state, url):
        with ThreadPoolExecutor(1) as pool:
            with state.tiers.lock:  # queue the request, then unload, before the engine admits anything
                fut = pool.submit(_gen, url, "a")
                t0 = time.monotonic()
                while state.engine.snapshot()["waiting"] < 1 and time.monotonic() - t0 < 30:
                    time.sleep(0.01)
            # admitted and running now (give the engine a moment), then unloaded
            t0 = time.monotonic()
            while state.engine.snapshot()["running"] < 1 and not fut.done() and time.monotonic() - t0 < 30:
                time.sleep(0.001)
            assert httpx.delete(f"{url}/v1/deltas/a").status_code == 200
            r = fut.result()
        assert r.status_code in (200, 404)  # finished normally, or was still waiting when unloaded
        if r.status_code == 200:
            assert r.json()["choices"][0]["token_ids"] == refs["a"]
        assert _gen(url, "a").status_code == 404
        assert state.tiers.snapshot()["resident"]["device"] == 0


def test_small_budgets_force_evictions(env):
    d, root, deltas, refs = env
    with running_server(d / "base", list(deltas.items()), max_batch=8) as (state, url):
        sizes = {n: t.nbytes for n, t in state.tiers.tenants.items()}
        # each tier holds the largest delta alone: switching tenants evicts, some reload from disk
        state.tiers.set_budget("host", max(sizes.values()))
        state.tiers.set_budget("device", max(sizes.values()))
        before = _metrics(url)
        order = ["a", "b", "c", "a", "c", "b", "a"]
        for name in order:
            r = _gen(url, name)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == refs[name], name
            snap = state.tiers.snapshot()
            assert snap["bytes"]["device"] <= snap["budget"]["device"]
            assert snap["bytes"]["host"] <= snap["budget"]["host"]
        after = _metrics(url)

        def delta(name, tier):
            key = (name, (("tier", tier),))
            return after[key] - before.get(key, 0)

        # the largest delta fills each tier alone, so every switch to or from it evicts
        assert delta("deltapack:delta_loads_total", "device") >= 5
        assert delta("deltapack:delta_evictions_total", "device") >= 4
        assert delta("deltapack:delta_evictions_total", "host") >= 2
        assert delta("deltapack:delta_loads_total", "host") >= 2  # re-read from disk after a host eviction
        # concurrent requests for tenants that cannot be resident together: one waits for the other's slot
        with ThreadPoolExecutor(6) as pool:
            futs = {pool.submit(_gen, url, n): n for n in ("a", "b", "c", "a", "b", "c")}
            for f, n in futs.items():
                r = f.result()
                assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == refs[n]
        t0 = time.monotonic()  # a finished request leaves the batch just after its last event reached the client
        while state.engine.snapshot()["running"] and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        assert state.engine.snapshot()["running"] == 0


def test_delta_larger_than_device_budget(env):
    d, root, deltas, _ = env
    with running_server(d / "base", [], delta_root=root, gpu_delta_bytes=1000) as (state, url):
        r = httpx.post(f"{url}/v1/deltas", json={"name": "a", "path": "a"})
        assert r.status_code == 400 and "budget" in r.json()["error"]["message"]



def test_warmup_runs_every_model_once_and_loads_the_deltas(env):
    """`serve --warmup`: one short request per model before listening; every delta is loaded to a tier, the engine
    is idle afterwards, and real requests still equal the merged models."""
    from deltapack.serve.app import warmup

    d, root, deltas, refs = env
    with running_server(d / "base", list(deltas.items()), device="cpu", dtype="float32", max_batch=2) as (state, url):
        outcome = warmup(state, prompt_tokens=5, max_tokens=2)
        assert outcome == {"base": "length", "a": "length", "b": "length", "c": "length"}
        # every delta reached the device tier (the budget holds all three) and got a slot
        assert all(t.tier == "device" and t.slot is not None for t in state.tiers.tenants.values())
        assert _wait_idle(state)
        for name in deltas:
            assert _gen(url, name).json()["choices"][0]["token_ids"] == refs[name]
        state.tiers.tenants["b"].removed = True  # an unloaded delta is skipped, not warmed
        assert set(warmup(state, prompt_tokens=5, max_tokens=1)) == {"base", "a", "c"}


def test_warmup_with_static_decoding(env):
    """Warm-up on a static-rows engine: the stand-in prefills and the (CPU: no) graph captures leave the batch
    empty and at column 0, and requests afterwards still equal the merged models."""
    from deltapack.serve.app import warmup

    d, root, deltas, refs = env
    with running_server(d / "base", list(deltas.items()), device="cpu", dtype="float32", max_batch=2,
                        decode="static") as (state, url):
        warmup(state, prompt_tokens=5, max_tokens=2)
        slots = [t.slot for t in state.tiers.tenants.values()]
        assert state.engine.warm_up(slots) == 0  # graphs need CUDA; the prefills still ran
        assert _wait_idle(state) and len(state.engine.batch) == 0 and state.engine.batch.col == 0
        for name in deltas:
            assert _gen(url, name).json()["choices"][0]["token_ids"] == refs[name]


def _wait_idle(state, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if state.engine.snapshot()["running"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_engine_says_where_decode_time_goes(env):
    """engine.busy splits the decode steps' time into launching, waiting for the tokens and accepting them (the live
    benchmark's record of whether a step is bound by the host or the device): the parts add up to the whole."""
    d, root, deltas, refs = env
    with running_server(d / "base", [("a", deltas["a"])]) as (state, url):
        assert _gen(url, "a").json()["choices"][0]["token_ids"] == refs["a"]
        busy = dict(state.engine.busy)
    parts = busy["decode_launch_s"] + busy["decode_wait_s"] + busy["decode_accept_s"]
    assert busy["decode_s"] > 0 and min(busy["decode_launch_s"], busy["decode_wait_s"], busy["decode_accept_s"]) >= 0
    assert parts == pytest.approx(busy["decode_s"], rel=1e-9)
