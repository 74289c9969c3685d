"""Through real HTTP: every codec's tenant, interleaved with other tenants and the base in one batch, generates
exactly the greedy tokens of its merged model (fp32 pico models: the server's base(x) + delta(x) and the merged
model's (base + delta) x agree to float32 rounding, far below the gaps between the top logits)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.serve.testing import greedy_reference, merged_model, running_server, to_float32

HIDDEN, VOCAB = 64, 128
# tenant -> (method, ratio, fine-tune options)
TENANTS = {
    "raw": ("raw", None, {"seed": 11}),
    "lowrank": ("lowrank", 2.0, {"seed": 12, "rank": 4}),
    "bitdelta": ("bitdelta", 2.0, {"seed": 13}),
    "dare": ("dare", 2.0, {"seed": 14}),
    "grown": ("lowrank", 2.0, {"seed": 15, "rank": 4, "grow_vocab": 5}),  # vocabulary growth: new embedding/head rows
}
PROMPTS = [[5, 17, 9, 33], [40, 2, 77, 8, 13, 61, 99, 4, 20], [7]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_eq")
    make_llama(d / "base", hidden=HIDDEN, vocab=VOCAB, dtype=torch.float32)
    deltas, refs = {}, {}
    for name, (method, ratio, ft) in TENANTS.items():
        make_finetune(d / "base", d / f"ft_{name}", scale=0.6, **ft)
        to_float32(d / f"ft_{name}")
        deltas[name] = api.compress(d / "base", d / f"ft_{name}", d / f"delta_{name}", method=method, ratio=ratio, progress=False)
        model = merged_model(d / "base", deltas[name])
        refs[name] = [greedy_reference(model, p, MAX_TOKENS) for p in PROMPTS]
    base_model = merged_model_base(d / "base")
    refs["base"] = [greedy_reference(base_model, p, MAX_TOKENS) for p in PROMPTS]
    return d, deltas, refs


def merged_model_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _complete(url, model, prompt, max_tokens=MAX_TOKENS):
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_codecs_cover_every_codec(setup):
    _, deltas, _ = setup
    codecs = {n: {r["codec"] for r in api.inspect(p)["tensors"]} for n, p in deltas.items()}
    assert "factors" in codecs["lowrank"] and "sign" in codecs["bitdelta"] and "sparse" in codecs["dare"]
    assert codecs["raw"] == {"lossless"}  # served as the dense delta computed from the base


def test_references_differ(setup):
    """Tenants must generate different tokens, or the test could not tell their deltas apart."""
    _, _, refs = setup
    distinct = {tuple(map(tuple, v)) for v in refs.values()}
    assert len(distinct) == len(refs)


# decode modes testable here: `static` keeps the rows in a static KV cache (the bookkeeping of CUDA-graph decoding,
# stepped eagerly); `graph` itself needs a GPU
MODES = ["dynamic", "static"] + (["graph"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("decode", MODES)
def test_mixed_batch_matches_merged_models(setup, decode):
    """All tenants and the base, 3 prompts each, admitted in one step: one batch of 18 rows, ragged prompts."""
    d, deltas, refs = setup
    with running_server(d / "base", list(deltas.items()), max_batch=32, decode=decode) as (state, url):
        assert state.engine.decode_mode == decode
        jobs = [(m, i) for m in refs for i in range(len(PROMPTS))]
        with state.tiers.lock:  # hold the engine between steps until every request is queued
            with ThreadPoolExecutor(len(jobs)) as pool:
                futs = {pool.submit(_complete, url, m, PROMPTS[i]): (m, i) for m, i in jobs}
                t0 = time.monotonic()
                while state.engine.snapshot()["waiting"] < len(jobs) and time.monotonic() - t0 < 30:
                    time.sleep(0.01)
                state.tiers.lock.release()  # let the engine run while we wait (re-acquired for the with-exit)
                try:
                    got = {futs[f]: f.result() for f in futs}
                finally:
                    state.tiers.lock.acquire()
        for (m, i), toks in got.items():
            assert toks == refs[m][i], (m, i)
        assert state.engine.max_tenants_in_step == len(refs)  # every tenant decoded in the same steps


@pytest.mark.parametrize("decode", MODES)
def test_requests_joining_a_running_batch(setup, decode):
    """Continuous batching: a long request runs while others join (different cache lengths) and leave."""
    d, deltas, refs = setup
    with running_server(d / "base", list(deltas.items()), max_batch=8, decode=decode) as (state, url):
        long_prompt = PROMPTS[1]
        long_ref = greedy_reference(merged_model(d / "base", deltas["dare"]), long_prompt, 40)
        out = {}

        def run_long():
            out["long"] = _complete(url, "dare", long_prompt, 40)

        th = threading.Thread(target=run_long)
        th.start()
        t0 = time.monotonic()
        while state.engine.steps < 3 and time.monotonic() - t0 < 30:
            time.sleep(0.005)
        for m in ("bitdelta", "grown", "base", "raw"):
            assert _complete(url, m, PROMPTS[0]) == refs[m][0], m
        th.join(60)
        assert out["long"] == long_ref


def test_grown_vocabulary_ids(setup):
    """Token ids that exist only in the grown tenant: accepted as input for it, rejected for the base."""
    d, deltas, _ = setup
    new_id = VOCAB + 2
    ref = greedy_reference(merged_model(d / "base", deltas["grown"]), [5, new_id, 9], 6)
    with running_server(d / "base", [("grown", deltas["grown"])]) as (state, url):
        assert _complete(url, "grown", [5, new_id, 9], 6) == ref
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": [5, new_id], "max_tokens": 2})
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_static_rows_move_to_the_front(setup, monkeypatch):
    """Static decoding: once every running request starts past the first columns (here 3), the used columns move
    to the cache's front; tokens stay exactly those of the merged models, and an emptied batch starts over."""
    from deltapack.serve import fastpath

    monkeypatch.setattr(fastpath, "COMPACT_AT", 3)
    d, deltas, refs = setup
    long_ref = greedy_reference(merged_model(d / "base", deltas["lowrank"]), PROMPTS[0], 34)
    late_ref = greedy_reference(merged_model(d / "base", deltas["grown"]), PROMPTS[1], 30)
    with running_server(d / "base", list(deltas.items()), max_batch=4, decode="static", max_model_len=40) as (state, url):
        batch = state.engine.batch
        assert batch.L == 40 + 3 + 1
        assert _complete(url, "bitdelta", PROMPTS[1]) == refs["bitdelta"][1]
        t0 = time.monotonic()
        while batch.rows and time.monotonic() - t0 < 10:  # the engine drops the row just after streaming its end
            time.sleep(0.001)
        assert batch.col == 0 and batch.compactions == 0  # the batch emptied: the cache starts over
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(_complete, url, "lowrank", PROMPTS[0], 34)
            t0 = time.monotonic()
            # 8 tokens in, the long request has 26 to go: the late ones join mid-way, and the 30-token one outlives it
            # (no holding of the engine's lock here: a thread waiting for it can starve while the engine loops)
            while not (batch.rows and len(batch.rows[0].output_ids) >= 8) and time.monotonic() - t0 < 30:
                time.sleep(0.001)
            late = [pool.submit(_complete, url, "grown", PROMPTS[1], 30), pool.submit(_complete, url, "dare", PROMPTS[2])]
            got = [first.result(), late[0].result(), late[1].result()]
        assert got == [long_ref, late_ref, refs["dare"][2]]
        assert batch.compactions >= 1  # after the long request left, the late ones started past column 3
        assert batch.eager_steps == state.engine.steps  # no graphs without CUDA


