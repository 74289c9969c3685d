"""Through real HTTP: the paper methods' deltas (delta-come: quantized factors; deltadq: its own sparse codec) served
in one mixed batch with the base equal their merged models token for token. Skipped for a method whose module is
absent. Their fine-tunes touch a few tensors only, to keep compression fast on CPU."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.methods import METHODS
from deltapack.serve.testing import greedy_reference, merged_model, running_server, to_float32

PAPER = {"delta-come": {"quantizer": "rtn"}, "deltadq": {"calibrate": False}}
SKIP = ("layers.1", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head", "norm")  # leaves q_proj, down_proj, embed
PROMPTS = [[3, 9, 27, 81], [100, 50, 25, 12, 6, 3]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    present = [m for m in PAPER if m in METHODS]
    if not present:
        pytest.skip("no paper method module present")
    d = tmp_path_factory.mktemp("serve_methods")
    make_llama(d / "base", hidden=64, vocab=128, dtype=torch.float32)
    deltas, refs = {}, {}
    for i, m in enumerate(present):
        make_finetune(d / "base", d / f"ft_{m}", scale=0.8, seed=30 + i, skip=SKIP)
        to_float32(d / f"ft_{m}")
        deltas[m] = api.compress(d / "base", d / f"ft_{m}", d / f"delta_{m}", method=m, ratio=2.0, params=PAPER[m], progress=False)
        model = merged_model(d / "base", deltas[m])
        refs[m] = [greedy_reference(model, p, 6) for p in PROMPTS]
    return d, deltas, refs


def test_paper_methods_in_one_batch(setup):
    d, deltas, refs = setup
    codecs = {m: {r["codec"] for r in api.inspect(p)["tensors"]} for m, p in deltas.items()}
    if "delta-come" in codecs:
        assert "factors" in codecs["delta-come"]
    jobs = [(m, i) for m in list(deltas) + ["base"] for i in range(len(PROMPTS))]

    def call(m, i):
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": m, "prompt": PROMPTS[i], "max_tokens": 6, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with running_server(d / "base", list(deltas.items()), max_batch=16) as (state, url):
        state.tiers.lock.acquire()  # queue every request before the engine's next step: one mixed batch
        try:
            with ThreadPoolExecutor(len(jobs)) as pool:
                futs = {pool.submit(call, m, i): (m, i) for m, i in jobs}
                t0 = time.monotonic()
                while state.engine.snapshot()["waiting"] < len(jobs) and time.monotonic() - t0 < 30:
                    time.sleep(0.01)
                state.tiers.lock.release()
                got = {futs[f]: f.result() for f in futs}
        except BaseException:
            if state.tiers.lock.held_by_me():
                state.tiers.lock.release()
            raise
        for (m, i), toks in got.items():
            if m != "base":
                assert toks == refs[m][i], (m, i)
        assert state.engine.max_tenants_in_step == len(deltas) + 1
