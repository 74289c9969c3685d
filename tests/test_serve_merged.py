"""Merged weights of hot tenants (deltapack.serve.merged): a forward whose rows all belong to one tenant runs on
base + dense delta and reads no delta; outputs equal the kernel path's, mixed batches never use a copy, a tenant
leaving the device tier or cooling down frees its copy, budget 0 disables, and the choice follows measured costs."""

from __future__ import annotations

import gc
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.kernels.schedule import dense_delta
from deltapack.serve import merged as mw
from deltapack.serve.testing import greedy_reference, merged_model, running_server, to_float32

PROMPT = [9, 8, 7, 6, 5]
N = 12  # enough decode steps for the tenant to turn hot and be merged within one request


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_merged")
    make_llama(d / "base", hidden=64, vocab=128, dtype=torch.float32)
    deltas, refs = {}, {}
    for i, (name, method) in enumerate((("a", "lowrank"), ("b", "bitdelta"))):
        make_finetune(d / "base", d / f"ft_{name}", scale=0.6, seed=60 + i)
        to_float32(d / f"ft_{name}")
        deltas[name] = api.compress(d / "base", d / f"ft_{name}", d / f"delta_{name}", method=method, ratio=2.0,
                                    progress=False)
        refs[name] = greedy_reference(merged_model(d / "base", deltas[name]), PROMPT, N)
    return d, deltas, refs


def _gen(url, model, max_tokens=N):
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                  "temperature": 0, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _wait_idle(state, timeout=30.0):
    t0 = time.monotonic()
    while state.engine.snapshot()["running"] and time.monotonic() - t0 < timeout:
        time.sleep(0.01)


def _server(env, **kw):
    d, deltas, _ = env
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    kw.setdefault("merged_bytes", 1 << 30)
    return running_server(d / "base", list(deltas.items()), **kw)


class FixedCosts(mw.StepCosts):
    """Measured costs pinned per path (merged cheaper): on a pico CPU model both paths take about the same time,
    and the choice between them would follow timing noise."""

    SECONDS = {mw.PATH_MERGED: 1e-3, mw.PATH_BASE: 1e-3, mw.PATH_KERNELS: 2e-3, mw.PATH_MIXED: 4e-3}

    def record(self, phase, path, size, seconds):
        super().record(phase, path, size, self.SECONDS[path])


def test_merged_weight_is_base_plus_the_packed_delta(env):
    with _server(env) as (state, url):
        _gen(url, "a", 1)  # promotes a to the device tier
        t = state.tiers.tenants["a"]
        m = state.tiers.merged
        sites = m.sites_of(t.slot)
        assert sites and set(sites) <= set(m.linear)
        for key in sites:
            p = state.runner.state.layers[key].get(t.slot)
            base_w = m.linear[key].base.weight
            w = mw.merged_weight(base_w, p, torch.float32)
            assert torch.equal(w, base_w + dense_delta(p).float())
            assert w.data_ptr() != base_w.data_ptr()  # the base weight itself is never written
        assert m.entry_bytes(t.slot) == sum(m.linear[k].base.weight.numel() * 4 for k in sites)


@pytest.mark.parametrize("decode", ["static", "dynamic"])
def test_single_tenant_steps_run_merged_and_equal_the_kernels(env, decode):
    _, _, refs = env
    with _server(env, decode=decode, merged_bytes=0) as (state, url):
        assert state.tiers.merged is None  # budget 0: off
        plain = _gen(url, "a")
    with _server(env, decode=decode) as (state, url):
        state.tiers.merged.costs = FixedCosts()
        first = _gen(url, "a")  # a turns hot within the request: merged, then its steps run on the copy
        m = state.tiers.merged
        snap = m.snapshot()
        assert snap["merges"] == 1 and snap["tenants"]["a"]["complete"], snap
        assert snap["merged_forwards"] > 0 and snap["tenants"]["a"]["used"] > 0
        assert snap["bytes"] == m.entry_bytes(state.tiers.tenants["a"].slot) > 0
        again = _gen(url, "a")  # prefill and every step on the copy
        assert m.snapshot()["merged_forwards"] >= snap["merged_forwards"] + N
        assert any(k.startswith("prefill merged") for k in m.snapshot()["costs"])
        # visible in /health and /metrics
        health = httpx.get(f"{url}/health").json()
        assert health["merged"]["tenants"]["a"]["complete"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'deltapack:merged_deltas{model_name="a"} 1.0' in metrics
        assert "deltapack:merged_forwards_total" in metrics
    assert first == again == plain == refs["a"]


def test_mixed_steps_never_use_a_merged_copy(env):
    _, _, refs = env
    with _server(env, decode="static", max_batch=4) as (state, url):
        assert _gen(url, "a") == refs["a"]
        m = state.tiers.merged
        assert m.snapshot()["tenants"]["a"]["complete"]
        a, b = state.tiers.tenants["a"], state.tiers.tenants["b"]
        for tenants in ([a, b], [a, None], [None, a], [b], [None]):
            assert m.choose("decode", tenants, len(tenants)) is None, tenants
        used = m.snapshot()["merged_forwards"]
        # both tenants (and the base) in flight at once: every mixed step runs on the kernels, tokens unchanged
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda n: (n, _gen(url, n)), ["a", "b", "a", "b"]))
        for n, toks in outs:
            assert toks == refs[n], n
        _wait_idle(state)
        # the static batch itself refuses a merged copy for rows of another tenant
        e = m.entries[a.slot]
        with pytest.raises(RuntimeError, match="merged weights"):
            state.engine.batch.step(state.runner, [1, 1], [a.slot, b.slot], merged=e)
        assert m.snapshot()["merged_forwards"] >= used