def test_late_requests_gather_for_one_prefill(setup):
    """With a prefill delay, a request arriving while rows decode waits for company (up to the delay) instead of
    stalling the batch with a prefill of its own; two arriving together share one prefill. Tokens are unchanged."""
    d, deltas, refs = setup
    long_ref = greedy_reference(merged_model(d / "base", deltas["lowrank"]), PROMPTS[0], 40)
    with running_server(d / "base", list(deltas.items()), max_batch=8, decode="static", prefill_delay_s=0.15) as (state, url):
        engine = state.engine
        assert engine.prefill_batch == 8 and engine.prefill_delay_s == 0.15
        # the long request must still be decoding when the delay ends (else admitting the late ones at once is
        # right): 5 ms per step makes its 40 steps outlast the delay on any machine, however fast the pico model
        decode = engine._decode

        def slow_decode():
            time.sleep(0.005)
            decode()

        engine._decode = slow_decode
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(_complete, url, "lowrank", PROMPTS[0], 40)
            t0 = time.monotonic()
            while engine.steps < 2 and time.monotonic() - t0 < 30:
                time.sleep(0.001)
            steps, t1 = engine.steps, time.monotonic()
            late = [pool.submit(_complete, url, m, PROMPTS[2]) for m in ("dare", "raw")]
            got = [f.result() for f in late]
            waited = time.monotonic() - t1
            assert first.result() == long_ref
        assert got == [refs["dare"][2], refs["raw"][2]]
        assert waited >= 0.15  # neither was admitted before the delay (two waiting are fewer than 8)
        assert engine.steps > steps  # the running row kept decoding meanwhile