def test_unloading_or_evicting_the_tenant_frees_its_copy(env):
    _, _, refs = env
    with _server(env, decode="static") as (state, url):
        assert _gen(url, "a") == refs["a"]
        m = state.tiers.merged
        e = next(iter(m.entries.values()))
        assert m.nbytes > 0 and e.weights
        weight = weakref.ref(next(iter(e.weights.values())))
        del e
        # the device tier holds one delta: serving b evicts a from the device, which drops a's copy
        state.tiers.set_budget("device", max(t.nbytes for t in state.tiers.tenants.values()))
        assert _gen(url, "b") == refs["b"]
        gc.collect()
        assert "a" not in m.snapshot()["tenants"] and weight() is None  # the copy's memory is freed
        assert m.evictions["unloaded"] == 1
        assert m.snapshot()["tenants"]["b"]["complete"]  # b turned hot in its turn
        # a stale copy is never used: replacing the slot's delta makes the layer fall back to the kernels
        b = state.tiers.tenants["b"]
        eb = m.entries[b.slot]
        key = next(iter(eb.sources))
        lay = state.runner.state.layers[key]
        p = lay.get(b.slot)
        assert eb.weight(key, p) is not None
        lay.set(b.slot, p.to("cpu"))  # same device: the same object back, still valid
        assert eb.weight(key, lay.get(b.slot)) is not None
        clone = type(p)(p.kind, p.shape, dict(p.tensors), dict(p.meta), p.extra_rows, p.replace, p.source)
        assert eb.weight(key, clone) is None
        # unloading b drops its copy too
        state.tiers.remove("b")
        _wait_idle(state)
        assert m.nbytes == 0 and not m.entries


def test_cooling_down_drops_the_copy(env):
    _, _, refs = env
    with _server(env, decode="static") as (state, url):
        assert _gen(url, "a") == refs["a"]
        m = state.tiers.merged
        assert m.entries
        b = state.tiers.tenants["b"]
        for _ in range(8 * mw.HALF_LIFE_FORWARDS):  # forwards of another tenant only: a's hotness decays
            m.observe([b], "decode", 1)
        with state.tiers.lock:
            m.tick()
        assert not any(e.name == "a" for e in m.entries.values()) and m.evictions["cool"] == 1


def test_budget_too_small_or_zero_never_merges(env):
    _, _, refs = env
    with _server(env, decode="static", merged_bytes=1000) as (state, url):
        assert _gen(url, "a") == refs["a"]
        snap = state.tiers.merged.snapshot()
        assert snap["merges"] == 0 and snap["bytes"] == 0 and snap["merged_forwards"] == 0
    from deltapack.serve.app import merged_budget

    assert merged_budget("auto", torch.device("cpu")) == 0  # auto: off on a CPU
    assert merged_budget("auto", torch.device("cuda")) is None  # auto: free device memory decides
    assert merged_budget(0, torch.device("cuda")) == 0
    # off unless asked for, on every device, until the GPU path is measured (bench/serving/merged.py)
    import inspect

    from deltapack.cli import _size, main
    from deltapack.serve import app

    assert inspect.signature(app.build_server).parameters["merged_bytes"].default == 0
    option = next(p for p in main.commands["serve"].params if p.name == "merged_bytes")
    assert _size(option.default) == 0


def test_choice_follows_measured_costs():
    class T:
        def __init__(self, name, slot):
            self.name, self.slot = name, slot

    a, b = T("a", 0), T("b", 1)
    m = mw.MergedWeights.__new__(mw.MergedWeights)  # the choice logic alone: no model needed
    m.costs = mw.StepCosts()
    m.entries = {0: mw.MergedEntry("a", 0, 1, 10)}
    m._choices = 0
    m.budget = None
    e = m.entries[0]
    # unmeasured merged path: probed first
    assert m.choose("decode", [a, a], 64) is e
    for _ in range(mw.PROBES):
        m.costs.record("decode", mw.PATH_MERGED, 64, 0.010)
    assert m.choose("decode", [a, a], 64) is None  # now the kernels get measured
    for _ in range(mw.PROBES):
        m.costs.record("decode", mw.PATH_KERNELS, 64, 0.026)
    assert m.choose("decode", [a] * 64, 64) is e  # merged measured faster
    # merged measured slower at another size: kernels there, the loser re-measured now and then
    for _ in range(mw.PROBES):
        m.costs.record("decode", mw.PATH_MERGED, 4, 0.030)
        m.costs.record("decode", mw.PATH_KERNELS, 4, 0.012)
    picks = [m.choose("decode", [a] * 4, 4) for _ in range(2 * mw.REPROBE_EVERY)]
    assert picks.count(e) == 2 and e.skipped == len(picks) - 2
    assert m.choose("decode", [a, b], 2) is None and m.choose("decode", [b, b], 2) is None
    # record() files each forward under its path; only single-tenant forwards compare with merged ones
    m.merged_forwards = 0
    m.record("decode", [a, b], 2, None, 1.0)
    assert m.costs.get("decode", mw.PATH_KERNELS, 2)[1] == 0
    m.record("decode", [None, None], 2, None, 0.5)
    assert m.costs.get("decode", mw.PATH_BASE, 2) == (0.5, 1)
    assert mw.size_bucket(60) == 64 and mw.size_bucket(1) == 1
    assert mw.sole_tenant([a, a]) is a and mw.sole_tenant([a, None]) is None and mw.sole_tenant([]) is None


# ---- prefill: a hot tenant's prompts apart from a mixed chunk -------------------------------------------------------
def _stub_merged(entries: dict):
    """A MergedWeights over no model: just the entries and the measured costs prefill_split reads."""
    m = mw.MergedWeights.__new__(mw.MergedWeights)
    m.budget, m.entries, m.costs = None, entries, mw.StepCosts()
    return m


def _tenant(name, slot):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, slot=slot)


def test_prefill_split_follows_measured_costs():
    a, b = _tenant("a", 0), _tenant("b", 1)
    e = mw.MergedEntry("a", 0, 1, 0)
    m = _stub_merged({0: e})
    rows, lengths = [a, b, a], [5, 5, 5]
    assert m.prefill_split(rows, lengths) is a  # the copy's prefill at this size not yet measured: probe it
    for _ in range(mw.PROBES):
        m.costs.record("prefill", mw.PATH_MERGED, 10, 2e-3)  # a's two rows, padded 10 tokens
    assert m.prefill_split(rows, lengths) is None  # the mixed chunk and the rest not yet measured: keep it whole
    for _ in range(mw.PROBES):
        m.costs.record("prefill", mw.PATH_KERNELS, 5, 3e-3)  # b alone
        m.costs.record("prefill", mw.PATH_MIXED, 15, 10e-3)  # the whole chunk
    assert m.prefill_split(rows, lengths) is a  # 2 + 3 ms apart < 10 ms together
    for _ in range(20):
        m.costs.record("prefill", mw.PATH_MIXED, 15, 4e-3)
    assert m.prefill_split(rows, lengths) is None  # 2 + 3 ms apart > ~4 ms together
    # never: a tenant without a complete copy, a chunk of one tenant, merging switched off
    e.todo.append("x")
    assert m.prefill_split([a, b], [5, 5]) is None
    e.todo.clear()
    assert m.prefill_split([a, a], [5, 5]) is None
    m.budget = 0
    assert m.prefill_split(rows, lengths) is None


def test_mixed_prefill_chunks_make_a_tenant_hot():
    """A tenant's share of the rows of mixed prefill chunks counts towards its hotness (prefill_split can run those
    rows on a copy); mixed decode steps do not (a copy cannot serve a shared step). With solo forwards alone, no
    tenant of a many-tenant trace ever became hot."""
    a, b = _tenant("a", 0), _tenant("b", 1)
    m = _stub_merged({})
    m.scores, m.solo_size, m.forwards, m._decay = {}, {}, 0, 1.0
    for _ in range(3):
        m.observe([a, b, b, None], "decode", 4)
    assert m.scores == {}
    m.observe([a, b, b, None], "prefill", 40)
    assert m.scores == pytest.approx({"a": 0.25, "b": 0.5})
    assert m.solo_size == {"a": ("prefill", 10), "b": ("prefill", 20)}  # the size their rows would run at apart
    m.observe([a, a], "decode", 2)  # a solo forward: a full count, and its own size wins
    assert m.scores["a"] == pytest.approx(1.25) and m.solo_size["a"] == ("decode", 2)
    for _ in range(8):
        m.observe([a, b, b, None], "prefill", 40)
    assert m.scores["b"] >= mw.MIN_SOLO_SCORE  # hot from shared prefills alone


def test_a_tenant_hot_from_mixed_prefills_alone_is_merged_and_served_apart(env):
    """End to end: prompts of two tenants that only ever meet in shared prefill chunks (never a forward to one
    tenant) make the busier tenant hot; it gets a copy, its rows are split onto it, and every answer is unchanged."""
    from deltapack.serve.engine import GenRequest
    from deltapack.serve.sampling import SamplingParams

    _, _, refs = env
    with _server(env, decode="static", max_batch=8) as (state, url):
        m = state.tiers.merged
        m.costs = FixedCosts()
        ta, tb = state.tiers.tenants["a"], state.tiers.tenants["b"]
        for t in (ta, tb):  # both device-resident, without a forward of their own
            assert state.tiers.acquire(t)
            state.tiers.release(t)
        assert m.snapshot()["merges"] == 0
        reqs = [GenRequest(f"r{i}", t.name, t, list(PROMPT), SamplingParams(max_tokens=1), lambda ev: None)
                for i, t in enumerate((ta, ta, ta, tb))]
        with state.tiers.lock:  # as the engine thread does, between its steps
            for _ in range(8):  # the engine's bookkeeping of a mixed prefill chunk: a owns 3 of its 4 rows
                assert state.engine._merged_choice("prefill", reqs, 20) is None  # never a copy for a mixed chunk
            assert m.scores["a"] > mw.MIN_SOLO_SCORE > m.scores["b"]
            for _ in range(100):
                m.tick()
                if m.snapshot()["tenants"].get("a", {}).get("complete"):
                    break
        snap = m.snapshot()
        assert snap["tenants"]["a"]["complete"] and "b" not in snap["tenants"]
        # such a chunk is now split: a's prompts run apart, on the copy (its prefill is not yet measured: probed)
        assert [[r.tenant.name for r in c] for c in state.engine._chunks(reqs)] == [["a", "a", "a"], ["b"]]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda n: (n, _gen(url, n)), ["a", "b", "a", "a"]))
        for n, toks in outs:
            assert toks == refs[n], n


def test_a_merged_tenants_prompts_run_apart_on_its_copy(env):
    """In the engine: a prefill chunk holding a merged tenant's prompt and another tenant's is split, the merged
    tenant's part runs on its copy, and both answer exactly as alone."""
    from deltapack.serve.engine import GenRequest
    from deltapack.serve.sampling import SamplingParams

    _, _, refs = env
    with _server(env, decode="static", max_batch=4) as (state, url):
        state.tiers.merged.costs = FixedCosts()
        assert _gen(url, "a") == refs["a"]
        assert _gen(url, "b") == refs["b"]  # b resident too
        _wait_idle(state)
        m = state.tiers.merged
        assert m.snapshot()["tenants"]["a"]["complete"]
        ta, tb = state.tiers.tenants["a"], state.tiers.tenants["b"]
        reqs = [GenRequest(f"r{i}", t.name, t, list(PROMPT), SamplingParams(max_tokens=1), lambda ev: None)
                for i, t in enumerate((ta, tb, ta))]
        chunks = state.engine._chunks(reqs)
        assert [[r.tenant.name for r in c] for c in chunks] == [["a", "a"], ["b"]]
        before = m.snapshot()["merged_forwards"]
        with ThreadPoolExecutor(4) as pool:  # the same through HTTP, when the prompts meet in one prefill
            outs = list(pool.map(lambda n: (n, _gen(url, n)), ["a", "b", "a", "b"]))
        for n, toks in outs:
            assert toks == refs[n], n
        assert m.snapshot()["merged_forwards"] > before
